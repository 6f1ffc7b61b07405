"""The notifier actor (PostgreSQL): commits made by other hubs reach our subscribers.

A notice only says "task T is durable up to S" (or "T's state changed"); the
subscribers' catch-up reads the rows from the store, which stays the single
source of truth. A lost or overflowed notice, or a lost LISTEN connection,
costs latency, never data: after each we re-read the watermarks we follow.
"""

from __future__ import annotations

import logging

from hub.actors.broadcaster import Broadcaster
from hub.store.base import Listens, StoreUnavailable
from hub.store.postgres import STATUS_NOTICE
from keruta.backoff import Backoff
from keruta.supervisor import supervise

log = logging.getLogger("keruta.hub.notifier")


async def _catch_up_all(store: Listens, broadcaster: Broadcaster) -> None:
    """Re-read what notices may have said meanwhile: watermarks and states."""
    for task_id in list(broadcaster.subs):
        task = await store.task(task_id)
        if task is not None:
            broadcaster.notify_durable(task_id, task.durable_seq)
            broadcaster.publish_status(task)


async def _listen_session(store: Listens, broadcaster: Broadcaster) -> None:
    # Our own commits reach our subscribers through the writer; only other
    # hubs' notices matter here.
    async with store.listen(ignore_own=True) as notices:
        await _catch_up_all(store, broadcaster)
        async for notice in notices:
            if notice is None:
                await _catch_up_all(store, broadcaster)
                continue
            task_id, seq = notice
            if task_id not in broadcaster.subs:
                continue
            if seq == STATUS_NOTICE:
                task = await store.task(task_id)
                if task is not None:
                    broadcaster.publish_status(task)
            else:
                broadcaster.notify_durable(task_id, seq)


async def run_notifier(store: Listens, broadcaster: Broadcaster) -> None:
    await supervise(
        lambda: _listen_session(store, broadcaster),
        name="notifier",
        backoff=Backoff(initial=0.5, cap=10.0),
        max_restarts=None,
        healthy_after=30.0,
        recoverable=(StoreUnavailable, OSError),
    )
