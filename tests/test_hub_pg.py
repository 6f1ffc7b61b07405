"""Several hubs on one PostgreSQL database, and the database going away.

Two hubs served in the test's trio run (tests/inprocess.py), a real agent
process, real PostgreSQL (KERUTA_TEST_PG_DSN).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from agent.http import system_tls
from keruta.frames import LogsFrame, StatusFrame, SubscribeFrame
from keruta.wire import decode_hub_frame, dumps
from tests import pgpool
from tests.conftest import pg_dsn
from tests.hubclient import TEST_DEADLINE
from tests.inprocess import InProcessHub, in_process_hubs
from tests.support import python_m

pytestmark = pytest.mark.pg


@pytest.fixture
async def two_hubs(fresh_pg_url: str) -> AsyncIterator[tuple[InProcessHub, InProcessHub]]:
    async with in_process_hubs(lambda: fresh_pg_url, TEST_DEADLINE) as hubs:
        yield await hubs.astart(), await hubs.astart()


async def run_agent(args: list[str]) -> int:
    return (await trio.run_process(python_m("agent", *args), check=False)).returncode


def agent_args(hub: InProcessHub, task_id: str, spool: str, program: str) -> list[str]:
    return [
        "run", "--hub", hub.url, "--task-id", task_id,
        "--spool-dir", spool, "--quiet", "--", sys.executable, "-c", program,
    ]


async def follow(hub: InProcessHub, task_id: str, into: list[Any], ready: trio.Event) -> None:
    """Subscribe on `hub` from seq 1 and collect records until the task is finished."""
    async with open_websocket_url(hub.ws_url, max_message_size=64 * 1024 * 1024) as ws:
        await ws.send_message(dumps(SubscribeFrame(task_id, from_seq=1)))
        ready.set()
        while True:
            frame = decode_hub_frame(await ws.get_message())
            if isinstance(frame, LogsFrame):
                into.extend(frame.records)
            elif isinstance(frame, StatusFrame) and frame.state in ("succeeded", "failed"):
                return


async def rest_all(hub: InProcessHub, task_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=hub.url, timeout=30, verify=system_tls()) as client:
        after = 0
        while True:
            resp = await client.get(f"/api/v1/tasks/{task_id}/logs", params={"afterSeq": after, "size": 1000})
            resp.raise_for_status()
            page = resp.json()["content"]
            if not page:
                return out
            out.extend(page)
            after = page[-1]["seq"]


async def test_agent_through_hub_a_reaches_subscriber_on_hub_b(
    two_hubs: tuple[InProcessHub, InProcessHub], tmp_path: Any
) -> None:
    a, b = two_hubs
    n = 10_000
    program = f"for i in range({n}): print('line', i)"
    live: list[Any] = []
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(follow, b, "multi", live, ready)
            await ready.wait()
            assert await run_agent(agent_args(a, "multi", str(tmp_path / "spool"), program)) == 0
    assert [r.seq for r in live] == list(range(1, n + 1)), "hub B's subscriber missed or doubled records"
    assert [r.message for r in live] == [f"line {i}" for i in range(n)]
    stored = await rest_all(b, "multi")
    assert [r["seq"] for r in stored] == list(range(1, n + 1))
    async with httpx.AsyncClient(base_url=b.url, verify=system_tls()) as client:
        task = (await client.get("/api/v1/tasks/multi")).json()
    assert task["state"] == "succeeded" and task["exitCode"] == 0 and task["totalLogs"] == n


def _cut_connections(database: str) -> None:
    dsn = pg_dsn()
    assert dsn is not None
    pgpool.admin(dsn, pgpool.end_sessions(database))


async def test_database_connections_cut_mid_stream_lose_and_double_nothing(
    two_hubs: tuple[InProcessHub, InProcessHub], fresh_pg_url: str, tmp_path: Any
) -> None:
    a, b = two_hubs
    database = fresh_pg_url.rsplit("/", 1)[1]
    n = 10_000
    # About 2.8 seconds of output; the four cuts come at 0.5 s intervals, so
    # they land mid-stream.
    program = (
        "import time\n"
        f"for i in range({n}):\n"
        "    print('line', i)\n"
        "    if i % 250 == 0: time.sleep(0.07)\n"
    )
    live: list[Any] = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(follow, b, "cut", live, ready)
            await ready.wait()

            async def cutter() -> None:
                for _ in range(4):
                    await trio.sleep(0.5)
                    await trio.to_thread.run_sync(_cut_connections, database)

            nursery.start_soon(cutter)
            assert await run_agent(agent_args(a, "cut", str(tmp_path / "spool"), program)) == 0
    stored = await rest_all(a, "cut")
    assert [r["seq"] for r in stored] == list(range(1, n + 1)), "records lost or doubled in the store"
    assert [r["message"] for r in stored] == [f"line {i}" for i in range(n)]
    assert [r.seq for r in live] == list(range(1, n + 1)), "hub B's subscriber missed or doubled records"
