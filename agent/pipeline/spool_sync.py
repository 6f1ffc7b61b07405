"""The spool's fsync timer: not an actor (it has no inbox), a loop the run's
nursery owns, so records are durable within SYNC_INTERVAL of being spooled
without an fsync per append. A segment filled up is synced at once, not at
the next tick: a command that writes fast leaves at most the last segment
to sync when it ends."""

from __future__ import annotations

import trio

from agent.spool.spool import Spool

SYNC_INTERVAL = 1.0


async def sync_every(spool: Spool, interval: float = SYNC_INTERVAL) -> None:
    while True:
        with trio.move_on_after(interval):
            await spool.segment_retired()
        await spool.sync()
        spool.save_watermark()
