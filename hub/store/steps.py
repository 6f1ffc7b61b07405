"""How the store algorithms talk to a database without doing I/O.

An algorithm (hub/store/core.py) is a generator: it yields an `Op` -- a
statement and its arguments -- and is sent the answer. A driver runs it:
SQLite's runs the whole generator in one worker thread (one thread hop per
transaction), PostgreSQL's awaits each op on a triopg connection.

A `Dialect` is one database's SQL: every statement an algorithm runs is a
named attribute, written out in full in that database's module
(hub/store/sqlite_sql.py, hub/store/pg_sql.py), plus the few steps whose
shape differs (how many ids one statement takes, how a batch of rows goes
in). The statements' names and arguments are declared here, once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

from hub.store.chunk import ChunkCache, ChunkRow
from hub.store.rules import TaskProgress

T = TypeVar("T")

FETCH = "fetch"  # -> list of rows
ROW = "row"  # -> one row or None
EXEC = "exec"  # -> nothing useful
MANY = "many"  # args: a list of argument tuples -> nothing useful
# SQLite only: one row whose one column is a JSON array of the rows -> list of rows
# (a row read is a step, and sqlite3 lets the GIL go around every step).
JSON_ROWS = "json_rows"


class Op(NamedTuple):
    kind: str
    sql: str
    args: Sequence[Any]


Steps = Generator[Op, Any, T]

# Dialect.save_producers' rows: a producer's new high mark (task_id,
# producer, high, now); a new range (task_id, producer, pseq_first,
# pseq_last, seq_first); a stored range extended (new pseq_last, task_id,
# producer, pseq_first).
HighMark = tuple[str, str, int, str]
NewRange = tuple[str, str, int, int, int]
ExtendedRange = tuple[int, str, str, int]

# Dialect.save_tasks' rows: a task the append stored records in, what it
# added, and whether its watermark moved (other hubs are told).
TaskSave = tuple[str, TaskProgress, bool]

# The columns of a chunk as the statements below answer them, in this order.
CHUNK_HEAD = "seq_first, seq_last, n, ts_first, ts_last, tally"
CHUNK_FULL = CHUNK_HEAD + ", lines, body"
TASK_SELECT = "task_id, state, exit_code, first_ts, last_ts, total_logs, durable_seq, updated_at, verdict"
# Bounds that hold every canonical timestamp ("2026-...Z"): a statement with a
# time filter runs without one too.
TS_LOW = ""
TS_HIGH = "~"


def drive_sync(steps: Steps[T], do: Callable[[Op], Any]) -> T:
    """Run an algorithm against a blocking driver."""
    answer = None
    try:
        while True:
            answer = do(steps.send(answer))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def drive(steps: Steps[T], do: Callable[[Op], Awaitable[Any]]) -> T:
    """Run an algorithm against an async driver."""
    answer = None
    try:
        while True:
            answer = await do(steps.send(answer))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


class Dialect:
    """One database's statements. Each is named for what it does; its
    arguments, in order, follow its name here."""

    # -- appending
    # (task_id, producer, highest pseq, lowest pseq) -> [(pseq_first, pseq_last, seq_first)]
    PRODUCER_RANGES: ClassVar[str]
    # (task_id, lowest seq, highest seq) -> [CHUNK_FULL] of the chunks holding any of them
    CHUNKS_COVERING: ClassVar[str]
    # (task_id, limit) -> [(bytes, *CHUNK_FULL)] of its last chunks, newest first
    LAST_CHUNKS: ClassVar[str]
    # (task_id, lowest seq_first, highest seq_last): the chunks wholly within
    DROP_CHUNKS_WITHIN: ClassVar[str]
    # -- states
    # (task_id, state, exit_code, now): create the task if new
    ENSURE_TASK: ClassVar[str]
    # (task_id) -> (state, exit_code, run_no), the row locked
    TASK_STATE: ClassVar[str]
    # (task_id, producer) -> (state, exit_code, run_no)
    RUN_STATE: ClassVar[str]
    # (task_id) -> (runs,) after counting one more
    NUMBER_RUN: ClassVar[str]
    # (task_id, producer, run_no, now)
    NEW_RUN: ClassVar[str]
    # (state, exit_code, task_id, producer)
    SET_RUN_STATE: ClassVar[str]
    # (state, exit_code, now, run_no, task_id)
    SET_TASK_STATE: ClassVar[str]
    # (summary JSON, task_id, producer)
    SET_SUMMARY: ClassVar[str]
    # -- verifying
    # (task_id) -> [(producer, summary JSON or None)] by run
    SUMMARIES: ClassVar[str]
    # (task_id) -> [(producer, pseq_first, pseq_last, seq_first)] by seq_first
    TASK_RANGES: ClassVar[str]
    # (verdict, task_id)
    SET_VERDICT: ClassVar[str]
    # -- reading
    # (task_id) -> TASK_SELECT
    TASK: ClassVar[str]
    # () -> [TASK_SELECT]
    TASKS: ClassVar[str]
    # (task_id) -> (durable_seq,)
    DURABLE_SEQ: ClassVar[str]
    # (task_id) -> (total_logs,)
    TOTAL_LOGS: ClassVar[str]
    # (task_id) -> (total_logs, lowest seq stored, highest seq stored)
    SEQ_BOUNDS: ClassVar[str]
    # (task_id, source or None, level or None) -> (records with them,)
    COUNTED: ClassVar[str]
    # (task_id, after seq, ts low, ts high, limit) -> [CHUNK_FULL] by seq
    CHUNKS_AFTER: ClassVar[str]
    # (task_id, after seq, ts low, ts high, limit) -> [CHUNK_HEAD] by seq
    CHUNK_HEADS_AFTER: ClassVar[str]
    # (task_id, after seq, through seq, limit) -> [CHUNK_FULL] by seq
    CHUNKS_BETWEEN: ClassVar[str]
    # (task_id) -> [(total, first_ts, last_ts, updated_at, source, level, n)]
    STATS: ClassVar[str]
    # -- deleting
    # (task_id) -> (1,), the row locked
    LOCK_TASK: ClassVar[str]
    # (task_id, before, limit) -> [CHUNK_FULL] of chunks holding records older than `before`
    CHUNKS_BEFORE: ClassVar[str]
    # (task_id, seq_last) -> (bytes,) of the chunk deleted
    DELETE_CHUNK: ClassVar[str]
    # (task_id, seq_first, seq_last, n, ts_first, ts_last, tally, lines, body, old seq_last, bytes)
    REPLACE_CHUNK: ClassVar[str]
    # (task_id, seq_last) -> (bytes,)
    CHUNK_BYTES: ClassVar[str]
    # (delta, task_id): the task's stored message bytes change by delta
    ADD_STORED_BYTES: ClassVar[str]
    # many (n, task_id, source, level)
    SUBTRACT_COUNTS: ClassVar[str]
    # (task_id)
    DROP_EMPTY_COUNTS: ClassVar[str]
    # (task_id): the producer ranges wholly below the task's lowest stored seq
    PRUNE_RANGES: ClassVar[str]
    # (deleted, now, task_id)
    AFTER_DELETE: ClassVar[str]
    # (before): retention forgets idle producers' ranges, then the producers -> [(1,)]
    PRUNE_IDLE_RANGES: ClassVar[str]
    PRUNE_IDLE_PRODUCERS: ClassVar[str]
    # (before) -> [(task_id,)]
    OLD_TASKS: ClassVar[str]
    # -- sections (hub/store/sections.py)
    # (task_id) -> (max_seq,)
    TASK_MAX_SEQ: ClassVar[str]
    # (task_id, start_seq, name, title, style, collapsed, started_at)
    SECTION_OPEN: ClassVar[str]
    # (task_id, name or None, end_seq, ended_at): the innermost open one of that name
    SECTION_CLOSE: ClassVar[str]
    # (task_id, limit) -> [sections.ROW] by start_seq
    SECTIONS: ClassVar[str]
    # (task_id, lowest start_seq, highest start_seq): the sections whose start went
    SECTIONS_DROP: ClassVar[str]
    # (task_id) -> (state,), the row locked
    LOCK_TASK_STATE: ClassVar[str]
    # -- caps, gaps and redaction (hub/store/trimming.py, hub/store/redacting.py)
    # (task_id) -> (stored_bytes, max_bytes, cap_gap_seq), the row locked
    CAP_STATE: ClassVar[str]
    # (hub cap or None, the same again, limit) -> [(task_id,)] of tasks over their cap
    OVER_CAP: ClassVar[str]
    # (task_id, after seq, limit) -> [(seq_first, seq_last, bytes)] by seq
    CHUNK_BYTES_AFTER: ClassVar[str]
    # (task_id, lowest seq, highest seq) -> [(producer, pseq_first, pseq_last, seq_first)]
    #   of the producer ranges holding any of those task seqs
    RANGES_FOR_SEQS: ClassVar[str]
    # many (task_id, source, level, n)
    ADD_COUNTS: ClassVar[str]
    # (records removed, records added, cap_gap_seq, now, task_id)
    AFTER_TRIM: ClassVar[str]
    # (max_bytes, task_id): the cap an agent asked for, where lower than one it asked before
    SET_MAX_BYTES: ClassVar[str]

    # Most task ids one LOCK_TASKS statement takes.
    in_chunk: ClassVar[int] = 500
    # Chunks deleted per transaction, so a big delete never holds the writer for long.
    delete_chunks: ClassVar[int] = 20

    def __init__(self) -> None:
        # Decoded chunks, for the algorithms' reads (a store has one dialect).
        self.cache = ChunkCache()

    def fetch(self, sql: str, *args: Any) -> Op:
        return Op(FETCH, sql, args)

    def row(self, sql: str, *args: Any) -> Op:
        return Op(ROW, sql, args)

    def exec(self, sql: str, *args: Any) -> Op:
        return Op(EXEC, sql, args)

    def many(self, sql: str, args: list[tuple[Any, ...]]) -> Op:
        return Op(MANY, sql, args)

    # -- the steps whose shape differs ------------------------------------------

    def lock_tasks(self, task_ids: Sequence[str], skip_locked: bool = False) -> Op:
        """-> [(task_id, max_seq, durable_seq, stored_bytes, max_bytes)] of those that exist, locked, in task_id order.

        `skip_locked` (a store with row locks): rows another transaction holds
        are left out instead of waited for."""
        raise NotImplementedError

    def lock_wait(self, seconds: float | None) -> Op | None:
        """Make this transaction's lock waits give up after `seconds` (at
        least a millisecond; None: as long as the session's default). None
        back: the database has no row locks."""
        return None

    def existing_tasks(self, task_ids: Sequence[str]) -> Op:
        """-> [(task_id,)] of those that exist, without taking a lock."""
        raise NotImplementedError

    def create_tasks(self, task_ids: list[str], now: str) -> Op | None:
        """Create missing task rows before locking them (None: not needed)."""
        return None

    def producer_highs(self, keys: Sequence[tuple[str, str]]) -> Op:
        """-> [(task_id, producer, high, pseq_first, seq_first)] of those
        (task_id, producer) that have a row; the last two are those of its
        stored range ending at `high` (None when there is none)."""
        raise NotImplementedError

    def insert_chunks(self, rows: list[ChunkRow]) -> Op:
        raise NotImplementedError

    def save_producers(self, highs: list[HighMark], ranges: list[NewRange], extended: list[ExtendedRange]) -> Steps[None]:
        """Producers' new high marks, their new ranges, and their stored ranges extended."""
        raise NotImplementedError

    def save_append(
        self,
        rows: list[ChunkRow],
        tasks: Sequence[TaskSave],
        producers: tuple[list[HighMark], list[NewRange], list[ExtendedRange]],
        now: str,
    ) -> Steps[None]:
        """What an append stores: its chunks, its tasks' rows and counts, its
        producers' marks and ranges (`save_producers`' three lists)."""
        if rows:
            yield self.insert_chunks(rows)
        if tasks:
            yield from self.save_tasks(tasks, now)
        if producers[0]:
            yield from self.save_producers(*producers)

    def save_tasks(self, tasks: Sequence[TaskSave], now: str) -> Steps[None]:
        """The task rows and their counts after an append that stored records
        in them: a statement or two for them all, however many (a fleet's
        commit holds a record or two of each of many tasks)."""
        raise NotImplementedError

    def section_errors(self, task_id: str, runs: Sequence[tuple[int, int]]) -> Op:
        """Every open section of the task gets the errors of the runs
        `(first seq, count)` that began after its start (sections.CountErrors)."""
        raise NotImplementedError

    def notice(self, task_id: str, seq: int) -> Op | None:
        """Tell other hubs about a task (None: nobody to tell)."""
        return None
