"""Origin checks, the admin token, the command's
environment, the loopback check and the spool lock, on real hubs, real agent
processes and real spool directories."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

from hub.cli import build_parser, check_config, config_from_args
from hub.config import HubConfig
from tests import hubclient
from tests.agentclient import agent, agent_env, run_args
from tests.hubclient import (
    MAX_WS_MESSAGE,
    PATIENCE,
    HubFactory,
    TestHub,
    Ws,
    assert_error,
    drain_until_closed,
    fetch_all,
    logs_path,
    make_record,
)
from tests.test_hub_auth import clean_env, run_hub

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures
hub_process, hub_process_factory = hubclient.hub_process, hubclient.hub_process_factory  # fixtures

TASK = "guarded"
EVIL = "http://evil.example"
FRIEND = "http://dashboard.example:3000"


@asynccontextmanager
async def origin_ws(url: str, origin: str) -> AsyncIterator[Ws]:
    """A WebSocket as a browser page on `origin` opens it."""
    headers = [(b"Origin", origin.encode())]
    async with open_websocket_url(url, extra_headers=headers, max_message_size=MAX_WS_MESSAGE) as conn:
        yield Ws(conn)


def own_origin(hub: TestHub) -> str:
    return hub.url  # http://127.0.0.1:PORT, what a page the hub served sends


# --- Origin ----------------------------------------------------------


async def test_cross_origin_writes_and_deletes_are_refused(hub: TestHub) -> None:
    async with hub.http() as client:
        resp = await client.post(logs_path(TASK), json={"message": "mine", "seq": 1})
        assert resp.status_code == 200, resp.text
        # What a page elsewhere can send without a CORS preflight: a text/plain POST.
        for origin in (EVIL, "null", "http://127.0.0.1", hub.url.replace("127.0.0.1", "localhost")):
            resp = await client.post(
                logs_path(TASK),
                content=orjson.dumps({"message": "injected", "seq": 2}),
                headers={"Origin": origin, "Content-Type": "text/plain"},
            )
            body = assert_error(resp, 403, "FORBIDDEN_ORIGIN")
            assert "--allow-origin" in body["message"], body
            assert_error(await client.delete(logs_path(TASK), headers={"Origin": origin}), 403, "FORBIDDEN_ORIGIN")
            assert_error(
                await client.request("PUT", logs_path(TASK), headers={"Origin": origin}), 403, "FORBIDDEN_ORIGIN"
            )
        assert [r["message"] for r in await fetch_all(client, TASK)] == ["mine"]

        # Reading is as before (no CORS headers, so a page elsewhere cannot see the answer).
        resp = await client.get(logs_path(TASK), headers={"Origin": EVIL})
        assert resp.status_code == 200
        assert "access-control-allow-origin" not in resp.headers

        # The hub's own pages, and clients that send no Origin, are unaffected.
        resp = await client.post(logs_path(TASK), json={"message": "viewer", "seq": 2}, headers={"Origin": own_origin(hub)})
        assert resp.status_code == 200, resp.text
        resp = await client.delete(logs_path(TASK), headers={"Origin": own_origin(hub)})
        assert resp.json() == {"deletedCount": 2}


async def test_cross_origin_websocket_is_refused(hub: TestHub) -> None:
    with trio.fail_after(PATIENCE):
        async with hub.ws() as writer:
            await writer.send(hubclient.logs_frame(TASK, [make_record(TASK, 1, "secret")]))
            await writer.wait_ack(TASK, 1)

        for origin in (EVIL, "null"):
            async with origin_ws(hub.ws_url, origin) as ws:
                try:
                    await ws.send({"type": "subscribe", "taskId": TASK, "fromSeq": 1})
                    await ws.send(hubclient.logs_frame(TASK, [make_record(TASK, 2, "injected")]))
                except Exception:  # noqa: BLE001 - the hub may close before we finish sending
                    pass
                frames: list[dict[str, Any]] = []
                code: int | None = None
                with trio.move_on_after(10) as waited:
                    frames, code = await drain_until_closed(ws)
                assert not waited.cancelled_caught, f"the hub kept a WebSocket from {origin} open"
            assert [f.get("code") for f in frames] == ["FORBIDDEN_ORIGIN"], frames
            assert code == 1008

        # The viewer page's own origin works as before.
        async with origin_ws(hub.ws_url, own_origin(hub)) as ws:
            await ws.subscribe(TASK, from_seq=1)
            frame = await ws.recv_type("logs", skip=("status",))
            assert [r["message"] for r in frame["records"]] == ["secret"]

    async with hub.http() as client:
        assert [r["message"] for r in await fetch_all(client, TASK)] == ["secret"]


async def test_allow_origin(hub_factory: HubFactory) -> None:
    hub = await hub_factory.astart("--allow-origin", FRIEND, "--allow-origin", "https://ops.example/")
    async with hub.http() as client:
        for origin in (FRIEND, "HTTP://Dashboard.Example:3000", "https://ops.example", "https://ops.example:443"):
            resp = await client.post(logs_path(TASK), json={"message": origin}, headers={"Origin": origin})
            assert resp.status_code == 200, (origin, resp.text)
        for origin in (EVIL, "http://dashboard.example", "http://ops.example"):
            resp = await client.post(logs_path(TASK), json={"message": origin}, headers={"Origin": origin})
            assert_error(resp, 403, "FORBIDDEN_ORIGIN")
    with trio.fail_after(PATIENCE):
        async with origin_ws(hub.ws_url, FRIEND) as ws:
            await ws.send({"type": "ping"})
            assert await ws.recv() == {"type": "pong"}


def test_bad_allow_origin_is_refused_at_start(tmp_path: Path) -> None:
    done = run_hub(tmp_path, "--allow-origin", "evil.example/path")
    assert done.returncode == 2, done.stderr
    assert "--allow-origin" in done.stderr and "listening" not in done.stderr


# --- the admin token and the command's environment ---------------------

AGENT, VIEWER, ADMIN = "agent-secret-1", "viewer-secret-2", "admin-secret-3"


async def test_delete_needs_the_admin_token(hub_factory: HubFactory) -> None:
    hub = await hub_factory.astart("--agent-token", AGENT, "--viewer-token", VIEWER, "--admin-token", ADMIN)
    async with hub.http(AGENT) as agent_client, hub.http(VIEWER) as viewer, hub.http(ADMIN) as admin, \
            hub.http() as anon:
        resp = await agent_client.post(logs_path(TASK), json=[{"message": f"l{s}", "seq": s} for s in (1, 2)])
        assert resp.status_code == 200, resp.text
        for client in (agent_client, viewer):
            assert_error(await client.delete(logs_path(TASK)), 403, "FORBIDDEN", mentions="admin token")
        assert_error(await anon.delete(logs_path(TASK)), 401, "UNAUTHORIZED")
        assert len(await fetch_all(viewer, TASK)) == 2

        # The admin token reads, writes and deletes.
        resp = await admin.post(logs_path(TASK), json={"message": "by admin", "seq": 3})
        assert resp.status_code == 200, resp.text
        assert [r["seq"] for r in await fetch_all(admin, TASK)] == [1, 2, 3]
        resp = await admin.delete(logs_path(TASK))
        assert resp.status_code == 200 and resp.json() == {"deletedCount": 3}
    with trio.fail_after(PATIENCE):
        async with hub.ws(token=ADMIN) as ws:
            await ws.send(hubclient.logs_frame(TASK, [make_record(TASK, 4)]))
            await ws.wait_ack(TASK, 4)


async def test_admin_token_from_the_environment_and_alone(hub_process_factory: HubFactory) -> None:
    # The CLI's environment fallback: a process.
    hub = await hub_process_factory.astart(env={"KERUTA_ADMIN_TOKEN": "env-admin"})
    async with hub.http() as anon, hub.http("env-admin") as admin:
        # An admin token alone is a token: the hub is no longer open.
        assert_error(await anon.get(logs_path(TASK)), 401, "UNAUTHORIZED")
        assert (await admin.post(logs_path(TASK), json={"message": "x"})).status_code == 200
        assert (await admin.delete(logs_path(TASK))).json() == {"deletedCount": 1}


async def test_open_hub_still_deletes_without_a_token(hub: TestHub) -> None:
    async with hub.http() as client:
        assert (await client.post(logs_path(TASK), json={"message": "x"})).status_code == 200
        assert (await client.delete(logs_path(TASK))).json() == {"deletedCount": 1}


def test_admin_token_alone_allows_a_non_loopback_address() -> None:
    args = build_parser().parse_args(["--host", "0.0.0.0", "--admin-token", "a"])
    assert check_config(config_from_args(args)) is None
    args = build_parser().parse_args(["--host", "0.0.0.0"])
    assert check_config(config_from_args(args)) is not None


DUMP_ENV = (
    "import json, os, sys; "
    "json.dump(dict(os.environ), open(sys.argv[1], 'w')); "
    "print('env dumped')"
)


@pytest.mark.parametrize("via", ["env", "flag"])
async def test_command_does_not_inherit_the_agent_token(
    hub_factory: HubFactory, tmp_path: Path, via: str
) -> None:
    hub = await hub_factory.astart("--agent-token", AGENT)
    dump = tmp_path / "env.json"
    env = agent_env(KERUTA_TASK_ID="ignored-by-flag", KERUTA_AGENT_TOKEN=AGENT, KERUTA_SPOOL_DIR=str(tmp_path / "x"),
                    MY_OWN_TOKEN="the-users-own")
    extra: tuple[str, ...] = ()
    if via == "env":
        env["KERUTA_TOKEN"] = AGENT
    else:
        env["KERUTA_TOKEN"] = "stale-other-value"
        extra = ("--token", AGENT)
    args = run_args(hub.url, "env-task", tmp_path / "spool", *extra) + [sys.executable, "-c", DUMP_ENV, str(dump)]
    async with agent(args, env=env) as proc:
        assert await proc.wait() == 0, proc.stderr_text
    child = orjson.loads(dump.read_bytes())
    assert "KERUTA_TOKEN" not in child
    leaked = [name for name, value in child.items() if value == AGENT]
    assert not leaked, f"the command can read the agent's token from {leaked}"
    # Everything else is passed on as before.
    assert child["KERUTA_TASK_ID"] == "ignored-by-flag"
    assert child["MY_OWN_TOKEN"] == "the-users-own"
    assert child["PYTHONUNBUFFERED"] == "1"
    # And the agent itself still delivered with the token.
    async with hub.http(AGENT) as client:
        assert [r["message"] for r in await fetch_all(client, "env-task")] == ["env dumped"]


# --- loopback and the spool lock ------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("LOCALHOST", True), ("::1", True),
        ("[::1]", True), ("::ffff:127.0.0.1", True),
        ("127.example.com", False), ("127.0.0.1.nip.io", False), ("localhost.example", False),
        ("0.0.0.0", False), ("::", False), ("192.0.2.10", False), ("128.0.0.1", False),
    ],
)
def test_is_loopback_parses_the_address(host: str, loopback: bool) -> None:
    assert HubConfig(host=host).is_loopback() is loopback


def test_hub_refuses_a_name_that_only_looks_like_loopback(tmp_path: Path) -> None:
    done = run_hub(tmp_path, "--host", "127.example.com", env=clean_env())
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "token" in done.stderr.lower() and "listening" not in done.stderr


SPOOL_WORKER = r"""
import os, sys
from pathlib import Path
import trio
from agent.spool.lock import SpoolLocked
from agent.spool.spool import Spool

root, rounds = Path(sys.argv[1]), int(sys.argv[2])
owned = lost = shared = 0
for _ in range(rounds):
    try:
        spool = Spool.open(root, "same-task", hub_url="http://127.0.0.1:1")
    except SpoolLocked:
        continue
    owned += 1
    # Two owners at once would both create this file.
    try:
        os.close(os.open(root / "owner", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        mine = True
    except FileExistsError:
        shared += 1
        mine = False
    spool.append([(spool.last_seq + 1, b'{"message": "x"}')])
    trio.run(spool.set_final, "succeeded", 0)
    if not (spool.dir / "task.json").exists():
        lost += 1
    if mine:
        os.unlink(root / "owner")
    spool.remove()
print(owned, lost, shared)
"""


def test_concurrent_runs_of_one_task_never_share_or_lose_the_spool(tmp_path: Path) -> None:
    """Processes open, write and remove the same task's spool as fast as they can:
    at any time at most one owns it, and an owner's task.json is never taken away."""
    root = tmp_path / "spool"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", SPOOL_WORKER, str(root), "400"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        for _ in range(4)
    ]
    totals = [0, 0, 0]
    failures: list[str] = []
    for w in workers:
        out, err = w.communicate(timeout=PATIENCE)
        if w.returncode != 0:
            failures.append(err[-2000:])
            continue
        for i, n in enumerate(out.split()):
            totals[i] += int(n)
    assert not failures, "a worker crashed:\n" + "\n".join(failures)
    owned, lost, shared = totals
    assert owned > 0
    assert shared == 0, f"{shared} times two processes owned the spool at once"
    assert lost == 0, f"{lost} times an owner's task.json was removed under it"
    assert not (root / "same-task").exists() or not any((root / "same-task").iterdir())


async def test_dns_rebinding_is_refused_by_an_open_hub(hub_factory: HubFactory) -> None:
    """A page on evil.example whose DNS now says 127.0.0.1 is same-origin with
    the hub to the browser (Origin and Host agree), and could read every log.
    A hub without tokens answers only requests addressed to a loopback name."""
    hub = await hub_factory.astart("--allow-origin", FRIEND)
    port = hub.url.rsplit(":", 1)[1]
    async with hub.http() as client:
        for host in (f"evil.example:{port}", "evil.example", f"127.example.com:{port}"):
            resp = await client.get(logs_path(TASK), headers={"Host": host})
            assert_error(resp, 403, "FORBIDDEN_HOST")
            resp = await client.post(
                logs_path(TASK), json={"message": "x"}, headers={"Host": host, "Origin": f"http://{host}"}
            )
            assert_error(resp, 403, "FORBIDDEN_HOST")
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"LOCALHOST:{port}", "dashboard.example:3000"):
            resp = await client.get("/api/v1/tasks", headers={"Host": host})
            assert resp.status_code == 200, (host, resp.text)
    # The WebSocket upgrade, by hand: client libraries write Host from the URL.
    upgrade = (
        f"GET /api/v1/ws HTTP/1.1\r\nHost: evil.example:{port}\r\nOrigin: http://evil.example:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    received = b""
    with trio.fail_after(PATIENCE):
        stream = await trio.open_tcp_stream("127.0.0.1", int(port))
        async with stream:
            await stream.send_all(upgrade.encode())
            while b"FORBIDDEN_HOST" not in received and b"\x88" not in received.partition(b"\r\n\r\n")[2]:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                received += chunk
    assert b"FORBIDDEN_HOST" in received, received
    assert b"secret" not in received
    # A hub with tokens is reached by any name: the token is what guards it.
    await hub.astop()
    guarded = await hub_factory.astart("--agent-token", "a-token-1234", db=hub.db)
    async with guarded.http(token="a-token-1234") as client:
        resp = await client.get("/api/v1/tasks", headers={"Host": "logs.example.org"})
        assert resp.status_code == 200, resp.text
