"""A connection closing while its ping task sends must not end the hub (hub/sendlock.py)."""

from __future__ import annotations

import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import TCPServer

from hub import sendlock


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
    ours, theirs = trio.socket.socketpair()
    server = _server(trio.SocketStream(ours))
    try:
        async with trio.open_nursery() as nursery:
            # The close starts first and yields inside send_eof; the ping's send comes next.
            nursery.start_soon(server._close)
            nursery.start_soon(server.protocol_send, RawData(b"\x89\x00"))
        assert server.protocol.closed == 1  # type: ignore[attr-defined]
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
