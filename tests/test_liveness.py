"""Liveness: nothing hangs, nothing dies of a recoverable fault.

In-process tests drive the real writer on a real SQLite store with trio's
autojump clock (asyncpg's timeouts run on the same clock, so PostgreSQL cannot
share it); an outage is injected by `Outage`, a switch in front of the store.
On PostgreSQL the same behaviour is tested for real: a hub (served in the
test's trio run) against a database that refuses connections (ALTER DATABASE
... ALLOW_CONNECTIONS false), with real agent processes.
"""

from __future__ import annotations

import functools
import io
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from agent.http import system_tls
from agent.link.framing import fit_frame
from agent.pipeline.failures import UplinkFailed
from agent.pipeline.uplink import Uplink, UplinkSettings
from agent.spool.spool import Spool
from agent.tail import TailSettings, tail
from hub.actors.broadcaster import Broadcaster
from hub.actors.writer import Writer, write_within
from hub.messages import WriteRequest
from hub.metrics import Metrics
from hub.store.base import AppendResult, Incoming, LogQuery, StoreUnavailable
from hub.store.pg_errors import transient as _transient
from hub.store.sqlite import SQLiteStore
from hub.task_rate_limits import Limiters
from keruta.recordjson import encode_line, logs_frame
from keruta.timefmt import now_ts
from tests import hubclient, pgpool
from tests.agentclient import free_port, run_agent
from tests.conftest import pg_dsn
from tests.hubclient import InProcessHubFactory, Ws, make_record
from tests.hubclient import logs_frame as hc_logs_frame
from tests.inprocess import InProcessHub, in_process_hubs
from tests.support import HubProcess

sqlite_hub_factory, hub_factory = hubclient.sqlite_hub_factory, hubclient.hub_factory  # fixtures


class Outage:
    """A real store behind a switch: `down` makes appends fail as in an outage;
    `gate`, while set to an unset Event, holds appends mid-attempt."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.down = False
        self.gate: trio.Event | None = None
        self.attempts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def append(self, items: Sequence[Incoming]) -> AppendResult:
        self.attempts += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StoreUnavailable("injected outage")
        return await self.store.append(items)  # type: ignore[no-any-return]


def line(task_id: str, message: str, seq: int | None = None) -> Incoming:
    return Incoming(task_id=task_id, seq=seq, timestamp=now_ts(), source="stdout", level="INFO", message=message)


async def messages(store: Any, task_id: str) -> list[str]:
    page = await store.query(LogQuery(task_id=task_id, size=1000))
    return [r.message for r in page.content]


@pytest.fixture
async def writer_on(tmp_path: Path) -> Any:
    """(outage, inbox, writer) with the writer running on a real SQLite store."""
    store = SQLiteStore(tmp_path / "keruta.db")
    await store.open()
    outage = Outage(store)
    send, recv = trio.open_memory_channel[WriteRequest](64)
    writer = Writer(outage, Broadcaster(), Metrics())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, recv)
        yield outage, send, writer
        send.close()
    await store.close()


# --- every failure to reach the database is an outage -----------------


def _pg_error(cls: type[asyncpg.PostgresError], message: str) -> asyncpg.PostgresError:
    return cls(message)


@pytest.mark.parametrize(
    "error",
    [
        _pg_error(asyncpg.exceptions.ObjectNotInPrerequisiteStateError, 'database "x" is not currently accepting connections'),
        _pg_error(asyncpg.exceptions.CannotConnectNowError, "the database system is starting up"),
        _pg_error(asyncpg.exceptions.TooManyConnectionsError, "sorry, too many clients already"),
        _pg_error(asyncpg.exceptions.AdminShutdownError, "terminating connection due to administrator command"),
        _pg_error(asyncpg.exceptions.InvalidAuthorizationSpecificationError, "could not connect to the auth server"),
        _pg_error(asyncpg.exceptions.ConnectionFailureError, "connection failure"),
        _pg_error(asyncpg.exceptions.SerializationError, "could not serialize access"),
        _pg_error(asyncpg.exceptions.DiskFullError, "no space left on device"),
        _pg_error(asyncpg.exceptions.ReadOnlySQLTransactionError, "read-only transaction"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
    ],
    ids=type,
)
def test_every_failure_to_reach_the_database_is_transient(error: BaseException) -> None:
    assert _transient(error)


@pytest.mark.parametrize(
    "error",
    [
        _pg_error(asyncpg.exceptions.UndefinedTableError, 'relation "keruta_logs" does not exist'),
        _pg_error(asyncpg.exceptions.PostgresSyntaxError, "syntax error"),
        _pg_error(asyncpg.exceptions.UniqueViolationError, "duplicate key"),
        _pg_error(asyncpg.exceptions.NumericValueOutOfRangeError, "bigint out of range"),
        TypeError("a bug"),
    ],
    ids=type,
)
def test_programming_errors_are_not_transient(error: BaseException) -> None:
    assert not _transient(error)


# --- the store is available again after an outage --------------------


async def test_writer_available_again_after_outage(writer_on: Any, autojump_clock: trio.abc.Clock) -> None:
    outage, inbox, writer = writer_on
    outage.down = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_within, inbox, [line("t15", "during")], 1000.0)
        while outage.attempts < 2:
            await trio.sleep(0.1)
        assert not writer.available.is_set()
        outage.down = False
    assert writer.available.is_set(), "the store answered again but the hub still says unavailable"
    assert await messages(outage.store, "t15") == ["during"]


# --- a POST answers in time, and a 503 means "not stored" ------------


async def test_post_out_of_time_is_withdrawn_not_stored(writer_on: Any, autojump_clock: trio.abc.Clock) -> None:
    outage, inbox, writer = writer_on
    outage.down = True
    started = trio.current_time()
    assert await write_within(inbox, [line("t16", "first try")], 8.0) is None
    assert trio.current_time() - started <= 10.0
    outage.down = False
    # The client retries after the 503: stored once, the withdrawn attempt never.
    outcome = await write_within(inbox, [line("t16", "first try")], 8.0)
    assert outcome is not None and outcome.error is None
    await trio.sleep(30)  # the writer has long retried whatever it still held
    assert await messages(outage.store, "t16") == ["first try"]


async def test_post_waits_for_the_commit_in_flight(writer_on: Any, autojump_clock: trio.abc.Clock) -> None:
    outage, inbox, _writer = writer_on
    outage.gate = trio.Event()
    result: list[Any] = []

    async def post() -> None:
        result.append(await write_within(inbox, [line("t16b", "in flight")], 8.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post)
        await trio.sleep(9.0)  # past the POST's deadline, the attempt still under way
        assert result == [], "a POST whose commit is under way must wait for its outcome"
        outage.gate.set()
    assert result[0] is not None and [r.message for r in result[0].records] == ["in flight"]
    assert await messages(outage.store, "t16b") == ["in flight"]


async def test_post_whose_attempt_fails_after_deadline_is_not_stored(
    writer_on: Any, autojump_clock: trio.abc.Clock
) -> None:
    outage, inbox, _writer = writer_on
    outage.gate = trio.Event()
    outage.down = True
    result: list[Any] = []

    async def post() -> None:
        result.append(await write_within(inbox, [line("t16c", "lost attempt")], 8.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post)
        await trio.sleep(9.0)
        outage.gate.set()  # the attempt fails (store still down)
    assert result == [None]
    outage.gate = None
    outage.down = False
    outcome = await write_within(inbox, [line("t16c", "next")], 8.0)
    assert outcome is not None and outcome.error is None
    assert await messages(outage.store, "t16c") == ["next"]


# --- PostgreSQL refusing connections: a real database, agent processes ----------


def _refuse_connections(database: str, refuse: bool) -> None:
    """Make the database refuse new connections (and cut the open ones), or accept them again."""
    dsn = pg_dsn()
    assert dsn is not None
    pgpool.admin(dsn, f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {"false" if refuse else "true"}')
    if refuse:
        pgpool.admin(dsn, pgpool.end_sessions(database))


async def refuse_connections(database: str, refuse: bool) -> None:
    await trio.to_thread.run_sync(_refuse_connections, database, refuse)


@pytest.fixture
async def pg_hub(fresh_pg_url: str) -> AsyncIterator[InProcessHub]:
    # Retention every 0.2 s: a pass runs while the database refuses connections.
    # The writer tries its commit at least every 0.5 s, so the store's return
    # is noticed within that instead of the default's 5 s; a POST the outage
    # holds is answered 503 after 2 s instead of the default's 8 (which
    # test_post_out_of_time_is_withdrawn_not_stored holds to 10 s).
    async with in_process_hubs(lambda: fresh_pg_url, hubclient.TEST_DEADLINE) as hubs:
        try:
            yield await hubs.astart(
                "--retention-days", "1", "--retention-interval", "0.2",
                "--store-retry-max", "0.5", "--post-timeout", "2",
            )
        finally:
            await refuse_connections(fresh_pg_url.rsplit("/", 1)[1], False)


async def post_line(client: httpx.AsyncClient, task_id: str, message: str) -> tuple[httpx.Response, float]:
    started = trio.current_time()
    resp = await client.post(f"/api/v1/tasks/{task_id}/logs", json={"source": "stdout", "message": message})
    return resp, trio.current_time() - started


async def restarted_twice(hub: InProcessHub, *actors: str) -> None:
    """Wait until each actor has failed twice in a row on the outage (it was
    restarted once and failed again), as the hub's log says."""
    with trio.fail_after(30):
        while not all(f"{actor} failed (2 in a row)" in hub.stderr_text for actor in actors):
            await trio.sleep(0.05)


async def healthz(client: httpx.AsyncClient) -> str:
    resp = await client.get("/healthz")
    assert resp.status_code == 200
    return resp.json()["store"]  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.pg
async def test_hub_waits_out_a_database_refusing_connections(pg_hub: InProcessHub, fresh_pg_url: str) -> None:
    database = fresh_pg_url.rsplit("/", 1)[1]
    async with httpx.AsyncClient(base_url=pg_hub.url, timeout=30, verify=system_tls()) as client:
        resp, _ = await post_line(client, "t14", "before")
        assert resp.status_code == 200
        await refuse_connections(database, True)
        # The notifier's LISTEN connection and retention both meet the refusal.
        await restarted_twice(pg_hub, "notifier", "retention")
        assert pg_hub.alive
        resp, took = await post_line(client, "t14", "during")
        assert resp.status_code == 503 and "Retry-After" in resp.headers, resp.text
        assert took <= 10.0, f"the POST took {took:.1f} s"
        assert await healthz(client) == "unavailable"
        await refuse_connections(database, False)
        with trio.fail_after(30):
            while True:
                resp, took = await post_line(client, "t14", "after")
                assert took <= 10.0
                if resp.status_code == 200:
                    break
                assert resp.status_code == 503, resp.text
                await trio.sleep(0.5)
        assert await healthz(client) == "ok", "the store is back but /healthz says unavailable"
        page = (await client.get("/api/v1/tasks/t14/logs")).json()["content"]
        assert [r["message"] for r in page] == ["before", "after"], "a POST answered 503 was stored"
    assert pg_hub.alive


@pytest.mark.slow
@pytest.mark.pg
async def test_outage_refusing_connections_mid_stream(
    pg_hub: InProcessHub, fresh_pg_url: str, tmp_path: Path
) -> None:
    """The issue's "done when": an agent streaming and REST POSTs made while the
    database refuses connections for five seconds. Every line is stored once,
    every POST is answered in time (200, or 503 and then retried), the hub
    stays up and /healthz is healthy afterwards."""
    database = fresh_pg_url.rsplit("/", 1)[1]
    n = 4000
    # About 6.4 seconds of output: the five-second outage starts about half a
    # second in, so the stream runs before, through and after it.
    program = (
        "import time\n"
        f"for i in range({n}):\n"
        "    print('line', i, flush=True)\n"
        "    if i % 250 == 0: time.sleep(0.4)\n"
    )
    agent = [
        "run", "--hub", pg_hub.url, "--task-id", "outage",
        "--spool-dir", str(tmp_path / "spool"), "--quiet", "--drain-timeout", "90",
        "--", sys.executable, "-c", program,
    ]
    posted: list[str] = []
    answers: list[tuple[int, float]] = []

    async with httpx.AsyncClient(base_url=pg_hub.url, timeout=30, verify=system_tls()) as client:

        async def poster(i: int) -> None:
            for k in range(3):
                message = f"post {i}.{k}"
                while True:
                    resp, took = await post_line(client, "outage-rest", message)
                    answers.append((resp.status_code, took))
                    if resp.status_code == 200:
                        posted.append(message)
                        break
                    assert resp.status_code == 503 and "Retry-After" in resp.headers, resp.text
                    await trio.sleep(0.5)
                if k < 2:
                    await trio.sleep(0.3)

        with trio.fail_after(150):
            async with trio.open_nursery() as nursery:
                result: list[subprocess.CompletedProcess[bytes]] = []

                async def stream() -> None:
                    result.append(await run_agent(agent, capture_stderr=True))

                nursery.start_soon(stream)
                while True:
                    resp = await client.get("/api/v1/tasks/outage")
                    if resp.status_code == 200 and resp.json()["totalLogs"] >= 200:
                        break
                    await trio.sleep(0.05)
                await refuse_connections(database, True)
                for i in range(4):
                    nursery.start_soon(poster, i)
                await trio.sleep(5)
                assert pg_hub.alive
                await refuse_connections(database, False)
        assert result[0].returncode == 0, result[0].stderr.decode()
        assert all(took <= 10.0 for _, took in answers), f"slow POST answers: {answers}"
        assert any(took >= 1.0 for _, took in answers), "no POST met the outage"
        stored = await rest_all(client, "outage")
        assert [r["seq"] for r in stored] == list(range(1, n + 1)), "agent lines lost or doubled"
        assert [r["message"] for r in stored] == [f"line {i}" for i in range(n)]
        rest = [r["message"] for r in await rest_all(client, "outage-rest")]
        assert sorted(rest) == sorted(posted) and len(rest) == 12, f"POSTed lines lost or doubled: {rest}"
        assert await healthz(client) == "ok"
    assert pg_hub.alive


async def rest_all(client: httpx.AsyncClient, task_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        resp = await client.get(f"/api/v1/tasks/{task_id}/logs", params={"afterSeq": after, "size": 1000})
        resp.raise_for_status()
        page = resp.json()["content"]
        if not page:
            return out
        out.extend(page)
        after = page[-1]["seq"]


@pytest.mark.slow
@pytest.mark.pg
async def test_flush_gives_up_after_its_timeout_and_keeps_the_spool(
    pg_hub: InProcessHub, fresh_pg_url: str, tmp_path: Path
) -> None:
    database = fresh_pg_url.rsplit("/", 1)[1]
    spool = tmp_path / "spool"
    # No hub listens there: the record stays in the spool.
    left = await run_agent(
        ["run", "--hub", f"http://127.0.0.1:{free_port()}",
         "--task-id", "t16f", "--spool-dir", str(spool), "--quiet", "--drain-timeout", "0",
         "--", sys.executable, "-c", "print('kept')"],
        capture_stderr=True,
    )
    assert left.returncode == 0 and (spool / "t16f").exists(), left.stderr.decode()
    flush = ["flush", "--spool-dir", str(spool), "--hub", pg_hub.url]
    # The hub answers pings but cannot store anything, so it never acknowledges.
    await refuse_connections(database, True)
    started = trio.current_time()
    with trio.fail_after(60):
        gave_up = await run_agent(flush + ["--timeout", "1.5"], capture_stderr=True)
    took = trio.current_time() - started
    stderr = gave_up.stderr.decode()
    assert gave_up.returncode == 1, stderr
    assert "gave up after 1.5 s" in stderr and "t16f" in stderr, stderr
    assert took < 20, f"flush took {took:.1f} s with --timeout 1.5"
    assert (spool / "t16f").exists(), "flush dropped the spool it could not deliver"
    await refuse_connections(database, False)
    with trio.fail_after(60):
        done = await run_agent(flush, capture_stderr=True)
    assert done.returncode == 0, done.stderr.decode()
    async with httpx.AsyncClient(base_url=pg_hub.url, timeout=30, verify=system_tls()) as client:
        assert [r["message"] for r in await rest_all(client, "t16f")][:1] == ["kept"]


# --- permanent refusals end delivery loudly; frames are measured -----


@pytest.fixture
def hub_proc(tmp_path: Path) -> Iterator[Any]:
    """Start hub processes on SQLite in tmp_path: `hub_proc(*args)`."""
    started: list[HubProcess] = []

    def start(*args: str) -> HubProcess:
        hub = HubProcess(f"sqlite:///{tmp_path / f'hub{len(started)}.db'}", *args).start()
        started.append(hub)
        return hub

    try:
        yield start
    finally:
        for hub in started:
            alive = hub.proc is not None and hub.proc.poll() is None
            hub.stop()
            # Shown by pytest only when the test failed: the hub's own account.
            print(f"--- hub on {hub.db} ({'running' if alive else 'EXITED'}) ---\n{''.join(hub.output)}")


def test_fit_frame_never_exceeds_the_limit() -> None:
    rng = random.Random(17)
    for _ in range(200):
        payloads = [b"x" * rng.randint(1, 5000) for _ in range(rng.randint(1, 300))]
        limit = rng.randint(5000, 200_000)
        frame, count = fit_frame(lambda p: logs_frame("t" * 128, p), payloads, limit)
        assert frame == logs_frame("t" * 128, payloads[:count])
        assert len(frame) <= limit or count == 1
        assert count == len(payloads) or len(logs_frame("t" * 128, payloads[: count + 1])) > limit


@pytest.mark.slow
async def test_records_that_fill_a_frame_are_sent_in_frames_that_fit(
    sqlite_hub_factory: InProcessHubFactory, tmp_path: Path
) -> None:
    """1000 records of ~4.19 KB under a 128-character task id: the spool's
    payload budget (frame size less a fixed estimate) is met, the frame with
    its commas and envelope is not. Measured frames get everything through."""
    hub = await sqlite_hub_factory.astart()
    task_id = "t" * 128
    spool = Spool.open(tmp_path / "spool", task_id, hub_url=hub.url)
    ts = now_ts()
    entries = []
    for seq in range(1, 1001):
        target = 4193 if seq < 1000 else 4400
        base = len(encode_line(task_id, seq, ts, "stdout", "INFO", "", seq, {}, False))
        message = "x" * (target - base)
        entries.append((seq, encode_line(task_id, seq, ts, "stdout", "INFO", message, seq, {}, False)))
    spool.append(entries)
    said: list[str] = []
    uplink = Uplink(spool, UplinkSettings(hub_url=hub.url, task_id=task_id, batch_size=1000), say=said.append)
    uplink.finish("succeeded", 0)
    with trio.fail_after(60):
        await uplink.run()
    spool.close()
    async with httpx.AsyncClient(base_url=hub.url, timeout=30, verify=system_tls()) as client:
        stored = await rest_all(client, task_id)
    assert [r["seq"] for r in stored] == list(range(1, 1001)), said


@pytest.mark.slow
async def test_a_bug_in_the_uplink_ends_it_instead_of_looping(
    sqlite_hub_factory: InProcessHubFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = await sqlite_hub_factory.astart()
    spool = Spool.open(tmp_path / "spool", "t17bug", hub_url=hub.url)
    spool.append([(1, encode_line("t17bug", 1, now_ts(), "stdout", "INFO", "hello", 1, {}, False))])

    def broken(*_args: Any) -> Any:
        raise TypeError("a bug")

    monkeypatch.setattr("agent.pipeline.uplink.fill_gaps", broken)
    uplink = Uplink(spool, UplinkSettings(hub_url=hub.url, task_id="t17bug"))
    with trio.fail_after(30), pytest.raises(UplinkFailed) as failed:
        await uplink.run()
    assert failed.value.internal and "TypeError: a bug" in str(failed.value)
    assert spool.unacked == 1, "the records must stay in the spool"
    spool.close()


@pytest.mark.slow
async def test_a_permanent_refusal_ends_delivery_loudly_and_keeps_the_spool(
    sqlite_hub_factory: InProcessHubFactory, tmp_path: Path
) -> None:
    hub = await sqlite_hub_factory.astart("--agent-token", "right")
    spool = tmp_path / "spool"
    started = trio.current_time()
    with trio.fail_after(60):
        ran = await run_agent(
            ["run", "--hub", hub.url, "--token", "wrong",
             "--task-id", "t17", "--spool-dir", str(spool), "--quiet", "--drain-timeout", "60",
             "--", sys.executable, "-c", "print('hello'); raise SystemExit(3)"],
            capture_stderr=True,
        )
    stderr = ran.stderr.decode()
    assert ran.returncode == 3, stderr  # COMMAND's exit code, whatever delivery did
    assert trio.current_time() - started < 30, "run waited out its drain timeout for a hub that refuses"
    # The hub's UNAUTHORIZED frame, or its close (1008 unauthorized) if that is read first.
    assert "ERROR" in stderr and "unauthorized" in stderr.lower(), stderr
    assert (spool / "t17").exists()
    with trio.fail_after(60):
        flushed = await run_agent(
            ["flush", "--hub", hub.url, "--token", "wrong", "--spool-dir", str(spool)], capture_stderr=True
        )
    assert flushed.returncode == 1
    assert "unauthorized" in flushed.stderr.decode().lower(), flushed.stderr.decode()
    assert (spool / "t17").exists()
    # With the right token, flush delivers what was kept.
    with trio.fail_after(60):
        flushed = await run_agent(
            ["flush", "--hub", hub.url, "--token", "right", "--spool-dir", str(spool)], capture_stderr=True
        )
    assert flushed.returncode == 0, flushed.stderr.decode()
    assert not (spool / "t17").exists()


# --- no hangs in tail; pings answered while throttled; limiter map; shutdown; STORE_ERROR ---


async def test_tail_gives_up_on_a_hub_that_never_answers(autojump_clock: trio.abc.Clock) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        said: list[str] = []
        started = trio.current_time()
        with trio.fail_after(300):
            code = await tail(
                TailSettings(hub_url=f"http://127.0.0.1:{port}", task_id="t18", follow=False),
                out=io.BytesIO(), say=said.append,
            )
        assert code == 2 and "within" in " ".join(said), said
        assert trio.current_time() - started <= 31
        nursery.cancel_scope.cancel()


async def test_cycling_task_ids_neither_bypasses_the_limit_nor_grows_memory(
    autojump_clock: trio.abc.Clock,
) -> None:
    limiters = Limiters(rate=10, burst=10)
    assert limiters.limiter("victim").retry_after(10) == 0
    assert limiters.limiter("victim").retry_after(10) > 0
    for i in range(10_050):
        limiters.limiter(f"other-{i}").retry_after(10)
    assert limiters.limiter("victim").retry_after(10) > 0, "cycling task ids reset the victim's limit"
    await trio.sleep(5)  # every bucket is full again: idle
    for i in range(30_000):
        limiters.limiter(f"new-{i}").retry_after(1)
        await trio.sleep(0.001)
    # Idle buckets were forgotten; what stays is what wrote in the last ~0.1 s.
    assert len(limiters.buckets) <= 10_000 + 200


@pytest.mark.slow
async def test_pings_are_answered_while_a_producer_is_throttled(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart("--rate-limit", "40", "--rate-burst", "10")
    async with open_websocket_url(hub.ws_url, max_message_size=64 * 1024 * 1024) as conn:
        ws = Ws(conn)
        # 60 records at 40 a second with a burst of 10: about 1.25 seconds of
        # waiting, longer than the pong is given.
        await ws.send(hc_logs_frame("t18b", (make_record("t18b", s) for s in range(1, 61))))
        sent = trio.current_time()
        await ws.send({"type": "ping"})
        with trio.fail_after(1):
            pong = await ws.recv()
        assert pong["type"] == "pong", f"expected the pong first, got {pong}"
        assert trio.current_time() - sent < 1, "the ping waited behind the throttled frame"
        with trio.fail_after(30):
            await ws.wait_ack("t18b", 60)
        # Throttled, not dropped: slowed to the rate.
        assert trio.current_time() - sent >= 1


@pytest.mark.slow
async def test_shutdown_sends_the_last_ack_and_closes_1001_while_a_subscriber_catches_up(
    hub_proc: Any,
) -> None:
    # An outbox of one frame: a subscriber that reads nothing blocks its catch-up at once.
    hub = await trio.to_thread.run_sync(hub_proc, "--subscriber-queue", "1")
    big = "x" * 10_000
    async with open_websocket_url(hub.ws_url, max_message_size=64 * 1024 * 1024) as conn:
        writer = Ws(conn)
        for start in range(1, 2001, 100):
            await writer.send(hc_logs_frame("t18d-src", (make_record("t18d-src", s, big) for s in range(start, start + 100))))
        with trio.fail_after(60):
            await writer.wait_ack("t18d-src", 2000)
    async with open_websocket_url(hub.ws_url, max_message_size=64 * 1024 * 1024) as conn:
        ws = Ws(conn)
        await ws.subscribe("t18d-src", from_seq=1)
        await ws.send(hc_logs_frame("t18d-own", (make_record("t18d-own", s) for s in range(1, 6))))
        await trio.sleep(1.0)  # the write commits; the catch-up is stuck on the full outbox
        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGTERM)
        await trio.sleep(0.5)
        code = None
        with trio.fail_after(30):
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed as exc:
                code = exc.reason.code if exc.reason is not None else None
        assert ws.acked.get("t18d-own") == 5, "the hub closed without its last ack"
        assert code == 1001, f"closed with {code}, not 1001 (going away)"


def _rename_logs_table(db_url: str, away: bool) -> None:
    """A fault the store cannot wait out (the table is gone): the commit fails for good."""
    table = "keruta_chunks"
    old, new = (table, f"{table}_away") if away else (f"{table}_away", table)
    statement = f"ALTER TABLE {old} RENAME TO {new}"
    if db_url.startswith("sqlite:///"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
        try:
            conn.execute(statement)
        finally:
            conn.close()
    else:
        pgpool.admin(db_url, statement)


@pytest.mark.slow
async def test_store_error_reaches_the_producer_when_its_outbox_is_full(
    hub_factory: InProcessHubFactory,
) -> None:
    hub = await hub_factory.astart("--subscriber-queue", "1")
    db_url = hub.db
    big = "x" * 10_000
    async with open_websocket_url(hub.ws_url, max_message_size=64 * 1024 * 1024) as conn:
        writer = Ws(conn)
        for start in range(1, 2001, 100):
            await writer.send(hc_logs_frame("t18e-src", (make_record("t18e-src", s, big) for s in range(start, start + 100))))
        with trio.fail_after(60):
            await writer.wait_ack("t18e-src", 2000)
    async with open_websocket_url(hub.ws_url, max_message_size=64 * 1024 * 1024) as conn:
        ws = Ws(conn)
        await ws.subscribe("t18e-src", from_seq=1)
        await trio.sleep(1.0)  # the catch-up fills the one-frame outbox and waits
        await trio.to_thread.run_sync(_rename_logs_table, db_url, True)
        await ws.send(hc_logs_frame("t18e", (make_record("t18e", s) for s in range(1, 6))))
        with trio.fail_after(30):  # the commit has failed
            while "append of 5 records failed" not in hub.stderr_text:
                await trio.sleep(0.02)
        await trio.to_thread.run_sync(_rename_logs_table, db_url, False)
        with trio.fail_after(30):
            while True:
                frame = await ws.recv()
                if frame["type"] == "error":
                    break
        assert frame["code"] == "STORE_ERROR", frame
