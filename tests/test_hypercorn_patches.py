"""keruta's patches to hypercorn's internals (hub/hypercorn_patches.py):
the version they were written for, a close that waits for the send in
progress, one connection's failure ending only that connection, and ping
tasks that end with their WebSocket; a connection's messages taken and its
frames written inline, in order."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import hypercorn.trio
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from trio_websocket import open_websocket_url

from hub import hypercorn_patches
from tests import hubclient
from tests.support import websocket_app

sqlite_hub_factory = hubclient.sqlite_hub_factory


def test_the_patches_refuse_a_hypercorn_they_were_not_written_for() -> None:
    hypercorn_patches.check_version()  # the installed one: the pinned release
    for other in ("0.17.3", "0.18.1", "1.0.0"):
        with pytest.raises(hypercorn_patches.UnsupportedHypercorn, match=f"hypercorn {other} is installed"):
            hypercorn_patches.check_version(other)


def _server(ours: socket.socket) -> TCPServer:
    """A TCPServer on a real socket, not run: only its send lock, protocol_send
    and _close are used here."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    return TCPServer(None, Config(), None, None, stream)  # type: ignore[arg-type]


async def test_a_close_waits_for_the_send_in_progress() -> None:
    # A WebSocket ping being sent holds the send lock; without the patch the
    # close's send_eof ran beside it, and a send that started during send_eof
    # raised BusyResourceError, which ended the hub.
    hypercorn_patches.install()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    server = _server(ours)
    with theirs:
        async with trio.open_nursery() as nursery:
            async with server.send_lock:  # a send in progress
                nursery.start_soon(server._close)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(BlockingIOError):
                    theirs.recv(1)  # no end of stream yet: the close waits
        assert theirs.recv(1) == b"", "the close never happened"


async def test_closing_from_inside_a_failed_send_does_not_deadlock() -> None:
    hypercorn_patches.install()
    ours, theirs = socket.socketpair()
    server = _server(ours)
    theirs.close()
    with trio.fail_after(5):
        async with server.send_lock:
            await server._close()


async def test_a_failing_connection_handler_ends_only_that_connection(caplog) -> None:  # type: ignore[no-untyped-def]
    hypercorn_patches.install()
    # A stream hypercorn cannot use at all: its handler raises AttributeError.
    server = TCPServer(None, Config(), None, None, object())  # type: ignore[arg-type]
    await server  # would raise, and end trio.serve_listeners and the hub with it
    assert any("serves on" in r.getMessage() for r in caplog.records)


def _ping_tasks() -> list[str]:
    """The WebSocket ping tasks alive in this trio run (the in-process hub's:
    hypercorn's, and hub/ws/stream_socket.py's for the sockets the hub serves itself)."""
    found: list[str] = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if "_send_pings" in task.name or "ping_every" in task.name:
            found.append(task.name)
        todo.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return found


async def test_a_websocket_the_hub_closed_leaves_no_ping_task_behind(sqlite_hub_factory) -> None:  # type: ignore[no-untyped-def]
    # Pings an hour apart. Closed by the hub (here: 1008, no token), the
    # connection's ping task must end with it; one that waited for its next
    # ping to notice would outlive this test, and hold up a SIGTERM'd hub
    # (closing its viewers with 1001) for a ping interval.
    hub = await sqlite_hub_factory.astart("--agent-token", "agent-secret", "--ping-interval", "3600")
    with trio.fail_after(10):
        async with hub.ws() as refused:
            frames, code = await hubclient.drain_until_closed(refused)
    assert [f.get("code") for f in frames] == ["UNAUTHORIZED"] and code == 1008
    with trio.fail_after(10):
        while _ping_tasks():
            await trio.sleep(0.01)


# --- patch 6: a connection's common case inline ------------------------------------


@asynccontextmanager
async def _served(app: Any) -> AsyncIterator[str]:
    """`app` served by hypercorn with keruta's patches, on loopback: its ws:// URL."""
    hypercorn_patches.install()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, app, config, shutdown_trigger=done.wait))
        yield binds[0].replace("http://", "ws://")
        done.set()


async def test_an_inline_frame_the_socket_cannot_take_whole_goes_before_the_next() -> None:
    # Larger than any socket buffer: most of it is left as the tail.
    big = "a" * (16 * 1024 * 1024)
    checks: list[bool] = []

    async def body(receive: Any, send: Any, link: Any) -> None:
        assert (await receive())["text"] == "go"
        checks.append(link.writable())
        link.send_now(big)
        checks.append(link.writable())  # a tail is pending: no inline send until it is out
        await send({"type": "websocket.send", "text": "after"})
        await receive()  # until the client goes

    async with _served(websocket_app(body)) as url:
        async with open_websocket_url(url, max_message_size=len(big) + 1024) as client:
            await client.send_message("go")
            with trio.fail_after(30):
                assert await client.get_message() == big
                assert await client.get_message() == "after"
    assert checks == [True, False]


async def test_a_message_is_taken_inline_only_while_the_app_waits_on_an_empty_queue() -> None:
    taken: list[str] = []
    received: list[str] = []
    reading = trio.Event()

    async def body(receive: Any, send: Any, link: Any) -> None:
        link.on_message = lambda message: message.startswith("inline") and not taken.append(message)
        # Not reading yet: whatever comes now is queued, even what on_message would take.
        await reading.wait()
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            received.append(message["text"])
            if message["text"] == "done":
                await send({"type": "websocket.send", "text": "bye"})

    async with _served(websocket_app(body)) as url:
        async with open_websocket_url(url) as client:
            await client.send_message("inline-early")
            await client.send_message("queued-1")
            await trio.sleep(0.2)  # both reach hypercorn while the app does not read
            reading.set()
            await trio.sleep(0.2)  # the app drains its queue and waits
            await client.send_message("inline-late")
            await client.send_message("queued-2")
            await client.send_message("done")
            with trio.fail_after(10):
                assert await client.get_message() == "bye"
    assert taken == ["inline-late"]
    assert received == ["inline-early", "queued-1", "queued-2", "done"]
