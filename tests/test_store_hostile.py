"""The hub's database under faults: SQLite and PostgreSQL taken away, locked,
timed out, shared, refused, and numbers at their edges through the store.

Each case checks what the hub answers (HTTP status and error code, WebSocket
frames), that no acknowledged record is lost or doubled (read back over REST
afterwards), that nothing is acknowledged that was not committed, and that
everyone else is still served meanwhile: /healthz, REST reads of other tasks
and WebSocket pings answer within BOUND, and the event loop is never stopped
(an in-process hub shares the test's trio loop, so `LoopWatch` sees any
blocking call the hub makes on it).

Real sockets, real SQLite files, real PostgreSQL (KERUTA_TEST_PG_DSN; each
test its own database, tests/pgpool.py), real subprocesses holding the locks.
No mocks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from keruta.limits import DEFAULT_LIMITS, INT64_MAX, MAX_SEQ
from keruta.timefmt import now_ts
from tests import hubclient, pgpool
from tests.conftest import pg_dsn
from tests.hubclient import (
    TEST_DEADLINE,
    TestHub,
    Ws,
    assert_error,
    fetch_all,
    logs_path,
    parse_metrics,
)
from tests.inprocess import InProcessHub, InProcessHubFactory, in_process_hubs
from tests.support import exited, python_m, sqlite_url

hub, hub_factory, sqlite_hub_factory = hubclient.hub, hubclient.hub_factory, hubclient.sqlite_hub_factory

# Everything a client asks of a hub whose database is stuck, but that does not
# need the stuck part, must be answered within this (a loaded machine's slack,
# far below SQLite's 10 s busy timeout or a PostgreSQL lock held for ever).
BOUND = 3.0
# Hang guard for waits that do depend on the database coming back.
PATIENCE = 30.0
# The longest the event loop may go without running a task: a blocking call
# on it (a commit waiting for a lock, say) would show as seconds.
LOOP_STALL = 1.0


# --- helpers -------------------------------------------------------------------


def wire(seq: int, message: str, timestamp: str | None = None) -> dict[str, Any]:
    return {
        "seq": seq, "timestamp": timestamp or now_ts(), "source": "stdout", "level": "INFO",
        "message": message, "lineNumber": seq, "metadata": {},
    }


def logs(task_id: str, producer: str, first: int, last: int, tag: str) -> dict[str, Any]:
    """A `logs` frame of `producer`'s own seqs first..last, messages `tag seq`."""
    return {
        "type": "logs", "taskId": task_id, "producer": producer,
        "records": [wire(s, f"{tag} {s}") for s in range(first, last + 1)],
    }


def tagged(tag: str, first: int, last: int) -> list[str]:
    return [f"{tag} {s}" for s in range(first, last + 1)]


async def post(hub: Any, task_id: str, body: Any) -> Any:
    async with hub.http() as client:
        return await client.post(logs_path(task_id), json=body)


async def stored(hub: Any, task_id: str) -> list[dict[str, Any]]:
    async with hub.http() as client:
        return await fetch_all(client, task_id)


def assert_exactly_once(records: list[dict[str, Any]], *streams: list[str]) -> None:
    """Task seqs 1..n without a hole, and each stream's messages stored once, in its order."""
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1)), "task seqs skip or repeat"
    messages = [r["message"] for r in records]
    assert len(messages) == len(set(messages)), f"a record was stored twice: {messages}"
    expected = [m for stream in streams for m in stream]
    assert sorted(messages) == sorted(expected), "records lost or stored that were never acknowledged"
    for stream in streams:
        assert [m for m in messages if m in set(stream)] == stream, "a producer's records out of order"


async def no_ack_for(ws: Ws, seconds: float) -> None:
    """Nothing but pongs/subscription frames for `seconds`: above all no ack and no error."""
    with trio.move_on_after(seconds):
        while True:
            frame = await ws.recv()
            assert frame["type"] not in ("ack", "error"), f"while the database was held: {frame}"


class LoopWatch:
    """Ticks on the test's (and the in-process hub's) trio loop and keeps the longest gap."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(0.01)
            now = trio.current_time()
            self.worst = max(self.worst, now - last - 0.01)
            last = now


@asynccontextmanager
async def watched_loop() -> AsyncIterator[LoopWatch]:
    watch = LoopWatch()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        yield watch
        nursery.cancel_scope.cancel()
    assert watch.worst < LOOP_STALL, f"the event loop stood still for {watch.worst:.2f} s"


async def still_serving(hub: Any, task_id: str, messages: list[str]) -> None:
    """Everyone not writing is served within BOUND: /healthz answers, REST reads
    of `task_id` (already stored) answer in full, a WebSocket answers a ping and
    replays the task to a new subscriber."""
    with trio.fail_after(BOUND):
        async with hub.http() as client:
            resp = await client.get("/healthz")
            assert resp.status_code == 200 and resp.json()["status"] == "ok", resp.text
            assert [r["message"] for r in await fetch_all(client, task_id)] == messages
            resp = await client.get(f"/api/v1/tasks/{task_id}")
            assert resp.status_code == 200 and resp.json()["totalLogs"] == len(messages), resp.text
        async with hub.ws() as ws:
            await ws.send({"type": "ping"})
            await ws.recv_type("pong")
            await ws.subscribe(task_id, from_seq=1)
            assert await ws.collect(task_id, len(messages)) == list(range(1, len(messages) + 1))


# --- another process holding the database ------------------------------------

SQLITE_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("held", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
print("released", flush=True)
"""

PG_HOLDER = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    tx = conn.transaction()
    await tx.start()
    for statement in sys.argv[2:]:
        await conn.execute(statement)
    print("held", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await tx.rollback()
    await conn.close()
    print("released", flush=True)
asyncio.run(main())
"""


class Holder:
    """A child process holding a lock on the hub's database until `release`."""

    def __init__(self, program: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", program, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )

    async def _line(self) -> str:
        assert self.proc.stdout is not None
        with trio.fail_after(PATIENCE):
            return await trio.to_thread.run_sync(self.proc.stdout.readline, abandon_on_cancel=True)

    async def held(self) -> None:
        line = await self._line()
        if line.strip() != "held":
            self.proc.kill()
            raise AssertionError(f"the holder could not take its lock: {self.proc.communicate()[1]}")

    async def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert (await self._line()).strip() == "released"
        with trio.fail_after(PATIENCE):
            await trio.to_thread.run_sync(self.proc.wait)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@asynccontextmanager
async def holding(program: str, *args: str) -> AsyncIterator[Holder]:
    holder = Holder(program, *args)
    try:
        await holder.held()
        yield holder
    finally:
        holder.kill()


# --- SQLite: another process holds the write lock -------------------------------


async def test_sqlite_write_lock_held_elsewhere_stalls_only_the_writes(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    """A `sqlite3` shell left in BEGIN EXCLUSIVE for a while (shorter than the
    busy timeout): the records sent meanwhile are not acknowledged until the
    lock goes, everything else is served at once, and afterwards every record
    is stored exactly once."""
    hub = await sqlite_hub_factory.astart()
    assert (await post(hub, "other", [{"message": m} for m in tagged("other", 1, 5)])).status_code == 200
    async with watched_loop(), hub.ws() as producer:
        async with holding(SQLITE_HOLDER, str(hub.db_path)) as holder:
            await producer.send(logs("held", "p", 1, 50, "held"))
            await producer.send(logs("held", "p", 51, 100, "held"))
            await no_ack_for(producer, 0.5)
            await still_serving(hub, "other", tagged("other", 1, 5))
            # Not committed, so not readable either.
            assert await stored(hub, "held") == []
            await no_ack_for(producer, 0.5)
            await holder.release()
        with trio.fail_after(PATIENCE):
            await producer.wait_ack("held", 100)
    assert_exactly_once(await stored(hub, "held"), tagged("held", 1, 100))
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


async def test_sqlite_write_lock_held_past_the_busy_timeout(sqlite_hub_factory: InProcessHubFactory) -> None:
    """The lock is held past SQLite's busy timeout (10 s): the commit fails as
    an outage and is retried; a POST is answered 503 (and then not stored) or
    200 (and stored), a WebSocket producer is acked only once its records are
    committed, /healthz says the store is unavailable meanwhile, and reads
    and pings are served throughout."""
    hub = await sqlite_hub_factory.astart("--post-timeout", "1", "--store-retry-max", "0.5")
    assert (await post(hub, "other", [{"message": m} for m in tagged("other", 1, 3)])).status_code == 200
    assert (await post(hub, "doomed", [{"message": m} for m in tagged("doomed", 1, 2)])).status_code == 200
    answers: list[tuple[str, int]] = []
    deleted: list[int] = []
    async with watched_loop(), hub.ws() as producer, hub.http() as client:

        async def poster() -> None:
            for i in range(3):
                with trio.fail_after(15):  # the busy timeout, and slack: never a hang
                    resp = await client.post(logs_path("posted"), json={"message": f"post {i}"})
                if resp.status_code != 200:
                    assert_error(resp, 503, resp.json().get("error", "?"))
                    assert "Retry-After" in resp.headers
                answers.append((f"post {i}", resp.status_code))

        async def deleter() -> None:
            # Queued behind the writer's attempt, then its own busy timeout at most.
            with trio.fail_after(25):
                resp = await client.delete(logs_path("doomed"))
            if resp.status_code != 200:
                assert_error(resp, 503, "STORE_UNAVAILABLE")
                assert "Retry-After" in resp.headers
            deleted.append(resp.status_code)

        async with trio.open_nursery() as nursery:
            async with holding(SQLITE_HOLDER, str(hub.db_path)) as holder:
                await producer.send(logs("held", "p", 1, 20, "held"))
                nursery.start_soon(poster)
                nursery.start_soon(deleter)
                unavailable = False
                with trio.fail_after(20):
                    while not unavailable:
                        await still_serving(hub, "other", tagged("other", 1, 3))
                        unavailable = (await client.get("/healthz")).json()["store"] == "unavailable"
                        await trio.sleep(0.5)
                await no_ack_for(producer, 0.2)
                assert await stored(hub, "held") == []
                await holder.release()
        with trio.fail_after(PATIENCE):
            await producer.wait_ack("held", 20)
            while (await client.get("/healthz")).json()["store"] != "ok":
                await trio.sleep(0.1)
    assert_exactly_once(await stored(hub, "held"), tagged("held", 1, 20))
    doomed = [r["message"] for r in await stored(hub, "doomed") if not r.get("kind")]
    assert doomed == ([] if deleted == [200] else tagged("doomed", 1, 2)), (deleted, doomed)
    posted = [m for m, status in answers if status == 200]
    assert [r["message"] for r in await stored(hub, "posted")] == posted, (
        f"a POST answered 503 was stored, or one answered 200 was not: {answers}"
    )
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


@pytest.mark.parametrize("remove", ["directory", "file"])
async def test_sqlite_database_removed_while_serving_is_never_acked(tmp_path: Path, remove: str) -> None:
    """The database's directory (or its file alone) is deleted under a running
    hub. SQLite goes on committing into the unlinked files, which vanish with
    the hub's last connection: nothing written afterwards may be acknowledged
    as durable. The hub stops (as after a failed fsync) naming the file,
    and what it acknowledged before is still what was stored."""
    directory = tmp_path / "data"
    path = directory / "keruta.db"
    hub = TestHub(sqlite_url(path))
    try:
        await hub.astart()
        async with hub.ws() as producer:
            await producer.send(logs("gone", "p", 1, 5, "before"))
            with trio.fail_after(PATIENCE):
                await producer.wait_ack("gone", 5)
            if remove == "directory":
                shutil.rmtree(directory)
            else:
                path.unlink()
            try:
                await producer.send(logs("gone", "p", 6, 10, "after"))
                with trio.fail_after(PATIENCE):
                    while True:
                        frame = await producer.recv()
                        assert frame["type"] != "ack", f"acked after its database was removed: {frame}"
            except hubclient.GONE:
                pass
        with trio.fail_after(PATIENCE):
            code = await exited(hub.proc)  # type: ignore[arg-type]
        assert code != 0
        assert str(path) in hub.stderr_text and "removed" in hub.stderr_text, hub.stderr_text
    finally:
        hub.stop()


# --- SQLite: a file the hub cannot use, at start ------------------------------


def run_hub(db: str, timeout: float = 8.0) -> tuple[int | None, str]:
    """Start `python -m hub` on `db`; its exit code (None: still running after
    `timeout`, then killed) and its stderr."""
    proc = subprocess.Popen(
        python_m("hub", "--host", "127.0.0.1", "--port", "0", "--db", db),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return None, err


def assert_refused_at_start(code: int | None, stderr: str, *mentions: str) -> None:
    assert code is not None, f"the hub neither started nor gave up:\n{stderr[-2000:]}"
    assert code != 0, stderr
    assert "listening on" not in stderr, stderr
    assert "Traceback" not in stderr, f"a traceback instead of a clear error:\n{stderr[-3000:]}"
    for mention in mentions:
        assert mention in stderr, f"the error should name {mention!r}:\n{stderr[-2000:]}"


async def test_a_file_that_is_not_sqlite_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "not-sqlite.db"
    content = b"this is not a database, not at all\n" * 100
    path.write_bytes(content)
    # Opening a file takes milliseconds: a hub still at it after 4 s is retrying.
    code, stderr = await trio.to_thread.run_sync(run_hub, sqlite_url(path), 4.0)
    assert path.read_bytes() == content, "the hub changed a file that is not its database"
    assert_refused_at_start(code, stderr, str(path))


async def test_a_newer_sqlite_schema_is_refused_at_start_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"

    def make() -> None:
        import sqlite3

        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE future (x)")
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
        conn.close()

    make()
    code, stderr = await trio.to_thread.run_sync(run_hub, sqlite_url(path))
    assert_refused_at_start(code, stderr, "schema version 99")


# --- SQLite: two hubs on one file ---------------------------------------------


async def test_two_hubs_on_one_sqlite_file_number_one_task_without_holes_or_doubles(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    """A hub started twice on the same file (a second unit, a forgotten
    process): two producers, one on each, write the same task at once.
    Whatever each acknowledges is stored exactly once, the task's seqs have
    no hole, and each hub reads back what the other stored."""
    a = await sqlite_hub_factory.astart()
    b = await sqlite_hub_factory.astart(db=a.db)
    n, per_frame = 600, 50

    async def produce(hub: InProcessHub, producer: str) -> None:
        async with hub.ws() as ws:
            for first in range(1, n + 1, per_frame):
                await ws.send(logs("shared", producer, first, first + per_frame - 1, producer))
            await ws.wait_ack("shared", n)

    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, a, "pa")
            nursery.start_soon(produce, b, "pb")
    for hub in (a, b):
        assert_exactly_once(await stored(hub, "shared"), tagged("pa", 1, n), tagged("pb", 1, n))
        async with hub.http() as client:
            task = (await client.get("/api/v1/tasks/shared")).json()
        assert task["totalLogs"] == 2 * n, task
    # A third writer after both: the next seq, not one either hub had cached.
    assert (await post(a, "shared", {"message": "last"})).json()["seq"] == 2 * n + 1
    assert (await post(b, "shared", {"message": "very last"})).json()["seq"] == 2 * n + 2


# --- PostgreSQL ---------------------------------------------------------------


def admin_dsn() -> str:
    dsn = pg_dsn()
    if dsn is None:
        pytest.skip("needs KERUTA_TEST_PG_DSN")
    return dsn


async def pg_admin(url: str, *statements: str) -> None:
    await trio.to_thread.run_sync(lambda: pgpool.admin(url, *statements))


async def pg_fetchval(url: str, query: str) -> Any:
    import asyncpg

    out: list[Any] = []

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            out.append(await conn.fetchval(query))
        finally:
            await conn.close()

    await trio.to_thread.run_sync(pgpool._in_own_thread, run)
    return out[0]


async def hub_backends_waiting_on_a_lock(url: str) -> int:
    return int(await pg_fetchval(url, (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'keruta-hub' AND wait_event_type = 'Lock'"
    )))


async def until_a_hub_backend_waits_on_a_lock(url: str) -> None:
    with trio.fail_after(PATIENCE):
        while not await hub_backends_waiting_on_a_lock(url):
            await trio.sleep(0.05)


@pytest.fixture
async def pg_hubs(fresh_pg_url: str) -> AsyncIterator[InProcessHubFactory]:
    admin_dsn()
    async with in_process_hubs(lambda: fresh_pg_url, TEST_DEADLINE) as hubs:
        yield hubs


@pytest.mark.pg
async def test_pg_row_lock_on_the_task_then_its_backend_terminated_mid_append(
    pg_hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """Another session locks the task's row (SELECT ... FOR UPDATE, left open):
    the hub's append waits on the lock in the database, not on the event
    loop; reads, pings and /healthz are served meanwhile; nothing is acked.
    Then the waiting backend is terminated mid-append (pg_terminate_backend)
    and the lock released: the append is retried on a new connection and
    every record is stored exactly once."""
    hub = await pg_hubs.astart("--store-retry-max", "0.5")
    assert (await post(hub, "other", [{"message": m} for m in tagged("other", 1, 4)])).status_code == 200
    async with hub.ws() as producer:
        await producer.send(logs("locked", "p", 1, 10, "locked"))
        with trio.fail_after(PATIENCE):
            await producer.wait_ack("locked", 10)
        async with watched_loop():
            lock = "SELECT 1 FROM keruta_tasks WHERE task_id = 'locked' FOR UPDATE"
            async with holding(PG_HOLDER, fresh_pg_url, lock) as holder:
                await producer.send(logs("locked", "p", 11, 60, "locked"))
                await until_a_hub_backend_waits_on_a_lock(fresh_pg_url)
                await no_ack_for(producer, 0.3)
                await still_serving(hub, "other", tagged("other", 1, 4))
                assert [r["seq"] for r in await stored(hub, "locked")] == list(range(1, 11))
                # Kill the append where it stands: its transaction is open, waiting for the row.
                killed = await pg_fetchval(fresh_pg_url, (
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'keruta-hub' "
                    "AND wait_event_type = 'Lock'"
                ))
                assert killed >= 1
                # The retry waits on the same lock again.
                await until_a_hub_backend_waits_on_a_lock(fresh_pg_url)
                await no_ack_for(producer, 0.3)
                await holder.release()
            with trio.fail_after(PATIENCE):
                await producer.wait_ack("locked", 60)
    assert_exactly_once(await stored(hub, "locked"), tagged("locked", 1, 60))
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


@pytest.mark.pg
async def test_pg_a_locked_task_row_does_not_hold_other_tasks_writes_hostage(
    pg_hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """Another session holds one task's row (SELECT ... FOR UPDATE, left
    open): that task's writes wait for it, in order, its status after its
    records, while every other task's are stored and answered at once; once
    the row is free, the waiting ones are stored exactly once. A row held
    past --db-timeout is no store outage (/healthz, the failures metric)."""
    hub = await pg_hubs.astart("--post-timeout", "2", "--store-retry-max", "0.5", "--db-timeout", "2")
    assert (await post(hub, "locked", {"message": "first"})).status_code == 200
    async with hub.ws() as producer:
        lock = "SELECT 1 FROM keruta_tasks WHERE task_id = 'locked' FOR UPDATE"
        async with holding(PG_HOLDER, fresh_pg_url, lock) as holder:
            await producer.send(logs("locked", "p", 1, 5, "locked"))
            await until_a_hub_backend_waits_on_a_lock(fresh_pg_url)
            await producer.send(logs("locked", "p", 6, 10, "locked"))
            await producer.send({"type": "status", "taskId": "locked", "state": "succeeded", "exitCode": 0,
                                 "producer": "p"})
            try:
                with trio.fail_after(BOUND + 2):
                    resp = await post(hub, "free", {"message": "unrelated"})
                    assert resp.status_code == 200, resp.text
                    await producer.send(logs("other", "q", 1, 3, "other"))
                    await producer.wait_ack("other", 3)
                assert producer.acked.get("locked", 0) == 0, "acked while its row was held"
                # Held past the lane's patience and several of its waits: a
                # row held elsewhere is no store outage.
                await trio.sleep(3.0)
                async with hub.http() as client:
                    assert (await client.get("/healthz")).status_code == 200
            finally:
                await holder.release()
        with trio.fail_after(PATIENCE):
            await producer.wait_ack("locked", 10)
            status = await producer.recv_type("status")
    assert status["state"] == "succeeded", status
    assert_exactly_once(await stored(hub, "locked"), ["first"], tagged("locked", 1, 10))
    assert [r["message"] for r in await stored(hub, "locked")][1:] == tagged("locked", 1, 10)
    assert_exactly_once(await stored(hub, "other"), tagged("other", 1, 3))
    async with hub.http() as client:
        task = (await client.get("/api/v1/tasks/locked")).json()
        assert (task["state"], task["totalLogs"]) == ("succeeded", 11), task
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert metrics["keruta_parked_tasks_total"] >= 1 and metrics["keruta_store_failures_total"] == 0, metrics
    assert "Traceback" not in hub.stderr_text and "unavailable" not in hub.stderr_text, hub.stderr_text


@pytest.mark.pg
async def test_pg_table_locked_exclusively_reads_and_writes_wait_bounded(
    pg_hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """LOCK TABLE keruta_chunks IN ACCESS EXCLUSIVE MODE in another session:
    reads of records cannot run either. With --db-timeout 2, a read is
    answered within about that (200, or 503 STORE_UNAVAILABLE with
    Retry-After), /healthz and pings at once; nothing is acked while the
    lock holds; after it every record is stored exactly once, though the
    hub gave up on (and the server may still have run) the timed-out attempts."""
    hub = await pg_hubs.astart("--db-timeout", "2", "--store-retry-max", "0.5", "--post-timeout", "1")
    assert (await post(hub, "other", [{"message": m} for m in tagged("other", 1, 3)])).status_code == 200
    async with hub.ws() as producer, hub.http() as client:
        async with watched_loop():
            async with holding(PG_HOLDER, fresh_pg_url, "LOCK TABLE keruta_chunks IN ACCESS EXCLUSIVE MODE") as h:
                await producer.send(logs("locked", "p", 1, 30, "locked"))
                await until_a_hub_backend_waits_on_a_lock(fresh_pg_url)
                with trio.fail_after(BOUND):
                    assert (await client.get("/healthz")).status_code == 200
                    async with hub.ws() as other:
                        await other.send({"type": "ping"})
                        await other.recv_type("pong")
                with trio.fail_after(2 + BOUND + 2):
                    resp = await client.get(logs_path("other"))
                if resp.status_code != 200:
                    assert_error(resp, 503, "STORE_UNAVAILABLE")
                    assert "Retry-After" in resp.headers
                with trio.fail_after(2 + BOUND + 10):  # an in-flight commit's timeout, then withdrawn
                    resp = await client.post(logs_path("posted"), json={"message": "during"})
                during_stored = resp.status_code == 200
                if not during_stored:
                    assert_error(resp, 503, resp.json()["error"])
                await no_ack_for(producer, 2.5)  # past one --db-timeout: a timed-out attempt acks nothing
                await h.release()
            with trio.fail_after(PATIENCE):
                await producer.wait_ack("locked", 30)
    assert_exactly_once(await stored(hub, "locked"), tagged("locked", 1, 30))
    assert [r["message"] for r in await stored(hub, "posted")] == (["during"] if during_stored else [])
    assert_exactly_once(await stored(hub, "other"), tagged("other", 1, 3))
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


# The holder's own session is exempt from the timeouts the test imposes on the hub's.
NO_SERVER_TIMEOUTS = (
    "SET idle_in_transaction_session_timeout = 0", "SET idle_session_timeout = 0", "SET statement_timeout = 0",
)


@pytest.mark.pg
async def test_pg_server_side_timeouts_on_the_database(pg_hubs: InProcessHubFactory, fresh_pg_url: str) -> None:
    """The DBA sets idle_session_timeout, idle_in_transaction_session_timeout
    and statement_timeout on the hub's database: the server ends every pooled
    connection and the LISTEN connection left idle for 200 ms. Requests that
    come more slowly than that still get 200 (a closed pooled connection is
    replaced, not answered with 503), a live viewer sees every line, and a
    slow statement cut by statement_timeout is retried, not lost."""
    database = pgpool.database_of(fresh_pg_url)
    await pg_admin(
        admin_dsn(),
        f'ALTER DATABASE "{database}" SET idle_session_timeout = \'200ms\'',
        f'ALTER DATABASE "{database}" SET idle_in_transaction_session_timeout = \'100ms\'',
        f'ALTER DATABASE "{database}" SET statement_timeout = \'1s\'',
    )
    try:
        hub = await pg_hubs.astart("--store-retry-max", "0.5")
        async with hub.ws() as viewer, hub.http() as client:
            await viewer.subscribe("idle", from_seq=1)
            sent: list[str] = []
            for i in range(1, 6):
                await trio.sleep(0.4)  # every pooled connection has been ended meanwhile
                with trio.fail_after(BOUND * 2):
                    resp = await client.post(logs_path("idle"), json={"message": f"idle {i}"})
                    assert resp.status_code == 200, resp.text
                    sent.append(f"idle {i}")
                await trio.sleep(0.4)
                with trio.fail_after(BOUND * 2):
                    page = await client.get(logs_path("idle"))
                assert page.status_code == 200, f"a read after the server closed an idle connection: {page.text}"
                assert [r["message"] for r in page.json()["content"]] == sent
            with trio.fail_after(PATIENCE):
                assert await viewer.collect("idle", 5) == [1, 2, 3, 4, 5]
            # A statement_timeout cut: the row locked for longer than 1 s.
            async with holding(PG_HOLDER, fresh_pg_url, *NO_SERVER_TIMEOUTS,
                               "SELECT 1 FROM keruta_tasks WHERE task_id = 'idle' FOR UPDATE") as holder:
                async with hub.ws() as producer:
                    await producer.send(logs("idle", "p", 1, 10, "cut"))
                    await no_ack_for(producer, 1.6)
                    await holder.release()
                    with trio.fail_after(PATIENCE):
                        await producer.wait_ack("idle", 10)
            assert (await client.get("/healthz")).json()["store"] == "ok"
        assert_exactly_once(await stored(hub, "idle"), tagged("idle", 1, 5), tagged("cut", 1, 10))
        assert "Traceback" not in hub.stderr_text, hub.stderr_text
    finally:
        await pg_admin(admin_dsn(), f'ALTER DATABASE "{database}" RESET ALL')


@pytest.mark.pg
async def test_pg_two_hubs_two_producers_one_task(pg_hubs: InProcessHubFactory) -> None:
    """Two hubs on one database, a producer on each writing the same task at
    once, a live viewer on each: seqs 1..2n without hole or double, each
    producer's records in its order, and each viewer sees every record of
    both producers exactly once, in seq order."""
    a = await pg_hubs.astart()
    b = await pg_hubs.astart(db=a.db)
    n, per_frame = 500, 50
    seen: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}

    async def view(hub: InProcessHub, name: str, ready: trio.Event) -> None:
        async with hub.ws() as ws:
            await ws.subscribe("shared", from_seq=1)
            ready.set()
            while len(seen[name]) < 2 * n:
                frame = await ws.recv()
                assert frame["type"] != "error", frame
                if frame["type"] == "logs":
                    seen[name].extend(frame["records"])

    async def produce(hub: InProcessHub, producer: str) -> None:
        async with hub.ws() as ws:
            for first in range(1, n + 1, per_frame):
                await ws.send(logs("shared", producer, first, first + per_frame - 1, producer))
            await ws.wait_ack("shared", n)

    with trio.fail_after(PATIENCE * 2):
        async with trio.open_nursery() as nursery:
            for hub, name in ((a, "a"), (b, "b")):
                ready = trio.Event()
                nursery.start_soon(view, hub, name, ready)
                await ready.wait()
            nursery.start_soon(produce, a, "pa")
            nursery.start_soon(produce, b, "pb")
    for hub in (a, b):
        assert_exactly_once(await stored(hub, "shared"), tagged("pa", 1, n), tagged("pb", 1, n))
    for name, records in seen.items():
        assert [r["seq"] for r in records] == list(range(1, 2 * n + 1)), f"viewer on hub {name}"


@pytest.mark.pg
async def test_a_newer_pg_schema_is_refused_at_start_without_a_traceback(fresh_pg_url: str) -> None:
    await pg_admin(
        fresh_pg_url,
        "CREATE TABLE keruta_schema (version integer NOT NULL)",
        "INSERT INTO keruta_schema (version) VALUES (99)",
    )
    code, stderr = await trio.to_thread.run_sync(run_hub, fresh_pg_url)
    assert_refused_at_start(code, stderr, "schema version 99")


# --- numbers at the edges, through the store ---------------------------------

EARLIEST = "0001-01-01T00:00:00.000000Z"
LATEST = "9999-12-31T23:59:59.999999Z"
MIDDLE = "2026-06-15T12:00:00.000000Z"


async def lines_of(client: Any, task_id: str) -> list[str]:
    """The task's stored lines, without the `gap` records a DELETE leaves in their place."""
    return [r["message"] for r in await fetch_all(client, task_id) if not r.get("kind")]


async def test_extreme_timestamps_and_delete_before_at_the_boundaries(hub: InProcessHub) -> None:
    """Records at year 0001 and 9999 and a moment between are stored as sent;
    `from`/`to` include their bounds; DELETE `before` deletes strictly older
    records (a record exactly at `before` stays), `before` at the very first
    moment deletes nothing, and a deleted seq is never handed out again."""
    body = [
        {"message": "earliest", "timestamp": EARLIEST},
        {"message": "middle", "timestamp": MIDDLE},
        {"message": "latest", "timestamp": LATEST},
    ]
    resp = await post(hub, "edges", body)
    assert resp.status_code == 200 and resp.json()["seqs"] == [1, 2, 3], resp.text
    async with hub.http() as client:
        records = await fetch_all(client, "edges")
        assert [(r["message"], r["timestamp"]) for r in records] == [(b["message"], b["timestamp"]) for b in body]
        for params, expected in (
            ({"from": EARLIEST, "to": EARLIEST}, ["earliest"]),
            ({"from": LATEST}, ["latest"]),
            ({"to": MIDDLE}, ["earliest", "middle"]),
            ({"from": MIDDLE, "to": LATEST}, ["middle", "latest"]),
        ):
            assert [r["message"] for r in await fetch_all(client, "edges", **params)] == expected, params
        stats = (await client.get(logs_path("edges", "/stats"))).json()
        assert stats["timeRange"] == {"start": EARLIEST, "end": LATEST}, stats
        for before, deleted, left in (
            (EARLIEST, 0, ["earliest", "middle", "latest"]),
            ("0001-01-01T00:00:00.000001Z", 1, ["middle", "latest"]),
            (MIDDLE, 0, ["middle", "latest"]),
            (LATEST, 1, ["latest"]),
        ):
            resp = await client.delete(logs_path("edges"), params={"before": before})
            assert resp.status_code == 200 and resp.json() == {"deletedCount": deleted}, (before, resp.text)
            assert await lines_of(client, "edges") == left, before
        resp = await client.delete(logs_path("edges"))
        assert resp.status_code == 200 and resp.json()["deletedCount"] >= 1, resp.text
        assert await lines_of(client, "edges") == []
        resp = await client.post(logs_path("edges"), json={"message": "after", "timestamp": EARLIEST})
        assert resp.status_code == 200 and resp.json()["seq"] > 3, "a deleted seq was handed out again"
        assert await lines_of(client, "edges") == ["after"]


async def test_integers_at_their_edges_against_stored_records(hub: InProcessHub) -> None:
    """Paging, cursors and subscriptions at the integers' edges over a task that
    has records: never a 500 or STORE_ERROR (an offset of page*size past int64
    must not overflow in the database), a subscription from MAX_SEQ waits
    quietly and gets the next record live."""
    assert (await post(hub, "big", [{"message": f"m {i}"} for i in range(1, 4)])).status_code == 200
    async with hub.http() as client:
        for params in (
            {"afterSeq": INT64_MAX}, {"afterSeq": MAX_SEQ}, {"afterSeq": MAX_SEQ + 1},
            {"page": INT64_MAX, "size": 1000}, {"page": INT64_MAX // 1000 + 1, "size": 1000},
            {"page": 2**53, "size": 1000}, {"page": INT64_MAX, "size": 1, "source": "stdout"},
            {"page": INT64_MAX, "size": 1, "q": "m"},
        ):
            resp = await client.get(logs_path("big"), params=params)
            assert resp.status_code in (200, 400), (params, resp.status_code, resp.text)
            if resp.status_code == 200:
                assert resp.json()["content"] == [], params
                if "afterSeq" not in params:  # past a cursor, the total counts what follows it
                    assert resp.json()["totalElements"] == 3, (params, resp.json())
            else:
                assert_error(resp, 400, "INVALID_PARAMETER")
    async with hub.ws() as ws:
        await ws.subscribe("big", from_seq=MAX_SEQ)
        await no_ack_for(ws, 0.3)  # nothing to replay: no frame, no error
        await ws.send({"type": "ping"})
        with trio.fail_after(BOUND):
            await ws.recv_type("pong")
        # A producer at the top of its seq space is refused; the task's seq is the hub's.
        await ws.send(logs("big", "top", MAX_SEQ, MAX_SEQ, "top"))
        with trio.fail_after(BOUND):
            error = await ws.recv_type("error")
        assert error["code"] == "SEQ_GAP" and error.get("resumeFrom") == 1, error
    assert [r["message"] for r in await stored(hub, "big")] == ["m 1", "m 2", "m 3"]


async def test_records_and_task_ids_at_their_size_limits_round_trip(hub: InProcessHub) -> None:
    """A task id of 128 characters and lines of exactly the maximum line size
    (ASCII, and multi-byte characters) are stored and read back byte for byte
    through every read path; one character more is refused and stores nothing."""
    task_id = ("T.-:_9" * 30)[:128]
    limit = DEFAULT_LIMITS.max_line_bytes
    ascii_line = "a" * limit
    wide_line = "\u00e9" * (limit // 2)  # two bytes each in UTF-8
    emoji_line = "\U0001f600" * (limit // 4)  # four bytes each
    lines = [ascii_line, wide_line, emoji_line]
    async with hub.ws() as ws:
        await ws.send({
            "type": "logs", "taskId": task_id, "producer": "big",
            "records": [wire(i, line) for i, line in enumerate(lines, 1)],
        })
        with trio.fail_after(PATIENCE):
            await ws.wait_ack(task_id, 3)
        sub_records: list[dict[str, Any]] = []
        await ws.subscribe(task_id, from_seq=1)
        with trio.fail_after(PATIENCE):
            while len(sub_records) < 3:
                frame = await ws.recv()
                if frame["type"] == "logs":
                    sub_records.extend(frame["records"])
        assert [r["message"] for r in sub_records] == lines
    async with hub.http() as client:
        records = await fetch_all(client, task_id)
        assert [r["message"] for r in records] == lines and [r["seq"] for r in records] == [1, 2, 3]
        assert all(not r.get("partial") for r in records)
        raw = await client.get(logs_path(task_id, "/raw"))
        assert raw.status_code == 200 and raw.text == "".join(line + "\n" for line in lines)
        found = await fetch_all(client, task_id, q="\U0001f600" * 3)
        assert [r["seq"] for r in found] == [3]
        tasks = (await client.get("/api/v1/tasks")).json()
        listed = tasks if isinstance(tasks, list) else tasks.get("content", tasks.get("tasks", []))
        assert task_id in [t["taskId"] for t in listed], tasks
        too_long = task_id + "x"
        assert_error(await client.post(logs_path(too_long), json={"message": "x"}), 400, "INVALID_TASK_ID")
        # A byte more than a line may hold: refused whole (the client splits it), never cut silently.
        resp = await client.post(logs_path(task_id), json={"message": "b" * (limit + 1)})
        assert_error(resp, 413, "TOO_LARGE", "message")
        assert [r["message"] for r in await fetch_all(client, task_id)] == lines
        resp = await client.delete(logs_path(task_id))
        assert resp.status_code == 200 and resp.json()["deletedCount"] >= 3, resp.text
        assert await fetch_all(client, task_id) == []

