"""The viewer's files as the hub serves them, and the WebSocket token as a subprotocol (no browser needed)."""

from __future__ import annotations

import base64
import re
from importlib.resources import files

import pytest
from trio_websocket import open_websocket_url

from tests import hubclient
from tests.hubclient import (
    InProcessHub,
    InProcessHubFactory,
    TestHub,
    Ws,
    drain_until_closed,
    logs_frame,
    make_record,
)

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures

AGENT, VIEWER = "agent-secret-1", "viewer secret/with+odd=chars"


def bearer_protocol(token: str) -> str:
    return "bearer." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


async def test_viewer_files_are_served_with_their_types(hub: TestHub) -> None:
    async with hub.http() as client:
        for path in ("/", "/tasks/some-task"):
            resp = await client.get(path)
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "text/html; charset=utf-8"
            assert "default-src 'none'" in resp.headers["content-security-policy"]
            assert "connect-src 'self'" in resp.headers["content-security-policy"]
            for ref in re.findall(r'(?:src|href)="([^"]+)"', resp.text):
                assert ref.startswith(("/static/", "data:")) or ref == "/", ref
        for name, kind in (("viewer.js", "text/javascript"), ("ansi.js", "text/javascript"), ("viewer.css", "text/css")):
            resp = await client.get(f"/static/{name}")
            assert resp.status_code == 200, name
            assert resp.headers["content-type"].startswith(kind)
            assert resp.headers["x-content-type-options"] == "nosniff"
            assert resp.content == (files("hub") / "static" / name).read_bytes()
        # Nothing outside hub/static/, nothing without a known type, no hidden files.
        for path in (
            "/static/nope.js", "/static/..%2Fapp.py", "/static/%2E%2E%2Fapp.py", "/static/../app.py",
            "/static/.hidden.js", "/static/app.py", "/static/", "/static/viewer.js/x",
        ):
            resp = await client.get(path)
            assert resp.status_code == 404, path
            assert "import" not in resp.text


def test_viewer_loads_nothing_from_elsewhere() -> None:
    static = files("hub") / "static"
    for entry in static.iterdir():
        text = entry.read_text(encoding="utf-8")
        # No CDN, no fonts or scripts from another host: the page talks to its hub only.
        assert not re.search(r"https?://", text), entry.name
        assert "@import" not in text and "fonts.googleapis" not in text


@pytest.fixture
async def guarded(hub_factory: InProcessHubFactory) -> InProcessHub:
    return await hub_factory.astart("--agent-token", AGENT, "--viewer-token", VIEWER)


async def test_websocket_token_as_subprotocol(guarded: TestHub) -> None:
    async with hubclient.ws_connect(guarded.ws_url, token=AGENT) as writer:
        await writer.send(logs_frame("t", [make_record("t", 1)]))
        await writer.wait_ack("t", 1)
    # The viewer token as a subprotocol: accepted as "keruta", may read.
    async with open_websocket_url(
        guarded.ws_url, subprotocols=["keruta", bearer_protocol(VIEWER)], max_message_size=hubclient.MAX_WS_MESSAGE
    ) as conn:
        assert conn.subprotocol == "keruta"
        ws = Ws(conn)
        await ws.subscribe("t", from_seq=1)
        assert await ws.collect("t", 1) == [1]
    # A wrong token as a subprotocol: refused like any wrong token.
    async with open_websocket_url(guarded.ws_url, subprotocols=["keruta", bearer_protocol("wrong")]) as conn:
        assert conn.subprotocol == "keruta"
        frames, code = await drain_until_closed(Ws(conn))
        assert frames[0]["type"] == "error" and frames[0]["code"] == "UNAUTHORIZED"
        assert code == 1008
    # ?token= keeps working for clients that use it.
    async with guarded.ws(query_token=VIEWER) as ws:
        await ws.subscribe("t", from_seq=1)
        assert await ws.collect("t", 1) == [1]
