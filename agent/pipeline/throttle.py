"""The throttle: the rate limiter actor (--rate-limit): lets spooled records on to the uplink
no faster than `rate` records per second.

It owns the receive end of the recorder's output. It never stops reading it:
batches that arrive while it waits for tokens are merged into the one it
holds, so the recorder (and so the command) never waits on it. Each release
is at most a bucket's worth (`burst`, one second of tokens by default), so a
backlog goes out as a steady stream rather than in one late burst. Records a
reconnecting uplink sends again are not counted again: the limit is on new
records reaching the hub. Without a rate it only forwards (the agent
starts none then: the recorder hands its batches to the delivery itself).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from agent.pipeline.messages import Finished, RecordBatch, SpooledMessage
from keruta.ratelimit import TokenBucket


async def limit(
    inbox: trio.MemoryReceiveChannel[SpooledMessage],
    deliver: Callable[[SpooledMessage], Awaitable[None]],
    rate: float | None,
    burst: float | None = None,
    clock: Callable[[], float] = trio.current_time,
) -> None:
    with inbox:
        if not rate:
            async for message in inbox:
                await deliver(message)
            return
        bucket = TokenBucket(rate, burst if burst else max(1.0, rate))
        chunk = max(1, int(bucket.burst))
        held: RecordBatch | None = None  # arrived, no tokens taken yet
        reserved: RecordBatch | None = None  # tokens taken, goes out at `due`
        due = 0.0
        finished: Finished | None = None
        closed = False
        while True:
            if reserved is None and held is not None:
                take = min(held.count, chunk)
                reserved = RecordBatch(held.first_seq, held.first_seq + take - 1)
                held = None if take == held.count else RecordBatch(reserved.last_seq + 1, held.last_seq)
                due = clock() + bucket.take(take, clock())
            if reserved is not None and clock() >= due:
                await deliver(reserved)
                reserved = None
                continue
            if reserved is None and finished is not None:
                await deliver(finished)
                finished = None
            if closed and reserved is None and held is None:
                return
            with trio.move_on_at(due if reserved is not None else float("inf")):
                if closed:
                    await trio.sleep_forever()
                try:
                    message = await inbox.receive()
                except trio.EndOfChannel:
                    closed = True
                    continue
                if isinstance(message, Finished):
                    finished = message
                else:
                    held = message if held is None else held.merged(message)
