"""hub/ws/endpoint.py: /api/v1/ws served on ASGI messages, below Quart.

Most tests drive the whole app's ASGI callable (create_app: the admission
layer dispatches the WebSocket scope) with the messages hypercorn would
exchange, over memory channels, with a real SQLite store and writer; the last
one goes through hypercorn on a real socket.
"""

from __future__ import annotations

import base64
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio

from hub.app import create_app
from hub.config import HubConfig
from hub.deps import ConnectionDeps
from hub.hypercorn_patches import OVERSIZED
from hub.store.sqlite import SQLiteStore
from tests import hubclient
from tests.hubclient import logs_frame, make_record, parse_metrics
from tests.hubparts import hub_parts

TASK = "t"
sqlite_hub_factory = hubclient.sqlite_hub_factory
Message = dict[str, Any]


class Client:
    """The hypercorn side of one WebSocket scope: what it puts in the app's
    receive queue and what the app sends."""

    def __init__(self) -> None:
        self._to_app, self.app_receive = trio.open_memory_channel[Message](math.inf)
        self.app_send_channel, self._from_app = trio.open_memory_channel[Message](math.inf)
        self.ended = trio.Event()
        self._to_app.send_nowait({"type": "websocket.connect"})

    async def app_send(self, message: Message) -> None:
        await self.app_send_channel.send(message)

    def put(self, frame: Message | str | bytes) -> None:
        if isinstance(frame, bytes):
            self._to_app.send_nowait({"type": "websocket.receive", "bytes": frame, "text": None})
        else:
            text = frame if isinstance(frame, str) else orjson.dumps(frame).decode()
            self._to_app.send_nowait({"type": "websocket.receive", "bytes": None, "text": text})

    def disconnect(self) -> None:
        self._to_app.send_nowait({"type": "websocket.disconnect", "code": 1000})

    async def next(self) -> Message:
        return await self._from_app.receive()

    async def frame(self) -> Message:
        message = await self.next()
        assert message["type"] == "websocket.send", message
        frame: Message = orjson.loads(message["text"])
        return frame

    def sent_after_end(self) -> list[Message]:
        messages = []
        while True:
            try:
                messages.append(self._from_app.receive_nowait())
            except trio.WouldBlock:
                return messages


class Hub:
    def __init__(self, deps: ConnectionDeps, nursery: trio.Nursery) -> None:
        self.deps = deps
        self.app = create_app(deps, store_available=lambda: True)
        self.nursery = nursery

    def connect(
        self, *, headers: list[tuple[bytes, bytes]] | None = None, subprotocols: list[str] | None = None,
        query: bytes = b"", host: bytes = b"127.0.0.1:8090",
    ) -> Client:
        client = Client()
        scope = {
            "type": "websocket", "asgi": {"spec_version": "2.3", "version": "3.0"}, "scheme": "ws",
            "http_version": "1.1", "path": "/api/v1/ws", "raw_path": b"/api/v1/ws", "query_string": query,
            "root_path": "", "headers": [(b"host", host), *(headers or [])],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8090),
            "subprotocols": subprotocols or [], "extensions": {"websocket.http.response": {}},
        }

        async def serve() -> None:
            try:
                await self.app(scope, client.app_receive.receive, client.app_send)
            finally:
                client.ended.set()

        self.nursery.start_soon(serve)
        return client


@pytest.fixture
def store(sqlite_store: SQLiteStore) -> SQLiteStore:
    return sqlite_store


@asynccontextmanager
async def running(store: SQLiteStore, config: HubConfig) -> AsyncIterator[Hub]:
    async with hub_parts(store, config) as (deps, connections):
        yield Hub(deps, connections)


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


async def test_a_client_that_goes_away_ends_its_connection_at_once(store: SQLiteStore) -> None:
    async with running(store, HubConfig(agent_token="agent")) as hub:
        client = hub.connect(headers=bearer("agent"))
        with trio.fail_after(10):
            accept = await client.next()
            assert accept["type"] == "websocket.accept" and accept["subprotocol"] is None
            client.put({"type": "subscribe", "taskId": TASK})
            assert (await client.frame())["type"] == "subscribed"
            client.put(logs_frame(TASK, [make_record(TASK, 1)]))
            while (frame := await client.frame())["type"] != "ack":
                pass
            assert frame["seq"] == 1
            assert hub.deps.metrics.connections == 1 and hub.deps.broadcaster.count == 1
            client.disconnect()
            await client.ended.wait()
        assert hub.deps.metrics.connections == 0 and hub.deps.broadcaster.count == 0
        # Nothing is sent to a client that is gone, not even a close.
        assert all(m["type"] == "websocket.send" for m in client.sent_after_end())


@pytest.mark.parametrize(
    ("config", "headers", "host", "code"),
    [
        (HubConfig(agent_token="agent"), [], b"127.0.0.1:8090", "UNAUTHORIZED"),
        (
            HubConfig(agent_token="agent"), [(b"origin", b"http://evil.example"), *bearer("agent")],
            b"127.0.0.1:8090", "FORBIDDEN_ORIGIN",
        ),
        (HubConfig(), [], b"rebind.example:8090", "FORBIDDEN_HOST"),
    ],
)
async def test_a_refused_socket_gets_one_error_frame_and_1008(
    store: SQLiteStore, config: HubConfig, headers: list[tuple[bytes, bytes]], host: bytes, code: str
) -> None:
    async with running(store, config) as hub:
        client = hub.connect(headers=headers, host=host)
        with trio.fail_after(10):
            assert (await client.next())["type"] == "websocket.accept"
            frame = await client.frame()
            assert (frame["type"], frame["code"]) == ("error", code)
            close = await client.next()
            assert (close["type"], close["code"], close["reason"]) == ("websocket.close", 1008, code.lower())
            # What the client sent meanwhile is read, never taken as a frame.
            client.put({"type": "ping"})
            client.disconnect()
            await client.ended.wait()
        assert client.sent_after_end() == []
        assert hub.deps.metrics.connections == 0


async def test_a_refused_client_that_never_closes_is_let_go_after_2_s(
    store: SQLiteStore, autojump_clock: trio.abc.Clock
) -> None:
    async with running(store, HubConfig(agent_token="agent")) as hub:
        client = hub.connect()
        await client.next()
        await client.frame()
        await client.next()
        start = trio.current_time()
        await client.ended.wait()
        assert trio.current_time() - start == pytest.approx(2.0)


async def test_a_browser_gets_the_keruta_subprotocol_and_its_token_counts(store: SQLiteStore) -> None:
    token = base64.urlsafe_b64encode(b"agent").decode().rstrip("=")
    async with running(store, HubConfig(agent_token="agent")) as hub:
        client = hub.connect(subprotocols=["keruta", f"bearer.{token}"])
        with trio.fail_after(10):
            accept = await client.next()
            assert (accept["type"], accept["subprotocol"]) == ("websocket.accept", "keruta")
            client.put({"type": "ping"})
            assert await client.frame() == {"type": "pong"}
            client.disconnect()
            await client.ended.wait()


async def test_a_query_token_counts_and_frames_come_as_text_or_bytes(store: SQLiteStore) -> None:
    async with running(store, HubConfig(agent_token="agent")) as hub:
        client = hub.connect(query=b"token=agent")
        with trio.fail_after(10):
            await client.next()
            client.put(b'{"type":"ping"}')
            assert await client.frame() == {"type": "pong"}
            client.put(OVERSIZED)
            frame = await client.frame()
            assert (frame["type"], frame["code"]) == ("error", "TOO_LARGE")
            client.put(b"")
            assert (await client.frame())["type"] == "error"
            client.disconnect()
            await client.ended.wait()


async def test_a_connection_that_fails_is_logged_and_closed_with_1011(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(store, HubConfig(agent_token="agent")) as hub:
        client = hub.connect(headers=bearer("agent"))
        with trio.fail_after(10):
            await client.next()
            # A closed store's error is no StoreUnavailable: nothing retries it.
            await store.close()
            client.put({"type": "subscribe", "taskId": TASK, "fromSeq": 1})
            close = await client.next()
            await client.ended.wait()
        assert (close["type"], close["code"]) == ("websocket.close", 1011)
        assert hub.deps.metrics.connections == 0
        assert "a WebSocket connection failed" in caplog.text


async def test_other_websocket_paths_are_left_to_quart(store: SQLiteStore) -> None:
    async with running(store, HubConfig()) as hub:
        client = Client()
        scope = {
            "type": "websocket", "asgi": {"spec_version": "2.3", "version": "3.0"}, "scheme": "ws",
            "http_version": "1.1", "path": "/api/v1/wsx", "raw_path": b"/api/v1/wsx", "query_string": b"",
            "root_path": "", "headers": [(b"host", b"127.0.0.1:8090")], "client": None, "server": None,
            "subprotocols": [], "extensions": {"websocket.http.response": {}},
        }
        with trio.fail_after(10):
            await hub.app(scope, client.app_receive.receive, client.app_send)
            start = await client.next()
        assert (start["type"], start["status"]) == ("websocket.http.response.start", 404)


async def test_a_closed_socket_ends_its_connection_in_the_hub(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    sqlite_hub = await sqlite_hub_factory.astart()
    async with sqlite_hub.http() as http:
        async with sqlite_hub.ws() as ws:
            await ws.subscribe(TASK)
            during = parse_metrics((await http.get("/metrics")).text)
        with trio.fail_after(10):
            while True:
                after = parse_metrics((await http.get("/metrics")).text)
                if after["keruta_websocket_connections"] == 0:
                    break
                await trio.sleep(0.05)
    assert during["keruta_websocket_connections"] == 1 and during["keruta_subscribers"] == 1
    assert after["keruta_subscribers"] == 0
