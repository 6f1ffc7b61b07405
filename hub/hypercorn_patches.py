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

6. A connection's common case skips two task hops (`InlineLink`). Each
   message hypercorn reads went through a channel to the app's reader task,
   and each frame the app sent went from its sender task through hypercorn's
   layers; for a producer's one-record frame and its ack those hops cost more
   than the work. An HTTP/1.1 WebSocket's app may take a whole message in
   hypercorn's own read task (`InlineLink.on_message`), only while its reader
   waits on an empty queue, so nothing is read out of order; and it may write
   a text frame at once from synchronous code (`InlineLink.send_now`) while
   no send is under way: what the socket does not take is sent, before
   anything else, by the next send or a task started for it.

7. A WebSocket handshake hypercorn refuses ends its connection
   (`WSStream.handle`). For a handshake it cannot accept (another version,
   no key: a second request on a kept-alive connection, since the listener
   answers a connection's first itself) hypercorn answered 400 with
   "connection: close" but never ended the stream, so the connection stayed
   open, and not idle (no keep-alive timeout), for as long as the client
   liked. Here the stream ends with the answer, and the connection with it.

8. `100 Continue` waits for the app (`H11Protocol._handle_events`,
   `HTTPStream.app_send`). Hypercorn answered `Expect: 100-continue` as soon
   as it parsed the head, before hub/admission.py had judged the token, so
   a client such as curl uploaded a body that would be refused unread. Here
   hypercorn sends no 100 of its own; the app asks for it with an ASGI
   message of type CONTINUE once the request is admitted. And a client that
   pipelines past an answer with `connection: close` no longer cuts that
   answer after its head: the bytes h11 refuses wait (unread, up to
   ANSWER_GRACE) until the answer is sent whole.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from io import BytesIO, StringIO
from typing import Any

import h11
import trio
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol import ws_stream
from hypercorn.protocol.events import Body, Data, EndBody, Response, StreamClosed
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol, H11WSConnection
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
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
    # Patch 6: what this connection's tasks (its reads, the app) find as their link.
    self.keruta_link = InlineLink(self)
    _current_link.set(self.keruta_link)
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
    link = _current_link.get()
    if link is not None:
        link.attach(self)
    if isinstance(event, Data) and not self.closed and self.handshake.accepted:
        await _handle_data(self, event.data)
        return
    was_closed = self.closed
    await _original_handle(self, event)
    if isinstance(event, StreamClosed):
        pings: trio.CancelScope | None = getattr(self, "keruta_pings", None)
        if pings is not None:
            pings.cancel()
    elif self.closed and not was_closed and self.app_put is None:
        # Patch 7: refused before any app ran (400/404, "connection: close"):
        # the stream ends here, so the connection closes as its answer says.
        await self.send(StreamClosed(stream_id=self.stream_id))


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
    link = _current_link.get()
    take = link.on_message if link is not None else None
    for message in messages:
        if isinstance(message, Ping):
            await self.send(Data(stream_id=self.stream_id, data=pong_frame(message.payload)))
            continue
        # One frame is a whole message: over the limit, the app gets OVERSIZED
        # as from DiscardingWebsocketBuffer (which counts a text's characters).
        if len(message) > limit:
            await self.app_put({"type": "websocket.receive", "bytes": None, "text": OVERSIZED})
        elif take is not None and _app_waits_on_empty_queue(self) and take(message):
            continue
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
    extra one was a trip through trio's scheduler for every ack. What an
    inline send left unsent goes first (patch 6)."""
    if not isinstance(event, RawData):
        await _original_protocol_send(self, event)
        return
    lock: trio.Lock = self.send_lock
    if lock.locked():
        await lock.acquire()
    else:
        lock.acquire_nowait()
    try:
        link: InlineLink | None = getattr(self, "keruta_link", None)
        await _send_shielded(self, event.data if link is None else link.take_tail() + event.data)
    finally:
        lock.release()


async def _send_shielded(self: Any, data: bytes) -> None:
    try:
        with trio.CancelScope(shield=True):
            await self.stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await self.protocol.handle(Closed())


async def _read_data_untimed(self: Any) -> None:
    if self.config.read_timeout is not None:
        await _original_read_data(self)
        return
    # Hypercorn's loop, without `fail_after(inf)` around every read.
    link: InlineLink | None = getattr(self, "keruta_link", None)
    while True:
        try:
            data = bytes(await self.stream.receive_some(MAX_RECV))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            break
        ws = link.reads_straight() if link is not None and data else None
        if ws is not None:
            # What H11Protocol.handle would hand its WebSocket, without its layers (patch 6).
            await ws.handle(Data(stream_id=ws.stream_id, data=data))
            continue
        await self.protocol.handle(RawData(data))
        if data == b"":
            break
    await self.protocol.handle(Closed())


# --- 6: a connection's common case inline -----------------------------------------

_current_link: contextvars.ContextVar[InlineLink | None] = contextvars.ContextVar("keruta_link", default=None)


def current_link() -> InlineLink | None:
    """The link of the connection whose task calls this (an ASGI app's task
    inherits it from hypercorn's connection task); None outside hypercorn."""
    return _current_link.get()


def _app_waits_on_empty_queue(ws: Any) -> bool:
    """The app's reader is parked on its queue with nothing in it: a message
    taken inline now is taken in the order it came."""
    channel = getattr(ws.app_put, "__self__", None)
    if not isinstance(channel, trio.MemorySendChannel):
        return False
    stats = channel.statistics()
    return stats.current_buffer_used == 0 and stats.tasks_waiting_receive > 0


class InlineLink:
    """Patch 6: one HTTP/1.1 connection's WebSocket, reachable from the app's
    synchronous code. `on_message` (set by the app) takes a whole message in
    hypercorn's read task, or answers False to have it queued as usual;
    `send_now` writes a text frame without a task hop."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self._ws: Any = None
        self._shared = False
        self._plain_found: bool | None = None
        # Bytes of an inline frame the socket did not take: sent before anything else.
        self._tail = b""
        self.on_message: Callable[[str | bytes], bool] | None = None

    def attach(self, ws: Any) -> None:
        if self._ws is None:
            self._ws = ws
        elif self._ws is not ws:
            self._shared = True  # several streams on one connection (HTTP/2): never inline

    def reads_straight(self) -> Any:
        """The WebSocket stream raw data may go to straight (H11Protocol passes
        an upgraded connection's bytes through unchanged), or None."""
        ws, server = self._ws, self._server
        if ws is None or self._shared:
            return None
        protocol = server.protocol.protocol
        if not isinstance(protocol, H11Protocol) or protocol.stream is not ws:
            return None
        connection = protocol.connection
        if not isinstance(connection, H11WSConnection) or connection.buffer:
            return None
        return ws

    def _plain(self) -> bool:
        """An accepted WebSocket, alone on a plain HTTP/1.1 socket, with no
        extension: settled once it is accepted, so found out once."""
        if self._plain_found is None:
            ws, server = self._ws, self._server
            if ws is None or ws.state != ASGIWebsocketState.CONNECTED:
                return False
            protocol = server.protocol.protocol
            self._plain_found = (
                not ws.handshake.extensions
                and isinstance(server.stream, trio.SocketStream)
                and isinstance(protocol, H11Protocol)
                and protocol.stream is ws
            )
        return self._plain_found and not self._shared

    def writable(self) -> bool:
        """No send is under way and this is a plain HTTP/1.1 WebSocket, open:
        `send_now` may write."""
        ws = self._ws
        return (
            self._plain()
            and not self._tail
            and not self._server.send_lock.locked()
            and not ws.closed
            and ws.state == ASGIWebsocketState.CONNECTED
            and ws.connection.state is ConnectionState.OPEN
        )

    def send_now(self, text: str) -> None:
        """Writes `text` as one frame now (only when `writable`); what the
        socket does not take goes before the connection's next send."""
        if not self.writable():
            raise RuntimeError("send_now while a send is under way")
        data = server_frame(text)
        server = self._server
        try:
            written = os.write(server.stream.socket.fileno(), data)
        except OSError:
            # Full (BlockingIOError) or broken: the task's send_all waits or
            # meets the error, and a broken connection closes as hypercorn closes it.
            written = 0
        if written < len(data):
            self._tail = data[written:]
            self._ws.task_group.spawn(self._send_tail)

    def take_tail(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail

    async def _send_tail(self) -> None:
        server = self._server
        with trio.CancelScope(shield=True):
            async with server.send_lock:
                tail = self.take_tail()
                if tail:
                    await _send_shielded(server, tail)


# An ASGI message (patch 8): send `100 Continue` now, the request admitted.
CONTINUE = "keruta.http.continue"


async def _handle_events_no_early_continue(self: Any) -> None:
    # H11Protocol._handle_events of HYPERCORN_VERSION without its first
    # statement, which sent 100 Continue for every head that asked.
    while True:
        try:
            event = self.connection.next_event()
        except h11.RemoteProtocolError as error:
            if self.connection.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
                await self._send_error_response(error.error_status_hint)
            elif self.connection.our_state is h11.SEND_BODY:
                # An answer is under way (a refusal with `connection: close`,
                # and the client pipelined past it): let it go out whole
                # before the close, reading nothing meanwhile.
                await _answer_sent(self)
            await self.send(Closed())
            break
        else:
            if isinstance(event, h11.Request):
                await self.send(Updated(idle=False))
                await self._check_protocol(event)
                await self._create_stream(event)
            elif event is h11.PAUSED:
                await self.can_read.clear()
                await self.can_read.wait()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
                break
            elif self.stream is None:
                break
            elif isinstance(event, h11.Data):
                await self.stream.handle(Body(stream_id=STREAM_ID, data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self.stream.handle(EndBody(stream_id=STREAM_ID))
            elif isinstance(event, Data):
                await self.stream.handle(event)


# How long a connection whose client broke the protocol waits for the answer
# it was sending to end (patch 8).
ANSWER_GRACE = 5.0


async def _answer_sent(self: Any) -> None:
    # Polled: hypercorn marks no event when a response ends, and this path is
    # rare (a client that sent bytes where h11 expected its close).
    with trio.move_on_after(ANSWER_GRACE):
        while self.connection.our_state is h11.SEND_BODY:
            await trio.sleep(0.002)


_http_app_send = HTTPStream.app_send


async def _http_app_send_continue(self: Any, message: Any) -> None:
    if message is not None and message["type"] == CONTINUE:
        # A status under 200 goes out as an informational response (H11Protocol.stream_send).
        if self.state == ASGIHTTPState.REQUEST:
            await self.send(Response(stream_id=self.stream_id, headers=[], status_code=100))
        return
    await _http_app_send(self, message)


def install() -> None:
    """Check the version, then apply the patches; idempotent. hub.server.serve()
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
    if H11Protocol._handle_events is not _handle_events_no_early_continue:  # type: ignore[comparison-overlap]
        H11Protocol._handle_events = _handle_events_no_early_continue  # type: ignore[method-assign]
    if HTTPStream.app_send is not _http_app_send_continue:  # type: ignore[comparison-overlap]
        HTTPStream.app_send = _http_app_send_continue  # type: ignore[method-assign]
