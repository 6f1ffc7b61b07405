"""The rules both stores share: identities and seqs, tallies, states, pages.

Plain functions over plain data, so the SQLite and PostgreSQL stores agree on
every rule and tests can drive the rules without a database.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, TypeVar

import attrs

from hub.store.accounts import carried_accounts
from hub.store.base import (
    ANONYMOUS,
    CONFLICT,
    DUPLICATE,
    FULL,
    GAP,
    INSERTED,
    AppendResult,
    Incoming,
    LogQuery,
    hub_made,
)
from hub.store.chunk import ChunkRow, source_level_counts
from keruta.levels import LEVELS
from keruta.limits import MAX_SEQ
from keruta.records import (
    HUB_KINDS,
    KINDS,
    SOURCES,
    TASK_ID_RULE,
    InvalidField,
    LogRecord,
    trusted_record,
    trusted_run,
    valid_task_id,
)

T = TypeVar("T")


@attrs.define
class TaskProgress:
    """A task's row as the running append transaction sees it, plus what the
    batch adds to it."""

    max_seq: int  # highest seq ever given (kept through deletes)
    durable_seq: int
    exists: bool = True
    batch_max: int = 0
    # Over the rows this batch actually inserts:
    count: int = 0
    first_ts: str | None = None
    last_ts: str | None = None
    inserted_max: int = 0
    counts: dict[tuple[str, str], int] = attrs.field(factory=lambda: defaultdict(int))
    # The UTF-8 bytes of the messages stored before the batch, and those it adds;
    # the cap the task's agent asked for (None: none).
    stored_bytes: int = 0
    bytes: int = 0
    max_bytes: int | None = None

    def room(self) -> int:
        """How many more seqs the task may give (up to MAX_SEQ). A task
        numbered before task seqs were the hub's (a client's seq taken as
        one: schema v2 and before) may have reached it, or int64's end."""
        return max(0, MAX_SEQ - max(self.max_seq, self.batch_max))

    def next_seqs(self, count: int) -> int:
        """Take the task's next `count` seqs; return the first."""
        first = max(self.max_seq, self.batch_max) + 1
        self.batch_max = first + count - 1
        return first

    def add_chunk(self, row: ChunkRow) -> None:
        """The batch stores this chunk of the task's new records (`tally`,
        from what the chunk already counted)."""
        self.count += row.n
        self.bytes += row.bytes
        counts = self.counts
        for key, n in row.counts.items():
            counts[key] += n
        if self.first_ts is None or row.ts_first < self.first_ts:
            self.first_ts = row.ts_first
        if self.last_ts is None or row.ts_last > self.last_ts:
            self.last_ts = row.ts_last
        if row.seq_last > self.inserted_max:
            self.inserted_max = row.seq_last

    def durable_after_batch(self) -> int:
        """The watermark after the batch commits: the hub gives every seq
        itself, in order and under the task's lock, so every seq up to the
        highest stored is stored."""
        return max(self.durable_seq, self.max_seq, self.inserted_max)


@attrs.define
class ProducerProgress:
    """A producer of a task, as the append transaction sees it."""

    high: int  # its highest seq stored; every one of its seqs below is stored too
    # Its stored range ending at `high` (first producer seq, first task seq), if
    # any: a run that continues it in both numberings extends that row instead
    # of adding one (a quiet producer sends a record a commit).
    last_range: tuple[int, int] | None = None
    # Ranges this batch adds: [first producer seq, last producer seq, first task seq].
    new_ranges: list[list[int]] = attrs.field(factory=list)
    # Whether new_ranges[0] is the stored last range, extended (saved by UPDATE).
    extends_stored: bool = False

    def range_of(self, pseq: int, stored: Sequence[Sequence[int]]) -> int | None:
        """The task seq the producer's record `pseq` was stored under, if known."""
        for first, last, seq_first in (*stored, *self.new_ranges):
            if first <= pseq <= last:
                return seq_first + pseq - first
        return None

    def take_run(self, first: int, last: int, seq: int) -> None:
        """Its records `first`..`last` are stored under task seqs from `seq` on by this batch."""
        if not self.new_ranges and self.last_range is not None:
            stored_first, stored_seq = self.last_range
            if self.high + 1 == first and stored_seq + (first - stored_first) == seq:
                self.new_ranges.append([stored_first, self.high, stored_seq])
                self.extends_stored = True
        self.high = last
        previous = self.new_ranges[-1] if self.new_ranges else None
        if previous is not None and previous[1] + 1 == first and previous[2] + (first - previous[0]) == seq:
            previous[1] = last
        else:
            self.new_ranges.append([first, last, seq])


@attrs.define
class Plan:
    records: list[LogRecord | None]  # one per item, in input order
    status: list[str]  # one per item; PENDING until `resolve`
    # Indexes of the items whose fate depends on what is stored: records at or
    # below their producer's high mark, sent before.
    lookups: list[int] = attrs.field(factory=list)
    # (task_id, producer) -> (lowest, highest) producer seq among the lookups.
    producer_lookups: dict[tuple[str, str], list[int]] = attrs.field(factory=dict)
    items: Sequence[Incoming] = ()

    def result(
        self,
        inserted: list[LogRecord],
        durable: dict[str, int],
        producers: dict[tuple[str, str], ProducerProgress],
    ) -> AppendResult:
        return AppendResult(
            records=self.records,
            inserted=inserted,
            durable=durable,
            status=self.status,
            producers={key: run.high for key, run in producers.items()},
        )

    def inserted(self) -> list[LogRecord]:
        status = self.status
        if status.count(INSERTED) == len(status):
            # The usual batch, counted in C: every record new.
            return list(self.records)  # type: ignore[arg-type]
        return [r for r, s in zip(self.records, status, strict=True) if s == INSERTED and r is not None]

    def seqs_to_read(
        self, ranges: dict[tuple[str, str], list[Sequence[int]]], producers: dict[tuple[str, str], ProducerProgress]
    ) -> dict[str, list[int]]:
        """task_id -> stored seqs `resolve` must compare with, given the producers' ranges."""
        wanted: dict[str, set[int]] = defaultdict(set)
        for i in self.lookups:
            item = self.items[i]
            key = (item.task_id, item.producer)
            assert item.seq is not None
            seq = producers[key].range_of(item.seq, ranges.get(key, ()))
            if seq is not None:
                wanted[item.task_id].add(seq)
        return {task_id: sorted(seqs) for task_id, seqs in wanted.items()}


PENDING = "pending"


def same_record(a: LogRecord, b: LogRecord) -> bool:
    """Whether a resent record is the one stored. The timestamp is left out: the
    hub stamps a REST record that has none, so a retried POST differs there."""
    return (
        a.message == b.message
        and a.source == b.source
        and a.level == b.level
        and a.line_number == b.line_number
        and a.partial == b.partial
        and a.metadata == b.metadata
        and a.kind == b.kind
    )


def _record(item: Incoming, seq: int) -> LogRecord:
    return _records([item], seq)[0]


def plan_batch(
    items: Sequence[Incoming],
    progress: dict[str, TaskProgress],
    producers: dict[tuple[str, str], ProducerProgress],
) -> Plan:
    """Give every new record the next task seq and its id, and decide what can
    be decided without reading rows; the rest is in `lookups`, for `resolve`.

    `progress` holds every task of the batch, `producers` every (task,
    producer) pair. A producer's record is new when it is the one after the
    producer's highest stored (a hub-made producer's: any above it); at or
    below it, it was sent before (`resolve` tells a duplicate from a
    conflict); further above, it is a GAP and is not stored. A client's seq
    never becomes a task seq.
    """
    check_items(items)
    plan = Plan(records=[], status=[], items=items)
    skip_to = 0
    for index, item in enumerate(items):
        if index < skip_to:
            continue
        key = (item.task_id, item.producer)
        run = producers[key]
        pseq = item.seq
        if pseq is None:
            raise ValueError("a record reaches the store with its identity: the writer numbers seq-less ones")
        if pseq < 1:
            raise InvalidField("seq", "must be an integer >= 1 (the producer's own)")
        if pseq <= run.high:
            plan.records.append(None)
            plan.status.append(PENDING)
            plan.lookups.append(index)
            bounds = plan.producer_lookups.setdefault(key, [pseq, pseq])
            bounds[0] = min(bounds[0], pseq)
            bounds[1] = max(bounds[1], pseq)
            continue
        if pseq != run.high + 1 and not hub_made(item.producer):
            plan.records.append(None)
            plan.status.append(GAP)
            continue
        # The usual batch is runs of one producer's next seqs: each run is
        # given its task seqs and its range at once.
        end = _run_end(items, index)
        count = end - index
        task = progress[item.task_id]
        # Never a seq past MAX_SEQ: what does not fit is refused (the next
        # turn finds no room for it), the producer's mark left below it.
        room = task.room()
        if 0 < room < count:
            count, end = room, index + room
        skip_to = end
        if not room:
            plan.records.extend([None] * count)
            plan.status.extend([FULL] * count)
            continue
        first = task.next_seqs(count)
        run.take_run(pseq, pseq + count - 1, first)
        if count == 1 and not hub_made(item.producer):
            # A fleet's commit: a run of one record per producer, built inline.
            plan.records.append(
                trusted_record(
                    item.task_id, first, item.timestamp, item.source, item.level, item.message, item.line_number,
                    item.metadata, item.partial, None, item.kind, item.producer,
                )
            )
            plan.status.append(INSERTED)
        else:
            plan.records.extend(_records(items[index:end], first))
            plan.status.extend([INSERTED] * count)
    return plan


_SOURCES = frozenset(SOURCES)
_LEVELS = frozenset(LEVELS)
_KINDS = frozenset((None, *KINDS))


def check_items(items: Sequence[Incoming]) -> None:
    """What a stored record must be (keruta.records' validators), checked
    once per batch: the store builds its records without running them again,
    and a bad item rolls the whole batch back."""
    for item in items:
        if item.source not in _SOURCES or item.level not in _LEVELS or item.kind not in _KINDS:
            # The validators say which field, and how.
            LogRecord(item.task_id, 1, item.timestamp, item.source, item.level, "", None, {}, False, None, item.kind)
        line = item.line_number
        if line is not None and (type(line) is not int or not 0 <= line <= MAX_SEQ):
            raise InvalidField("lineNumber", f"must be an integer between 0 and {MAX_SEQ}")
    for task_id in {item.task_id for item in items}:
        if not valid_task_id(task_id):
            raise InvalidField("taskId", f"must be {TASK_ID_RULE}")


def _run_end(items: Sequence[Incoming], start: int) -> int:
    """Where the run of one producer's consecutive seqs that starts at `start` ends."""
    first = items[start]
    task_id, producer, pseq = first.task_id, first.producer, first.seq
    assert pseq is not None
    # By index, no slice: a fleet's commit is a run per item, and a copy of
    # the rest of the batch per run was quadratic in its size.
    end = start + 1
    count = len(items)
    while end < count:
        item = items[end]
        pseq += 1
        if item.seq != pseq or item.producer != producer or item.task_id != task_id:
            break
        end += 1
    return end


def answered_producer(item: Incoming) -> str | None:
    """Who wrote a record, as the hub answers it (LogRecord `producer`): the
    producer it came with; "" for a record the hub numbered (its client named
    no producer: the anonymous one); None for the hub's own record, a
    redaction's audit record (it carries accounts: docs/identity.md)."""
    if not hub_made(item.producer):
        return item.producer
    if item.kind is not None and carried_accounts(item) is not None:
        return None
    return ANONYMOUS


def _records(items: Sequence[Incoming], first: int) -> list[LogRecord]:
    """Records for a run of items of one task and producer, given seqs from `first` on."""
    task_id = items[0].task_id
    # No ids: `with_ids` gives them where a record is shown (AppendResult).
    producer = items[0].producer
    if hub_made(producer):
        return [
            trusted_record(
                task_id, first + k, item.timestamp, item.source, item.level, item.message, item.line_number,
                item.metadata, item.partial, None, item.kind, answered_producer(item),
            )
            for k, item in enumerate(items)
        ]
    return trusted_run(task_id, first, items, producer)


def resolve(
    plan: Plan,
    producers: dict[tuple[str, str], ProducerProgress],
    ranges: dict[tuple[str, str], list[Sequence[int]]],
    stored: dict[tuple[str, int], LogRecord],
) -> None:
    """Decide the looked-up items from the rows stored under their identities.

    A record whose identity holds the same record is a DUPLICATE; a different
    one is a CONFLICT. An identity at or below its producer's mark whose row is
    gone (deleted since, or its range pruned) was stored once: a DUPLICATE,
    never stored again (docs/identity.md).
    """
    if not plan.lookups:
        return
    in_batch = {
        (r.task_id, r.seq): r
        for r, s in zip(plan.records, plan.status, strict=True)
        if s == INSERTED and r is not None
    }
    for i in plan.lookups:
        item = plan.items[i]
        key = (item.task_id, item.producer)
        assert item.seq is not None
        seq = producers[key].range_of(item.seq, ranges.get(key, ()))
        if seq is None:
            plan.status[i] = DUPLICATE
            continue
        candidate = _record(item, seq)
        # Stored before, or earlier in this batch; neither: stored once and deleted since.
        held = stored.get((item.task_id, seq)) or in_batch.get((item.task_id, seq))
        if held is not None and held.kind in HUB_KINDS and held.producer is None:
            # The hub's own gap took that seq (a cap, a DELETE, retention):
            # the producer's record was stored there once and cut since.
            held = None
        plan.records[i] = held or candidate
        plan.status[i] = DUPLICATE if held is None or same_record(held, candidate) else CONFLICT


def tally(inserted: Sequence[LogRecord], progress: dict[str, TaskProgress]) -> None:
    by_task: dict[str, list[LogRecord]] = {}
    for r in inserted:
        by_task.setdefault(r.task_id, []).append(r)
    for task_id, records in by_task.items():
        task = progress[task_id]
        task.count += len(records)
        for key, n in source_level_counts([r.source for r in records], [r.level for r in records]).items():
            task.counts[key] += n
        timestamps = [r.timestamp for r in records]
        low, high = min(timestamps), max(timestamps)
        if task.first_ts is None or low < task.first_ts:
            task.first_ts = low
        if task.last_ts is None or high > task.last_ts:
            task.last_ts = high
        task.inserted_max = max(task.inserted_max, max(r.seq for r in records))


def counted_filters(query: LogQuery) -> list[tuple[str, str]] | None:
    """The (column, value) filters of a query whose total the per (source,
    level) counts answer exactly, or None when it needs counting rows."""
    if query.start is not None or query.end is not None or query.q or query.after_seq is not None:
        return None
    filters = [("source", query.source), ("level", query.level)]
    return [(column, value) for column, value in filters if value is not None]


def check_page(query: LogQuery) -> None:
    if type(query.page) is not int or query.page < 0:
        raise InvalidField("page", "must be an integer >= 0")
    if type(query.size) is not int or query.size < 1:
        raise InvalidField("size", "must be an integer >= 1")


_STATE_RANK = {"pending": 0, "running": 1, "succeeded": 2, "failed": 2}


def next_state(
    current: str | None, current_exit: int | None, state: str, exit_code: int | None
) -> tuple[str, int | None] | None:
    """The state after a status change, or None when it changes nothing.

    States only move forward: pending, running, then succeeded or failed. A
    stale `running` committed late (another hub, a resent frame) never
    overwrites a final state; one final state may replace another.
    """
    if current is not None and _STATE_RANK[state] < _STATE_RANK[current]:
        return None
    if (current, current_exit) == (state, exit_code):
        return None
    return state, exit_code


@attrs.frozen
class StateDecision:
    run: tuple[str, int | None] | None  # the run's new (state, exit code); None: unchanged
    task: tuple[str, int | None] | None  # the task's new (state, exit code); None: unchanged


def decide_state(
    task: Sequence[Any] | None,
    run: Sequence[Any] | None,
    state: str,
    exit_code: int | None,
) -> StateDecision:
    """What a status change does to a run and to its task.

    `task` is the task's (state, exit_code, run_no) or None when new; `run` the
    producer's (state, exit_code, run_no) -- a new producer's with the run_no it
    is about to get -- or None for a status without producer. A task shows the
    state of its newest run, so a late status of an older run (a retry's
    predecessor) changes only that run.
    """
    if run is None:
        if task is None:
            return StateDecision(None, (state, exit_code))
        return StateDecision(None, next_state(task[0], task[1], state, exit_code))
    run_change = next_state(run[0], run[1], state, exit_code)
    if run_change is None or (task is not None and run[2] < task[2]):
        return StateDecision(run_change, None)
    return StateDecision(run_change, run_change)
