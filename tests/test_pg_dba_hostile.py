"""What a database administrator does to the hub's own PostgreSQL database while it serves.

Everything here is done to the test's own database only, from an admin
connection, while producers stream, viewers follow and other clients read:
new connections refused (CONNECTION LIMIT 0, ALLOW_CONNECTIONS false, CONNECT
revoked from the role the hub logs in as) with the hub's sessions ended so it
must reconnect; every hub session terminated again and again; the database
made read-only as a standby is during a failover; its default isolation made
serializable under two hubs writing one task; lock and statement timeouts
set on it; its search_path moved to an empty schema; the hub's tables
vacuumed, clustered, reindexed and its integer columns widened under it; and the
session settings a DBA tunes per database.

Each case checks what the hub answers (HTTP status and error code, WebSocket
frames), that no acknowledged record is lost or doubled and nothing is
acknowledged that was not committed (read back over REST once the change is
undone), that other clients (/healthz, REST reads) are answered within
BOUND, that the hub never stops nor logs a Python traceback, and that it
recovers by itself once the change is undone. ALTER DATABASE settings apply
to sessions made afterwards: a case that needs them now ends the hub's
sessions, as a restart, a failover or a pooler would.

Real sockets, real PostgreSQL (KERUTA_TEST_PG_DSN; each test its own
database and, where one is needed, its own login role, both given back as
they were found), in-process hubs. No mocks.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import trio

from hub.store.base import StoreRefused
from tests import pgpool
from tests.hubclient import GONE, Ws, assert_error, fetch_all, logs_path, parse_metrics
from tests.inprocess import InProcessHub, InProcessHubFactory
from tests.test_store_hostile import (
    BOUND,
    NO_SERVER_TIMEOUTS,
    PATIENCE,
    PG_HOLDER,
    admin_dsn,
    assert_exactly_once,
    holding,
    logs,
    no_ack_for,
    pg_admin,
    pg_fetchval,
    pg_hubs,
    post,
    stored,
    tagged,
    watched_loop,
)

__all__ = ["pg_hubs"]  # a fixture, used by name

pytestmark = pytest.mark.pg


# --- the administrator ---------------------------------------------------------------


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Dba:
    """The administrator of the test's own database, working from an admin
    connection to the server's maintenance database (so a database that
    refuses connections can still be given them back)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.database = pgpool.database_of(url)
        self.schemas: list[str] = []

    async def alter(self, *changes: str) -> None:
        """ALTER DATABASE <the test's database> CHANGE, for each change."""
        await pg_admin(admin_dsn(), *(f"ALTER DATABASE {quoted(self.database)} {c}" for c in changes))

    async def set(self, *settings: str) -> None:
        """Defaults for the sessions made from now on (ALTER DATABASE ... SET)."""
        await self.alter(*(f"SET {s}" for s in settings))

    async def reset(self) -> None:
        await self.alter("RESET ALL")

    async def grant(self, statement: str) -> None:
        """A GRANT or REVOKE on the test's database (`{db}` in `statement`)."""
        await pg_admin(admin_dsn(), statement.format(db=quoted(self.database)))

    async def run(self, *statements: str) -> None:
        """Statements inside the test's database, as its owner would run them."""
        await pg_admin(self.url, *statements)

    async def maintain(self, statement: str) -> None:
        """A maintenance command, run again if the server chose it, not the
        hub's transaction it deadlocked with, to give way (as a DBA would)."""
        import asyncpg

        for attempt in range(5):
            try:
                await self.run(statement)
                return
            except asyncpg.DeadlockDetectedError:
                if attempt == 4:
                    raise

    async def new_schema(self, name: str) -> None:
        self.schemas.append(name)
        await self.run(f"CREATE SCHEMA {name}")

    async def end_hub_sessions(self, wait: bool = True) -> int:
        """pg_terminate_backend of every session a hub holds on the database
        (its pool's and its LISTEN connection); with `wait`, until they are gone."""
        pids = await pg_fetchval(admin_dsn(), (
            "WITH hub AS MATERIALIZED (SELECT pid FROM pg_stat_activity "
            f"WHERE datname = '{self.database}' AND application_name LIKE 'keruta-hub%') "
            "SELECT coalesce(array_agg(pid), '{}') FROM hub WHERE pg_terminate_backend(pid)"
        ))
        if wait and pids:
            listed = ",".join(str(pid) for pid in pids)
            with trio.fail_after(PATIENCE):
                while await pg_fetchval(admin_dsn(), f"SELECT count(*) FROM pg_stat_activity WHERE pid IN ({listed})"):
                    await trio.sleep(0.02)
        return len(pids)

    async def hub_tables_outside_public(self) -> list[str]:
        names = await pg_fetchval(self.url, (
            "SELECT coalesce(string_agg(schemaname || '.' || tablename, ', '), '') FROM pg_tables "
            "WHERE tablename LIKE 'keruta%' AND schemaname <> 'public'"
        ))
        return [n for n in str(names).split(", ") if n]

    def undo_all(self) -> None:
        """Everything a test here may have done to the database, undone (it goes
        back to the pool, tests/pgpool.py, which resets only its `public` schema)."""
        dsn = admin_dsn()
        db = quoted(self.database)
        pgpool.admin(
            dsn,
            f"ALTER DATABASE {db} RESET ALL",
            f"ALTER DATABASE {db} CONNECTION LIMIT -1",
            f"ALTER DATABASE {db} ALLOW_CONNECTIONS true",
            f"GRANT CONNECT ON DATABASE {db} TO PUBLIC",
        )
        for schema in self.schemas:
            pgpool.admin(self.url, f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def dba(fresh_pg_url: str) -> Iterator[Dba]:
    """The administrator of the test's database; whatever they changed is undone afterwards."""
    admin = Dba(fresh_pg_url)
    try:
        yield admin
    finally:
        admin.undo_all()


def as_role(url: str, role: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))


@pytest.fixture
def hub_role(fresh_pg_url: str, dba: Dba) -> Iterator[str]:
    """A login role of the test's own, no superuser (a connection limit and a
    revoked CONNECT do not bite a superuser), that may make the hub's tables
    in the test's database: that database's URL as the role. Dropped
    afterwards with all it owns."""
    role = "keruta_dba_" + secrets.token_hex(5)
    password = secrets.token_hex(8)
    dsn = admin_dsn()
    pgpool.admin(dsn, f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        pgpool.admin(fresh_pg_url, f"GRANT USAGE, CREATE ON SCHEMA public TO {role}")
        yield as_role(fresh_pg_url, role, password)
    finally:
        dba.undo_all()
        pgpool.admin(dsn, f"SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = '{role}'")
        pgpool.admin(fresh_pg_url, f"DROP OWNED BY {role}")
        pgpool.admin(dsn, f"DROP ROLE {role}")


# --- what clients see ------------------------------------------------------------------


def no_traceback(*hubs: InProcessHub) -> None:
    """Nothing the hubs logged (what `keruta-hub` prints on stderr) holds a Python traceback."""
    for hub in hubs:
        lines = hub.stderr_text.splitlines()
        at = next((i for i, line in enumerate(lines) if "Traceback" in line), None)
        assert at is None, "a traceback in the hub's log:\n" + "\n".join(lines[max(0, at - 2):at + 30])


async def store_state(client: httpx.AsyncClient) -> str:
    with trio.fail_after(BOUND):
        resp = await client.get("/healthz")
    assert resp.status_code == 200 and resp.json()["status"] == "ok", resp.text
    return str(resp.json()["store"])


async def until_store(client: httpx.AsyncClient, state: str, within: float = PATIENCE) -> None:
    """/healthz, answered within BOUND each time, says the store is `state` within `within`."""
    with trio.fail_after(within):
        while await store_state(client) != state:
            await trio.sleep(0.05)


async def refused_meanwhile(client: httpx.AsyncClient, post_timeout: float, reads: str, posted: str) -> None:
    """While the hub cannot connect: /healthz answers at once (the store
    unavailable), a read is answered 503 STORE_UNAVAILABLE within BOUND, a
    POST 503 STORE_UNAVAILABLE within its --post-timeout and BOUND (and is
    then not stored: the caller reads `posted` back later)."""
    await until_store(client, "unavailable", BOUND)
    with trio.fail_after(BOUND):
        resp = await client.get(logs_path(reads))
    assert_error(resp, 503, "STORE_UNAVAILABLE")
    assert "Retry-After" in resp.headers
    with trio.fail_after(post_timeout + BOUND):
        resp = await client.post(logs_path(posted), json={"message": "refused"})
    assert_error(resp, 503, "STORE_UNAVAILABLE")
    assert "Retry-After" in resp.headers


async def held(hub: InProcessHub, producer: Ws, seconds: float) -> None:
    """For `seconds` the producer gets neither an ack (nothing can have been
    committed) nor an error frame (the records are waited with, not refused),
    its connection stays open and the hub serving."""
    frames: list[dict[str, Any]] = []
    closed: BaseException | None = None
    with trio.move_on_after(seconds):
        try:
            while True:
                frames.append(await producer.recv())
        except GONE as exc:
            closed = exc
    wrong = [f for f in frames if f["type"] in ("ack", "error")]
    assert not wrong and closed is None and hub.alive, (
        f"while the database would not take them: frames {wrong}; producer's connection "
        f"{'closed: ' + repr(closed) if closed else 'open'}; hub {'serving' if hub.alive else 'stopped'}"
    )


async def acked_within(ws: Ws, task_id: str, seq: int, seconds: float = PATIENCE) -> None:
    with trio.fail_after(seconds):
        await ws.wait_ack(task_id, seq)


async def until_logged(hub: InProcessHub, *words: str) -> None:
    """A line of the hubs' log (what `keruta-hub` prints on stderr) says all of `words`."""
    with trio.fail_after(PATIENCE):
        while not any(all(w in line for w in words) for line in hub.stderr_text.splitlines()):
            await trio.sleep(0.05)


async def produce_until(hub: InProcessHub, task_id: str, producer: str, batch: int, stop: trio.Event) -> int:
    """Frames of `batch` records (messages `producer seq`) one after another
    until `stop`, then until the last is acked; how many records were sent."""
    sent = 0
    async with hub.ws() as ws, trio.open_nursery() as nursery:

        async def acks() -> None:
            while not stop.is_set() or ws.acked.get(task_id, 0) < sent:
                with trio.move_on_after(0.05):
                    await ws.wait_ack(task_id, sent + 1)

        nursery.start_soon(acks)
        while not stop.is_set():
            await ws.send(logs(task_id, producer, sent + 1, sent + batch, producer))
            sent += batch
            await trio.sleep(0.02)
    return sent


async def produce(hub: InProcessHub, task_id: str, producer: str, n: int, batch: int, pause: float = 0.0) -> None:
    """`producer`'s records 1..n (messages `producer seq`) in frames of
    `batch`, pipelined, until the last is acked; an error frame fails."""
    async with hub.ws() as ws, trio.open_nursery() as nursery:
        nursery.start_soon(acked_within, ws, task_id, n, PATIENCE * 2)
        for first in range(1, n + 1, batch):
            await ws.send(logs(task_id, producer, first, min(first + batch - 1, n), producer))
            await trio.sleep(pause)


class Viewer:
    """A live viewer of one task from seq 1, checking each record as it comes."""

    def __init__(self, hub: InProcessHub, task_id: str) -> None:
        self.hub = hub
        self.task_id = task_id
        self.seqs: list[int] = []

    async def follow(self, ready: trio.Event, enough: Callable[[], bool]) -> None:
        async with self.hub.ws() as ws:
            await ws.subscribe(self.task_id, from_seq=1)
            ready.set()
            with trio.fail_after(PATIENCE * 2):
                while not enough():
                    with trio.move_on_after(0.05):
                        frame = await ws.recv()
                        assert frame["type"] != "error", f"viewer of {self.task_id} on {self.hub.url}: {frame}"
                        if frame["type"] == "logs":
                            for record in frame["records"]:
                                assert not self.seqs or record["seq"] > self.seqs[-1], (
                                    f"seq {record['seq']} after {self.seqs[-1]}: doubled or out of order")
                                self.seqs.append(record["seq"])


async def following(nursery: trio.Nursery, hub: InProcessHub, task_id: str, last: Callable[[], int]) -> Viewer:
    """A Viewer started in `nursery`, subscribed, following until it has seen seq `last()`."""
    viewer = Viewer(hub, task_id)
    ready = trio.Event()
    nursery.start_soon(viewer.follow, ready, lambda: bool(viewer.seqs) and viewer.seqs[-1] >= last())
    await ready.wait()
    return viewer


async def same_on_every_hub(task_id: str, *hubs: InProcessHub) -> list[dict[str, Any]]:
    """The task's records, which every hub answers alike over REST."""
    answers = [await stored(hub, task_id) for hub in hubs]
    for hub, answer in zip(hubs[1:], answers[1:], strict=True):
        assert answer == answers[0], f"{hub.url} answers {task_id} differently from {hubs[0].url}"
    return answers[0]


def contains(exc: BaseException, kind: type[BaseException]) -> bool:
    """`exc`, an exception group holding one, or what it was raised from, is a `kind`."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return True
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


# --- 1. new connections refused ----------------------------------------------------------


@pytest.mark.pg
async def test_pg_connection_limit_then_allow_connections_false_while_a_producer_streams(
    pg_hubs: InProcessHubFactory, dba: Dba, hub_role: str
) -> None:
    """CONNECTION LIMIT 0 on the database: the sessions the hub has go on
    (records acked), new ones are refused (53300). The DBA then ends the
    hub's sessions, so it must reconnect while refused; later the limit goes
    and ALLOW_CONNECTIONS false refuses instead (55000). Meanwhile the hub
    waits it out: nothing acked, reads and POSTs 503 STORE_UNAVAILABLE within
    their bounds, /healthz says the store is unavailable, never a crash.
    Connections allowed again, it catches up by itself: every record once."""
    hub = await pg_hubs.astart("--store-retry-max", "0.5", "--post-timeout", "1", db=hub_role)
    assert (await post(hub, "other", [{"message": m} for m in tagged("other", 1, 3)])).status_code == 200
    async with watched_loop(), hub.ws() as producer, hub.http() as client:
        await producer.send(logs("s", "p", 1, 50, "s"))
        await acked_within(producer, "s", 50)
        await dba.alter("CONNECTION LIMIT 0")
        await producer.send(logs("s", "p", 51, 100, "s"))
        await acked_within(producer, "s", 100)
        with trio.fail_after(BOUND):
            resp = await client.get(logs_path("other"))
        if resp.status_code != 200:  # a read that needed a new connection
            assert_error(resp, 503, "STORE_UNAVAILABLE")

        assert await dba.end_hub_sessions() >= 1
        await producer.send(logs("s", "p", 101, 150, "s"))
        await held(hub, producer, 1.0)
        await refused_meanwhile(client, 1, "other", "posted")

        await dba.alter("ALLOW_CONNECTIONS false", "CONNECTION LIMIT -1")  # never a moment without either
        await dba.end_hub_sessions()
        await producer.send(logs("s", "p", 151, 200, "s"))
        await held(hub, producer, 1.0)
        await refused_meanwhile(client, 1, "other", "posted")
        assert hub.alive

        await dba.alter("ALLOW_CONNECTIONS true")
        await acked_within(producer, "s", 200)
        await until_store(client, "ok")
        resp = await client.post(logs_path("posted"), json={"message": "after"})
        assert resp.status_code == 200, resp.text
    assert_exactly_once(await stored(hub, "s"), tagged("s", 1, 200))
    assert [r["message"] for r in await stored(hub, "posted")] == ["after"], "a POST answered 503 was stored"
    assert [r["message"] for r in await stored(hub, "other")] == tagged("other", 1, 3)
    no_traceback(hub)


# --- 2. the hub's sessions terminated again and again -------------------------------------


@pytest.mark.pg
async def test_pg_every_hub_session_terminated_every_few_hundred_ms_during_a_stream(
    pg_hubs: InProcessHubFactory, dba: Dba
) -> None:
    """Two hubs on the database, a producer on each writing one task, a live
    viewer on each, REST POSTs on one, reads on the other; every 100-300 ms
    the DBA terminates every hub session (pooled and LISTEN), commits in
    flight included. Every record sent is acked and stored exactly once with
    task seqs 1..n, both viewers see every seq once and in order, every POST
    is answered 200 and stored once, reads are answered within BOUND (200,
    or 503 when their connection was ended under them), both hubs answer alike."""
    a = await pg_hubs.astart("--store-retry-max", "0.5")
    b = await pg_hubs.astart("--store-retry-max", "0.5", db=a.db)
    posts, rounds = 20, 8
    assert (await post(b, "other", [{"message": m} for m in tagged("other", 1, 3)])).status_code == 200
    kills: list[int] = []
    reads: list[int] = []
    sent: dict[str, int] = {}
    last = [2**62]
    rng = random.Random(7)

    async def killer(stop: trio.Event) -> None:
        for _ in range(rounds):
            await trio.sleep(rng.uniform(0.1, 0.3))
            kills.append(await dba.end_hub_sessions(wait=False))
        stop.set()

    async def producer(hub: InProcessHub, name: str, stop: trio.Event) -> None:
        sent[name] = await produce_until(hub, "t", name, 25, stop)

    async def poster() -> None:
        async with a.http() as client:
            for i in range(1, posts + 1):
                with trio.fail_after(PATIENCE):
                    resp = await client.post(logs_path("t"), json={"message": f"post {i}"})
                assert resp.status_code == 200, resp.text
                await trio.sleep(0.05)

    async def reader(stop: trio.Event) -> None:
        async with b.http() as client:
            while not stop.is_set():
                with trio.fail_after(BOUND):
                    assert (await client.get("/healthz")).status_code == 200
                    resp = await client.get(logs_path("other"))
                if resp.status_code == 200:
                    assert [r["message"] for r in resp.json()["content"]] == tagged("other", 1, 3)
                else:  # its connection terminated under it, and the next one too
                    assert_error(resp, 503, "STORE_UNAVAILABLE")
                reads.append(resp.status_code)
                await trio.sleep(0.05)

    with trio.fail_after(PATIENCE * 2):
        async with trio.open_nursery() as nursery:
            viewers = [await following(nursery, hub, "t", lambda: last[0]) for hub in (a, b)]
            stop = trio.Event()
            async with trio.open_nursery() as writers:
                writers.start_soon(killer, stop)
                writers.start_soon(reader, stop)
                writers.start_soon(producer, a, "pa", stop)
                writers.start_soon(producer, b, "pb", stop)
                writers.start_soon(poster)
            last[0] = sent["pa"] + sent["pb"] + posts
    assert sum(kills) >= rounds, kills
    rows = await same_on_every_hub("t", a, b)
    assert_exactly_once(rows, tagged("pa", 1, sent["pa"]), tagged("pb", 1, sent["pb"]), tagged("post", 1, posts))
    for viewer in viewers:
        assert viewer.seqs == list(range(1, last[0] + 1)), f"the viewer on {viewer.hub.url}"
    assert reads, "no read was answered"
    no_traceback(a, b)


# --- 3. a standby during a failover: read-only -------------------------------------------


@pytest.mark.pg
async def test_pg_database_read_only_as_a_standby_in_a_failover(pg_hubs: InProcessHubFactory, dba: Dba) -> None:
    """default_transaction_read_only on the database and the hub's sessions
    ended (a failover onto a standby): writes fail with 25006, which is
    waited out: nothing acked, a POST 503 STORE_UNAVAILABLE (not stored), a
    DELETE 503, /healthz says the store is unavailable, while reads and a new
    subscriber's replay are served as before. A hub starting meanwhile waits
    for a writable database instead of failing. Writable again, both carry
    on: every record once, the run's status after its records."""
    hub = await pg_hubs.astart("--store-retry-max", "0.5", "--post-timeout", "1")
    assert (await post(hub, "other", [{"message": m} for m in tagged("other", 1, 3)])).status_code == 200
    late: list[InProcessHub] = []

    async def start_late() -> None:
        late.append(await pg_hubs.astart("--store-retry-max", "0.5", db=hub.db))

    async with watched_loop(), hub.ws() as viewer, hub.ws() as producer, hub.http() as client:
        await viewer.subscribe("s", from_seq=1)
        await producer.send(logs("s", "p", 1, 50, "s"))
        await acked_within(producer, "s", 50)

        await dba.set("default_transaction_read_only = on")
        assert await dba.end_hub_sessions() >= 1
        await producer.send(logs("s", "p", 51, 100, "s"))
        await producer.send({"type": "status", "taskId": "s", "state": "succeeded", "exitCode": 0, "producer": "p"})
        await held(hub, producer, 1.0)
        await until_store(client, "unavailable", BOUND)
        with trio.fail_after(BOUND):
            page = await client.get(logs_path("other"))
            assert page.status_code == 200, page.text
            assert [r["message"] for r in page.json()["content"]] == tagged("other", 1, 3)
            async with hub.ws() as replay:
                await replay.subscribe("s", from_seq=1)
                assert await replay.collect("s", 50) == list(range(1, 51))
        with trio.fail_after(1 + BOUND):
            resp = await client.post(logs_path("posted"), json={"message": "refused"})
        assert_error(resp, 503, "STORE_UNAVAILABLE")
        with trio.fail_after(BOUND):
            resp = await client.delete(logs_path("other"))
        assert_error(resp, 503, "STORE_UNAVAILABLE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_late)
            # The late hub's first try at its schema failed (its log says so): it waits.
            await until_logged(hub, "keruta.hub WARNING store postgresql://", "ReadOnlySQLTransactionError")
            assert not late, "a hub started on a read-only database"
            await dba.reset()
            await acked_within(producer, "s", 100)
            with trio.fail_after(PATIENCE):
                status = await producer.recv_type("status")
            assert (status["state"], status.get("exitCode")) == ("succeeded", 0), status
            await until_store(client, "ok")
        with trio.fail_after(PATIENCE):
            assert await viewer.collect("s", 100) == list(range(1, 101))
    assert_exactly_once(await stored(hub, "s"), tagged("s", 1, 100))
    assert await stored(hub, "posted") == []
    assert [r["message"] for r in await stored(hub, "other")] == tagged("other", 1, 3)
    assert late and [r["message"] for r in await stored(late[0], "s")] == tagged("s", 1, 100)
    no_traceback(hub)


# --- 4. serializable isolation -----------------------------------------------------------


@pytest.mark.pg
async def test_pg_serializable_by_default_under_two_hubs_writing_one_task(
    pg_hubs: InProcessHubFactory, dba: Dba
) -> None:
    """default_transaction_isolation = serializable on the database; two hubs
    write one task at once (a producer and a REST poster on each) while each
    also deletes the task's old records (none are). Serialization failures
    (40001) are a normal outcome under this isolation and must be retried
    by the hub: every POST and DELETE answered 200, every record stored once
    with seqs 1..n, both viewers see all."""
    await dba.set("default_transaction_isolation = 'serializable'")
    a = await pg_hubs.astart("--store-retry-max", "0.5")
    b = await pg_hubs.astart("--store-retry-max", "0.5", db=a.db)
    n, posts, deletes = 600, 15, 15
    answers: list[tuple[str, int, str]] = []
    last = [2 * n + 2 * posts]

    async def poster(hub: InProcessHub, name: str) -> None:
        async with hub.http() as client:
            for i in range(1, posts + 1):
                with trio.fail_after(PATIENCE):
                    resp = await client.post(logs_path("shared"), json={"message": f"{name} {i}"})
                answers.append((f"POST {name} {i}", resp.status_code, resp.text[:200]))

    async def deleter(hub: InProcessHub, name: str) -> None:
        async with hub.http() as client:
            for i in range(1, deletes + 1):
                with trio.fail_after(PATIENCE):
                    resp = await client.delete(logs_path("shared"), params={"before": "2000-01-01T00:00:00Z"})
                answers.append((f"DELETE on {name} #{i}", resp.status_code, resp.text[:200]))
                await trio.sleep(0.02)

    with trio.fail_after(PATIENCE * 2):
        async with trio.open_nursery() as nursery:
            viewers = [await following(nursery, hub, "shared", lambda: last[0]) for hub in (a, b)]
            async with trio.open_nursery() as writers:
                writers.start_soon(produce, a, "shared", "pa", n, 10)
                writers.start_soon(produce, b, "shared", "pb", n, 10)
                writers.start_soon(poster, a, "ra")
                writers.start_soon(poster, b, "rb")
                writers.start_soon(deleter, a, "a")
                writers.start_soon(deleter, b, "b")
            last[0] = len(await stored(a, "shared"))
    ok = {what for what, status, _ in answers if status == 200}
    posted = [[f"{name} {i}" for i in range(1, posts + 1) if f"POST {name} {i}" in ok] for name in ("ra", "rb")]
    rows = await same_on_every_hub("shared", a, b)
    assert_exactly_once(rows, tagged("pa", 1, n), tagged("pb", 1, n), *posted)
    for viewer in viewers:
        assert viewer.seqs == list(range(1, len(rows) + 1)), f"the viewer on {viewer.hub.url}"
    failed = [x for x in answers if x[1] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests not retried past a serialization failure: {failed[:3]}"
    no_traceback(a, b)


# --- 5. lock and statement timeouts ---------------------------------------------------------


@pytest.mark.pg
async def test_pg_lock_and_statement_timeouts_on_the_database(
    pg_hubs: InProcessHubFactory, dba: Dba, fresh_pg_url: str
) -> None:
    """lock_timeout = 10ms and statement_timeout = 50ms on the database, a
    burst, then another session holding one task's row: that task's writes
    are cut by the server again and again and retried, never acked before
    they are stored, its POST answered 503 (not stored); other tasks, reads
    and /healthz are served meanwhile. Released, all is stored once, the
    run's status after its records."""
    await dba.set("lock_timeout = '10ms'", "statement_timeout = '50ms'")
    hub = await pg_hubs.astart("--store-retry-max", "0.5", "--post-timeout", "1")
    assert (await post(hub, "held", {"message": "held first"})).status_code == 200
    async with hub.ws() as producer, hub.http() as client:
        for first in range(1, 1001, 100):
            await producer.send(logs("free", "p", first, first + 99, "free"))
        await acked_within(producer, "free", 1000)
        lock = "SELECT 1 FROM keruta_tasks WHERE task_id = 'held' FOR UPDATE"
        async with holding(PG_HOLDER, fresh_pg_url, *NO_SERVER_TIMEOUTS, "SET lock_timeout = 0", lock) as holder:
            await producer.send(logs("held", "p", 1, 50, "held"))
            await producer.send(logs("held", "p", 51, 100, "held"))
            await producer.send({"type": "status", "taskId": "held", "state": "failed", "exitCode": 3,
                                 "producer": "p"})
            await producer.send(logs("free", "p", 1001, 1100, "free"))
            await acked_within(producer, "free", 1100, BOUND)
            with trio.fail_after(1 + BOUND):
                resp = await client.post(logs_path("held"), json={"message": "refused"})
            assert_error(resp, 503, "STORE_UNAVAILABLE")
            with trio.fail_after(BOUND):
                assert (await client.get("/healthz")).status_code == 200
                page = await client.get(logs_path("held"))
            assert page.status_code == 200 and [r["message"] for r in page.json()["content"]] == ["held first"]
            await no_ack_for(producer, 1.0)  # many statement timeouts meanwhile
            # Cut short by the database's statement_timeout, a wait for a row
            # held elsewhere is still that task's business: no store outage.
            health = (await client.get("/healthz")).json()
            assert health["store"] == "ok", health
            failures = parse_metrics((await client.get("/metrics")).text).get("keruta_store_failures_total", 0)
            assert failures == 0, f"{failures} store failures counted for one held row"
            await holder.release()
        await acked_within(producer, "held", 100)
        with trio.fail_after(PATIENCE):
            status = await producer.recv_type("status")
        assert (status["state"], status.get("exitCode")) == ("failed", 3), status
    assert_exactly_once(await stored(hub, "held"), ["held first"], tagged("held", 1, 100))
    assert [r["message"] for r in await stored(hub, "held")][1:] == tagged("held", 1, 100)
    assert_exactly_once(await stored(hub, "free"), tagged("free", 1, 1100))
    no_traceback(hub)


# --- 6. search_path moved to an empty schema -----------------------------------------------


@pytest.mark.pg
async def test_pg_search_path_moved_to_an_empty_schema_under_a_running_hub(
    pg_hubs: InProcessHubFactory, dba: Dba
) -> None:
    """The DBA makes a schema and sets the database's search_path to it (the
    hub's tables are in public); the hub's sessions are made again. The hub
    made its tables and knows where they are: it goes on storing into them
    (every record acked and stored once, reads 200, its live viewer sees
    all), and never answers STORE_ERROR, 500, nor stops."""
    hub = await pg_hubs.astart("--store-retry-max", "0.5", "--post-timeout", "1")
    async with hub.ws() as viewer, hub.ws() as producer, hub.http() as client:
        await viewer.subscribe("s", from_seq=1)
        await producer.send(logs("s", "p", 1, 50, "s"))
        await acked_within(producer, "s", 50)
        await dba.new_schema("elsewhere")
        await dba.set("search_path = elsewhere")
        assert await dba.end_hub_sessions() >= 1
        await producer.send(logs("s", "p", 51, 100, "s"))
        await acked_within(producer, "s", 100)
        with trio.fail_after(BOUND):
            resp = await client.post(logs_path("s"), json={"message": "posted"})
        assert resp.status_code == 200, resp.text
        with trio.fail_after(BOUND):
            page = await client.get(logs_path("s"), params={"size": 1000})
        assert page.status_code == 200, page.text
        assert [r["message"] for r in page.json()["content"]] == [*tagged("s", 1, 100), "posted"]
        with trio.fail_after(PATIENCE):
            assert await viewer.collect("s", 101) == list(range(1, 102))
    assert hub.alive
    assert await dba.hub_tables_outside_public() == []
    no_traceback(hub)


@pytest.mark.pg
async def test_pg_a_hub_started_after_the_search_path_moved_does_not_split_the_data(
    pg_hubs: InProcessHubFactory, dba: Dba
) -> None:
    """A hub stores a task; the DBA points the database's search_path at a new,
    empty schema; a second hub is started on the same database. It must not
    make a second, empty set of tables there and serve the task from it (two
    seq 1s for one task, records the other hub cannot see): either it uses
    the tables that exist, and both hubs answer alike, or it refuses to
    start, naming the problem."""
    a = await pg_hubs.astart("--store-retry-max", "0.5")
    assert (await post(a, "s", [{"message": m} for m in tagged("s", 1, 20)])).status_code == 200
    await dba.new_schema("elsewhere")
    await dba.set("search_path = elsewhere")
    try:
        with trio.fail_after(PATIENCE):
            b: InProcessHub | None = await pg_hubs.astart("--store-retry-max", "0.5", db=a.db)
    except Exception as exc:
        assert contains(exc, StoreRefused), f"the second hub failed to start, not clearly: {exc!r}"
        b = None
    assert await dba.hub_tables_outside_public() == [], "the second hub made its tables again, elsewhere"
    if b is not None:
        assert [r["message"] for r in await stored(b, "s")] == tagged("s", 1, 20)
        resp = await post(b, "s", {"message": "from b"})
        assert resp.status_code == 200 and resp.json()["seq"] == 21, resp.text
        resp = await post(a, "s", {"message": "from a"})
        assert resp.status_code == 200 and resp.json()["seq"] == 22, resp.text
        rows = await same_on_every_hub("s", a, b)
        assert_exactly_once(rows, tagged("s", 1, 20), ["from b"], ["from a"])
        no_traceback(b)
    no_traceback(a)


# --- 7. CONNECT revoked ---------------------------------------------------------------


@pytest.mark.pg
async def test_pg_connect_revoked_from_the_hubs_role_mid_stream(
    pg_hubs: InProcessHubFactory, dba: Dba, hub_role: str
) -> None:
    """REVOKE CONNECT ON DATABASE ... FROM PUBLIC while the hub (logged in as
    a role that has CONNECT only through PUBLIC) serves: its sessions go on;
    once the DBA ends them, every new connection is refused (42501,
    permission denied for database). Like a refused login (28xxx) that is
    an outage to wait out: nothing acked, no STORE_ERROR, reads and POSTs
    503 STORE_UNAVAILABLE, the hub stays up. GRANT it back: it recovers by
    itself, every record once."""
    hub = await pg_hubs.astart("--store-retry-max", "0.5", "--post-timeout", "1", db=hub_role)
    assert (await post(hub, "other", [{"message": m} for m in tagged("other", 1, 3)])).status_code == 200
    async with watched_loop(), hub.ws() as producer, hub.http() as client:
        await producer.send(logs("s", "p", 1, 50, "s"))
        await acked_within(producer, "s", 50)
        await dba.grant("REVOKE CONNECT ON DATABASE {db} FROM PUBLIC")
        await producer.send(logs("s", "p", 51, 100, "s"))
        await acked_within(producer, "s", 100)
        assert await dba.end_hub_sessions() >= 1
        await producer.send(logs("s", "p", 101, 150, "s"))
        await held(hub, producer, 1.0)
        await refused_meanwhile(client, 1, "other", "posted")
        assert hub.alive
        await dba.grant("GRANT CONNECT ON DATABASE {db} TO PUBLIC")
        await acked_within(producer, "s", 150)
        await until_store(client, "ok")
    assert_exactly_once(await stored(hub, "s"), tagged("s", 1, 150))
    assert await stored(hub, "posted") == [], "a POST answered 503 was stored"
    no_traceback(hub)


# --- 8. maintenance and settings -------------------------------------------------------------


@pytest.mark.pg
async def test_pg_vacuum_full_cluster_and_reindex_of_the_hubs_tables_during_a_stream(
    pg_hubs: InProcessHubFactory, dba: Dba
) -> None:
    """VACUUM FULL, CLUSTER, REINDEX (plain and CONCURRENTLY) and ANALYZE of
    the hub's tables, one after another, while a producer streams and a
    viewer follows: each holds its table's lock a moment, which the hub
    waits for (a command the server picks as a deadlock's victim over the
    hub's transaction is run again, as a DBA would); reads are answered
    within BOUND, the viewer sees every seq, every record is stored once."""
    hub = await pg_hubs.astart("--store-retry-max", "0.5")
    n = 1200
    async with trio.open_nursery() as nursery, hub.http() as client:
        viewer = await following(nursery, hub, "m", lambda: n)
        async with watched_loop(), trio.open_nursery() as writers:
            writers.start_soon(produce, hub, "m", "m", n, 20, 0.01)
            for statement in (
                "VACUUM FULL keruta_chunks", "CLUSTER keruta_chunks USING keruta_chunks_pkey",
                "REINDEX TABLE keruta_tasks", "REINDEX TABLE CONCURRENTLY keruta_chunks",
                "VACUUM (FULL, ANALYZE) keruta_producers", "VACUUM FULL", "ANALYZE",
            ):
                await trio.sleep(0.05)
                await dba.maintain(statement)
                with trio.fail_after(BOUND):
                    assert (await client.get("/healthz")).status_code == 200
                    page = await client.get(logs_path("m"), params={"size": 1000})
                assert page.status_code == 200, (statement, page.text)
    assert viewer.seqs == list(range(1, n + 1))
    assert_exactly_once(await stored(hub, "m"), tagged("m", 1, n))
    no_traceback(hub)


@pytest.mark.pg
async def test_pg_integer_columns_widened_to_bigint_under_a_running_hub(
    pg_hubs: InProcessHubFactory, dba: Dba
) -> None:
    """The DBA widens the hub's integer columns to bigint (ALTER TABLE ...
    ALTER COLUMN ... TYPE bigint) while it serves: every statement the hub's
    connections prepared on those tables is invalid from then on
    (InvalidCachedStatementError, 0A000) until prepared again. The hub must
    prepare them again, not answer 500 or STORE_ERROR: reads, a replay,
    writes and a run's status all go on."""
    hub = await pg_hubs.astart("--store-retry-max", "0.5")

    async def every_read(client: httpx.AsyncClient, last: int) -> list[tuple[str, int, str]]:
        answers = []
        for path, params in (
            (logs_path("w"), {"size": 1000}), (logs_path("w"), {"afterSeq": 10, "size": 5}),
            (logs_path("w"), {"q": "w 1"}), ("/api/v1/tasks/w", {}), ("/api/v1/tasks", {}),
            (logs_path("w", "/stats"), {}), (logs_path("w", "/raw"), {}),
        ):
            with trio.fail_after(BOUND):
                resp = await client.get(path, params=params)
            answers.append((path, resp.status_code, resp.text[:300]))
        async with hub.ws() as replay:
            with trio.fail_after(BOUND):
                await replay.subscribe("w", from_seq=1)
                assert await replay.collect("w", last) == list(range(1, last + 1))
        return answers

    async with hub.ws() as producer, hub.http() as client:
        await producer.send(logs("w", "p", 1, 100, "w"))
        await producer.send({"type": "status", "taskId": "w", "state": "running", "producer": "p"})
        await acked_within(producer, "w", 100)
        await producer.recv_type("status")
        for _ in range(3):  # on every connection of the pool, as far as it goes
            assert all(status == 200 for _, status, _ in await every_read(client, 100))
        await dba.run(
            "ALTER TABLE keruta_chunks ALTER COLUMN n TYPE bigint",
            "ALTER TABLE keruta_tasks ALTER COLUMN exit_code TYPE bigint",
            "ALTER TABLE keruta_producers ALTER COLUMN exit_code TYPE bigint",
        )
        answers = [a for _ in range(3) for a in await every_read(client, 100)]
        await producer.send(logs("w", "p", 101, 200, "w"))
        await producer.send({"type": "status", "taskId": "w", "state": "succeeded", "exitCode": 0, "producer": "p"})
        await acked_within(producer, "w", 200)
        with trio.fail_after(PATIENCE):
            status = await producer.recv_type("status")
        answers += await every_read(client, 200)
    failed = [a for a in answers if a[1] != 200]
    assert not failed, f"answered after the columns were widened: {failed}"
    assert (status["state"], status.get("exitCode")) == ("succeeded", 0), status
    assert_exactly_once(await stored(hub, "w"), tagged("w", 1, 200))
    no_traceback(hub)


# Session settings a DBA sets per database, some that the hub must override
# for itself (an acknowledged record is committed; a transaction of its own
# is never idle long) and some that must change nothing it stores or reads.
TUNED = (
    "idle_in_transaction_session_timeout = '1ms'", "synchronous_commit = off",
    "client_encoding = 'LATIN1'", "DateStyle = 'SQL, DMY'", "TimeZone = 'Pacific/Chatham'",
    "IntervalStyle = 'sql_standard'", "bytea_output = 'escape'", "extra_float_digits = -15",
    "standard_conforming_strings = off", "plan_cache_mode = force_generic_plan",
    "default_transaction_deferrable = on", "enable_seqscan = off", "enable_indexscan = off",
    "work_mem = '64kB'", "jit = on", "jit_above_cost = 0", "session_replication_role = replica",
    "client_min_messages = 'debug5'", "default_toast_compression = 'pglz'",
)


@pytest.mark.pg
async def test_pg_session_settings_a_dba_tunes_change_nothing_stored(
    pg_hubs: InProcessHubFactory, dba: Dba
) -> None:
    """Idle-in-transaction timeout of 1 ms, synchronous_commit off, another
    client encoding, date style and time zone, escaped bytea, planner
    toggles... set on the database before the hub starts: every record is
    acked once stored and read back byte for byte through every read path."""
    await dba.set(*TUNED)
    hub = await pg_hubs.astart("--store-retry-max", "0.5")
    tail = " \u00e9\U0001f600\\'\"%_ x"
    n = 2000
    async with hub.ws() as viewer, hub.ws() as producer, hub.http() as client:
        await viewer.subscribe("t", from_seq=1)
        for first in range(1, n + 1, 200):
            frame = logs("t", "p", first, first + 199, "t")
            for record in frame["records"]:
                record["message"] += tail
            await producer.send(frame)
        await acked_within(producer, "t", n)
        with trio.fail_after(PATIENCE):
            assert await viewer.collect("t", n) == list(range(1, n + 1))
        with trio.fail_after(BOUND * 2):
            found = await fetch_all(client, "t", q="\U0001f600\\'")
            raw = await client.get(logs_path("t", "/raw"))
            stats = await client.get(logs_path("t", "/stats"))
            tasks = await client.get("/api/v1/tasks")
            deleted = await client.delete(logs_path("t"), params={"before": "2000-01-01T00:00:00Z"})
            metrics = parse_metrics((await client.get("/metrics")).text)
    assert len(found) == n
    assert raw.status_code == 200 and raw.text == "".join(f"t {s}{tail}\n" for s in range(1, n + 1))
    assert stats.status_code == 200 and stats.json()["totalLogs"] == n, stats.text
    assert tasks.status_code == 200 and [t["taskId"] for t in tasks.json()["tasks"]] == ["t"], tasks.text
    assert deleted.status_code == 200 and deleted.json() == {"deletedCount": 0}, deleted.text
    assert metrics["keruta_store_failures_total"] == 0, "a setting the hub overrides cut its transactions"
    records = await stored(hub, "t")
    assert [r["message"] for r in records] == [f"t {s}{tail}" for s in range(1, n + 1)]
    assert [r["seq"] for r in records] == list(range(1, n + 1))
    no_traceback(hub)
