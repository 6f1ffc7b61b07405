"""The retention actor: deletes records older than the configured age, periodically."""

from __future__ import annotations

import datetime as dt
import logging

import trio

from hub.store.base import Store, StoreUnavailable
from keruta.timefmt import format_ts

log = logging.getLogger("keruta.hub.retention")


def cutoff(now: dt.datetime, days: float) -> str:
    return format_ts(now - dt.timedelta(days=days))


async def run_retention(store: Store, days: float, interval: float) -> None:
    while True:
        try:
            deleted = await store.delete_older_than(cutoff(dt.datetime.now(dt.UTC), days))
        except StoreUnavailable as exc:
            log.warning("retention skipped: store unavailable (%s)", exc)
        else:
            if deleted:
                log.info("retention deleted %d records older than %s days", deleted, days)
        await trio.sleep(interval)
