"""Records and reads the store tests share."""

from __future__ import annotations

import datetime as dt

from hub.store.base import Incoming, LogQuery
from keruta.timefmt import format_ts

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def ts(second: float) -> str:
    return format_ts(T0 + dt.timedelta(seconds=second))


def rec(
    seq: int | None,
    message: str | None = None,
    *,
    task: str = "t1",
    at: float | None = None,
    source: str = "stdout",
    level: str = "INFO",
    **extra: object,
) -> Incoming:
    return Incoming(
        task_id=task,
        seq=seq,
        timestamp=ts(at if at is not None else (seq or 0)),
        source=source,
        level=level,
        message=message if message is not None else f"line {seq}",
        **extra,  # type: ignore[arg-type]
    )


async def all_seqs(store, task: str = "t1", **filters) -> list[int]:  # type: ignore[no-untyped-def]
    """Every seq of the task matching `filters`, page by page (afterSeq)."""
    seqs: list[int] = []
    while True:
        cursor = {**filters, "after_seq": seqs[-1]} if seqs else filters
        page = await store.query(LogQuery(task_id=task, size=10_000, **cursor))
        seqs += [r.seq for r in page.content]
        if len(page.content) < 10_000:
            return seqs
