"""The embedded store: SQLite in WAL mode, every call off the event loop.

One writer connection, used by one thread at a time (a trio.Lock), a small
pool of reader connections, and one connection for checkpoints; WAL lets the
readers run while the writer commits. Every statement runs in a worker
thread, commits included: a commit can fsync (SQLite syncs a new WAL header
after each reset of the WAL) and a write can wait for the disk, and on the
event loop's thread either would stop every task of the hub.

The writer runs `synchronous=NORMAL`: a commit is in the WAL file (visible to
every reader, and it survives the hub process being killed) when `append`
or `set_state` returns, and `sync` fsyncs the WAL, after which it also
survives a power cut. Those two leave the sync to their caller (the writer's
syncer), so live viewers get records and states without waiting for the disk
while acks still do (docs/durability.md); every other write (deletes) syncs
before it returns. FULL would fsync inside every commit, putting the disk
back in the live path for nothing the sync does not already give.

SQLite's automatic checkpoint is off (`wal_autocheckpoint=0`): it would run
inside a commit, two fsyncs on the live path. `upkeep` checkpoints instead,
once the WAL's frames hold `checkpoint_at` bytes (`wal_held_bytes`, read at
each `sync`), on its own connection beside the
writer (PASSIVE: it never waits for the writer or a reader); a WAL that grew
past `truncate_at` anyway (the writer never paused long enough for a passive
checkpoint to finish, or a reader held an old snapshot) is checkpointed and
truncated with the writer held back. So the WAL stays bounded. What the WAL
holds is read from its frames' salts, not its size: after a checkpoint that
copied everything SQLite writes the WAL again from its start without
shrinking the file, and a file left large by a burst checkpointed after
every commit (a fleet's hub spent ~6 % of its CPU on them).

A task's records are stored in chunks (hub/store/chunk.py), one row each in
`keruta_chunks`. Per task, the `keruta_tasks` row carries what must be cheap to read: state, the
durable watermark, the highest seq ever stored (for assigning seqs, and so a
delete never makes a seq reusable), first/last timestamp and the count; the
`counts` table carries the per (source, level) counts for stats. All of them
change in the same transaction as the rows they describe.

The algorithms are hub/store/core.py's, in SQLite's SQL (hub/store/sqlite_sql.py);
the schema is hub/store/sqlite_schema.py's. Here: the connections
and the driver that runs an algorithm in one worker thread.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import trio

from hub.store.base import DurabilityLost, StoreRefused, StoreUnavailable
from hub.store.sqlite_schema import SCHEMA_VERSION, create_schema
from hub.store.sqlite_sql import SQLiteSql
from hub.store.sqlstore import SqlStore
from hub.store.steps import EXEC, FETCH, JSON_ROWS, MANY, ROW, Op, Steps, drive_sync
from hub.store.thread_hop import run_in_thread

T = TypeVar("T")

log = logging.getLogger("keruta.hub.store")

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

_BUSY_TIMEOUT_MS = 10_000
# `upkeep` checkpoints a WAL whose frames hold this much (SQLite's own default: 1000 pages)...
CHECKPOINT_AT = 4 * 1024 * 1024
# ...and truncates one whose file is this large, holding the writer back meanwhile.
TRUNCATE_AT = 64 * 1024 * 1024
# How long a truncating checkpoint waits for readers to leave old snapshots
# (the writer waits as long); it tries again at a later sync.
_TRUNCATE_BUSY_MS = 100
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


def _connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
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
        # No checkpoint inside a commit: `sync` runs them (module docstring).
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA foreign_keys = OFF")
    except BaseException:
        conn.close()
        raise
    return conn


def _in_write_tx(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """Run `work` in a write transaction: committed, or rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _in_snapshot(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN")  # deferred: the first read fixes what every later one sees
    try:
        return work(conn)
    finally:
        conn.execute("COMMIT")


def _call(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    return work(conn)


def _begin(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN")


def _end(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("COMMIT")


def _wal_checkpoint(conn: sqlite3.Connection, mode: str) -> None:
    try:
        conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    except sqlite3.Error as exc:
        # Nothing is lost: the WAL keeps every commit until a checkpoint has
        # copied it, and a later sync tries again.
        log.warning("SQLite checkpoint (%s) of the WAL failed: %s", mode, exc)


_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24


def wal_held_bytes(fd: int, size: int) -> int:
    """The bytes of a WAL file (open as `fd`, `size` long) that its current
    frames take: those whose salts are the header's, a prefix of the file
    (SQLite's WAL format), found by bisection in a few small reads."""
    header = os.pread(fd, _WAL_HEADER, 0)
    if len(header) < _WAL_HEADER:
        return size
    page = int.from_bytes(header[8:12], "big")
    frame = _WAL_FRAME_HEADER + (65536 if page == 1 else page)
    if page < 1:
        return size
    salts = header[16:24]
    valid, beyond = 0, (size - _WAL_HEADER) // frame
    while valid < beyond:
        mid = (valid + beyond) // 2
        if os.pread(fd, 8, _WAL_HEADER + mid * frame + 8) == salts:
            valid = mid + 1
        else:
            beyond = mid
    return _WAL_HEADER + valid * frame


def _file_identity(path: str) -> tuple[int, int] | None:
    """The file `path` names now (device, inode); None when nothing is there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _close_all(conns: list[sqlite3.Connection]) -> None:
    for conn in conns:
        conn.close()


def _runner(steps: Steps[T]) -> Callable[[sqlite3.Connection], T]:
    """An algorithm as blocking work on one connection (for a worker thread)."""
    return lambda conn: drive_sync(steps, lambda op: run_op(conn, op))


# Rows a multi-row INSERT takes at once: powers of two, so a batch of any size
# is a few statements of a few texts, each prepared once (the statement cache).
_ROWS_AT_ONCE = (64, 16, 4, 1)
_VALUES = re.compile(r"\bVALUES\s*(\([^()]*\))", re.IGNORECASE)


@functools.lru_cache(maxsize=64)
def _multi_row(sql: str) -> tuple[str, str, str] | None:
    """A statement's text around its one VALUES row of plain `?`s (an INSERT,
    or an UPDATE ... FROM (VALUES row) whose rows have distinct keys), to
    repeat the row; None for anything else (numbered parameters, a second row)."""
    found = list(_VALUES.finditer(sql))
    if len(found) != 1 or not sql.lstrip().upper().startswith(("INSERT", "UPDATE")) or re.search(r"\?\d", sql):
        return None
    match = found[0]
    return sql[: match.start(1)], match.group(1), sql[match.end(1) :]


def _execute_many(conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """executemany, with the rows sent several to a statement: sqlite3
    releases and retakes the GIL around every step, and while the event loop
    is busy each retake waits for it (a fleet's commit of 400 tasks took
    about 3,000 of them)."""
    shape = _multi_row(sql) if len(rows) > 1 else None
    if shape is None:
        conn.executemany(sql, rows)
        return
    head, row, tail = shape
    start = 0
    for size in _ROWS_AT_ONCE:
        while len(rows) - start >= size:
            part = rows[start : start + size]
            conn.execute(head + ",".join([row] * size) + tail, [value for values in part for value in values])
            start += size


def run_op(conn: sqlite3.Connection, op: Op) -> Any:
    """One step of an algorithm (hub/store/steps.py) on a SQLite connection."""
    kind, sql, args = op
    if kind == FETCH:
        return conn.execute(sql, args).fetchall()
    if kind == ROW:
        return conn.execute(sql, args).fetchone()
    if kind == EXEC:
        return conn.execute(sql, args)
    if kind == MANY:
        return _execute_many(conn, sql, args)
    if kind == JSON_ROWS:
        return orjson.loads(conn.execute(sql, args).fetchone()[0])
    raise ValueError(f"SQLite cannot run a {kind!r} op")


class SQLiteStore(SqlStore):
    """`Store` on one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        readers: int = 3,
        url: str | None = None,
        checkpoint_at: int = CHECKPOINT_AT,
        truncate_at: int = TRUNCATE_AT,
    ) -> None:
        self.path = str(path)
        self.url = url or f"sqlite:///{self.path}"
        self.checkpoint_at = checkpoint_at
        self.truncate_at = truncate_at
        self._dialect = SQLiteSql()
        self._reader_count = readers
        self._writer: sqlite3.Connection | None = None
        self._write_lock = trio.Lock()
        # The WAL's file size and the bytes of it this WAL's frames hold, at
        # the last sync: what `upkeep` goes by.
        self._wal_bytes = 0
        self._wal_held = 0
        # Checkpoints run (upkeep): tests count them.
        self.checkpoints = 0
        self._readers: list[sqlite3.Connection] = []
        self._reader_slots = trio.Semaphore(readers)
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_lock = trio.Lock()
        self._wal_dir_synced = False
        # (st_dev, st_ino) of the database file when opened: a sync checks the
        # path still names it (a file removed or replaced under the hub takes
        # every later commit with it when the last connection closes).
        self._identity: tuple[int, int] | None = None

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        return cls(_path_from_url(url), url=url)

    async def open(self) -> None:
        if self._writer is not None:
            return
        await run_in_thread(self._open_sync)

    def _open_sync(self) -> None:
        opened: list[sqlite3.Connection] = []
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            writer = _connect(self.path)
            opened.append(writer)
            _in_write_tx(writer, create_schema)
            checkpointer = _connect(self.path)
            opened.append(checkpointer)
            # Only its truncating checkpoints wait (for readers), the writer held back meanwhile.
            checkpointer.execute(f"PRAGMA busy_timeout = {_TRUNCATE_BUSY_MS}")
            readers = []
            for _ in range(self._reader_count):
                readers.append(_connect(self.path, readonly=True))
                opened.append(readers[-1])
        except BaseException as exc:
            _close_all(opened)
            if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
                raise StoreRefused(f"{self.path} is not a SQLite database: {exc}") from exc
            if isinstance(exc, sqlite3.Error) and not _unavailable(exc):
                # Not the file being busy, locked or out of reach: what it
                # holds (a schema this hub cannot use, damage) stays as it is
                # however often the hub tries again.
                raise StoreRefused(f"cannot use SQLite database {self.path}: {exc}") from exc
            if isinstance(exc, sqlite3.Error | OSError):
                raise StoreUnavailable(f"cannot open SQLite database {self.path}: {exc}") from exc
            raise
        self._identity = _file_identity(self.path)
        self._writer, self._checkpointer, self._readers = writer, checkpointer, readers

    async def close(self) -> None:
        if self._writer is None:
            return
        # Shielded: in-flight calls finish (their threads cannot be abandoned),
        # then every connection closes even when the caller is being cancelled.
        # A sync's checkpoint takes the write lock inside the checkpoint lock: same order here.
        with trio.CancelScope(shield=True):
            async with self._checkpoint_lock, self._write_lock:
                for _ in range(self._reader_count):
                    await self._reader_slots.acquire()
                try:
                    conns = [*self._readers, self._checkpointer, self._writer]
                    self._writer, self._checkpointer, self._readers = None, None, []
                    # In a thread: the last connection to close checkpoints
                    # the WAL into the database, with its fsyncs.
                    await run_in_thread(_close_all, [c for c in conns if c is not None])
                finally:
                    for _ in range(self._reader_count):
                        self._reader_slots.release()

    async def _write(self, steps: Steps[T], *, sync: bool = True) -> T:
        async with self._write_lock:
            conn = self._writer
            if conn is None:
                raise RuntimeError("the store is not open")
            # In a thread however small (module docstring). Never abandoned on
            # cancel (run_in_thread): the transaction either commits or rolls
            # back entirely before control comes back here.
            result = await run_in_thread(self._guarded, _in_write_tx, conn, _runner(steps))
        if sync:
            await self.sync()
            await self.upkeep()
        return result

    async def sync(self) -> None:
        """Make every commit so far survive a power cut: fsync the WAL.

        No lock for the fsync: it covers everything written to the file before
        it started, and a checkpoint syncs the WAL and the database itself.
        """
        # to_thread and its limiter: REST deletes and redactions sync too, as
        # many at once as clients send (not a viewer's latency: that is the commit).
        self._wal_bytes, self._wal_held = await trio.to_thread.run_sync(self._fsync_wal)

    async def upkeep(self) -> None:
        """Checkpoint the WAL if, at the last sync, it had grown past
        `checkpoint_at` (module docstring). Apart from `sync`, so the answers
        waiting for a sync never wait for a checkpoint (a fleet's acks did,
        every few seconds, for tens of milliseconds)."""
        wal_bytes, held = self._wal_bytes, self._wal_held
        truncate = wal_bytes >= self.truncate_at
        if (held >= self.checkpoint_at or truncate) and not self._checkpoint_lock.locked():
            async with self._checkpoint_lock:
                await self._checkpoint(truncate=truncate)

    async def _checkpoint(self, *, truncate: bool) -> None:
        conn = self._checkpointer
        if conn is None:
            return  # closed meanwhile
        self.checkpoints += 1
        # PASSIVE copies what no reader still needs, beside the writer; after
        # it, the writer's next commit starts the WAL over if it copied all.
        await run_in_thread(_wal_checkpoint, conn, "PASSIVE")
        if truncate:
            # The rest, and the file cut to nothing: with no commit meanwhile,
            # so nothing keeps a WAL this large from being reset.
            async with self._write_lock:
                if self._checkpointer is not None:
                    await run_in_thread(_wal_checkpoint, conn, "TRUNCATE")

    def _fsync_wal(self) -> tuple[int, int]:
        """fsync the WAL; its size, and the bytes of it this WAL's frames hold."""
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            if self._writer is None:
                return 0, 0  # closed: the last connection checkpointed the WAL into the file
            # Open connections keep the WAL file until the last one closes: it
            # was removed under the hub, and the commits in it go with it.
            raise DurabilityLost(
                f"the WAL {self.path}-wal was removed while the hub had the database open: "
                "commits since the last sync are not on disk"
            ) from None
        try:
            size = os.fstat(fd).st_size
            held = wal_held_bytes(fd, size)
            os.fsync(fd)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the pages: what
            # was committed may be gone, so no ack can be trusted (fsyncgate).
            raise DurabilityLost(f"fsync of {self.path}-wal failed: {exc}") from exc
        finally:
            os.close(fd)
        if self._identity is not None and _file_identity(self.path) != self._identity:
            raise DurabilityLost(
                f"the database file {self.path} was removed or replaced while the hub had it open: "
                "commits since the last sync would be lost"
            )
        if not self._wal_dir_synced:
            # The WAL file's directory entry must be durable too, once.
            directory = os.path.dirname(os.path.abspath(self.path))
            try:
                dfd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError as exc:
                raise DurabilityLost(f"fsync of {directory} failed: {exc}") from exc
            self._wal_dir_synced = True
        return size, held

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[sqlite3.Connection]:
        """A reader connection of the pool, for the block's length."""
        async with self._reader_slots:
            if not self._readers:
                raise RuntimeError("the store is not open")
            conn = self._readers.pop()
            try:
                yield conn
            finally:
                self._readers.append(conn)

    async def _read(self, steps: Steps[T], *, snapshot: bool = False) -> T:
        async with self._reader() as conn:
            run = _in_snapshot if snapshot else _call
            return await run_in_thread(self._guarded, run, conn, _runner(steps))

    @asynccontextmanager
    async def _snapshot_reads(self) -> AsyncIterator[Callable[[Steps[Any]], Awaitable[Any]]]:
        async with self._reader() as conn:

            async def read(steps: Steps[T]) -> T:
                return await run_in_thread(self._guarded, _call, conn, _runner(steps))

            # Deferred: the first read fixes what every later one sees.
            await run_in_thread(self._guarded, _call, conn, _begin)
            try:
                yield read
            finally:
                with trio.CancelScope(shield=True):
                    await run_in_thread(self._guarded, _call, conn, _end)

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
