"""A hub whose link to PostgreSQL goes silent, or away for a while.

A TCP proxy (tests/tcpproxy.py) sits between one hub and the database. A
*frozen* link stops forwarding the flows already open, both ways, without a
FIN or an RST (a partition, NAT state lost); new connections pass. An
*outage* cuts the flows and turns new connections away until it ends.

What users see: a viewer on that hub gets other hubs' records again shortly
after the hub's short deadlines (--db-ping-interval, --db-timeout), a REST
call on a frozen pooled connection answers within about the deadline and the
next one is served, SIGTERM still stops the hub, and after an outage live
delivery resumes as soon as the database is reachable again.

Real PostgreSQL (KERUTA_TEST_PG_DSN), real sockets; in-process hubs except
where the process is the point (SIGTERM).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from hub.store.postgres import idle_transaction_ms
from tests import pgpool
from tests.hubclient import PATIENCE, TEST_DEADLINE, TestHub, Ws, fetch_all, logs_path
from tests.inprocess import InProcessHub, InProcessHubFactory, in_process_hubs
from tests.support import exited
from tests.tcpproxy import TcpProxy, target_of, tcp_proxy

pytestmark = pytest.mark.pg

PING = 1.0  # --db-ping-interval
TIMEOUT = 2.0  # --db-timeout
SHORT = ("--db-ping-interval", str(PING), "--db-timeout", str(TIMEOUT))
# Detecting a silent link takes a ping interval and a deadline; then one more
# deadline may go to a frozen pooled connection before fresh ones are used.
# The rest is slack for a loaded machine, not a performance bound.
RECOVERY = PING + 2 * TIMEOUT + 8.0


@asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[InProcessHubFactory, TcpProxy]]:
    """In-process hubs, and a proxy to `url`'s server. The proxy ends first:
    its flows are cut before the hubs stop, as a real network would let them."""
    async with in_process_hubs(lambda: url, TEST_DEADLINE) as hubs, tcp_proxy(*target_of(url)) as proxy:
        yield hubs, proxy


async def post_lines(hub: Any, task_id: str, count: int, tag: str) -> None:
    async with hub.http() as client:
        resp = await client.post(
            logs_path(task_id), json=[{"message": f"{tag} {i}"} for i in range(1, count + 1)]
        )
        assert resp.status_code == 200, resp.text


async def messages_until(viewer: Ws, task_id: str, wanted: set[str]) -> None:
    """Read the viewer's frames until every message in `wanted` has come."""
    missing = set(wanted)
    while missing:
        frame = await viewer.recv()
        if frame["type"] == "logs" and frame["taskId"] == task_id:
            missing -= {r["message"] for r in frame["records"]}
        assert frame["type"] != "error", frame


def tagged(tag: str, count: int) -> set[str]:
    return {f"{tag} {i}" for i in range(1, count + 1)}


async def backends(url: str, application: str) -> int:
    """How many sessions named `application` the server has on `url`'s database
    (asked from a thread: the test's loop keeps carrying the proxy's flows)."""
    database = pgpool.database_of(url)
    counted: list[int] = []

    async def count() -> None:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            counted.append(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
                    database, application,
                )
            )
        finally:
            await conn.close()

    await trio.to_thread.run_sync(pgpool._in_own_thread, count)
    return counted[0]


async def live_viewer_ready(viewer: Ws, writer: Any, task_id: str) -> None:
    """Subscribe from the start and see a first record pass, so the watching
    hub's LISTEN is known to work before the test breaks its link."""
    await viewer.subscribe(task_id, from_seq=1)
    await post_lines(writer, task_id, 3, "before")
    with trio.fail_after(PATIENCE):
        await messages_until(viewer, task_id, tagged("before", 3))


async def test_a_frozen_listen_link_is_dropped_and_live_records_flow_again(fresh_pg_url: str) -> None:
    async with proxied(fresh_pg_url) as (hubs, proxy):
        frozen = await hubs.astart(*SHORT, db=proxy.url_for(fresh_pg_url))
        direct = await hubs.astart(db=fresh_pg_url)
        async with frozen.ws() as viewer:
            await live_viewer_ready(viewer, direct, "t")
            assert proxy.freeze() >= 2, "the LISTEN connection and a pooled one"
            await post_lines(direct, "t", 5, "after")
            with trio.fail_after(RECOVERY):
                await messages_until(viewer, "t", tagged("after", 5))
            # And the new LISTEN connection carries notices as the old one did.
            await post_lines(direct, "t", 2, "later")
            with trio.fail_after(PATIENCE):
                await messages_until(viewer, "t", tagged("later", 2))
        log = frozen.stderr_text
        assert "LISTEN connection" in log and "judged dead" in log, log
        assert "LISTEN connection is back" in log, log


async def busy_pool(hub: InProcessHub, url: str, at_least: int) -> None:
    """Concurrent reads until the hub's pool holds `at_least` connections."""
    async with hub.http() as client:

        async def read() -> None:
            resp = await client.get(logs_path("t"))
            assert resp.status_code == 200, resp.text

        with trio.fail_after(PATIENCE):
            while await backends(url, "keruta-hub") < at_least:
                async with trio.open_nursery() as nursery:
                    for _ in range(20):
                        nursery.start_soon(read)


async def test_a_frozen_pooled_connection_costs_one_deadline_not_every_request(fresh_pg_url: str) -> None:
    async with proxied(fresh_pg_url) as (hubs, proxy):
        # The LISTEN connection is not pinged during the test: the pool finds
        # out on its own.
        frozen = await hubs.astart(
            "--db-ping-interval", "600", "--db-timeout", str(TIMEOUT), db=proxy.url_for(fresh_pg_url)
        )
        await post_lines(frozen, "t", 3, "before")
        await busy_pool(frozen, fresh_pg_url, 3)
        proxy.freeze()
        async with frozen.http(timeout=PATIENCE) as client:
            with trio.fail_after(TIMEOUT + 5.0):
                first = await client.get(logs_path("t"))
            assert first.status_code in (200, 503), first.text
            # The connection that did not answer is gone, and so are the idle
            # ones opened over the same silent link: the next calls get new ones.
            for _ in range(3):
                with trio.fail_after(TIMEOUT + 5.0):
                    resp = await client.get(logs_path("t"))
                assert resp.status_code == 200, resp.text
                assert [r["message"] for r in resp.json()["content"]] == sorted(tagged("before", 3))
        await post_lines(frozen, "t", 2, "after")
        assert "judged dead" in frozen.stderr_text, frozen.stderr_text


@pytest.mark.slow
async def test_sigterm_stops_a_hub_whose_database_link_is_frozen(fresh_pg_url: str) -> None:
    async with tcp_proxy(*target_of(fresh_pg_url)) as proxy:
        hub = TestHub(proxy.url_for(fresh_pg_url), *SHORT)
        await hub.astart()
        try:
            with trio.fail_after(PATIENCE):
                while await backends(fresh_pg_url, "keruta-hub-listen") < 1:
                    await trio.sleep(0.05)
            await post_lines(hub, "t", 3, "before")  # a pooled connection in use
            assert proxy.freeze() >= 2
            assert hub.proc is not None
            hub.proc.send_signal(signal.SIGTERM)
            # Shutdown waits for connections and the writer (bounded by the
            # hub's shutdown timeout), then for the database only as long as
            # --db-timeout: not for a server that will never answer.
            with trio.move_on_after(10.0 + 4 * TIMEOUT + 10.0):
                code = await exited(hub.proc)
                assert code == 0, hub.stderr_text
                return
            pytest.fail("the hub did not exit after SIGTERM:\n" + hub.stderr_text)
        finally:
            hub.stop()


async def test_after_an_outage_live_delivery_resumes_at_once(fresh_pg_url: str) -> None:
    async with proxied(fresh_pg_url) as (hubs, proxy):
        watching = await hubs.astart(*SHORT, db=proxy.url_for(fresh_pg_url))
        direct = await hubs.astart(db=fresh_pg_url)
        async with watching.ws() as viewer:
            await live_viewer_ready(viewer, direct, "t")
            # Long enough for a backoff doubling from 0.5 s to reach 8 s:
            # with it the next attempt would come at least 2.9 s after the end.
            proxy.refuse()
            await post_lines(direct, "t", 5, "during")
            await trio.sleep(9.5)
            proxy.restore()
            # Slack for a loaded machine; a grown backoff waits 2.9 s and more.
            with trio.fail_after(2.0):
                await messages_until(viewer, "t", tagged("during", 5))
        log = watching.stderr_text
        assert "LISTEN connection" in log and "is back" in log, log


async def test_a_hub_silent_mid_transaction_holds_other_hubs_writes_only_briefly(fresh_pg_url: str) -> None:
    """A hub whose link goes silent between locking a task's row and its
    COMMIT leaves that transaction open on the server, the row locked. Other
    hubs writing that task (and whatever shares their commit) wait until the
    server ends the idle transaction (idle_in_transaction_session_timeout,
    hub/store/postgres.py), not until its TCP keepalive finds the hub gone,
    two hours by default. Nothing is stored twice."""
    async with proxied(fresh_pg_url) as (hubs, proxy):
        silent = await hubs.astart(*SHORT, db=proxy.url_for(fresh_pg_url))
        other = await hubs.astart(*SHORT, db=fresh_pg_url)
        await post_lines(other, "shared", 1, "first")
        proxy.freeze_at_commit()
        async with trio.open_nursery() as nursery:
            # The silent hub's own answer does not matter here (503, or 200
            # once it retried on a fresh connection): only that it stores once.
            nursery.start_soon(post_lines_somehow, silent, "shared", "silent")
            with trio.fail_after(PATIENCE):
                while proxy.commits_frozen == 0:
                    await trio.sleep(0.01)
            # Without the server's timeout these would be 503 for two hours.
            with trio.fail_after(idle_transaction_ms(TIMEOUT) / 1000 + RECOVERY):
                await post_until_stored(other, "shared", "after")
                await post_until_stored(other, "elsewhere", "beside")
            proxy.thaw()
    async with in_process_hubs(lambda: fresh_pg_url, TEST_DEADLINE) as hubs:
        reader = await hubs.astart(db=fresh_pg_url)
        async with reader.http() as client:
            shared = [r["message"] for r in await fetch_all(client, "shared")]
            elsewhere = [r["message"] for r in await fetch_all(client, "elsewhere")]
    assert shared[:1] == ["first 1"] and "after 1" in shared, shared
    assert len(shared) == len(set(shared)) and set(shared) <= {"first 1", "after 1", "silent 1"}, shared
    assert elsewhere == ["beside 1"], elsewhere


async def post_lines_somehow(hub: Any, task_id: str, tag: str) -> None:
    async with hub.http() as client:
        await client.post(logs_path(task_id), json=[{"message": f"{tag} 1"}])


async def post_until_stored(hub: Any, task_id: str, tag: str) -> None:
    """POST one line until it is answered 200; a 503 stored nothing (CONTRACT), so it is sent again."""
    async with hub.http() as client:
        while True:
            resp = await client.post(logs_path(task_id), json=[{"message": f"{tag} 1"}])
            if resp.status_code == 200:
                return
            assert resp.status_code == 503, resp.text
