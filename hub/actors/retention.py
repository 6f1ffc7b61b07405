"""The retention actor: deletes records older than the configured age, periodically."""

from __future__ import annotations

import datetime as dt
import logging

import trio

from hub.store.base import Store, StoreUnavailable
from keruta.backoff import Backoff
from keruta.supervisor import supervise
from keruta.timefmt import format_ts

log = logging.getLogger("keruta.hub.retention")


def cutoff(now: dt.datetime, days: float) -> str:
    return format_ts(now - dt.timedelta(days=days))


async def _passes(store: Store, days: float, interval: float) -> None:
    while True:
        deleted = await store.delete_older_than(cutoff(dt.datetime.now(dt.UTC), days))
        if deleted:
            log.info("retention deleted %d records older than %s days", deleted, days)
        await trio.sleep(interval)


async def run_retention(store: Store, days: float, interval: float) -> None:
    # A store outage during a pass is waited out like everywhere else in the
    # hub: the pass is tried again after a backoff, and the hub never ends
    # for it. Anything else is a bug and propagates.
    await supervise(
        lambda: _passes(store, days, interval),
        name="retention",
        backoff=Backoff(initial=1.0, cap=min(60.0, max(1.0, interval))),
        max_restarts=None,
        healthy_after=min(60.0, interval),
        recoverable=(StoreUnavailable,),
    )
