"""The shared store: PostgreSQL through triopg (asyncpg under trio-asyncio).

Needs a running trio-asyncio loop around it: the hub opens one
(`async with trio_asyncio.open_loop():`) for its whole life; the store never
opens its own.

Several hubs may share one database. Everything an append decides per task
(assigned seqs, the durable watermark, counts) happens under the task row's
lock (`SELECT ... FOR UPDATE`, rows taken in task_id order), so two hubs never
hand out one seq twice and the watermark only moves forward.

The algorithms are hub/store/core.py's; the SQL is hub/store/pg_sql.py's;
the schema hub/store/pg_schema.py's; notices hub/store/pg_notices.py's; which
errors are an outage hub/store/pg_errors.py's; how a connection is ended
within a deadline hub/store/pg_link.py's. Here: the pool, the transactions,
and the driver that runs the algorithms on a connection.

No await on the database outlives a deadline: every command has the
command timeout (the hub's --db-timeout), and a pooled connection whose
command runs out of it is judged dead: it is terminated, not returned, and
the pool's idle connections are dropped with it, since a link that went
silent (no FIN, no RST) silenced them too. Closing is bounded the same way.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any, ClassVar, Generic, TypeVar

import asyncpg
import trio
import triopg

from hub.store.base import AppendResult, Incoming, Rewrite, StoreUnavailable, TaskBusy
from hub.store.pg_errors import unavailable_as_store_error
from hub.store.pg_link import close_pool_within, drop_idle, in_one_hop
from hub.store.pg_notices import (
    NOTIFY_CHANNEL,
    STATUS_NOTICE,
    DurableNotices,
    listen,
    parse_notice,
    rewrite_payload,
)
from hub.store.pg_schema import SCHEMA_VERSION, keep_session, migrate, quote_ident, tables_schema
from hub.store.pg_sql import PostgresSql
from hub.store.sqlstore import SqlStore
from hub.store.steps import EXEC, FETCH, MANY, ROW, Op, Steps
from keruta.records import TaskInfo
from keruta.summary import Summary

T = TypeVar("T")

log = logging.getLogger("keruta.hub.store")

__all__ = [
    "NOTIFY_CHANNEL",
    "SCHEMA_VERSION",
    "STATUS_NOTICE",
    "DurableNotices",
    "PostgresStore",
    "parse_notice",
]


def _notify(payload: str) -> Steps[None]:
    yield Op(EXEC, "SELECT pg_notify($1, $2)", (NOTIFY_CHANNEL, payload))


async def _begin_snapshot(raw: Any) -> None:
    await raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")


async def _commit(raw: Any) -> None:
    await raw.execute("COMMIT")


# The least a transaction may idle before the server ends it, whatever
# --db-timeout says: room for a loaded hub between two statements.
IDLE_TRANSACTION_FLOOR = 5.0


def idle_transaction_ms(command_timeout: float) -> int:
    """The server's `idle_in_transaction_session_timeout` for a hub's sessions."""
    return round(max(command_timeout, IDLE_TRANSACTION_FLOOR) * 1000)


class PostgresStore(SqlStore):
    """`Store` on PostgreSQL (see the module docstring)."""

    # Another hub's commit, or any session, may hold a task's row.
    row_locks: ClassVar[bool] = True

    # Seconds a new connection may take, unless --db-timeout is shorter.
    CONNECT_TIMEOUT = 10.0

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 10,
        command_timeout: float = 30.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        notify: bool = True,
        ping_interval: float = 15.0,
    ) -> None:
        self.url = dsn
        self._dsn = dsn
        self._pool_size = pool_size
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        # The LISTEN connection is pinged after this long without a notice,
        # and must answer within the smaller of this and the command timeout.
        self._ping_interval = ping_interval
        # A pooled connection was judged dead and none has answered since.
        self._silent = False
        # Names this store instance in its notices, so a hub can skip its own.
        self.origin = secrets.token_hex(6)
        self._dialect = PostgresSql(notify, self.origin)
        self._pool: Any = None

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        return cls(url)

    # -- lifecycle -------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        # The schema the hub's tables are in, as the URL and the database's
        # settings name it now; every session of the hub keeps to it.
        probe = self._create_pool(None)
        try:
            with unavailable_as_store_error():
                await probe.__aenter__()
                async with probe.acquire() as conn:
                    schema = await tables_schema(conn)
        finally:
            with trio.CancelScope(shield=True):
                probe.terminate()
        pool = self._create_pool(schema)
        with unavailable_as_store_error():
            await pool.__aenter__()
        try:
            with unavailable_as_store_error():
                async with pool.acquire() as conn:
                    await migrate(conn)
        except BaseException:
            with trio.CancelScope(shield=True):
                pool.terminate()
            raise
        self._pool = pool

    def _create_pool(self, schema: str | None) -> Any:
        # No connection kept open while idle: none to lose, and asyncpg would
        # log a traceback for each failed try to keep one while the database
        # refuses connections.
        pinned = {} if schema is None else {"search_path": quote_ident(schema)}
        return triopg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            command_timeout=self._command_timeout,
            timeout=self._connect_timeout,
            reset=keep_session,
            server_settings={
                **pinned,
                # Acknowledged means durable, whatever the server's default.
                "synchronous_commit": "on",
                # The locking is READ COMMITTED's (FOR UPDATE, then reads of
                # what the lock holder committed), whatever the database's
                # default isolation; snapshot reads ask for theirs.
                "default_transaction_isolation": "read committed",
                "application_name": "keruta-hub",
                # A hub whose link went silent mid-transaction (a partition:
                # no FIN, no RST) would hold its task rows locked until the
                # server's TCP keepalive found it out (two hours by default),
                # and every hub writing those tasks would wait as long. The
                # hub's own transactions are never idle (each runs in one hop,
                # hub/store/pg_link.py), so the server may end one that is.
                "idle_in_transaction_session_timeout": str(idle_transaction_ms(self._command_timeout)),
            },
        )

    async def sync(self) -> None:
        """Nothing to do: every commit is synchronous (synchronous_commit=on)."""

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        await close_pool_within(pool, self._command_timeout)

    # -- running the algorithms ----------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        with unavailable_as_store_error():
            async with self._pool.acquire() as conn:
                try:
                    yield conn
                except BaseException as exc:
                    # An operation that failed or was cancelled midway can leave
                    # the connection mid-protocol: never hand it out again.
                    conn.terminate()
                    if _timed_out(exc):
                        self._judged_dead()
                    raise
        if self._silent:
            self._silent = False
            log.warning("PostgreSQL answers again on the pool's new connections")

    @contextmanager
    def _dead_on_timeout(self, conn: Any) -> Iterator[None]:
        """A command that ran out of time ends its connection here, before a
        transaction's ROLLBACK would wait on it for another timeout."""
        try:
            yield
        except TimeoutError:
            conn.terminate()
            self._judged_dead()
            raise

    def _judged_dead(self) -> None:
        dropped = drop_idle(self._pool) if self._pool is not None else 0
        if not self._silent:
            self._silent = True
            log.warning(
                "PostgreSQL: a pooled connection did not answer within %g s: judged dead and "
                "terminated, with the %d idle ones; new connections are made as needed",
                self._command_timeout, dropped,
            )

    def _drop_stale_idle(self) -> None:
        # The server ended a pooled connection while it sat idle (its
        # idle_session_timeout, most likely): those idle as long are as
        # likely ended, and the pool hands out connected ones first.
        if self._pool is not None:
            drop_idle(self._pool)

    def _listen_judged_dead(self) -> None:
        # The LISTEN connection stopped answering: pooled connections opened
        # over the same link are likely silent too, and would each cost a
        # request a command timeout to find out.
        if self._pool is not None:
            drop_idle(self._pool)

    async def _read(self, steps: Steps[T], *, snapshot: bool = False) -> T:
        transaction = {"isolation": "repeatable_read", "readonly": True} if snapshot else None
        run = _Run(steps)
        for last_try in (False, True):
            try:
                async with self._connection() as conn:
                    with self._dead_on_timeout(conn):
                        return await in_one_hop(conn, run, transaction)
            except StoreUnavailable as exc:
                if last_try or not run.movable(exc):
                    raise
                self._drop_stale_idle()
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def _snapshot_reads(self) -> AsyncIterator[Callable[[Steps[Any]], Awaitable[Any]]]:
        async with self._begun(_begin_snapshot) as conn:
            with self._dead_on_timeout(conn):

                async def read(steps: Steps[T]) -> T:
                    return await in_one_hop(conn, _Run(steps), None)  # mid-snapshot: never moved

                yield read
                await in_one_hop(conn, _commit, None)

    @asynccontextmanager
    async def _begun(self, begin: Callable[[Any], Awaitable[None]]) -> AsyncIterator[Any]:
        """A pooled connection on which `begin` ran; taken again, once, when
        the first found itself closed (see _Run.movable)."""
        for last_try in (False, True):
            began = False
            try:
                async with self._connection() as conn:
                    with self._dead_on_timeout(conn):
                        await in_one_hop(conn, begin, None)
                    began = True
                    yield conn
                    return
            except StoreUnavailable as exc:
                if began or last_try or not _found_closed(exc):
                    raise
                self._drop_stale_idle()

    async def append(self, items: Sequence[Incoming], busy_wait: float | None = None) -> AppendResult:
        try:
            return await super().append(items, busy_wait)
        except StoreUnavailable as exc:
            # A lock held elsewhere for longer than busy_wait (which row is
            # not told: every task of the batch).
            if _held_elsewhere(exc, busy_wait):
                return AppendResult(records=[], inserted=[], durable={}, busy=sorted({i.task_id for i in items}))
            raise

    async def set_state(
        self, task_id: str, state: str, exit_code: int | None, producer: str | None = None,
        summary: Summary | None = None, busy_wait: float | None = None,
    ) -> TaskInfo:
        try:
            return await super().set_state(task_id, state, exit_code, producer, summary, busy_wait)
        except StoreUnavailable as exc:
            if _held_elsewhere(exc, busy_wait):
                raise TaskBusy(task_id) from exc
            raise

    async def _write(self, steps: Steps[T], *, sync: bool = True) -> T:
        # `sync` changes nothing: every commit is synchronous (synchronous_commit=on).
        # Waiting for a connection may be cancelled; a started transaction is
        # shielded so it commits or rolls back entirely (bounded by
        # command_timeout) and a commit's outcome is never left unknown.
        run = _Run(steps)
        for last_try in (False, True):
            try:
                async with self._connection() as conn:
                    with trio.CancelScope(shield=True), unavailable_as_store_error(), self._dead_on_timeout(conn):
                        return await in_one_hop(conn, run, {})
            except StoreUnavailable as exc:
                if last_try or not run.movable(exc):
                    raise
                self._drop_stale_idle()
        raise AssertionError("unreachable")

    # -- notices ----------------------------------------------------------------

    async def announce(self, rewrite: Rewrite) -> None:
        """Tell the other hubs that records were rewritten in place (after the
        commit that did it; pg_notices.Rewrite)."""
        await self._read(_notify(rewrite_payload(rewrite, self.origin)))

    def listen(
        self, *, buffer: int = 1024, ping_interval: float | None = None, ignore_own: bool = False
    ) -> AbstractAsyncContextManager[DurableNotices]:
        """LISTEN for durable-watermark notices on a dedicated connection.

            async with store.listen() as notices:
                async for notice in notices:
                    ...  # (task_id, seq), or None after an overflow

        See DurableNotices for overflow and connection loss.
        """
        origin = self.origin if ignore_own else None
        if ping_interval is None:
            ping_interval = self._ping_interval
        return listen(
            self._dsn, self._connect_timeout, origin, buffer=buffer, ping_interval=ping_interval,
            ping_timeout=min(ping_interval, self._command_timeout), on_dead=self._listen_judged_dead,
        )


def _held_elsewhere(exc: StoreUnavailable, busy_wait: float | None) -> bool:
    """A write that waited up to `busy_wait` for a row held elsewhere, cut
    by its lock_timeout, or (waiting at all) by the database's own shorter
    statement_timeout: busy, not the database away."""
    if busy_wait is None:
        return False
    cause = exc.__cause__
    return isinstance(cause, asyncpg.LockNotAvailableError) or (
        busy_wait > 0 and isinstance(cause, asyncpg.QueryCanceledError)
    )


def _timed_out(exc: BaseException) -> bool:
    """A command ran out of its time: `exc`, or what it was raised from."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Run(Generic[T]):
    """An algorithm as async work on one asyncpg connection (for in_one_hop),
    which may go on, once, on another connection when the first was found
    closed before it answered anything.

    A pooled connection the server ended while it sat idle (its
    idle_session_timeout, pg_terminate_backend, a restart) is told apart from
    a live one only when used, and when the server ends it just as it is
    taken, its first statement fails. Nothing was read and nothing committed
    then (no statement answered, so no COMMIT was sent): the statement that
    failed is sent again on a fresh connection, and the algorithm goes on as
    if nothing had happened."""

    def __init__(self, steps: Steps[T]) -> None:
        self._steps = steps
        self._pending: Op | None = None  # sent, not answered
        self._answered = False
        self._moved = False

    def movable(self, exc: BaseException) -> bool:
        """May this run go on on another connection after `exc`?"""
        if self._answered or self._moved or not _found_closed(exc):
            return False
        self._moved = True
        return True

    async def __call__(self, raw: Any) -> T:
        try:
            op = self._pending if self._pending is not None else self._steps.send(None)
            while True:
                self._pending = op
                answer = await _do(raw, op)
                self._answered = True
                op = self._steps.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def _found_closed(exc: BaseException) -> bool:
    """`exc` (a StoreUnavailable, or what it was raised from) says the
    connection was closed under us, not that the database is away or slow:
    asyncpg's words when the server ended the session as a statement went
    out, or before (the end not yet read)."""
    cause = exc.__cause__ if isinstance(exc, StoreUnavailable) else exc
    if isinstance(cause, asyncpg.ConnectionDoesNotExistError | asyncpg.InternalClientError):
        return True
    if isinstance(cause, asyncpg.InvalidCachedStatementError):
        # A table's type changed under a prepared statement (an ALTER): the
        # statement goes again where nothing is prepared yet.
        return True
    if isinstance(cause, asyncpg.InterfaceError):
        return "closed" in str(cause)
    if isinstance(cause, asyncpg.PostgresError):
        # The server's own word for it: idle-session timeout, terminated by an administrator.
        return getattr(cause, "sqlstate", None) in ("57P05", "57P01")
    return False


async def _do(conn: Any, op: Op) -> Any:
    kind, sql, args = op
    if kind == FETCH:
        return await conn.fetch(sql, *args)
    if kind == ROW:
        return await conn.fetchrow(sql, *args)
    if kind == EXEC:
        return await conn.execute(sql, *args)
    if kind == MANY:
        return await conn.executemany(sql, args) if args else None
    raise ValueError(f"unknown op {kind!r}")
