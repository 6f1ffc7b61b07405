"""What both stores do to a batch besides I/O: seqs, de-duplication, tallies.

Plain functions over plain data, so the SQLite and PostgreSQL stores agree on
every rule and tests can drive the rules without a database.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
import orjson

from hub.store.base import Incoming, LogQuery, LogStats, record_id
from keruta.records import InvalidField, LogRecord, TaskInfo

T = TypeVar("T")

# "Up to the end" for range reads: every seq the stores can hold (int64).
SEQ_MAX = 2**63 - 1


@attrs.define
class TaskProgress:
    """A task's row as the running append transaction sees it, plus what the
    batch adds to it."""

    max_seq: int  # highest seq ever stored (kept through deletes)
    durable_seq: int
    exists: bool = True
    batch_max: int = 0
    seen: set[int] = attrs.field(factory=set)
    # Over the rows this batch actually inserts:
    count: int = 0
    first_ts: str | None = None
    last_ts: str | None = None
    inserted_seqs: list[int] = attrs.field(factory=list)
    counts: dict[tuple[str, str], int] = attrs.field(factory=lambda: defaultdict(int))

    @property
    def inserted_max(self) -> int:
        return max(self.inserted_seqs, default=0)

    def durable_through_batch(self) -> tuple[int, bool]:
        """Advance the watermark through the seqs this batch inserted.

        Returns the new value and whether stored rows may carry it further
        (the store then walks on from there). After a commit `durable_seq + 1`
        is never stored, so a batch that did not insert it moves nothing; and
        nothing is stored above the highest seq ever stored.
        """
        seqs = sorted(s for s in self.inserted_seqs if s > self.durable_seq)
        if not seqs or seqs[0] != self.durable_seq + 1:
            return self.durable_seq, False
        durable, _ = advance(self.durable_seq, seqs)
        return durable, durable < max(self.max_seq, seqs[-1])


@attrs.define
class Plan:
    records: list[LogRecord]  # one per item, in input order
    fresh: list[LogRecord]  # the first of each key in the batch
    maybe_stored: list[LogRecord]  # fresh records whose seq may already be stored


def plan_batch(items: Sequence[Incoming], progress: dict[str, TaskProgress]) -> Plan:
    """Give every item its seq and id, and find which could be new.

    `progress` holds every task of the batch. A `None` seq gets one more than
    the highest seq stored or seen earlier in the batch. Raises InvalidField
    for a record that breaks the contract.
    """
    records: list[LogRecord] = []
    fresh: list[LogRecord] = []
    maybe_stored: list[LogRecord] = []
    for item in items:
        task = progress[item.task_id]
        seq = item.seq
        if seq is None:
            seq = max(task.max_seq, task.batch_max) + 1
        record = LogRecord(
            task_id=item.task_id,
            seq=seq,
            timestamp=item.timestamp,
            source=item.source,
            level=item.level,
            message=item.message,
            line_number=item.line_number,
            metadata=item.metadata,
            partial=item.partial,
            id=record_id(item.task_id, seq),
        )
        records.append(record)
        task.batch_max = max(task.batch_max, seq)
        if seq in task.seen:
            continue
        task.seen.add(seq)
        fresh.append(record)
        if seq <= task.max_seq:
            maybe_stored.append(record)
    return Plan(records=records, fresh=fresh, maybe_stored=maybe_stored)


def tally(inserted: Iterable[LogRecord], progress: dict[str, TaskProgress]) -> None:
    for r in inserted:
        task = progress[r.task_id]
        task.count += 1
        task.counts[(r.source, r.level)] += 1
        if task.first_ts is None or r.timestamp < task.first_ts:
            task.first_ts = r.timestamp
        if task.last_ts is None or r.timestamp > task.last_ts:
            task.last_ts = r.timestamp
        task.inserted_seqs.append(r.seq)


def advance(durable: int, seqs: Iterable[int]) -> tuple[int, bool]:
    """Step `durable` through ascending `seqs` while they follow on; return the
    new value and whether the run went on to the end of `seqs`."""
    for seq in seqs:
        if seq != durable + 1:
            return durable, False
        durable = seq
    return durable, True


def metadata_json(metadata: dict) -> str | None:
    return orjson.dumps(metadata).decode() if metadata else None


def metadata_from_json(text: str | None) -> dict:
    return orjson.loads(text) if text else {}


def record_from_row(row: Sequence[Any]) -> LogRecord:
    """A record from a row in both stores' column order:
    task_id, seq, id, ts, source, level, message, line_number, metadata, partial."""
    task_id, seq, id_, ts, source, level, message, line_number, metadata, partial = row
    return LogRecord(
        task_id=task_id,
        seq=seq,
        timestamp=ts,
        source=source,
        level=level,
        message=message,
        line_number=line_number,
        metadata=metadata_from_json(metadata),
        partial=bool(partial),
        id=id_,
    )


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
    task_id, state, exit_code, first_ts, last_ts, total, durable, updated_at = row
    return TaskInfo(
        task_id=task_id,
        state=state,
        exit_code=exit_code,
        first_timestamp=first_ts,
        last_timestamp=last_ts,
        total_logs=total,
        durable_seq=durable,
        updated_at=updated_at,
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


def chunks(values: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def check_page(query: LogQuery) -> None:
    if type(query.page) is not int or query.page < 0:
        raise InvalidField("page", "must be an integer >= 0")
    if type(query.size) is not int or query.size < 1:
        raise InvalidField("size", "must be an integer >= 1")
