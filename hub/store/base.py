"""The store interface both SQLite and PostgreSQL implement.

Every record comes with an identity `(task_id, producer, producer seq)`
(docs/identity.md); appending a record whose identity was stored before
changes nothing (that is how every retry stays exactly-once). The store gives
each new record the task's next seq, so a task's seqs run 1, 2, 3... with no
gap, and `durable_seq` (every seq up to it is stored) is the task's highest.
Acks and live delivery are driven by that watermark.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import attrs

from keruta.backoff import Backoff
from keruta.records import LogRecord, TaskInfo
from keruta.summary import Summary

if TYPE_CHECKING:
    from hub.answers import Verify

# Most sections one answer lists (GET .../sections `size`).
MAX_SECTIONS = 10_000

_ID_NAMESPACE = uuid.UUID("6f1c1f0e-5d47-4a4e-9f57-6b6572757461")
_ID_NAMESPACE_BYTES = _ID_NAMESPACE.bytes


class StoreUnavailable(ConnectionError):
    """The database cannot be reached or used right now; retrying later may work."""


class TaskBusy(Exception):
    """A lock another session holds (a task's row) was not had within the
    `busy_wait` asked for; nothing was changed. Not an outage."""


# Waits between attempts while the store is unavailable: the writer's commits
# (--store-retry-max caps them) and a subscription's reads.
STORE_RETRY = Backoff(initial=0.2, cap=5.0)


class StoreRefused(RuntimeError):
    """The database is one this hub must not use (a newer schema, a file that
    is not a database): not an outage, waiting will not change it."""


class DurabilityLost(RuntimeError):
    """The disk refused an fsync: commits since the last sync may be gone.

    Not an outage to wait out: a retried fsync can succeed over pages the
    kernel dropped, so the hub stops rather than acknowledge them.
    """


# sha1 state after the namespace and "task_id\x00", per task: a batch's ids
# share it. Bounded: emptied when full.
_ID_PREFIXES: dict[str, Any] = {}
_ID_PREFIXES_MAX = 1024
# The RFC 4122 variant bits over the 17th hex digit.
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def _id_prefix(task_id: str) -> Any:
    prefix = _ID_PREFIXES.get(task_id)
    if prefix is None:
        if len(_ID_PREFIXES) >= _ID_PREFIXES_MAX:
            _ID_PREFIXES.clear()
        prefix = _ID_PREFIXES[task_id] = hashlib.sha1(_ID_NAMESPACE_BYTES + f"{task_id}\x00".encode())
    return prefix


def _uuid_text(x: str) -> str:
    # Version 5 in the 13th hex digit, the variant in the 17th.
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"


def record_id(task_id: str, seq: int) -> str:
    """Deterministic, so a duplicate of a stored record gets the same id.

    Equal to `str(uuid.uuid5(_ID_NAMESPACE, f"{task_id}\\x00{seq}"))`, computed
    directly because it runs for every record of every batch.
    """
    digest = _id_prefix(task_id).copy()
    digest.update(b"%d" % seq)
    return _uuid_text(digest.hexdigest())


def record_ids(task_id: str, first: int, count: int) -> list[str]:
    """`record_id` of seqs first, first + 1, ... (the task's prefix looked up once)."""
    prefix = _id_prefix(task_id)
    ids = []
    for seq in range(first, first + count):
        digest = prefix.copy()
        digest.update(b"%d" % seq)
        ids.append(_uuid_text(digest.hexdigest()))
    return ids


def with_ids(records: Iterable[LogRecord | None]) -> None:
    """Give each record without an id its id (in place): an append's, before
    it is shown (AppendResult)."""
    run: list[LogRecord] = []  # consecutive seqs of one task: their ids at once
    for record in records:
        if record is None or record.id is not None:
            continue
        if run and (record.task_id != run[0].task_id or record.seq != run[-1].seq + 1):
            _give_ids(run)
            run = []
        run.append(record)
    if run:
        _give_ids(run)


def _give_ids(run: list[LogRecord]) -> None:
    for record, id_ in zip(run, record_ids(run[0].task_id, run[0].seq, len(run)), strict=True):
        record.id = id_


# The anonymous producer: a client that names none (docs/identity.md).
ANONYMOUS = ""
# Producers whose ids start with this are the hub's own (a writer numbering
# the records a REST client sent without `seq`); clients' ids cannot. Such a
# record answers the anonymous producer (hub/store/rules.py answered_producer).
HUB_MADE = "~"


def hub_made(producer: str) -> bool:
    """Whether the hub numbered this producer's records itself: its seqs rise
    but may skip (a withdrawn POST takes its numbers with it)."""
    return producer.startswith(HUB_MADE)


@attrs.define(slots=True, on_setattr=attrs.setters.NO_OP)  # not frozen: see keruta.records.LogRecord
class Incoming:
    """A record on its way into the store, with its identity: `seq` is the
    producer's own (1, 2, 3... per producer), never a task seq; the store gives
    the task seq (docs/identity.md). A record sent without `seq` (REST) is
    given an identity by the writer before it reaches the store."""

    task_id: str
    seq: int | None
    timestamp: str  # canonical RFC 3339 (keruta.timefmt.format_ts)
    source: str
    level: str
    message: str
    line_number: int | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)
    partial: bool = False
    producer: str = ANONYMOUS
    kind: str | None = None  # keruta.records.KINDS; None for a line


# What an append did with each item (AppendResult.status).
INSERTED = "inserted"
DUPLICATE = "duplicate"  # that record was stored before (it may have been deleted since)
CONFLICT = "conflict"  # its identity holds a different record: not stored, never acked
GAP = "gap"  # a producer record that does not follow the producer's last stored one
FULL = "full"  # its task has given every seq it may (MAX_SEQ): not stored, never acked


@attrs.frozen
class AppendResult:
    # One per input item, in input order, with seq filled in (None for a
    # record that was not stored and has no known task seq). A record stored
    # by this append has no id yet: `with_ids` gives them where records are
    # shown (a live frame, a POST's answer). The id is a SHA-1 of the task
    # and seq (`record_id`), about 30 % of an append's CPU, and most records
    # are stored with nobody watching; one held from before has its id.
    records: list[LogRecord | None]
    # Only the records that were not stored before, in input order.
    inserted: list[LogRecord]
    # task_id -> durable_seq after this commit, for every task in the batch.
    durable: dict[str, int]
    # One per input item: INSERTED, DUPLICATE, CONFLICT, GAP or FULL.
    status: list[str] = attrs.field(factory=list)
    # (task_id, producer) -> the producer's highest seq stored, every one of
    # its seqs below it too (for a hub-made producer: every one it sent).
    producers: dict[tuple[str, str], int] = attrs.field(factory=dict)
    # task_id -> (message bytes stored after this commit, the cap its agent
    # asked for or None), for the tasks that stored records: what a cap decides on.
    sizes: dict[str, tuple[int, int | None]] = attrs.field(factory=dict)
    # Tasks whose trailing small chunks are due to be merged (`Store.compact`).
    compact: list[str] = attrs.field(factory=list)
    # append(busy_wait=...): tasks whose rows another session held past it;
    # when not empty, nothing was stored and the fields above say nothing.
    busy: list[str] = attrs.field(factory=list)


@attrs.frozen
class LogQuery:
    task_id: str
    source: str | None = None
    level: str | None = None
    start: str | None = None  # canonical timestamp, inclusive
    end: str | None = None  # canonical timestamp, inclusive
    q: str | None = None  # substring of message, case-sensitive
    after_seq: int | None = None
    page: int = 0
    size: int = 100


@attrs.frozen
class Page:
    content: list[LogRecord]
    total_elements: int
    number: int
    size: int

    @property
    def total_pages(self) -> int:
        return (self.total_elements + self.size - 1) // self.size if self.size else 0


@attrs.frozen
class SectionPage:
    """Sections in start order, nested among themselves (hub/store/sections.py):
    one whose enclosing section is on an earlier page is at the top here."""

    sections: list[dict[str, Any]]
    # The startSeq of the last section listed when more start after it (ask
    # again with it as `after_seq`); None: none does.
    next_after_seq: int | None


@attrs.frozen
class LogStats:
    task_id: str
    total_logs: int
    log_counts: dict[str, int]
    level_counts: dict[str, int]
    start: str | None
    end: str | None
    last_updated: str | None


class Store(Protocol):
    url: str

    async def open(self) -> None:
        """Connect, create or migrate the schema. Idempotent."""

    async def close(self) -> None: ...

    # Whether a task's row may be locked by another session (PostgreSQL):
    # then `append(items, busy_wait=...)` is understood.
    row_locks: ClassVar[bool] = False

    async def append(self, items: Sequence[Incoming], busy_wait: float | None = None) -> AppendResult:
        """Store a batch in one transaction; return only after it committed.

        Committed means visible to every reader and kept if the hub process
        dies; it survives a power cut only after the next `sync`. With
        `busy_wait` (stores with `row_locks`), a batch that would wait longer
        than that many seconds (0: at all) for a lock another session holds
        stores nothing and names its tasks in `busy` (all of them when the
        wait was not for a task's row).
        """
        ...

    async def compact(self, task_ids: Sequence[str]) -> None:
        """Merge each task's trailing small chunks into full ones, in one
        transaction (hub/store/chunk.py, SMALL_CHUNK): the same records, in
        fewer rows. An append says when it is due (`AppendResult.compact`);
        it runs apart from the append so the commit a viewer waits for does
        not carry it."""
        ...

    async def sync(self) -> None:
        """Make every commit so far durable against a power cut.

        Raises DurabilityLost when the disk refused (nothing committed since
        the last sync can be trusted).
        """

    async def upkeep(self) -> None:
        """Housekeeping a sync leaves to be done apart from the answers that
        wait for it (SQLite: checkpoint a WAL grown past its threshold); the
        writer's syncer asks for it after answering (hub/actors/syncer.py)."""

    async def set_state(
        self, task_id: str, state: str, exit_code: int | None, producer: str | None = None,
        summary: Summary | None = None, busy_wait: float | None = None,
    ) -> TaskInfo:
        """Record a task's state (creating the task if new) and return it.
        With `producer`, `summary` is what that run says it sent
        (keruta/summary.py), kept for `verify`.

        Monotonic (rules.next_state): a final state is never followed by
        `running` or `pending`. With `producer`, the change is the state of that
        run; the task shows the state of its newest run. Committed, like
        `append`, when it returns; it survives a power cut after the next `sync`.
        With `busy_wait` (stores with `row_locks`), a lock held elsewhere for
        longer than that is TaskBusy, nothing changed.
        """
        ...

    async def run_state(self, task_id: str, producer: str) -> tuple[str, int | None] | None:
        """The stored state of one run of a task (None: never heard of it)."""
        ...

    async def verify(self, task_id: str) -> Verify | None:
        """Check the stored records against the runs' summaries (hub/store/verify.py)
        and keep the verdict as the task's; None for an unknown task."""
        ...

    async def task(self, task_id: str) -> TaskInfo | None: ...

    async def tasks(self) -> list[TaskInfo]: ...

    async def durable_seq(self, task_id: str) -> int: ...

    async def query(self, query: LogQuery) -> Page:
        """A page of records matching the filters, in seq order."""
        ...

    async def read_range(
        self,
        task_id: str,
        after_seq: int,
        through_seq: int,
        limit: int,
        source: str | None = None,
        level: str | None = None,
    ) -> list[LogRecord]:
        """Records with after_seq < seq <= through_seq, in seq order, at most limit."""
        ...

    def iter_task(self, task_id: str, chunk: int = 1000) -> AsyncIterator[list[LogRecord]]:
        """The whole log of a task in seq order, chunk by chunk (for raw download)."""
        ...

    def iter_raw(self, task_id: str) -> AsyncIterator[str]:
        """The whole log of a task as text, each line's message and its newline
        (none after a partial line), a few chunks at a time."""
        ...

    async def stats(self, task_id: str) -> LogStats: ...

    async def sections(self, task_id: str, after_seq: int = 0, limit: int = MAX_SECTIONS) -> SectionPage | None:
        """The first `limit` of the task's sections that start after seq
        `after_seq`, as /sections answers them, nested (hub/store/sections.py);
        None when there is no such task."""
        ...

    async def delete(
        self, task_id: str, before: str | None, *, gap: str | None = None,
        on_gap: Callable[[LogRecord], None] | None = None,
    ) -> int:
        """Delete a task's records older than `before` (all when None); return
        the count. `gap` (with `before`): what went leaves a `gap` record in
        its place, with that reason: `deleted` (an admin's DELETE) always,
        `retention` only for the head cut off a task still running
        (hub/store/trimming.py); `on_gap` is given it after each transaction
        that left or grew it (for live viewers)."""
        ...

    async def delete_older_than(self, before: str) -> int:
        """Retention: delete every task's records older than `before`; a
        running task's head leaves a gap record."""
        ...

    async def cap_step(self, task_id: str, hub_cap: int | None) -> Any:
        """Cut a task over its cap (the hub's, or its agent's where lower) in
        one bounded transaction: a `trimming.CapStep` (its gap record, and
        whether more is due), or None when it is within its cap."""
        ...

    async def tasks_over_cap(self, hub_cap: int | None, limit: int) -> list[str]:
        """Up to `limit` tasks over their cap now (the hub's, or their agent's
        where lower): those whose cut a crash, a store outage or a full
        queue left undone, and no commit of theirs will ask for again."""
        ...

    async def redact_step(
        self, task_id: str, values: Sequence[str], after: int, through: int,
        record: int | None = None, by: str = "admin",
    ) -> Any:
        """Redact `values` in a few chunks after seq `after` (up to `through`)
        in one transaction, which also appends the redaction's record (none
        yet: `record` None) or adds to the one at seq `record`: a
        `redacting.RedactStep`. At every commit the stored records and the
        record's accounts add up (docs/identity.md)."""
        ...

    async def set_max_bytes(self, task_id: str, max_bytes: int) -> None:
        """The cap a task's agent asked for (--max-bytes); the lowest asked stays."""
        ...


# A Rewrite's kinds.
REPLACED = "replaced"
REDACTED = "redacted"
REWRITE_KINDS = (REPLACED, REDACTED)


@attrs.frozen
class Rewrite:
    """A hub rewrote records of a task in place, and tells the others:
    `replaced` (read the records at `seqs` again: a gap, a redaction record
    grown) or `redacted` (viewers holding these seqs read them again)."""

    task_id: str
    kind: str
    seqs: tuple[int, ...]


@runtime_checkable
class Listens(Store, Protocol):
    """A store several hubs share, which tells each of the others' commits
    (PostgreSQL LISTEN/NOTIFY; hub/actors/notifier.py). `isinstance(store, Listens)`
    decides whether the hub runs a notifier."""

    def listen(
        self, *, ignore_own: bool = False
    ) -> AbstractAsyncContextManager[AsyncIterator[tuple[str, int] | Rewrite | None]]:
        """Notices `(task_id, durable_seq or STATUS_NOTICE)` or a rewrite
        (`Rewrite`), None after an overflow;
        StoreUnavailable when the notices are lost."""
        ...

    async def announce(self, rewrite: Rewrite) -> None:
        """Tell the other hubs of records rewritten in place, after the commit."""
        ...
