"""Rows to answers, in the column order both stores share.

Tasks: task_id, state, exit_code, first_ts, last_ts, total_logs, durable_seq,
updated_at (hub/store/steps.py TASK_SELECT).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from hub.store.base import LogStats
from keruta.records import LogRecord, TaskInfo

T = TypeVar("T")

# "Up to the end" for range reads: every seq the stores can hold (int64).
SEQ_MAX = 2**63 - 1


def stats_from_rows(
    task_id: str,
    task_row: Sequence[Any] | None,
    counts: Iterable[tuple[str, str, int]],
) -> LogStats:
    """Stats from the task row (total, first_ts, last_ts, updated_at) and the
    per (source, level) counts, as both stores keep them."""
    by_source: dict[str, int] = defaultdict(int)
    by_level: dict[str, int] = defaultdict(int)
    for source, level, n in counts:
        by_source[source] += n
        by_level[level] += n
    total, first, last, updated = task_row if task_row else (0, None, None, None)
    return LogStats(
        task_id=task_id,
        total_logs=total,
        log_counts=dict(by_source),
        level_counts=dict(by_level),
        start=first,
        end=last,
        last_updated=updated or last,
    )


def task_from_row(row: Sequence[Any]) -> TaskInfo:
    """Task info from: task_id, state, exit_code, first_ts, last_ts, total, durable, updated_at."""
    task_id, state, exit_code, first_ts, last_ts, total, durable, updated_at, verdict = row
    return TaskInfo(
        task_id=task_id,
        state=state,
        exit_code=exit_code,
        first_timestamp=first_ts,
        last_timestamp=last_ts,
        total_logs=total,
        durable_seq=durable,
        updated_at=updated_at,
        verdict=verdict or "unverified",
    )


async def iter_by_range(
    read_range: Callable[[str, int, int, int], Awaitable[list[LogRecord]]],
    task_id: str,
    chunk: int,
) -> AsyncIterator[list[LogRecord]]:
    after = 0
    while True:
        records = await read_range(task_id, after, SEQ_MAX, chunk)
        if not records:
            return
        yield records
        if len(records) < chunk:
            return
        after = records[-1].seq
