"""Shared fixtures.

Stores: `store` is an open, empty store, once on SQLite and once on PostgreSQL
(skipped unless KERUTA_TEST_PG_DSN names a server, e.g.
postgresql://postgres@127.0.0.1:5432/test). Each PostgreSQL test gets a new
database, dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest

PG_DSN_ENV = "KERUTA_TEST_PG_DSN"


def pg_dsn() -> str | None:
    return os.environ.get(PG_DSN_ENV) or None


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@asynccontextmanager
async def fresh_pg_database(dsn: str) -> AsyncIterator[str]:
    """Create a database for one test; yield its URL; drop it afterwards.

    Needs a running trio-asyncio loop (see the `store` fixture).
    """
    import trio
    import triopg

    name = "keruta_t_" + secrets.token_hex(6)
    async with triopg.connect(dsn) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(dsn, name)
    finally:
        with trio.CancelScope(shield=True):
            async with triopg.connect(dsn) as admin:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


STORE_KINDS = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=[pytest.mark.pg, pytest.mark.skipif(pg_dsn() is None, reason=f"needs {PG_DSN_ENV}")],
    ),
]


@pytest.fixture(params=STORE_KINDS)
async def store(request, tmp_path):  # type: ignore[no-untyped-def]
    """An open, empty store. The PostgreSQL one runs inside the test's single
    trio-asyncio loop, opened here: pytest-trio runs fixtures as concurrent
    tasks sharing one contextvars context, and two loops would fight over it."""
    if request.param == "sqlite":
        from hub.store.sqlite import SQLiteStore

        sqlite_store = SQLiteStore(tmp_path / "keruta.db")
        await sqlite_store.open()
        try:
            yield sqlite_store
        finally:
            await sqlite_store.close()
        return

    dsn = pg_dsn()
    assert dsn is not None
    import trio_asyncio
    from hub.store.postgres import PostgresStore

    async with trio_asyncio.open_loop():
        async with fresh_pg_database(dsn) as url:
            pg_store = PostgresStore.from_url(url)
            await pg_store.open()
            try:
                yield pg_store
            finally:
                await pg_store.close()
