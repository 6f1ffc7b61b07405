"""PostgreSQL databases for tests, reused within a pytest process.

Every PostgreSQL test needs an empty database of its own. CREATE DATABASE
costs 0.3-0.6 s of server time here (PostgreSQL 15 writes the template's
pages through the WAL), a third of a typical test; emptying a used database
(drop the `public` schema and make it again) costs about 15 ms. So each pytest
process (each xdist worker) keeps the databases its tests gave back and hands
them out again, empty: a test sees exactly what a new database would show it,
as everything keruta or a test makes lives in `public`.

A database comes back through `release`, which first makes it empty and
able to take connections again: any session still on it is ended, the
`ALLOW_CONNECTIONS false` a liveness test may have left is undone, the schema
is dropped with all it holds. A database whose reset fails is dropped, not
reused. `drop_all` at the end of the session drops them all.

The admin work runs asyncpg under a private asyncio loop in a thread of its
own, so it can be called from plain code, from inside a trio run and from
inside trio-asyncio alike.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

PREFIX = "keruta_t_"

T = TypeVar("T")


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def database_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _in_own_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a new asyncio loop in a new thread; its result or its error."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        async def run() -> T:
            return await make()

        try:
            outcome.append(asyncio.run(run()))
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=target, name="pg-admin")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def end_sessions(database: str) -> str:
    """The statement that ends every other session on `database`."""
    return (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"
    )


def admin(dsn: str, *statements: str) -> None:
    """Run statements one by one on one connection to `dsn`."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    _in_own_thread(run)


class DatabasePool:
    """Empty databases on one server, made on demand and reused after `release`."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self._free: list[str] = []
        self._made: set[str] = set()
        self._lock = threading.Lock()

    def acquire(self) -> str:
        """The URL of an empty database no other test holds."""
        with self._lock:
            name = self._free.pop() if self._free else None
        if name is None:
            name = PREFIX + secrets.token_hex(6)
            admin(self.admin_dsn, f'CREATE DATABASE "{name}"')
            with self._lock:
                self._made.add(name)
        return with_database(self.admin_dsn, name)

    def release(self, url: str) -> None:
        """Take a database back: emptied for the next test, or dropped if that fails."""
        name = database_of(url)
        try:
            self._reset(name)
        except Exception:
            self._drop(name)
            raise
        with self._lock:
            self._free.append(name)

    def drop_all(self) -> None:
        with self._lock:
            names, self._free, self._made = list(self._made), [], set()
        for name in names:
            admin(self.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _reset(self, name: str) -> None:
        admin(
            self.admin_dsn,
            f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true',
            end_sessions(name),
        )
        admin(
            with_database(self.admin_dsn, name),
            "DROP SCHEMA IF EXISTS public CASCADE",
            "CREATE SCHEMA public",
        )

    def _drop(self, name: str) -> None:
        with self._lock:
            self._made.discard(name)
        admin(self.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_pools: dict[str, DatabasePool] = {}


def pool_for(admin_dsn: str) -> DatabasePool:
    """This process's pool for the server `admin_dsn` names."""
    pool = _pools.get(admin_dsn)
    if pool is None:
        pool = _pools[admin_dsn] = DatabasePool(admin_dsn)
    return pool


def drop_all_pools() -> None:
    for pool in _pools.values():
        pool.drop_all()
