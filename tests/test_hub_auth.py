"""Tokens on REST and WebSocket, and the refusal to listen openly without them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from agent.http import system_tls
from tests import hubclient
from tests.hubclient import (
    PATIENCE,
    HubFactory,
    InProcessHub,
    InProcessHubFactory,
    TestHub,
    assert_error,
    drain_until_closed,
    fetch_all,
    logs_frame,
    logs_path,
    make_record,
)
from tests.support import sqlite_url

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures
hub_process, hub_process_factory = hubclient.hub_process, hubclient.hub_process_factory  # fixtures

AGENT, VIEWER, ADMIN = "agent-secret-1", "viewer-secret-2", "admin-secret-3"
TASK = "guarded"


@pytest.fixture
async def guarded(hub_factory: InProcessHubFactory) -> InProcessHub:
    return await hub_factory.astart("--agent-token", AGENT, "--viewer-token", VIEWER, "--admin-token", ADMIN)


async def test_rest_tokens(guarded: TestHub) -> None:
    body = {"message": "hello"}
    async with guarded.http() as anon, guarded.http(AGENT) as agent, guarded.http(VIEWER) as viewer, \
            guarded.http("wrong") as wrong:
        # Without a token or with a wrong one: 401 on every API call.
        for client in (anon, wrong):
            for method, url in (
                ("GET", logs_path(TASK)),
                ("POST", logs_path(TASK)),
                ("DELETE", logs_path(TASK)),
                ("GET", logs_path(TASK, "/stats")),
                ("GET", logs_path(TASK, "/raw")),
                ("GET", "/api/v1/tasks"),
                ("GET", f"/api/v1/tasks/{TASK}"),
            ):
                resp = await client.request(method, url, json=body if method == "POST" else None)
                assert_error(resp, 401, "UNAUTHORIZED")
        resp = await anon.get(logs_path(TASK), headers={"Authorization": f"Basic {AGENT}"})
        assert_error(resp, 401, "UNAUTHORIZED")
        assert_error(await anon.get(logs_path(TASK), params={"token": "wrong"}), 401, "UNAUTHORIZED")
        assert_error(await anon.get(logs_path(TASK), params={"token": ""}), 401, "UNAUTHORIZED")

        # The agent token writes and reads.
        resp = await agent.post(logs_path(TASK), json=[{"message": f"line {s}", "seq": s} for s in (1, 2, 3)])
        assert resp.status_code == 200, resp.text
        assert [r["seq"] for r in await fetch_all(agent, TASK)] == [1, 2, 3]
        resp = await anon.post(logs_path(TASK), json={"message": "by query", "seq": 4}, params={"token": AGENT})
        assert resp.status_code == 200, resp.text

        # The viewer token reads, and may not write or delete.
        assert [r["seq"] for r in await fetch_all(viewer, TASK)] == [1, 2, 3, 4]
        for url in (logs_path(TASK, "/stats"), logs_path(TASK, "/raw"), "/api/v1/tasks", f"/api/v1/tasks/{TASK}"):
            assert (await viewer.get(url)).status_code == 200, url
        assert (await anon.get(logs_path(TASK), params={"token": VIEWER})).status_code == 200
        assert_error(await viewer.post(logs_path(TASK), json=body), 403, "FORBIDDEN")
        assert_error(await anon.post(logs_path(TASK), json=body, params={"token": VIEWER}), 403, "FORBIDDEN")
        assert_error(await viewer.delete(logs_path(TASK)), 403, "FORBIDDEN")
        assert [r["seq"] for r in await fetch_all(agent, TASK)] == [1, 2, 3, 4]

        # Deleting takes the admin token (issue 7 item 21), not the agent's.
        assert_error(await agent.delete(logs_path(TASK)), 403, "FORBIDDEN", mentions="admin token")
        async with guarded.http(ADMIN) as admin:
            resp = await admin.delete(logs_path(TASK))
        assert resp.status_code == 200 and resp.json() == {"deletedCount": 4}

        # Health stays open for load balancers and probes.
        assert (await anon.get("/healthz")).status_code == 200


async def refused(ws_cm: Any, eager: bool) -> tuple[list[dict[str, Any]], int | None]:
    """Frames and close code of a connection the hub should refuse.

    An eager client sends at once, as an agent does; a quiet one only listens.
    """
    try:
        async with ws_cm as ws:
            if eager:
                try:
                    await ws.send({"type": "ping"})
                    await ws.send(logs_frame(TASK, [make_record(TASK, 1)]))
                except ConnectionClosed:
                    pass
            return await drain_until_closed(ws)
    except ConnectionRejected as exc:
        raise AssertionError(
            f"the hub refused the WebSocket handshake with HTTP {exc.status_code}; "
            "expected an `error` frame UNAUTHORIZED and close code 1008"
        ) from None


async def test_ws_without_a_valid_token_gets_unauthorized_and_1008(guarded: TestHub) -> None:
    outcomes: list[str] = []
    with trio.fail_after(PATIENCE):
        for name, connect in (
            ("no token", lambda: guarded.ws()),
            ("wrong header token", lambda: guarded.ws(token="wrong")),
            ("wrong query token", lambda: guarded.ws(query_token="wrong")),
        ):
            # Several times over: a close racing the client's own frames shows up now and then.
            for attempt in range(30):
                eager = attempt % 2 == 1
                frames, code = await refused(connect(), eager)
                kinds = [f["type"] if f["type"] != "error" else f["code"] for f in frames]
                if kinds != ["UNAUTHORIZED"] or code != 1008:
                    client = "eager" if eager else "quiet"
                    outcomes.append(f"{name}, {client} client: frames {kinds}, close code {code}")
    assert not outcomes, "expected exactly one error frame UNAUTHORIZED, then close 1008:\n" + "\n".join(outcomes)

    async with guarded.http(AGENT) as client:
        assert await fetch_all(client, TASK) == [], "a refused connection stored records"


async def test_ws_tokens(guarded: TestHub) -> None:
    with trio.fail_after(PATIENCE):
        async with guarded.ws(token=VIEWER) as viewer, guarded.ws(query_token=VIEWER) as watcher, \
                guarded.ws(query_token=AGENT) as agent:
            await watcher.subscribe(TASK, from_seq=1)
            # The viewer may watch but not write; its connection stays open.
            await viewer.subscribe(TASK)
            await viewer.send(logs_frame(TASK, [make_record(TASK, 1, "from the viewer")]))
            error = await viewer.recv_type("error", skip=())
            assert error["code"] == "FORBIDDEN", error
            await viewer.send({"type": "status", "taskId": TASK, "state": "failed", "exitCode": 1})
            error = await viewer.recv_type("error", skip=())
            assert error["code"] == "FORBIDDEN", error
            await viewer.send({"type": "ping"})
            assert await viewer.recv() == {"type": "pong"}

            # The agent token (here as ?token=) writes; everyone watching gets it.
            await agent.send(logs_frame(TASK, [make_record(TASK, s, f"agent {s}") for s in (1, 2)]))
            await agent.wait_ack(TASK, 2)
            for ws in (watcher, viewer):
                got = (await ws.recv_type("logs"))["records"]
                while got[-1]["seq"] < 2:
                    got += (await ws.recv_type("logs"))["records"]
                assert [(r["seq"], r["message"]) for r in got] == [(1, "agent 1"), (2, "agent 2")]

    async with guarded.http(VIEWER) as client:
        assert [r["message"] for r in await fetch_all(client, TASK)] == ["agent 1", "agent 2"]
        assert (await client.get(f"/api/v1/tasks/{TASK}")).json()["state"] == "running"


async def test_tokens_from_the_environment(hub_process_factory: HubFactory) -> None:
    # The CLI's environment fallbacks: a process.
    hub = await hub_process_factory.astart(env={"KERUTA_AGENT_TOKEN": "from-env", "KERUTA_VIEWER_TOKEN": "env-viewer"})
    async with hub.http() as anon, hub.http("from-env") as agent, hub.http("env-viewer") as viewer:
        assert_error(await anon.get(logs_path(TASK)), 401, "UNAUTHORIZED")
        resp = await agent.post(logs_path(TASK), json={"message": "ok"})
        assert resp.status_code == 200, resp.text
        assert_error(await viewer.post(logs_path(TASK), json={"message": "no"}), 403, "FORBIDDEN")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}
    return {**env, **extra}


# SQLite only, on purpose: the hub refuses in check_config, before it opens any
# store, so the store cannot change the outcome (the hub never touches the file).
def run_hub(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hub", "--port", "0", "--db", sqlite_url(tmp_path / "open.db"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env or clean_env())


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--host", "0.0.0.0"), {}),
        (("--host", "::"), {}),
        (("--host", "192.0.2.10"), {}),
        ((), {"KERUTA_HOST": "0.0.0.0"}),
    ],
    ids=["0.0.0.0", "::", "an-address", "KERUTA_HOST"],
)
def test_refuses_a_non_loopback_address_without_tokens(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    done = run_hub(tmp_path, *args, env=clean_env(**env))
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "token" in done.stderr.lower(), done.stderr
    assert "listening" not in done.stderr


def test_listens_on_a_non_loopback_address_with_tokens(hub_process_factory: HubFactory) -> None:
    # HubProcess passes --host 127.0.0.1 first; the later flag wins.
    hub = hub_process_factory.start("--host", "0.0.0.0", "--agent-token", AGENT)
    port = hub.url.rsplit(":", 1)[1]
    resp = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10, verify=system_tls())
    assert resp.status_code == 200
    resp = httpx.get(f"http://127.0.0.1:{port}{logs_path(TASK)}", timeout=10, verify=system_tls())
    assert resp.status_code == 401
