"""The embedded store: SQLite in WAL mode, every call off the event loop.

One writer connection, used by one thread at a time (a trio.Lock), and a small
pool of reader connections; WAL lets the readers run while the writer commits.
The writer runs `synchronous=NORMAL`: a commit is in the WAL file (visible to
every reader, and it survives the hub process being killed) when `append`
returns, and `sync` fsyncs the WAL, after which it also survives a power cut.
Every other write syncs before it returns; `append` leaves it to the caller,
so live viewers get records without waiting for the disk while acks still do
(docs/durability.md).

Per task, the `tasks` row carries what must be cheap to read: state, the
durable watermark, the highest seq ever stored (for assigning seqs, and so a
delete never makes a seq reusable), first/last timestamp and the count; the
`counts` table carries the per (source, level) counts for stats. All of them
change in the same transaction as the rows they describe.
"""

from __future__ import annotations

import os
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from hub.store.base import (
    AppendResult,
    DurabilityLost,
    Incoming,
    LogQuery,
    LogStats,
    Page,
    StoreUnavailable,
)
from hub.store.batching import (
    ProducerProgress,
    TaskProgress,
    advance,
    check_page,
    chunks,
    counted_filters,
    decide_state,
    iter_by_range,
    metadata_json,
    plan_batch,
    record_from_row,
    resolve,
    stats_from_rows,
    tally,
    task_from_row,
)
from keruta.records import TASK_STATES, InvalidField, LogRecord, TaskInfo
from keruta.timefmt import now_ts

T = TypeVar("T")

SCHEMA_VERSION = 2

_SCHEMA_V1 = (
    """
    CREATE TABLE IF NOT EXISTS logs (
        task_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        ts TEXT NOT NULL,
        source TEXT NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        line_number INTEGER,
        metadata TEXT,
        partial INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, seq)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS logs_task_ts ON logs (task_id, ts)",
    "CREATE INDEX IF NOT EXISTS logs_task_level ON logs (task_id, level, seq)",
    "CREATE INDEX IF NOT EXISTS logs_task_source ON logs (task_id, source, seq)",
    """
    CREATE TABLE IF NOT EXISTS tasks (
        task_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        exit_code INTEGER,
        durable_seq INTEGER NOT NULL DEFAULT 0,
        max_seq INTEGER NOT NULL DEFAULT 0,
        first_ts TEXT,
        last_ts TEXT,
        total_logs INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS counts (
        task_id TEXT NOT NULL,
        source TEXT NOT NULL,
        level TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (task_id, source, level)
    ) WITHOUT ROWID
    """,
)
# Producers (docs/identity.md): one row per run of an agent, with the highest of
# its own seqs stored and its state; `producer_ranges` maps its seqs to task seqs
# (one row per run of consecutive seqs, so a few rows per batch at most).
_SCHEMA_V2 = (
    "ALTER TABLE tasks ADD COLUMN run_no INTEGER NOT NULL DEFAULT 0",
    """
    CREATE TABLE IF NOT EXISTS producers (
        task_id TEXT NOT NULL,
        producer TEXT NOT NULL,
        run_no INTEGER NOT NULL,
        high INTEGER NOT NULL DEFAULT 0,
        state TEXT,
        exit_code INTEGER,
        PRIMARY KEY (task_id, producer)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS producer_ranges (
        task_id TEXT NOT NULL,
        producer TEXT NOT NULL,
        pseq_first INTEGER NOT NULL,
        pseq_last INTEGER NOT NULL,
        seq_first INTEGER NOT NULL,
        PRIMARY KEY (task_id, producer, pseq_first)
    ) WITHOUT ROWID
    """,
)
_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2}

_LOG_COLUMNS = "task_id, seq, id, ts, source, level, message, line_number, metadata, partial"
_TASK_COLUMNS = "task_id, state, exit_code, first_ts, last_ts, total_logs, durable_seq, updated_at"
# Rows walked per query while advancing the durable watermark.
_WALK_CHUNK = 1000
# Rows deleted per transaction, so a big delete never holds the writer for long.
_DELETE_CHUNK = 2000
# SQLite's host-parameter limit is 32766; stay far below it.
_IN_CHUNK = 500
_BUSY_TIMEOUT_MS = 10_000
_UNAVAILABLE_HINTS = (
    "locked",
    "busy",
    "unable to open",
    "disk i/o",
    "disk is full",
    "readonly",
    "read-only",
    "not a database",
)


def _path_from_url(url: str) -> str:
    if not url.startswith("sqlite:///"):
        raise ValueError(
            f"not a SQLite URL {url!r}: use sqlite:///relative.db or sqlite:////abs.db"
        )
    path = url[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:" or path.startswith("file:"):
        raise ValueError(
            f"unsupported SQLite URL {url!r}: the store needs a file "
            "(in-memory databases cannot be shared by the writer and reader connections)"
        )
    return path


def _unavailable(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and any(h in text for h in _UNAVAILABLE_HINTS)


def _connect(path: str, *, readonly: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_MS / 1000
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if readonly:
            conn.execute("PRAGMA query_only = 1")
        else:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"SQLite at {path} refused WAL mode (got {mode!r})")
        # NORMAL: a commit does not wait for the disk; `sync` (an fsync of the
        # WAL) does that, off the live path (docs/durability.md).
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = OFF")
    except BaseException:
        conn.close()
        raise
    return conn


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database has schema version {version}; this hub knows up to {SCHEMA_VERSION}"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise




def _load_progress(conn: sqlite3.Connection, task_id: str) -> TaskProgress:
    row = conn.execute(
        "SELECT max_seq, durable_seq FROM tasks WHERE task_id = ?", (task_id,)
    ).fetchone()
    if row is None:
        return TaskProgress(max_seq=0, durable_seq=0, exists=False)
    return TaskProgress(max_seq=row[0], durable_seq=row[1])


def _walk_durable(conn: sqlite3.Connection, task_id: str, durable: int) -> int:
    """The highest seq reachable from `durable` through consecutive stored seqs."""
    while True:
        rows = conn.execute(
            "SELECT seq FROM logs WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (task_id, durable, _WALK_CHUNK),
        ).fetchall()
        durable, run_on = advance(durable, (seq for (seq,) in rows))
        if not run_on or len(rows) < _WALK_CHUNK:
            return durable


def _load_producer(conn: sqlite3.Connection, task_id: str, producer: str) -> ProducerProgress:
    row = conn.execute(
        "SELECT high FROM producers WHERE task_id = ? AND producer = ?", (task_id, producer)
    ).fetchone()
    return ProducerProgress(high=0, exists=False) if row is None else ProducerProgress(high=row[0])


def _load_ranges(
    conn: sqlite3.Connection, task_id: str, producer: str, low: int, high: int
) -> list[Sequence[int]]:
    return conn.execute(
        """
        SELECT pseq_first, pseq_last, seq_first FROM producer_ranges
        WHERE task_id = ? AND producer = ? AND pseq_first <= ? AND pseq_last >= ?
        """,
        (task_id, producer, high, low),
    ).fetchall()


def _save_producers(
    conn: sqlite3.Connection, producers: dict[tuple[str, str], ProducerProgress]
) -> None:
    for (task_id, producer), run in producers.items():
        if not run.new_ranges:
            continue
        if run.exists:
            conn.execute(
                "UPDATE producers SET high = ? WHERE task_id = ? AND producer = ?",
                (run.high, task_id, producer),
            )
        else:
            conn.execute(
                """
                INSERT INTO producers (task_id, producer, run_no, high)
                SELECT ?, ?, coalesce(max(run_no), 0) + 1, ? FROM producers WHERE task_id = ?
                """,
                (task_id, producer, run.high, task_id),
            )
        conn.executemany(
            "INSERT INTO producer_ranges (task_id, producer, pseq_first, pseq_last, seq_first) VALUES (?,?,?,?,?)",
            [(task_id, producer, *r) for r in run.new_ranges],
        )


def _append_tx(conn: sqlite3.Connection, items: Sequence[Incoming]) -> AppendResult:
    progress = {tid: _load_progress(conn, tid) for tid in dict.fromkeys(i.task_id for i in items)}
    producers = {
        key: _load_producer(conn, *key)
        for key in dict.fromkeys((i.task_id, i.producer) for i in items if i.producer is not None)
    }
    plan = plan_batch(items, progress, producers)
    ranges = {
        key: _load_ranges(conn, *key, low, high)
        for key, (low, high) in plan.producer_lookups.items()
    }
    # Under BEGIN IMMEDIATE nobody else writes, so what is not stored now is new.
    stored: dict[tuple[str, int], LogRecord] = {}
    for task_id, seqs in plan.seqs_to_read(ranges, producers).items():
        for chunk in chunks(seqs, _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT {_LOG_COLUMNS} FROM logs WHERE task_id = ? AND seq IN ({marks})",
                (task_id, *chunk),
            )
            for row in rows:
                record = record_from_row(row)
                stored[(task_id, record.seq)] = record
    resolve(plan, progress, producers, ranges, stored)
    inserted = plan.inserted()
    tally(inserted, progress)
    # Plain INSERT: a conflict here would be a bug, and rolls everything back.
    conn.executemany(
        f"INSERT INTO logs ({_LOG_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
        [
            (
                r.task_id,
                r.seq,
                r.id,
                r.timestamp,
                r.source,
                r.level,
                r.message,
                r.line_number,
                metadata_json(r.metadata),
                1 if r.partial else 0,
            )
            for r in inserted
        ],
    )

    now = now_ts()
    durable: dict[str, int] = {}
    count_rows: list[tuple[str, str, str, int]] = []
    for task_id, task in progress.items():
        task.durable_seq, walk_on = task.durable_through_batch()
        if walk_on:
            task.durable_seq = _walk_durable(conn, task_id, task.durable_seq)
        durable[task_id] = task.durable_seq
        if not task.count:
            continue
        count_rows.extend((task_id, s, lv, n) for (s, lv), n in task.counts.items())
        if task.exists:
            conn.execute(
                """
                UPDATE tasks SET
                    max_seq = max(max_seq, :max_seq),
                    durable_seq = :durable,
                    total_logs = total_logs + :count,
                    first_ts = CASE WHEN first_ts IS NULL OR first_ts > :first THEN :first ELSE first_ts END,
                    last_ts = CASE WHEN last_ts IS NULL OR last_ts < :last THEN :last ELSE last_ts END,
                    updated_at = :now
                WHERE task_id = :task_id
                """,
                {
                    "max_seq": task.inserted_max,
                    "durable": task.durable_seq,
                    "count": task.count,
                    "first": task.first_ts,
                    "last": task.last_ts,
                    "now": now,
                    "task_id": task_id,
                },
            )
        else:
            conn.execute(
                f"INSERT INTO tasks ({_TASK_COLUMNS}, max_seq) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    task_id,
                    "running",
                    None,
                    task.first_ts,
                    task.last_ts,
                    task.count,
                    task.durable_seq,
                    now,
                    task.inserted_max,
                ),
            )
    conn.executemany(
        """
        INSERT INTO counts (task_id, source, level, n) VALUES (?,?,?,?)
        ON CONFLICT (task_id, source, level) DO UPDATE SET n = n + excluded.n
        """,
        count_rows,
    )
    _save_producers(conn, producers)
    return plan.result(inserted, durable, producers)


def _in_write_tx(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _set_state(
    conn: sqlite3.Connection, task_id: str, state: str, exit_code: int | None, producer: str | None
) -> TaskInfo:
    task = conn.execute(
        "SELECT state, exit_code, run_no FROM tasks WHERE task_id = ?", (task_id,)
    ).fetchone()
    run = None
    if producer is not None:
        run = conn.execute(
            "SELECT state, exit_code, run_no FROM producers WHERE task_id = ? AND producer = ?",
            (task_id, producer),
        ).fetchone()
        if run is None:
            next_run = conn.execute(
                "SELECT coalesce(max(run_no), 0) + 1 FROM producers WHERE task_id = ?", (task_id,)
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO producers (task_id, producer, run_no) VALUES (?,?,?)",
                (task_id, producer, next_run),
            )
            run = (None, None, next_run)
    decision = decide_state(task, run, state, exit_code)
    if decision.run is not None:
        conn.execute(
            "UPDATE producers SET state = ?, exit_code = ? WHERE task_id = ? AND producer = ?",
            (*decision.run, task_id, producer),
        )
    if decision.task is not None:
        conn.execute(
            """
            INSERT INTO tasks (task_id, state, exit_code, updated_at, run_no) VALUES (?,?,?,?,?)
            ON CONFLICT (task_id) DO UPDATE SET
                state = excluded.state, exit_code = excluded.exit_code,
                updated_at = excluded.updated_at, run_no = excluded.run_no
            """,
            (task_id, *decision.task, now_ts(), run[2] if run else (task[2] if task else 0)),
        )
    row = conn.execute(
        f"SELECT {_TASK_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
    ).fetchone()
    return task_from_row(row)


def _delete_chunk(conn: sqlite3.Connection, task_id: str, before: str | None) -> tuple[int, bool]:
    """Delete up to one chunk of a task's records; return (deleted, more may remain)."""
    if before is None:
        rows = conn.execute(
            "SELECT seq, source, level FROM logs WHERE task_id = ? ORDER BY seq LIMIT ?",
            (task_id, _DELETE_CHUNK),
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT seq, source, level FROM logs WHERE task_id = ? AND ts < ? LIMIT ?",
            (task_id, before, _DELETE_CHUNK),
        ).fetchall()
    if not rows:
        return 0, False
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for _seq, source, level in rows:
        counts[(source, level)] += 1
    conn.executemany(
        "DELETE FROM logs WHERE task_id = ? AND seq = ?", [(task_id, seq) for seq, _s, _l in rows]
    )
    conn.executemany(
        "UPDATE counts SET n = n - ? WHERE task_id = ? AND source = ? AND level = ?",
        [(n, task_id, s, lv) for (s, lv), n in counts.items()],
    )
    conn.execute("DELETE FROM counts WHERE task_id = ? AND n <= 0", (task_id,))
    first = conn.execute("SELECT min(ts) FROM logs WHERE task_id = ?", (task_id,)).fetchone()[0]
    last = conn.execute("SELECT max(ts) FROM logs WHERE task_id = ?", (task_id,)).fetchone()[0]
    # durable_seq and max_seq stay: the watermark never goes backwards.
    conn.execute(
        """
        UPDATE tasks SET total_logs = max(total_logs - ?, 0), first_ts = ?, last_ts = ?, updated_at = ?
        WHERE task_id = ?
        """,
        (len(rows), first, last, now_ts(), task_id),
    )
    return len(rows), len(rows) == _DELETE_CHUNK


def _where(query: LogQuery) -> tuple[str, list[Any]]:
    clauses = ["task_id = ?"]
    params: list[Any] = [query.task_id]
    if query.source is not None:
        clauses.append("source = ?")
        params.append(query.source)
    if query.level is not None:
        clauses.append("level = ?")
        params.append(query.level)
    if query.start is not None:
        clauses.append("ts >= ?")
        params.append(query.start)
    if query.end is not None:
        clauses.append("ts <= ?")
        params.append(query.end)
    if query.q:
        # instr, not LIKE: LIKE is case-insensitive and treats % and _ as wildcards.
        clauses.append("instr(message, ?) > 0")
        params.append(query.q)
    if query.after_seq is not None:
        clauses.append("seq > ?")
        params.append(query.after_seq)
    return " AND ".join(clauses), params


def _query(conn: sqlite3.Connection, query: LogQuery) -> Page:
    where, params = _where(query)
    unfiltered = where == "task_id = ?"
    conn.execute("BEGIN")  # one snapshot for the page and its count
    try:
        rows = conn.execute(
            f"SELECT {_LOG_COLUMNS} FROM logs WHERE {where} ORDER BY seq LIMIT ? OFFSET ?",
            (*params, query.size, query.page * query.size),
        ).fetchall()
        if unfiltered:
            row = conn.execute(
                "SELECT total_logs FROM tasks WHERE task_id = ?", (query.task_id,)
            ).fetchone()
            total = row[0] if row else 0
        elif len(rows) < query.size and (rows or query.page == 0):
            total = query.page * query.size + len(rows)
        elif (counted := counted_filters(query)) is not None:
            # Kept in the same transactions as the rows: exact, without a scan.
            sql = "SELECT coalesce(sum(n), 0) FROM counts WHERE task_id = ?"
            sql += "".join(f" AND {column} = ?" for column, _ in counted)
            total = conn.execute(sql, (query.task_id, *(v for _, v in counted))).fetchone()[0]
        else:
            total = conn.execute(f"SELECT count(*) FROM logs WHERE {where}", params).fetchone()[0]
    finally:
        conn.execute("COMMIT")
    return Page(
        content=[record_from_row(r) for r in rows], total_elements=total, number=query.page, size=query.size
    )


def _read_range(
    conn: sqlite3.Connection,
    task_id: str,
    after_seq: int,
    through_seq: int,
    limit: int,
    source: str | None,
    level: str | None,
) -> list[LogRecord]:
    sql = f"SELECT {_LOG_COLUMNS} FROM logs WHERE task_id = ? AND seq > ? AND seq <= ?"
    params: list[Any] = [task_id, after_seq, through_seq]
    if source is not None:
        sql += " AND source = ?"
        params.append(source)
    if level is not None:
        sql += " AND level = ?"
        params.append(level)
    sql += " ORDER BY seq LIMIT ?"
    params.append(limit)
    return [record_from_row(r) for r in conn.execute(sql, params)]


def _stats(conn: sqlite3.Connection, task_id: str) -> LogStats:
    conn.execute("BEGIN")
    try:
        row = conn.execute(
            "SELECT total_logs, first_ts, last_ts, updated_at FROM tasks WHERE task_id = ?",
            (task_id,),
        ).fetchone()
        counts = conn.execute(
            "SELECT source, level, n FROM counts WHERE task_id = ?", (task_id,)
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    return stats_from_rows(task_id, row, counts)


class SQLiteStore:
    """`Store` on one SQLite file (see the module docstring)."""

    def __init__(self, path: str | Path, *, readers: int = 3, url: str | None = None) -> None:
        self.path = str(path)
        self.url = url or f"sqlite:///{self.path}"
        self._reader_count = readers
        self._writer: sqlite3.Connection | None = None
        self._write_lock = trio.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._reader_slots = trio.Semaphore(readers)
        self._wal_dir_synced = False

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        return cls(_path_from_url(url), url=url)

    async def open(self) -> None:
        if self._writer is not None:
            return
        await trio.to_thread.run_sync(self._open_sync)

    def _open_sync(self) -> None:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            writer = _connect(self.path, readonly=False)
            try:
                _create_schema(writer)
                readers = [_connect(self.path, readonly=True) for _ in range(self._reader_count)]
            except BaseException:
                writer.close()
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite database {self.path}: {exc}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"cannot open SQLite database {self.path}: {exc}") from exc
        self._writer = writer
        self._readers = readers

    async def close(self) -> None:
        if self._writer is None:
            return
        # Shielded: in-flight calls finish (their threads cannot be abandoned),
        # then every connection closes even when the caller is being cancelled.
        with trio.CancelScope(shield=True):
            async with self._write_lock:
                for _ in range(self._reader_count):
                    await self._reader_slots.acquire()
                try:
                    writer, readers = self._writer, self._readers
                    self._writer, self._readers = None, []
                    if writer is not None:
                        writer.close()
                    for conn in readers:
                        conn.close()
                finally:
                    for _ in range(self._reader_count):
                        self._reader_slots.release()

    async def _write(self, work: Callable[[sqlite3.Connection], T], *, sync: bool = True) -> T:
        async with self._write_lock:
            conn = self._writer
            if conn is None:
                raise RuntimeError("the store is not open")
            # Not abandonable on cancel (the default): the transaction either
            # commits or rolls back entirely before control comes back here.
            result = await trio.to_thread.run_sync(self._guarded, _in_write_tx, conn, work)
        if sync:
            await self.sync()
        return result

    async def sync(self) -> None:
        """Make every commit so far survive a power cut: fsync the WAL.

        No lock: an fsync covers everything written to the file before it
        started, and a checkpoint syncs the WAL and the database itself.
        """
        await trio.to_thread.run_sync(self._fsync_wal)

    def _fsync_wal(self) -> None:
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: everything is in the database file, synced at checkpoint
        try:
            os.fsync(fd)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the pages: what
            # was committed may be gone, so no ack can be trusted (fsyncgate).
            raise DurabilityLost(f"fsync of {self.path}-wal failed: {exc}") from exc
        finally:
            os.close(fd)
        if not self._wal_dir_synced:
            # The WAL file's directory entry must be durable too, once.
            dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._wal_dir_synced = True

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        async with self._reader_slots:
            if not self._readers:
                raise RuntimeError("the store is not open")
            conn = self._readers.pop()
            try:
                return await trio.to_thread.run_sync(self._guarded, _call, conn, work)
            finally:
                self._readers.append(conn)

    @staticmethod
    def _guarded(
        run: Callable[[sqlite3.Connection, Callable[[sqlite3.Connection], T]], T],
        conn: sqlite3.Connection,
        work: Callable[[sqlite3.Connection], T],
    ) -> T:
        try:
            return run(conn, work)
        except sqlite3.Error as exc:
            if _unavailable(exc):
                raise StoreUnavailable(f"SQLite: {exc}") from exc
            raise

    async def append(self, items: Sequence[Incoming]) -> AppendResult:
        if not items:
            return AppendResult(records=[], inserted=[], durable={})
        return await self._write(lambda conn: _append_tx(conn, items), sync=False)

    async def set_state(
        self, task_id: str, state: str, exit_code: int | None, producer: str | None = None
    ) -> TaskInfo:
        if state not in TASK_STATES:
            raise InvalidField("state", f"must be one of {', '.join(TASK_STATES)}")
        return await self._write(lambda conn: _set_state(conn, task_id, state, exit_code, producer))

    async def run_state(self, task_id: str, producer: str) -> tuple[str, int | None] | None:
        def work(conn: sqlite3.Connection) -> tuple[str, int | None] | None:
            row = conn.execute(
                "SELECT state, exit_code FROM producers WHERE task_id = ? AND producer = ?",
                (task_id, producer),
            ).fetchone()
            return None if row is None or row[0] is None else (row[0], row[1])

        return await self._read(work)

    async def task(self, task_id: str) -> TaskInfo | None:
        def work(conn: sqlite3.Connection) -> TaskInfo | None:
            row = conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            return task_from_row(row) if row else None

        return await self._read(work)

    async def tasks(self) -> list[TaskInfo]:
        def work(conn: sqlite3.Connection) -> list[TaskInfo]:
            return [
                task_from_row(r)
                for r in conn.execute(f"SELECT {_TASK_COLUMNS} FROM tasks ORDER BY task_id")
            ]

        return await self._read(work)

    async def durable_seq(self, task_id: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT durable_seq FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            return row[0] if row else 0

        return await self._read(work)

    async def query(self, query: LogQuery) -> Page:
        check_page(query)
        return await self._read(lambda conn: _query(conn, query))

    async def read_range(
        self,
        task_id: str,
        after_seq: int,
        through_seq: int,
        limit: int,
        source: str | None = None,
        level: str | None = None,
    ) -> list[LogRecord]:
        if limit <= 0 or through_seq <= after_seq:
            return []
        return await self._read(
            lambda conn: _read_range(conn, task_id, after_seq, through_seq, limit, source, level)
        )

    def iter_task(self, task_id: str, chunk: int = 1000) -> AsyncIterator[list[LogRecord]]:
        return iter_by_range(self.read_range, task_id, chunk)

    async def stats(self, task_id: str) -> LogStats:
        return await self._read(lambda conn: _stats(conn, task_id))

    async def delete(self, task_id: str, before: str | None) -> int:
        total = 0
        while True:
            deleted, more = await self._write(lambda conn: _delete_chunk(conn, task_id, before))
            total += deleted
            if not more:
                return total

    async def delete_older_than(self, before: str) -> int:
        def old_tasks(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT task_id FROM tasks WHERE first_ts IS NOT NULL AND first_ts < ?", (before,)
            )
            return [task_id for (task_id,) in rows]

        total = 0
        for task_id in await self._read(old_tasks):
            total += await self.delete(task_id, before)
        return total


def _call(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    return work(conn)
