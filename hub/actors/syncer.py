"""The syncer actor: answers writers once what they wrote is durable.

The writer commits a batch, hands it to live viewers, and passes whom to tell
here. The syncer makes everything committed so far survive a power cut with
one `Store.sync` for all that is waiting (group fsync), then answers them, in
commit order: each connection gets one message (hub/messages.py `Written`)
for all its writes that sync covers, so its acks go out coalesced. So the disk is out of the live path (viewers see a committed
record at once) but never out of an acknowledgement's (docs/durability.md),
and the writer commits the next batch while the disk catches up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import attrs
import trio

from hub.messages import WriteOutcome, WriteRequest, answer
from hub.store.base import Store
from keruta.channels import receive_now

# Committed batches waiting for their sync; past this the writer waits, and
# with it everything upstream.
SYNC_QUEUE = 64


@attrs.frozen
class Settled:
    """The answers of one committed batch, to give once it is durable."""

    answers: Sequence[tuple[WriteRequest, WriteOutcome]]


async def run_syncer(store: Store, inbox: trio.MemoryReceiveChannel[Settled]) -> None:
    """Serve until the inbox is closed and drained.

    Store.sync's DurabilityLost is not caught: after a failed fsync nothing
    committed since the last good one may be acknowledged, so the hub stops.

    After answering, the store's upkeep (a WAL checkpoint) is asked of a task
    beside this one, so the next answers do not wait for it: a poke in a
    one-place channel, dropped when one is already waiting.
    """
    poke, pokes = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_upkeep, store, pokes)
        with poke:
            async for first in inbox:
                waiting = [first]
                while (more := receive_now(inbox)) is not None:
                    waiting.append(more)
                await store.sync()
                # One message per connection for everything this sync made durable.
                answer([pair for settled in waiting for pair in settled.answers])
                with contextlib.suppress(trio.WouldBlock):
                    poke.send_nowait(None)


async def _upkeep(store: Store, pokes: trio.MemoryReceiveChannel[None]) -> None:
    async for _ in pokes:
        await store.upkeep()
