"""Every change keruta makes to hypercorn's internals, in one place.

Hypercorn has no hook for any of these, so they replace private methods and
one class, process-wide. They were written for, and checked against, one
hypercorn release (HYPERCORN_VERSION, the version setup.cfg pins): `install()`
refuses to run on any other, so that an upgrade cannot silently leave a patch
pointing at code that changed. docs/hypercorn-patches.md says what each works
around and what fix upstream would let it go.

1. A connection's close takes the send lock (`TCPServer._close`).
   Hypercorn's trio TCP server sends every chunk under `send_lock`, except
   the half-close in `_close` (`send_eof`). When a connection closes while
   its WebSocket ping task starts a send, the ping's `send_all` meets the
   `send_eof` in progress and raises trio.BusyResourceError; the ping task
   lives in the server's task group, so that error ended every connection
   and the hub. Here `_close` takes the same lock, so the two take turns; the
   send that comes second finds the socket closed, which hypercorn handles.

2. One connection's failure ends only that connection (`TCPServer.run`).
   Hypercorn runs each connection's handler under `trio.serve_listeners`,
   where an exception ends the listener and so the hub. It is logged with
   its traceback (it is a bug to fix) and only that connection ends.

3. A closed WebSocket's ping task ends with it (`WSStream._send_pings`,
   `WSStream.handle`). Hypercorn's ping task loops `while not closed: ping;
   sleep(ping interval)` in the connection's task group, which the
   connection's end waits for: a closed connection lingered up to a ping
   interval, and a SIGTERM'd hub waited that long for its last viewers.
   Here the ping task runs in a cancel scope that StreamClosed cancels.

4. An oversized WebSocket message is discarded, not a stuck connection
   (`ws_stream.WebsocketBuffer`). Hypercorn's buffer answers a message over
   its limit with close 1009 and then stops processing that connection's
   events, so the client's close reply can go unread and the TCP connection
   stays open for good. This buffer counts and discards the rest of the
   message and hands the app OVERSIZED, which the connection answers with a
   TOO_LARGE `error` frame; memory stays bounded by the limit.

5. A WebSocket's common frames skip wsproto, and its reads skip an unbounded
   timeout (`WSStream.handle`, `WSStream.app_send`, `TCPServer._read_data`).
   For a fleet of producers each sending small frames, wsproto's parser and
   hypercorn's layers were the largest share of the hub's CPU per frame.
   Whole one-frame messages in and out are parsed and written by
   hub/ws_frames.py, with no extension negotiated; anything else
   (control frames, fragments, errors) goes to wsproto as before. A read
   with no `read_timeout` (keruta sets none) is not wrapped in
   `fail_after(inf)`, and a send takes a free send lock without a checkpoint
   of its own (`TCPServer.protocol_send`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from io import BytesIO, StringIO
from typing import Any

import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol import ws_stream
from hypercorn.protocol.events import Data, StreamClosed
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from wsproto.connection import ConnectionState

from hub.ws_frames import ClientFrames, Ping, pong_frame, server_frame

# The release these patches were written for and checked against; setup.cfg pins it.
HYPERCORN_VERSION = "0.18.0"

# What the app receives for a message over the limit (patch 4). Not valid
# JSON, so it can never be mistaken for a frame a client sent.
OVERSIZED = "\x00oversized"

log = logging.getLogger("keruta.hub.http")


class UnsupportedHypercorn(RuntimeError):
    """The installed hypercorn is not the release these patches were written for."""


def check_version(installed: str | None = None) -> None:
    installed = installed if installed is not None else version("hypercorn")
    if installed != HYPERCORN_VERSION:
        raise UnsupportedHypercorn(
            f"hypercorn {installed} is installed; keruta's patches to its internals "
            f"(hub/hypercorn_patches.py) were written for {HYPERCORN_VERSION}. Install "
            f"hypercorn=={HYPERCORN_VERSION}, or check each patch against the new release "
            "(docs/hypercorn-patches.md) and update HYPERCORN_VERSION and the pin in setup.cfg"
        )


# --- 1 and 2: the trio TCP server ----------------------------------------------

_original_close: Callable[[Any], Awaitable[None]] = TCPServer._close
_original_run: Callable[[Any], Awaitable[None]] = TCPServer.run


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


# --- 3: WebSocket pings ----------------------------------------------------------

_original_send_pings: Callable[[Any], Awaitable[None]] = WSStream._send_pings
_original_handle: Callable[[Any, Any], Awaitable[None]] = WSStream.handle


async def _send_pings_until_closed(self: Any) -> None:
    with trio.CancelScope() as self.keruta_pings:
        await _original_send_pings(self)


async def _handle_and_stop_pings(self: Any, event: Any) -> None:
    if isinstance(event, Data) and not self.closed and self.handshake.accepted:
        await _handle_data(self, event.data)
        return
    await _original_handle(self, event)
    if isinstance(event, StreamClosed):
        pings: trio.CancelScope | None = getattr(self, "keruta_pings", None)
        if pings is not None:
            pings.cancel()


# --- 4: oversized WebSocket messages ---------------------------------------------


class DiscardingWebsocketBuffer(ws_stream.WebsocketBuffer):
    def __init__(self, max_length: int) -> None:
        super().__init__(max_length)
        self.oversized = False

    def extend(self, event: Any) -> None:
        if self.value is None:
            self.value = StringIO() if isinstance(event, ws_stream.TextMessage) else BytesIO()
        if self.oversized or self.length + len(event.data) > self.max_length:
            self.oversized = True
            self.length += len(event.data)
            self.value = StringIO() if isinstance(self.value, StringIO) else BytesIO()
            return
        self.length += self.value.write(event.data)

    def clear(self) -> None:
        super().clear()
        self.oversized = False

    def to_message(self) -> dict[str, Any]:
        if self.oversized:
            return {"type": "websocket.receive", "bytes": None, "text": OVERSIZED}
        return super().to_message()  # type: ignore[no-any-return]


# --- 5: common WebSocket frames without wsproto; reads without fail_after(inf) ----

_original_app_send: Callable[[Any, Any], Awaitable[None]] = WSStream.app_send
_original_read_data: Callable[[Any], Awaitable[None]] = TCPServer._read_data


def _fast(self: Any) -> bool:
    """Whether this accepted stream's frames may skip wsproto: no extension
    (hypercorn accepts one only when the client offers it) and wsproto still open."""
    return not self.handshake.extensions and self.connection.state is ConnectionState.OPEN


async def _handle_data(self: Any, data: bytes) -> None:
    """WSStream.handle of a Data event once accepted: what hypercorn does, with
    whole one-frame messages parsed by ClientFrames (hub/ws_frames.py)."""
    frames: ClientFrames | None = getattr(self, "keruta_frames", None)
    if frames is None:
        frames = self.keruta_frames = ClientFrames()
    if not frames.handed_over and not _fast(self):
        # wsproto from here on (a close under way: it knows what may still be sent).
        data = frames.stop() + data
    messages, rest = frames.feed(data)
    limit = self.buffer.max_length
    for message in messages:
        if isinstance(message, Ping):
            await self.send(Data(stream_id=self.stream_id, data=pong_frame(message.payload)))
            continue
        # One frame is a whole message: over the limit, the app gets OVERSIZED
        # as from DiscardingWebsocketBuffer (which counts a text's characters).
        if len(message) > limit:
            await self.app_put({"type": "websocket.receive", "bytes": None, "text": OVERSIZED})
        elif isinstance(message, str):
            await self.app_put({"type": "websocket.receive", "bytes": None, "text": message})
        else:
            await self.app_put({"type": "websocket.receive", "bytes": message, "text": None})
    if rest:
        self.connection.receive_data(rest)
        await self._handle_events()


async def _app_send_fast(self: Any, message: Any) -> None:
    if (
        message is not None
        and message["type"] == "websocket.send"
        and not self.closed
        and self.state == ASGIWebsocketState.CONNECTED
        and message.get("bytes") is None
        and isinstance(message.get("text"), str)
        and _fast(self)
    ):
        await self.send(Data(stream_id=self.stream_id, data=server_frame(message["text"])))
        return
    await _original_app_send(self, message)


_original_protocol_send: Callable[[Any, Any], Awaitable[None]] = TCPServer.protocol_send


async def _protocol_send_uncontended(self: Any, event: Any) -> None:
    """Hypercorn's send of a chunk (under the send lock, shielded), taking a
    free lock without the lock's own checkpoint: send_all has one, and the
    extra one was a trip through trio's scheduler for every ack."""
    if not isinstance(event, RawData) or self.send_lock.locked():
        await _original_protocol_send(self, event)
        return
    self.send_lock.acquire_nowait()
    try:
        try:
            with trio.CancelScope(shield=True):
                await self.stream.send_all(event.data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.protocol.handle(Closed())
    finally:
        self.send_lock.release()


async def _read_data_untimed(self: Any) -> None:
    if self.config.read_timeout is not None:
        await _original_read_data(self)
        return
    # Hypercorn's loop, without `fail_after(inf)` around every read.
    while True:
        try:
            data = await self.stream.receive_some(MAX_RECV)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            break
        await self.protocol.handle(RawData(bytes(data)))
        if data == b"":
            break
    await self.protocol.handle(Closed())


def install() -> None:
    """Check the version, then apply the four patches; idempotent. hub.server.serve()
    calls it before hypercorn starts, and so must anything else serving this
    app with hypercorn."""
    check_version()
    if TCPServer._close is not _close_under_send_lock:  # type: ignore[comparison-overlap]
        TCPServer._close = _close_under_send_lock  # type: ignore[method-assign]
    if TCPServer.run is not _run_isolated:  # type: ignore[comparison-overlap]
        TCPServer.run = _run_isolated  # type: ignore[method-assign]
    if WSStream._send_pings is not _send_pings_until_closed:  # type: ignore[comparison-overlap]
        WSStream._send_pings = _send_pings_until_closed  # type: ignore[method-assign]
    if WSStream.handle is not _handle_and_stop_pings:  # type: ignore[comparison-overlap]
        WSStream.handle = _handle_and_stop_pings  # type: ignore[method-assign]
    ws_stream.WebsocketBuffer = DiscardingWebsocketBuffer  # type: ignore[misc]
    if WSStream.app_send is not _app_send_fast:  # type: ignore[comparison-overlap]
        WSStream.app_send = _app_send_fast  # type: ignore[method-assign]
    if TCPServer.protocol_send is not _protocol_send_uncontended:  # type: ignore[comparison-overlap]
        TCPServer.protocol_send = _protocol_send_uncontended  # type: ignore[method-assign]
    if TCPServer._read_data is not _read_data_untimed:  # type: ignore[comparison-overlap]
        TCPServer._read_data = _read_data_untimed  # type: ignore[method-assign]
