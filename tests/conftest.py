"""Shared fixtures.

Stores: `store` is an open, empty store, once on SQLite and once on PostgreSQL;
`pg_url` is the URL of a fresh PostgreSQL database (with the test's one
trio-asyncio loop running). PostgreSQL needs KERUTA_TEST_PG_DSN, e.g.
postgresql://postgres@127.0.0.1:5432/test; tests marked `pg` are skipped
without it. Each PostgreSQL test gets an empty database of its own: new, or
one an earlier test in the same worker gave back, emptied (tests/pgpool.py).

Processes: `groups` collects the process groups a test's commands lead, and
kills what is left of them when the test ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests import pgpool

PG_DSN_ENV = "KERUTA_TEST_PG_DSN"


def pg_dsn() -> str | None:
    return os.environ.get(PG_DSN_ENV) or None


@asynccontextmanager
async def fresh_pg_database(dsn: str) -> AsyncIterator[str]:
    """An empty database for one test; yield its URL; give it back afterwards."""
    import trio

    pool = pgpool.pool_for(dsn)
    url = await trio.to_thread.run_sync(pool.acquire)
    try:
        yield url
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(pool.release, url)


def pytest_sessionfinish(session, exitstatus):  # type: ignore[no-untyped-def]
    """Drop the databases this process made (each xdist worker has its own)."""
    pgpool.drop_all_pools()


def pytest_configure(config):  # type: ignore[no-untyped-def]
    """Compile the project's modules once, before any test starts a hub or an
    agent process. Where PYTHONDONTWRITEBYTECODE is set (it is on this
    machine), no process writes them, so every `python -m hub` or `-m agent`
    a test starts would compile the whole project again (~0.1 s of CPU each,
    hundreds of times a run). The flag stops writing, not reading."""
    if hasattr(config, "workerinput"):
        return  # xdist workers: the controller did it
    import compileall

    root = Path(__file__).resolve().parent.parent
    for package in ("keruta", "agent", "hub"):
        compileall.compile_dir(root / package, quiet=1)


def _xdist_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """What `--dist loadgroup` should do and, with pytest 9.2, does not.

    xdist 3.8 puts a test's `xdist_group` into its node id (`...::test@group`,
    which its scheduler reads) by setting `item._nodeid`; pytest 9.2 keeps
    the id in `item._id` and ignores the other, so every group was split
    across the workers (two Chromiums, two viewer hubs). Where xdist's own
    suffix took, this does nothing.
    """
    if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if not groups or "@" in item.nodeid:
            continue
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")  # type: ignore[attr-defined]


# The modules whose tests take longest (seconds each: processes, Chromium,
# fuzzing), run first: handed out last, one of them would keep a worker busy
# long after the other ran out of tests. Only the order changes.
LONGEST_FIRST = (
    "test_viewer_browser.py",
    "test_schemathesis.py",
    "test_fuzz_hub.py",
    "test_hub_durability.py",
    "test_live_ahead_of_sync.py",
    "test_hub_pg.py",
    "test_agent_e2e.py",
    "test_agent_faults.py",
    "test_liveness.py",
)


def _longest_first(item: pytest.Item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """Tests marked `pg` (and the PostgreSQL `store` param) need a server."""
    items.sort(key=_longest_first)
    _xdist_groups(config, items)
    if os.environ.get("KERUTA_REQUIRE_BROWSER") and not all(
        os.path.exists(p) for p in ("/usr/bin/chromium", "/usr/bin/chromedriver")
    ):
        raise pytest.UsageError(
            "KERUTA_REQUIRE_BROWSER is set but Chromium or chromedriver is missing: "
            "the browser tests would be skipped"
        )
    if pg_dsn() is not None:
        return
    if os.environ.get("KERUTA_REQUIRE_PG"):
        raise pytest.UsageError(
            f"KERUTA_REQUIRE_PG is set but {PG_DSN_ENV} is not: the PostgreSQL tests would be skipped"
        )
    skip = pytest.mark.skip(reason=f"needs {PG_DSN_ENV}")
    for item in items:
        if "pg" in item.keywords:
            item.add_marker(skip)


STORE_KINDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.pg)]


@asynccontextmanager
async def pg_test_database() -> AsyncIterator[str]:
    """The test's one trio-asyncio loop, and a fresh database inside it.

    pytest-trio runs fixtures as concurrent tasks sharing one contextvars
    context, and two loops would fight over it: a test uses either `store`
    (PostgreSQL param) or `pg_url`, never both.
    """
    from hub.store.pg_loop import asyncio_loop

    dsn = pg_dsn()
    if dsn is None:
        pytest.skip(f"needs {PG_DSN_ENV}")
    async with asyncio_loop():
        async with fresh_pg_database(dsn) as url:
            yield url


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """URL of a fresh PostgreSQL database, with a trio-asyncio loop running."""
    async with pg_test_database() as url:
        yield url


@pytest.fixture
async def sqlite_store(tmp_path):  # type: ignore[no-untyped-def]
    """An open, empty SQLite store in tmp_path (for tests of one hub part that need a real store)."""
    from hub.store.sqlite import SQLiteStore

    sqlite = SQLiteStore(tmp_path / "keruta.db")
    await sqlite.open()
    try:
        yield sqlite
    finally:
        await sqlite.close()


@pytest.fixture(params=STORE_KINDS)
async def store(request, tmp_path):  # type: ignore[no-untyped-def]
    """An open, empty store: SQLite in tmp_path, or PostgreSQL in a fresh database."""
    if request.param == "sqlite":
        from hub.store.sqlite import SQLiteStore

        sqlite_store = SQLiteStore(tmp_path / "keruta.db")
        await sqlite_store.open()
        try:
            yield sqlite_store
        finally:
            await sqlite_store.close()
        return

    from hub.store.postgres import PostgresStore

    async with pg_test_database() as url:
        pg_store = PostgresStore.from_url(url)
        await pg_store.open()
        try:
            yield pg_store
        finally:
            await pg_store.close()


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty PostgreSQL database's URL, for hub processes (no loop needed here)."""
    dsn = pg_dsn()
    if dsn is None:
        pytest.skip(f"needs {PG_DSN_ENV}")
    pool = pgpool.pool_for(dsn)
    url = pool.acquire()
    try:
        yield url
    finally:
        pool.release(url)


@pytest.fixture(params=STORE_KINDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A `--db` URL for a hub process: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    return request.getfixturevalue("fresh_pg_url")  # type: ignore[no-any-return]


@pytest.fixture(params=STORE_KINDS)
def hub_databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """New databases for a test's hubs (tests/hubclient.py): SQLite files, or
    PostgreSQL databases dropped at teardown. Parametrizes the test over both stores."""
    from tests.hubclient import PgDatabases, SqliteFiles

    databases: SqliteFiles | PgDatabases
    if request.param == "sqlite":
        databases = SqliteFiles(tmp_path)
    else:
        # Asked for only here, so a SQLite run never needs a PostgreSQL server.
        first = request.getfixturevalue("fresh_pg_url")
        admin_dsn = pg_dsn()
        assert admin_dsn is not None  # fresh_pg_url skips without it
        databases = PgDatabases(first, admin_dsn)
    try:
        yield databases
    finally:
        databases.drop()


@pytest.fixture
def groups() -> Iterator[list[int]]:
    """Process groups a test saw its command lead; whatever is left of them is killed at its end."""
    started: list[int] = []
    yield started
    for pgid in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
