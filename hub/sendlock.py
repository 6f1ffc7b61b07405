"""One connection's trouble must never end the hub, nor hold it up.

Three guards around hypercorn's trio TCP server and its WebSocket streams
(installed by hub/server.py).

A connection's close must not race its own sends.

Hypercorn's trio TCP server sends every chunk under `send_lock`, except the
half-close in `_close` (`send_eof`). When a connection closes while its
WebSocket ping task starts a send, the ping's `send_all` meets the
`send_eof` in progress and raises trio.BusyResourceError. The ping task lives
in the server's task group, so that error ends every connection and the hub
(seen: a client refused with close 1008 at the moment of a ping). Here
`_close` takes the same lock, so the two take turns; the send that comes
second finds the socket closed, which hypercorn already handles.

And whatever else goes wrong in one connection's handler: hypercorn runs
each under `trio.serve_listeners`, where an exception ends the listener and
so the hub. It is logged with its traceback (it is a bug to fix) and only that
connection ends.

A closed WebSocket's ping task must end with it. Hypercorn's ping task loops
`while not closed: ping; sleep(ping interval)`, in the connection's task
group, which the connection's end waits for: a closed connection lingered
for up to a ping interval (5 s), and a SIGTERM'd hub waited that long for its
last viewers after closing them with 1001. Here the ping task runs in a
cancel scope that the stream's StreamClosed event cancels.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger("keruta.hub.http")

_original_close: Callable[[Any], Awaitable[None]] = TCPServer._close
_original_run: Callable[[Any], Awaitable[None]] = TCPServer.run
_original_send_pings: Callable[[Any], Awaitable[None]] = WSStream._send_pings
_original_handle: Callable[[Any, Any], Awaitable[None]] = WSStream.handle


async def _close_under_send_lock(self: Any) -> None:
    lock: trio.Lock = self.send_lock
    if lock.statistics().owner is trio.lowlevel.current_task():
        # Closing from inside a send that failed: the lock is already ours.
        await _original_close(self)
        return
    with trio.CancelScope(shield=True):
        # Shielded like hypercorn's own sends: a close is never left half done.
        async with lock:
            await _original_close(self)


async def _run_isolated(self: Any) -> None:
    try:
        await _original_run(self)
    except Exception:
        log.exception("a connection's handler failed; that connection is closed, the hub serves on")


async def _send_pings_until_closed(self: Any) -> None:
    with trio.CancelScope() as self.keruta_pings:
        await _original_send_pings(self)


async def _handle_and_stop_pings(self: Any, event: Any) -> None:
    await _original_handle(self, event)
    if isinstance(event, StreamClosed):
        pings: trio.CancelScope | None = getattr(self, "keruta_pings", None)
        if pings is not None:
            pings.cancel()


def install() -> None:
    if TCPServer._close is not _close_under_send_lock:  # type: ignore[comparison-overlap]
        TCPServer._close = _close_under_send_lock  # type: ignore[method-assign]
    if TCPServer.run is not _run_isolated:  # type: ignore[comparison-overlap]
        TCPServer.run = _run_isolated  # type: ignore[method-assign]
    if WSStream._send_pings is not _send_pings_until_closed:  # type: ignore[comparison-overlap]
        WSStream._send_pings = _send_pings_until_closed  # type: ignore[method-assign]
    if WSStream.handle is not _handle_and_stop_pings:  # type: ignore[comparison-overlap]
        WSStream.handle = _handle_and_stop_pings  # type: ignore[method-assign]
