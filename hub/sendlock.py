"""A connection's close must not race its own sends, or the whole hub exits.

Hypercorn's trio TCP server sends every chunk under `send_lock`, except the
half-close in `_close` (`send_eof`). When a connection closes while its
WebSocket ping task starts a send, the ping's `send_all` meets the
`send_eof` in progress and raises trio.BusyResourceError. The ping task lives
in the server's task group, so that error ends every connection and the hub
(seen: a client refused with close 1008 at the moment of a ping). Here
`_close` takes the same lock, so the two take turns; the send that comes
second finds the socket closed, which hypercorn already handles.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.trio.tcp_server import TCPServer

_original_close: Callable[[Any], Awaitable[None]] = TCPServer._close


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


def install() -> None:
    if TCPServer._close is not _close_under_send_lock:  # type: ignore[comparison-overlap]
        TCPServer._close = _close_under_send_lock  # type: ignore[method-assign]
