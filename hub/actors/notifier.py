"""The notifier actor (PostgreSQL): commits made by other hubs reach our subscribers.

A notice says "task T is durable up to S" (or "T's state changed", or "T's
records at these seqs were rewritten in place": hub/rewrites.py); the
subscribers' catch-up reads the rows from the store, which stays the single
source of truth. A lost or overflowed notice, or a lost LISTEN connection,
costs latency, never data: after each we re-read the watermarks we follow.

While the LISTEN connection is down, other hubs' records do not reach our
viewers, so reconnecting is worth trying often: the waits stay short (up to
LISTEN_RETRY's cap), and a session that is listening and caught up starts
the count of failures over. The link being judged dead and coming back are
logged once each; the attempts in between after 2, 4, 8... of them. An
error that is not an outage is logged with its traceback and the notifier
restarted too: it never ends the hub.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from hub.actors.broadcaster import Broadcaster
from hub.store.base import REDACTED, Listens, Rewrite, StoreUnavailable
from hub.store.postgres import STATUS_NOTICE
from keruta.backoff import Backoff
from keruta.retry import Failures, retry

log = logging.getLogger("keruta.hub.notifier")

# Waits between attempts to listen again; a refused connection costs little.
LISTEN_RETRY = Backoff(initial=0.1, cap=1.0)


async def _catch_up_all(store: Listens, broadcaster: Broadcaster) -> None:
    """Re-read what notices may have said meanwhile: watermarks and states."""
    for task_id in list(broadcaster.subs):
        task = await store.task(task_id)
        if task is not None:
            broadcaster.notify_durable(task_id, task.durable_seq)
            broadcaster.publish_status(task)


async def _rewritten(store: Listens, broadcaster: Broadcaster, rewrite: Rewrite) -> None:
    """Another hub's rewrite, to this hub's viewers as that hub gave it to its own."""
    if rewrite.kind == REDACTED:
        broadcaster.publish_redacted(rewrite.task_id, list(rewrite.seqs))
        return
    wanted = set(rewrite.seqs)
    low, high = min(wanted), max(wanted)
    records = await store.read_range(rewrite.task_id, low - 1, high, high - low + 1, None, None)
    broadcaster.publish_replaced(rewrite.task_id, [r for r in records if r.seq in wanted])


async def _listen_session(store: Listens, broadcaster: Broadcaster, listening: Callable[[], None]) -> None:
    # Our own commits reach our subscribers through the writer; only other
    # hubs' notices matter here.
    async with store.listen(ignore_own=True) as notices:
        await _catch_up_all(store, broadcaster)
        listening()
        async for notice in notices:
            if notice is None:
                await _catch_up_all(store, broadcaster)
                continue
            if isinstance(notice, Rewrite):
                if notice.task_id in broadcaster.subs:
                    await _rewritten(store, broadcaster, notice)
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


async def run_notifier(store: Listens, broadcaster: Broadcaster, *, backoff: Backoff = LISTEN_RETRY) -> None:
    failures = Failures()
    lost_at: float | None = None

    def listening() -> None:
        nonlocal lost_at
        failures.reset()
        if lost_at is not None:
            log.warning(
                "notifier: the LISTEN connection is back after %.1f s; viewers caught up",
                trio.current_time() - lost_at,
            )
            lost_at = None

    def failed(count: int, error: BaseException, wait: float) -> None:
        nonlocal lost_at
        if not isinstance(error, StoreUnavailable | OSError):
            # Not an outage: a bug, or a database error nobody classified. The
            # viewers of other hubs' records wait for it, the rest of the hub
            # serves on; said loudly, with its traceback, every time.
            log.error(
                "notifier failed (%d in a row) on an error that is not an outage; restarting in %.2f s",
                count, wait, exc_info=error,
            )
            return
        if lost_at is None:
            lost_at = trio.current_time()
            log.warning(
                "notifier: the LISTEN connection is judged dead (%s); other hubs' records "
                "reach this hub's viewers again once it is back; reconnecting",
                error,
            )
            return
        # Tries come every second while the database is away: say so after
        # 2, 4, 8... of them, not every time.
        level = logging.WARNING if count & (count - 1) == 0 else logging.INFO
        log.log(
            level, "notifier failed (%d in a row): %s: %s; restarting in %.2f s",
            count, type(error).__name__, error, wait,
        )

    await retry(
        lambda: _listen_session(store, broadcaster, listening),
        backoff=backoff,
        retryable=(Exception,),
        on_failure=failed,
        failures=failures,
    )
