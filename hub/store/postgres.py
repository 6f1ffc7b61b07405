"""The shared store: PostgreSQL through triopg (asyncpg under trio-asyncio).

Needs a running trio-asyncio loop around it: the hub opens one
(`async with trio_asyncio.open_loop():`) for its whole life; the store never
opens its own.

Several hubs may share one database. Everything an append decides per task
(assigned seqs, the durable watermark, counts) happens under the task row's
lock (`SELECT ... FOR UPDATE`, rows taken in task_id order), so two hubs never
hand out one seq twice and the watermark only moves forward. Each append that
moves a task's watermark sends `NOTIFY keruta_durable, 'TASK_ID SEQ'` inside
its transaction, so other hubs hear of it exactly when it is committed.

Text columns that are compared or ordered use COLLATE "C": canonical
timestamps order as strings, and task ids order byte-wise as in SQLite.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
import attrs
import trio
import triopg

from hub.store.base import (
    AppendResult,
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

SCHEMA_VERSION = 2
NOTIFY_CHANNEL = "keruta_durable"
# A notice with this seq means "the task's state changed", not a watermark.
STATUS_NOTICE = -1
# pg_advisory_xact_lock key for schema changes ("keruta" in ASCII).
_SCHEMA_LOCK = 0x6B6572757461

_SCHEMA_V1 = (
    """
    CREATE TABLE IF NOT EXISTS keruta_logs (
        task_id text COLLATE "C" NOT NULL,
        seq bigint NOT NULL,
        id text NOT NULL,
        ts text COLLATE "C" NOT NULL,
        source text NOT NULL,
        level text NOT NULL,
        message text NOT NULL,
        line_number bigint,
        metadata text,
        partial boolean NOT NULL DEFAULT false,
        PRIMARY KEY (task_id, seq)
    )
    """,
    "CREATE INDEX IF NOT EXISTS keruta_logs_task_ts ON keruta_logs (task_id, ts)",
    "CREATE INDEX IF NOT EXISTS keruta_logs_task_level ON keruta_logs (task_id, level, seq)",
    "CREATE INDEX IF NOT EXISTS keruta_logs_task_source ON keruta_logs (task_id, source, seq)",
    """
    CREATE TABLE IF NOT EXISTS keruta_tasks (
        task_id text COLLATE "C" PRIMARY KEY,
        state text NOT NULL,
        exit_code integer,
        durable_seq bigint NOT NULL DEFAULT 0,
        max_seq bigint NOT NULL DEFAULT 0,
        first_ts text COLLATE "C",
        last_ts text COLLATE "C",
        total_logs bigint NOT NULL DEFAULT 0,
        updated_at text
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS keruta_counts (
        task_id text COLLATE "C" NOT NULL,
        source text NOT NULL,
        level text NOT NULL,
        n bigint NOT NULL,
        PRIMARY KEY (task_id, source, level)
    )
    """,
)
# Producers (docs/identity.md): one row per agent run, its highest own seq stored
# and its state; ranges map its seqs to task seqs.
_SCHEMA_V2 = (
    "ALTER TABLE keruta_tasks ADD COLUMN IF NOT EXISTS run_no bigint NOT NULL DEFAULT 0",
    """
    CREATE TABLE IF NOT EXISTS keruta_producers (
        task_id text COLLATE "C" NOT NULL,
        producer text COLLATE "C" NOT NULL,
        run_no bigint NOT NULL,
        high bigint NOT NULL DEFAULT 0,
        state text,
        exit_code integer,
        PRIMARY KEY (task_id, producer)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS keruta_producer_ranges (
        task_id text COLLATE "C" NOT NULL,
        producer text COLLATE "C" NOT NULL,
        pseq_first bigint NOT NULL,
        pseq_last bigint NOT NULL,
        seq_first bigint NOT NULL,
        PRIMARY KEY (task_id, producer, pseq_first)
    )
    """,
)
_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2}

_LOG_COLUMNS = (
    "task_id",
    "seq",
    "id",
    "ts",
    "source",
    "level",
    "message",
    "line_number",
    "metadata",
    "partial",
)
_LOG_SELECT = ", ".join(_LOG_COLUMNS)
_TASK_SELECT = "task_id, state, exit_code, first_ts, last_ts, total_logs, durable_seq, updated_at"
_STAGE_TABLE = "keruta_logs_stage"
_WALK_CHUNK = 1000
_DELETE_CHUNK = 5000

# Errors that mean "the database is not reachable or not usable right now":
# an outage the hub waits out. Everything else (SQL the server does not
# understand, a constraint, a type our code got wrong) is a bug and ends the
# operation. The server's errors are told apart by their SQLSTATE class.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, timeouts (TimeoutError is an OSError)
    asyncpg.PostgresConnectionError,  # 08xxx, connection lost mid-query
    # A connection left mid-operation by a cut or a cancellation ("another
    # operation is in progress"); it is terminated, and a retry gets a fresh one.
    asyncpg.InternalClientError,
)
_TRANSIENT_SQLSTATE_CLASSES = (
    "08",  # connection exception
    "28",  # authorization: an auth server or pg_hba.conf mid-change refusing us
    "40",  # transaction rollback: serialization failure, deadlock
    "53",  # insufficient resources: too many connections, disk full, out of memory
    "55",  # not in prerequisite state: "database does not allow connections", lock not available
    "57",  # operator intervention: admin shutdown, crash shutdown, cannot connect now (57P03)
    "58",  # system error: I/O error on the server
)
_TRANSIENT_SQLSTATES = ("25006",)  # read-only transaction: a standby during failover


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES
    # asyncpg says "connection is closed" as a plain InterfaceError.
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


@contextmanager
def _unavailable_as_store_error() -> Iterator[None]:
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as exc:
        if _transient(exc):
            raise StoreUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc
        raise




def _row(r: LogRecord) -> tuple[Any, ...]:
    return (
        r.task_id,
        r.seq,
        r.id,
        r.timestamp,
        r.source,
        r.level,
        r.message,
        r.line_number,
        metadata_json(r.metadata),
        r.partial,
    )


def _columns(records: Sequence[LogRecord]) -> list[list[Any]]:
    rows = [_row(r) for r in records]
    return (
        [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in _LOG_COLUMNS]
    )


def _storable(item: Incoming) -> Incoming:
    """PostgreSQL text cannot hold NUL; a line may (binary output). It becomes
    U+FFFD, like undecodable bytes, so the line is stored instead of poisoning
    its batch; the returned records show what was stored."""
    if "\x00" in item.message:
        return attrs.evolve(item, message=item.message.replace("\x00", "\ufffd"))
    return item


def parse_notice(payload: str) -> tuple[str, int, str] | None:
    """`"TASK_ID SEQ [ORIGIN]"` -> (task_id, seq, origin); None for anything else.

    A task id has no spaces; ORIGIN names the store instance (hub) that sent it.
    """
    parts = payload.split(" ")
    if len(parts) not in (2, 3) or not parts[0]:
        return None
    try:
        return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else ""
    except ValueError:
        return None


def _where(query: LogQuery) -> tuple[str, list[Any]]:
    clauses = ["task_id = $1"]
    params: list[Any] = [query.task_id]

    def add(sql: str, value: Any) -> None:
        params.append(value)
        clauses.append(sql.replace("?", f"${len(params)}"))

    if query.source is not None:
        add("source = ?", query.source)
    if query.level is not None:
        add("level = ?", query.level)
    if query.start is not None:
        add("ts >= ?", query.start)
    if query.end is not None:
        add("ts <= ?", query.end)
    if query.q:
        # strpos, not LIKE: LIKE treats % and _ as wildcards.
        add("strpos(message, ?) > 0", query.q.replace("\x00", "\ufffd"))
    if query.after_seq is not None:
        add("seq > ?", query.after_seq)
    return " AND ".join(clauses), params


@attrs.define
class DurableNotices:
    """The async iterator `PostgresStore.listen` yields.

    Each item is `(task_id, durable_seq)`, or None when notices were dropped
    because the consumer fell behind (re-read the watermarks you care about).
    Raises StoreUnavailable when the LISTEN connection is lost: notices sent
    meanwhile are gone, so after reconnecting re-read the watermarks too.
    """

    _receive: trio.MemoryReceiveChannel[tuple[str, int] | None]
    _conn: Any
    _ping_interval: float

    def __aiter__(self) -> DurableNotices:
        return self

    async def __anext__(self) -> tuple[str, int] | None:
        while True:
            with trio.move_on_after(self._ping_interval):
                try:
                    return await self._receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    raise StoreUnavailable("PostgreSQL: the LISTEN connection was lost") from None
            # Quiet for a while: make sure the connection is still there.
            with _unavailable_as_store_error():
                await self._conn.fetchval("SELECT 1", timeout=self._ping_interval)


class PostgresStore:
    """`Store` on PostgreSQL (see the module docstring).

    `insert_method` says how new rows go in; every way reports exactly the
    rows it inserted (ON CONFLICT DO NOTHING RETURNING):
    - "unnest": one INSERT ... SELECT FROM unnest(column arrays); one round trip.
    - "copy": COPY into a temporary staging table, then INSERT ... SELECT; a
      round trip more, but cheaper per row.
    - "auto" (default): "copy" from COPY_FROM rows up, else "unnest". Measured
      with bench/pg_append.py: unnest is ~15-20% faster for batches of 20,
      copy ~8-13% faster for batches of 500-1000.
    """

    COPY_FROM = 200

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 10,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        insert_method: str = "auto",
        notify: bool = True,
    ) -> None:
        if insert_method not in ("auto", "copy", "unnest"):
            raise ValueError(f"insert_method must be auto, copy or unnest, not {insert_method!r}")
        self.url = dsn
        self._dsn = dsn
        self._pool_size = pool_size
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._insert_method = insert_method
        self._notify = notify
        # Names this store instance in its notices, so a hub can skip its own.
        self.origin = secrets.token_hex(6)
        self._pool: Any = None

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        return cls(url)

    # -- lifecycle -------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = triopg.create_pool(
            self._dsn,
            min_size=1,
            max_size=self._pool_size,
            command_timeout=self._command_timeout,
            timeout=self._connect_timeout,
            init=None if self._insert_method == "unnest" else _init_connection,
            reset=_keep_session,
            # Acknowledged means durable, whatever the server's default.
            server_settings={"synchronous_commit": "on", "application_name": "keruta-hub"},
        )
        with _unavailable_as_store_error():
            await pool.__aenter__()
        try:
            with _unavailable_as_store_error():
                async with pool.acquire() as conn:
                    await _migrate(conn)
        except BaseException:
            with trio.CancelScope(shield=True):
                pool.terminate()
            raise
        self._pool = pool

    async def sync(self) -> None:
        """Nothing to do: every commit is synchronous (synchronous_commit=on)."""

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self._command_timeout):
            try:
                await pool.close()
                return
            except Exception:
                pass
        pool.terminate()

    def _require_pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        return self._pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        with _unavailable_as_store_error():
            async with self._require_pool().acquire() as conn:
                try:
                    yield conn
                except BaseException:
                    # An operation that failed or was cancelled midway can leave
                    # the connection mid-protocol: never hand it out again.
                    conn.terminate()
                    raise

    @asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[Any]:
        # Waiting for a connection may be cancelled; a started transaction is
        # shielded so it commits or rolls back entirely (bounded by
        # command_timeout) and a commit's outcome is never left unknown.
        async with self._connection() as conn:
            with trio.CancelScope(shield=True), _unavailable_as_store_error():
                async with conn.transaction():
                    yield conn

    # -- writing -------------------------------------------------------------

    async def append(self, items: Sequence[Incoming]) -> AppendResult:
        if not items:
            return AppendResult(records=[], inserted=[], durable={})
        items = [_storable(i) for i in items]
        async with self._write_transaction() as conn:
            return await self._append_tx(conn, items)

    async def _append_tx(self, conn: Any, items: Sequence[Incoming]) -> AppendResult:
        task_ids = sorted(dict.fromkeys(i.task_id for i in items))
        now = now_ts()
        rows = await _lock_tasks(conn, task_ids)
        if len(rows) < len(task_ids):
            # Create the missing rows (locked by this transaction once
            # inserted), then take them all again in task_id order.
            await conn.execute(
                """
                INSERT INTO keruta_tasks (task_id, state, updated_at)
                SELECT t, 'running', $2 FROM unnest($1::text[]) AS t ORDER BY t
                ON CONFLICT (task_id) DO NOTHING
                """,
                task_ids,
                now,
            )
            rows = await _lock_tasks(conn, task_ids)
        progress = {r[0]: TaskProgress(max_seq=r[1], durable_seq=r[2]) for r in rows}
        producers = await _load_producers(conn, items)
        plan = plan_batch(items, progress, producers)
        ranges = {
            key: await _load_ranges(conn, *key, low, high)
            for key, (low, high) in plan.producer_lookups.items()
        }
        # Under the task rows' locks nobody else appends to these tasks.
        stored: dict[tuple[str, int], LogRecord] = {}
        for task_id, seqs in plan.seqs_to_read(ranges, producers).items():
            found = await conn.fetch(
                f"SELECT {_LOG_SELECT} FROM keruta_logs WHERE task_id = $1 AND seq = ANY($2::bigint[])",
                task_id,
                seqs,
            )
            for row in found:
                record = record_from_row(row)
                stored[(task_id, record.seq)] = record
        resolve(plan, progress, producers, ranges, stored)
        inserted = await self._insert(conn, plan.inserted())
        tally(inserted, progress)

        durable: dict[str, int] = {}
        for task_id, task in progress.items():
            before = task.durable_seq
            task.durable_seq, walk_on = task.durable_through_batch()
            if walk_on:
                task.durable_seq = await _walk_durable(conn, task_id, task.durable_seq)
            durable[task_id] = task.durable_seq
            if task.count:
                await _update_task(
                    conn, task_id, task, now, self._notify and task.durable_seq > before, self.origin
                )
        await _save_producers(conn, producers)
        return plan.result(inserted, durable, producers)

    async def _insert(self, conn: Any, fresh: list[LogRecord]) -> list[LogRecord]:
        """Insert what is not stored yet; return exactly the inserted records."""
        if not fresh:
            return []
        method = self._insert_method
        if method == "copy" or (method == "auto" and len(fresh) >= self.COPY_FROM):
            await conn.copy_records_to_table(
                _STAGE_TABLE, records=[_row(r) for r in fresh], columns=_LOG_COLUMNS
            )
            keys = await conn.fetch(
                f"""
                INSERT INTO keruta_logs ({_LOG_SELECT}) SELECT {_LOG_SELECT} FROM {_STAGE_TABLE}
                ON CONFLICT (task_id, seq) DO NOTHING RETURNING task_id, seq
                """
            )
        else:
            keys = await conn.fetch(
                f"""
                INSERT INTO keruta_logs ({_LOG_SELECT})
                SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                                     $6::text[], $7::text[], $8::bigint[], $9::text[], $10::boolean[])
                ON CONFLICT (task_id, seq) DO NOTHING RETURNING task_id, seq
                """,
                *_columns(fresh),
            )
        if len(keys) == len(fresh):
            return fresh
        stored = {(k[0], k[1]) for k in keys}
        return [r for r in fresh if (r.task_id, r.seq) in stored]

    async def set_state(
        self, task_id: str, state: str, exit_code: int | None, producer: str | None = None
    ) -> TaskInfo:
        if state not in TASK_STATES:
            raise InvalidField("state", f"must be one of {', '.join(TASK_STATES)}")
        async with self._write_transaction() as conn:
            # The task row's lock orders this against appends and other hubs.
            await conn.execute(
                """
                INSERT INTO keruta_tasks (task_id, state, exit_code, updated_at) VALUES ($1, $2, $3, $4)
                ON CONFLICT (task_id) DO NOTHING
                """,
                task_id,
                state,
                exit_code,
                now_ts(),
            )
            task = await conn.fetchrow(
                "SELECT state, exit_code, run_no FROM keruta_tasks WHERE task_id = $1 FOR UPDATE",
                task_id,
            )
            run = None
            if producer is not None:
                run = await conn.fetchrow(
                    "SELECT state, exit_code, run_no FROM keruta_producers WHERE task_id = $1 AND producer = $2",
                    task_id,
                    producer,
                )
                if run is None:
                    next_run = await conn.fetchval(
                        """
                        INSERT INTO keruta_producers (task_id, producer, run_no)
                        SELECT $1, $2, coalesce(max(run_no), 0) + 1 FROM keruta_producers WHERE task_id = $1
                        RETURNING run_no
                        """,
                        task_id,
                        producer,
                    )
                    run = (None, None, next_run)
            decision = decide_state(task, run, state, exit_code)
            if decision.run is not None:
                await conn.execute(
                    "UPDATE keruta_producers SET state = $3, exit_code = $4 WHERE task_id = $1 AND producer = $2",
                    task_id,
                    producer,
                    *decision.run,
                )
            if decision.task is not None:
                await conn.execute(
                    "UPDATE keruta_tasks SET state = $2, exit_code = $3, updated_at = $4, run_no = $5 WHERE task_id = $1",
                    task_id,
                    *decision.task,
                    now_ts(),
                    run[2] if run else task[2],
                )
            row = await conn.fetchrow(
                f"SELECT {_TASK_SELECT} FROM keruta_tasks WHERE task_id = $1", task_id
            )
            if self._notify:
                # Other hubs' subscribers learn the new state; seq STATUS_NOTICE says "read it".
                await conn.execute(
                    "SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, f"{task_id} {STATUS_NOTICE} {self.origin}"
                )
        return task_from_row(row)

    async def run_state(self, task_id: str, producer: str) -> tuple[str, int | None] | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT state, exit_code FROM keruta_producers WHERE task_id = $1 AND producer = $2",
                task_id,
                producer,
            )
        return None if row is None or row[0] is None else (row[0], row[1])

    async def delete(self, task_id: str, before: str | None) -> int:
        total = 0
        while True:
            async with self._write_transaction() as conn:
                deleted = await _delete_chunk(conn, task_id, before)
            total += deleted
            if deleted < _DELETE_CHUNK:
                return total

    async def delete_older_than(self, before: str) -> int:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT task_id FROM keruta_tasks WHERE first_ts < $1 ORDER BY task_id", before
            )
        total = 0
        for row in rows:
            total += await self.delete(row[0], before)
        return total

    async def notify(self, task_id: str, durable_seq: int) -> None:
        """Tell every listening hub that `task_id` is durable up to `durable_seq`."""
        async with self._connection() as conn:
            await conn.execute(
                "SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, f"{task_id} {durable_seq} {self.origin}"
            )

    @asynccontextmanager
    async def listen(
        self, *, buffer: int = 1024, ping_interval: float = 15.0, ignore_own: bool = False
    ) -> AsyncIterator[DurableNotices]:
        """LISTEN for durable-watermark notices on a dedicated connection.

            async with store.listen() as notices:
                async for notice in notices:
                    ...  # (task_id, seq), or None after an overflow

        See DurableNotices for overflow and connection loss.
        """
        send, receive = trio.open_memory_channel[tuple[str, int] | None](buffer + 1)
        overflowed = False

        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            nonlocal overflowed
            parsed = parse_notice(payload)
            if parsed is None or (ignore_own and parsed[2] == self.origin):
                return
            notice = parsed[:2]
            if send.statistics().current_buffer_used >= buffer:
                if not overflowed:
                    overflowed = True
                    send.send_nowait(None)  # the spare slot
                return
            overflowed = False
            send.send_nowait(notice)

        def on_termination(_conn: Any) -> None:
            send.close()

        with send, receive:
            with _unavailable_as_store_error():
                conn = await triopg.connect(
                    self._dsn,
                    timeout=self._connect_timeout,
                    server_settings={"application_name": "keruta-hub-listen"},
                ).__aenter__()
            try:
                with _unavailable_as_store_error():
                    conn.add_termination_listener(on_termination)
                    await conn.add_listener(NOTIFY_CHANNEL, on_notify)
                yield DurableNotices(receive, conn, ping_interval)
            finally:
                with trio.CancelScope(shield=True):
                    try:
                        await conn.close()
                    except Exception:
                        conn.terminate()

    # -- reading ---------------------------------------------------------------

    async def task(self, task_id: str) -> TaskInfo | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_TASK_SELECT} FROM keruta_tasks WHERE task_id = $1", task_id
            )
        return task_from_row(row) if row else None

    async def tasks(self) -> list[TaskInfo]:
        async with self._connection() as conn:
            rows = await conn.fetch(f"SELECT {_TASK_SELECT} FROM keruta_tasks ORDER BY task_id")
        return [task_from_row(r) for r in rows]

    async def durable_seq(self, task_id: str) -> int:
        async with self._connection() as conn:
            value = await conn.fetchval(
                "SELECT durable_seq FROM keruta_tasks WHERE task_id = $1", task_id
            )
        return value or 0

    async def query(self, query: LogQuery) -> Page:
        check_page(query)
        where, params = _where(query)
        n = len(params)
        page_sql = f"SELECT {_LOG_SELECT} FROM keruta_logs WHERE {where} ORDER BY seq LIMIT ${n + 1} OFFSET ${n + 2}"
        async with self._connection() as conn:
            # One snapshot for the page and its count.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                rows = await conn.fetch(page_sql, *params, query.size, query.page * query.size)
                if n == 1:
                    total = await conn.fetchval(
                        "SELECT total_logs FROM keruta_tasks WHERE task_id = $1", query.task_id
                    )
                elif len(rows) < query.size and (rows or query.page == 0):
                    total = query.page * query.size + len(rows)
                elif (counted := counted_filters(query)) is not None:
                    # Kept in the same transactions as the rows: exact, without a scan.
                    sql = "SELECT coalesce(sum(n), 0)::bigint FROM keruta_counts WHERE task_id = $1"
                    sql += "".join(f" AND {column} = ${i + 2}" for i, (column, _) in enumerate(counted))
                    total = await conn.fetchval(sql, query.task_id, *(v for _, v in counted))
                else:
                    total = await conn.fetchval(
                        f"SELECT count(*) FROM keruta_logs WHERE {where}", *params
                    )
        return Page(
            content=[record_from_row(r) for r in rows],
            total_elements=total or 0,
            number=query.page,
            size=query.size,
        )

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
        sql = f"SELECT {_LOG_SELECT} FROM keruta_logs WHERE task_id = $1 AND seq > $2 AND seq <= $3"
        params: list[Any] = [task_id, after_seq, through_seq]
        if source is not None:
            params.append(source)
            sql += f" AND source = ${len(params)}"
        if level is not None:
            params.append(level)
            sql += f" AND level = ${len(params)}"
        params.append(limit)
        sql += f" ORDER BY seq LIMIT ${len(params)}"
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *params)
        return [record_from_row(r) for r in rows]

    def iter_task(self, task_id: str, chunk: int = 1000) -> AsyncIterator[list[LogRecord]]:
        return iter_by_range(self.read_range, task_id, chunk)

    async def stats(self, task_id: str) -> LogStats:
        async with self._connection() as conn:
            rows = await conn.fetch(
                """
                SELECT t.total_logs, t.first_ts, t.last_ts, t.updated_at, c.source, c.level, c.n
                FROM keruta_tasks t LEFT JOIN keruta_counts c ON c.task_id = t.task_id
                WHERE t.task_id = $1
                """,
                task_id,
            )
        task_row = rows[0][:4] if rows else None
        counts = [(r[4], r[5], r[6]) for r in rows if r[4] is not None]
        return stats_from_rows(task_id, task_row, counts)


async def _init_connection(conn: asyncpg.Connection) -> None:
    """Per new pooled connection (asyncio side): the staging table for COPY."""
    await conn.execute(
        f"""
        CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE_TABLE} (
            task_id text, seq bigint, id text, ts text, source text, level text,
            message text, line_number bigint, metadata text, partial boolean
        ) ON COMMIT DELETE ROWS
        """
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset on release (asyncio side). asyncpg still rolls back an open
    transaction; its default reset would also run RESET ALL, UNLISTEN *, ... on
    every release, a round trip per call for session state we never change
    (LISTEN has its own connection)."""


async def _migrate(conn: Any) -> None:
    async with conn.transaction():
        # Two hubs starting at once: the second waits here, then finds the schema.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS keruta_schema (version integer NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM keruta_schema") or 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database has schema version {version}; this hub knows up to {SCHEMA_VERSION}"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                await conn.execute(statement)
        if version < SCHEMA_VERSION:
            await conn.execute("DELETE FROM keruta_schema")
            await conn.execute("INSERT INTO keruta_schema (version) VALUES ($1)", SCHEMA_VERSION)


async def _load_producers(
    conn: Any, items: Sequence[Incoming]
) -> dict[tuple[str, str], ProducerProgress]:
    keys = list(dict.fromkeys((i.task_id, i.producer) for i in items if i.producer is not None))
    if not keys:
        return {}
    rows = await conn.fetch(
        """
        SELECT p.task_id, p.producer, p.high FROM keruta_producers p
        JOIN unnest($1::text[], $2::text[]) AS k(t, p) ON p.task_id = k.t AND p.producer = k.p
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    known = {(r[0], r[1]): r[2] for r in rows}
    return {
        key: ProducerProgress(high=known[key]) if key in known else ProducerProgress(high=0, exists=False)
        for key in keys  # type: ignore[misc]
    }


async def _load_ranges(conn: Any, task_id: str, producer: str, low: int, high: int) -> list[Any]:
    return await conn.fetch(
        """
        SELECT pseq_first, pseq_last, seq_first FROM keruta_producer_ranges
        WHERE task_id = $1 AND producer = $2 AND pseq_first <= $3 AND pseq_last >= $4
        """,
        task_id,
        producer,
        high,
        low,
    )


async def _save_producers(conn: Any, producers: dict[tuple[str, str], ProducerProgress]) -> None:
    for (task_id, producer), run in producers.items():
        if not run.new_ranges:
            continue
        await conn.execute(
            """
            WITH run AS (
                INSERT INTO keruta_producers (task_id, producer, run_no, high)
                SELECT $1, $2, coalesce(max(run_no), 0) + 1, $3 FROM keruta_producers WHERE task_id = $1
                ON CONFLICT (task_id, producer) DO UPDATE SET high = excluded.high
            )
            INSERT INTO keruta_producer_ranges (task_id, producer, pseq_first, pseq_last, seq_first)
            SELECT $1, $2, f, l, s FROM unnest($4::bigint[], $5::bigint[], $6::bigint[]) AS r(f, l, s)
            """,
            task_id,
            producer,
            run.high,
            [r[0] for r in run.new_ranges],
            [r[1] for r in run.new_ranges],
            [r[2] for r in run.new_ranges],
        )


async def _lock_tasks(conn: Any, task_ids: list[str]) -> list[Any]:
    return await conn.fetch(
        """
        SELECT task_id, max_seq, durable_seq FROM keruta_tasks
        WHERE task_id = ANY($1::text[]) ORDER BY task_id FOR UPDATE
        """,
        task_ids,
    )


async def _walk_durable(conn: Any, task_id: str, durable: int) -> int:
    while True:
        rows = await conn.fetch(
            "SELECT seq FROM keruta_logs WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            task_id,
            durable,
            _WALK_CHUNK,
        )
        durable, run_on = advance(durable, (r[0] for r in rows))
        if not run_on or len(rows) < _WALK_CHUNK:
            return durable


async def _update_task(
    conn: Any, task_id: str, task: TaskProgress, now: str, notify: bool, origin: str
) -> None:
    """The task row, its counts and (when the watermark moved) the NOTIFY, in one round trip."""
    sources, levels, ns = [], [], []
    for (source, level), n in task.counts.items():
        sources.append(source)
        levels.append(level)
        ns.append(n)
    await conn.execute(
        """
        WITH task AS (
            UPDATE keruta_tasks SET
                max_seq = GREATEST(max_seq, $2),
                durable_seq = $3,
                total_logs = total_logs + $4,
                first_ts = LEAST(first_ts, $5),
                last_ts = GREATEST(last_ts, $6),
                updated_at = $7
            WHERE task_id = $1
        ), counts AS (
            INSERT INTO keruta_counts (task_id, source, level, n)
            SELECT $1, s, l, c FROM unnest($8::text[], $9::text[], $10::bigint[]) AS x(s, l, c)
            ON CONFLICT (task_id, source, level) DO UPDATE SET n = keruta_counts.n + excluded.n
        )
        SELECT CASE WHEN $11 THEN pg_notify($12, $1 || ' ' || $3::text || ' ' || $13) END
        """,
        task_id,
        task.inserted_max,
        task.durable_seq,
        task.count,
        task.first_ts,
        task.last_ts,
        now,
        sources,
        levels,
        ns,
        notify,
        NOTIFY_CHANNEL,
        origin,
    )


async def _delete_chunk(conn: Any, task_id: str, before: str | None) -> int:
    """Delete up to one chunk of a task's records under its row lock; return the count."""
    locked = await conn.fetchval(
        "SELECT true FROM keruta_tasks WHERE task_id = $1 FOR UPDATE", task_id
    )
    if not locked:
        return 0
    older = "" if before is None else " AND ts < $3"
    params: list[Any] = [task_id, _DELETE_CHUNK] + ([] if before is None else [before])
    rows = await conn.fetch(
        f"""
        WITH gone AS (
            DELETE FROM keruta_logs WHERE task_id = $1 AND seq IN (
                SELECT seq FROM keruta_logs WHERE task_id = $1{older} LIMIT $2
            )
            RETURNING source, level
        )
        SELECT source, level, count(*) FROM gone GROUP BY source, level
        """,
        *params,
    )
    deleted = sum(r[2] for r in rows)
    if not deleted:
        return 0
    await conn.execute(
        """
        UPDATE keruta_counts c SET n = c.n - x.n
        FROM unnest($2::text[], $3::text[], $4::bigint[]) AS x(s, l, n)
        WHERE c.task_id = $1 AND c.source = x.s AND c.level = x.l
        """,
        task_id,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
    )
    await conn.execute("DELETE FROM keruta_counts WHERE task_id = $1 AND n <= 0", task_id)
    # durable_seq and max_seq stay: the watermark never goes backwards.
    await conn.execute(
        """
        UPDATE keruta_tasks SET
            total_logs = GREATEST(total_logs - $2, 0),
            first_ts = (SELECT min(ts) FROM keruta_logs WHERE task_id = $1),
            last_ts = (SELECT max(ts) FROM keruta_logs WHERE task_id = $1),
            updated_at = $3
        WHERE task_id = $1
        """,
        task_id,
        deleted,
        now_ts(),
    )
    return deleted
