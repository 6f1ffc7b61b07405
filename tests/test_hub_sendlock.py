"""A connection closing while its ping task sends must not end the hub (hub/sendlock.py)."""

from __future__ import annotations

import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import TCPServer

from hub import sendlock
from tests import hubclient

sqlite_hub_factory = hubclient.sqlite_hub_factory


class _Protocol:
    """What TCPServer.protocol_send tells when a send finds the socket closed."""

    def __init__(self) -> None:
        self.closed = 0

    async def handle(self, event: object) -> None:
        if isinstance(event, Closed):
            self.closed += 1


def _server(stream: trio.SocketStream) -> TCPServer:
    # The parts of a TCPServer that _close and protocol_send use, on a real socket.
    server = TCPServer.__new__(TCPServer)
    server.stream = stream
    server.send_lock = trio.Lock()
    server.protocol = _Protocol()  # type: ignore[assignment]
    return server


async def test_a_send_that_starts_while_the_connection_closes_is_not_an_error() -> None:
    sendlock.install()
    # Trio runs ready tasks in a shuffled order: many rounds meet the race
    # (the send starting while send_eof waits at its checkpoint) many times.
    for _ in range(50):
        ours, theirs = trio.socket.socketpair()
        server = _server(trio.SocketStream(ours))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server._close)
                nursery.start_soon(server.protocol_send, RawData(b"\x89\x00"))
        finally:
            theirs.close()


async def test_closing_from_inside_a_failed_send_does_not_deadlock() -> None:
    sendlock.install()
    ours, theirs = trio.socket.socketpair()
    server = _server(trio.SocketStream(ours))
    theirs.close()
    with trio.fail_after(5):
        async with server.send_lock:
            await server._close()


async def test_a_failing_connection_handler_ends_only_that_connection(caplog) -> None:  # type: ignore[no-untyped-def]
    from hypercorn.config import Config

    sendlock.install()
    # A stream hypercorn cannot use at all: its handler raises AttributeError.
    server = TCPServer(None, Config(), None, None, object())  # type: ignore[arg-type]
    await server  # would raise, and end trio.serve_listeners and the hub with it
    assert any("serves on" in r.getMessage() for r in caplog.records)


def _ping_tasks() -> list[str]:
    """The WebSocket ping tasks alive in this trio run (the in-process hub's)."""
    found: list[str] = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if "_send_pings" in task.name:
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
