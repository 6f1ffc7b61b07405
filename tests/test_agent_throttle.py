"""The throttle, the rate limiter actor (agent/pipeline/throttle.py), between the recorder and the uplink."""

from __future__ import annotations

import trio
import trio.testing

from agent.pipeline.messages import Finished, RecordBatch
from agent.pipeline.throttle import limit


async def _run(rate: float | None, messages: list[object], spacing: float = 0.0) -> list[tuple[float, object]]:
    to_limiter, inbox = trio.open_memory_channel[object](64)
    out, received = trio.open_memory_channel[object](64)
    got: list[tuple[float, object]] = []

    async def limiter() -> None:
        with out:
            await limit(inbox, out.send, rate)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(limiter)
        with to_limiter:
            for message in messages:
                await to_limiter.send(message)
                await trio.sleep(spacing)
        async for message in received:
            got.append((trio.current_time(), message))
    return got


async def test_limiter_without_a_rate_forwards_everything_in_order() -> None:
    messages = [RecordBatch(1, 5), RecordBatch(6, 6), Finished("succeeded", 0)]
    got = await _run(None, messages)  # type: ignore[arg-type]
    assert [m for _, m in got] == messages


async def test_limiter_paces_records_and_finished_comes_last(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    got = await _run(100, [RecordBatch(1, 500), Finished("failed", 1)])  # type: ignore[arg-type]
    batches = [m for _, m in got if isinstance(m, RecordBatch)]
    # Released a bucket (one second of tokens) at a time, contiguous, all of them.
    assert batches[0] == RecordBatch(1, 100)
    assert all(b.count <= 100 for b in batches)
    assert [s for b in batches for s in range(b.first_seq, b.last_seq + 1)] == list(range(1, 501))
    assert got[-1][1] == Finished("failed", 1)
    took = got[-1][0] - start
    assert 3.9 <= took <= 4.1, took  # 100 at once (a full bucket), 400 more at 100/s


async def test_limiter_keeps_reading_while_it_waits(autojump_clock: trio.testing.MockClock) -> None:
    """Batches arriving while tokens are short merge into one: the recorder
    (and so the command) is never held up by the limit."""
    to_limiter, inbox = trio.open_memory_channel[object](1)
    out, received = trio.open_memory_channel[object](64)

    async def limiter() -> None:
        with out:
            await limit(inbox, out.send, 10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(limiter)
        start = trio.current_time()
        with to_limiter:
            for seq in range(1, 201):
                await to_limiter.send(RecordBatch(seq, seq))
        assert trio.current_time() - start < 0.01, "sending 200 batches into a 1-slot channel never waited"
        got = [m async for m in received]
    assert [s for b in got for s in range(b.first_seq, b.last_seq + 1)] == list(range(1, 201))  # type: ignore[attr-defined]
    assert len(got) < 50
