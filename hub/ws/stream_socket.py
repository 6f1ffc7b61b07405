"""hub.ws.connection.WebSocket over a Trio stream: the hub's own WebSocket
server for /api/v1/ws, below hypercorn (hub/listener.py routes a handshake here).

A fleet's producer costs hypercorn's layers (its protocol, stream and ASGI
tasks, a queue hop per message) more than keruta's own work on its frames,
and 5,000 idle producers cost it ~26 KB each. Here a connection is the
Connection's own tasks: its reader reads the socket itself (`receive`), its
sender writes it (`send`) unless a frame can be written at once from
synchronous code (`send_now`), and the listener's one pinger task sends every
socket's keep-alive pings.

Frames are parsed by hub/ws_frames.py; the first one it does not handle (a
close, a fragment, a very large frame, a protocol error) and everything after
go to wsproto, as under hypercorn. A message over `max_message` is handed on as
OVERSIZED the moment it is (the Connection answers it TOO_LARGE) and the rest
of it is read and dropped as it arrives, so memory stays bounded by the
limit, however many parts the message comes in.

A message still arriving holds up to PARTIAL_FREE bytes of its connection's
own; past that the socket is read only once the bytes its frame's header
announces are taken from the hub-wide ingest budget's share for such
messages (IngestBudget.take_partial), all at once: so connections stalled
mid-message hold no more than that share, however many they are, and no
connection waits for budget while it holds some for a frame (except between
the fragments of one message). A message that holds budget must be whole
within `message_timeout` (the hub's --body-timeout) of taking it, or its
connection is closed (1008) rather than hold the budget for ever.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NoReturn

import trio
from hypercorn.typing import ConnectionState as AsgiState
from hypercorn.typing import WebsocketScope
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, TextMessage
from wsproto.events import Ping as WsprotoPing

from hub.hypercorn_patches import OVERSIZED
from hub.ingest_budget import IngestBudget
from hub.ws_frames import ClientFrames, FrameTracker, Ping, pong_frame, server_frame
from hub.ws_handshake import Upgrade, accept_response

log = logging.getLogger("keruta.hub.ws")

MAX_RECV = 65536
# Of a message not yet whole, this much per connection is held without the
# ingest budget's leave (a small frame's worth, like a socket buffer).
PARTIAL_FREE = 16 * 1024
# A read never asks for less than this (what it brings past the frame
# begun is the next frame's start, at most this much more).
MIN_READ = 4096
CLOSE_POLICY = 1008
PING_FRAME = b"\x89\x00"
# How long a close we sent waits for the client's answer before the TCP
# connection is closed anyway.
CLOSE_LINGER = 2.0
# A fragmented message's parts are joined into one every this many (StreamWebSocket._take_part).
_JOIN_PARTS = 256
# What a socket error or EOF means for a send or a read.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


def close_frame(code: int, reason: str) -> bytes:
    payload = code.to_bytes(2, "big") + reason.encode()[:123]
    return bytes((0x88, len(payload))) + payload


class StreamWebSocket:
    """One handshake's WebSocket. The client's disconnect (EOF, a reset, its
    close) cancels `scope`, which the endpoint runs the Connection in, as the
    ASGI socket (hub/ws/endpoint.py AsgiWebSocket) does."""

    # Slots: 5,000 idle producers each hold one.
    __slots__ = (
        "_budget", "_credit", "_credit_deadline", "_flushes", "_frames", "_heard", "_leftover", "_loose",
        "_max_message", "_message_timeout", "_oversized", "_part_bytes", "_parts", "_ready", "_send_lock",
        "_tracker", "_unsent", "_upgrade", "_wsproto", "closed", "disconnected", "link", "on_message", "scope",
        "stream",
    )

    def __init__(
        self, stream: trio.SocketStream, upgrade: Upgrade, leftover: bytes, scope: trio.CancelScope,
        max_message: int, flushes: trio.Nursery, budget: IngestBudget, message_timeout: float,
    ) -> None:
        self.stream = stream
        self._budget = budget
        self._message_timeout = message_timeout
        # Bytes taken from the budget for the message now arriving (give_back
        # returns them), and when that message must be whole.
        self._credit = 0
        self._credit_deadline = 0.0
        # Made with wsproto: the frame boundaries in what it is fed.
        self._tracker: FrameTracker | None = None
        self._upgrade: Upgrade | None = upgrade
        self._leftover = leftover
        self.scope = scope
        self._max_message = max_message
        # Made with the first bytes read: an idle connection holds none.
        self._frames: ClientFrames | None = None
        self._wsproto: WsprotoConnection | None = None
        # Messages read but not yet taken by `receive`.
        self._ready: list[str | bytes] = []
        # A message wsproto gives in pieces: its parts so far, and their size.
        self._parts: list[str | bytes] = []
        self._part_bytes = 0
        # Parts appended since the last were joined into one.
        self._loose = 0
        self._oversized = False
        # Made by the first send after the handshake's: an idle connection holds none.
        self._send_lock: trio.Lock | None = None
        # What `send_now` or `ping` wrote that the socket did not take: it goes
        # before anything else, with the next send or by a task in `flushes`.
        self._unsent = b""
        self._flushes = flushes
        # hub.ws.connection.InlineSocket: the Connection writes acks and live
        # frames from its synchronous code through this socket itself (its
        # reader already reads the socket in its own task: `on_message` is
        # never called here).
        self.link = self
        self.on_message: Callable[[str | bytes], bool] | None = None
        self.closed = False
        self.disconnected = False
        # Bytes came from the client since the pinger's last look (the
        # handshake counts): a socket that talks needs no ping to be known alive.
        self._heard = True

    @property
    def path(self) -> str:
        assert self._upgrade is not None, "before accept"
        return self._upgrade.path

    def asgi_scope(self) -> WebsocketScope:
        """What hypercorn's ASGI scope says of the same handshake (the fields
        the endpoint reads); before `accept`, which lets the handshake go."""
        upgrade = self._upgrade
        assert upgrade is not None, "before accept"
        sock = self.stream.socket
        client = sock.getpeername()
        server = sock.getsockname()
        return {
            "type": "websocket",
            "asgi": {"spec_version": "2.3", "version": "3.0"},
            "scheme": "ws",
            "http_version": "1.1",
            "path": upgrade.path,
            "raw_path": upgrade.raw_path,
            "query_string": upgrade.query_string,
            "root_path": "",
            "headers": upgrade.headers,
            "client": (client[0], client[1]),
            "server": (server[0], server[1]),
            "subprotocols": upgrade.subprotocols,
            "extensions": {},
            "state": AsgiState({}),
        }

    async def accept(self, subprotocol: str | None) -> None:
        upgrade = self._upgrade
        assert upgrade is not None, "accepted once"
        # Not kept for the connection's life (5,000 idle connections would each hold it).
        self._upgrade = None
        # The first send: nothing else can write before the handshake's answer.
        try:
            await self.stream.send_all(accept_response(upgrade, subprotocol))
        except _GONE:
            self.disconnected = True
            await self._gone()

    async def receive(self) -> str | bytes:
        while not self._ready:
            if self.disconnected:
                await self._gone()
            if self._leftover:
                data, self._leftover = self._leftover, b""
            else:
                data = await self._read_more()
                if not data:
                    self.disconnected = True
                    continue
            self._heard = True
            await self._feed(data)
            if self._credit and (self._ready or not self._unfinished()):
                # A message came whole: the next one asks for its own.
                self.give_back()
        return self._ready.pop(0)

    def _unfinished(self) -> int:
        """Bytes held of messages not yet whole."""
        held = 0 if self._oversized else self._part_bytes
        if self._frames is not None and self._wsproto is None:
            held += self._frames.held
        return held

    def _to_come(self) -> int:
        """Bytes of the frame begun still to come, as its header says."""
        if self._wsproto is None:
            return self._frames.to_come if self._frames is not None else 0
        # An oversized message's bytes are dropped as they come.
        return 0 if self._tracker is None or self._oversized else self._tracker.to_come

    async def _read_more(self) -> bytes:
        """The socket's next bytes. Past PARTIAL_FREE of a message, only
        once the rest of its frame is covered by the ingest budget."""
        unfinished = self._unfinished()
        needed = min(unfinished + self._to_come(), self._max_message) - PARTIAL_FREE - self._credit
        if needed > 0:
            if self._credit:
                # More for a message that holds some: the next fragment of
                # one. Bounded by its time, or two such could wait for ever.
                with trio.move_on_at(self._credit_deadline) as waited:
                    await self._budget.take_partial(needed)
                    self._credit += needed
                if waited.cancelled_caught:
                    await self._out_of_time()
            else:
                # Waiting here, the socket is not read: TCP holds the rest.
                await self._budget.take_partial(needed)
                self._credit = needed
                self._credit_deadline = trio.current_time() + self._message_timeout
        limit = min(MAX_RECV, max(MIN_READ, PARTIAL_FREE + self._credit - unfinished))
        if not self._credit:
            return await self._recv(limit)
        with trio.move_on_at(self._credit_deadline):
            return await self._recv(limit)
        await self._out_of_time()

    async def _out_of_time(self) -> NoReturn:
        """A message holding budget is not whole in time (or waits for
        more while others hold the share): the budget goes back, the client goes."""
        self.give_back()
        log.info("closing a WebSocket whose message was not whole within %g s", self._message_timeout)
        await self.close(CLOSE_POLICY, f"message not completed within {self._message_timeout:g} s")
        self.disconnected = True
        await self._gone()

    def give_back(self) -> None:
        """Returns the budget held for a message still arriving (it is whole,
        or the connection has ended)."""
        credit, self._credit = self._credit, 0
        if credit:
            self._budget.release_partial(credit)

    async def _recv(self, limit: int = MAX_RECV) -> bytes:
        """The socket's next bytes, b"" at its end. A read straight off the
        file descriptor, with trio's checkpoints, not SocketStream.receive_some:
        its wrappers' frames, held by every idle connection's waiting read,
        cost 5,000 idle producers ~1.5 KB each."""
        fd = self.stream.socket.fileno()
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = os.read(fd, limit)
            except BlockingIOError:
                pass
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    return os.read(fd, limit)
                except BlockingIOError:
                    continue  # woken with nothing to read after all
        except (OSError, *_GONE):
            return b""

    async def send(self, data: str) -> None:
        await self._send_bytes(server_frame(data))

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        ws = self._wsproto
        if ws is None:
            frame = close_frame(code, reason)
        elif ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            frame = ws.send(CloseConnection(code, reason))
        else:
            return
        await self._send_bytes(frame)

    def ping(self) -> None:
        """A keep-alive ping, so a peer that vanished without a close is
        noticed (a write to it fails) as with hypercorn's
        `websocket_ping_interval`; called every interval. Only for a socket
        quiet since the last call: one the client spoke on is alive, and one
        younger than an interval is not pinged (hypercorn's first ping came an
        interval after the handshake, and a client closing then must not meet
        one). Never waits: skipped while a send is under way."""
        if self._heard:
            self._heard = False
            return
        if self.writable():
            self._write_now(PING_FRAME)

    def writable(self) -> bool:
        """Whether `send_now` may write: no send under way, nothing unsent."""
        lock = self._send_lock
        return not (self.closed or self.disconnected or self._unsent or (lock is not None and lock.locked()))

    def send_now(self, text: str) -> None:
        """Writes a text frame without waiting (only when `writable`)."""
        self._write_now(server_frame(text))

    def _write_now(self, frame: bytes) -> None:
        try:
            written = os.write(self.stream.socket.fileno(), frame)
        except BlockingIOError:
            written = 0
        except OSError:
            self.disconnected = True
            self.scope.cancel()
            return
        if written < len(frame):
            self._unsent = frame[written:]
            self._flushes.start_soon(self._flush)

    async def _flush(self) -> None:
        # A task of the listener's, outside the Connection's scope: a failure
        # cancels that scope and ends here.
        try:
            async with self._lock():
                data, self._unsent = self._unsent, b""
                if data:
                    await self.stream.send_all(data)
        except _GONE:
            self.disconnected = True
            self.scope.cancel()

    async def linger(self) -> None:
        """After our close: read (and drop) until the client answers it or goes."""
        # A send that fails meanwhile (a pong) ends this scope, not the Connection's.
        with trio.move_on_after(CLOSE_LINGER) as self.scope:
            while not self.disconnected:
                data = await self._recv()
                if not data:
                    return
                self._ready.clear()
                await self._feed(data)

    # --- reading ----------------------------------------------------------

    async def _feed(self, data: bytes) -> None:
        if self._wsproto is None:
            if self._frames is None:
                self._frames = ClientFrames()
            messages, rest = self._frames.feed(data)
            for message in messages:
                if isinstance(message, Ping):
                    await self._send_bytes(pong_frame(message.payload))
                else:
                    self._ready.append(message)
            if rest is None:
                return
            self._wsproto = WsprotoConnection(ConnectionType.SERVER)
            data = rest
        await self._feed_wsproto(self._wsproto, data)

    async def _feed_wsproto(self, ws: WsprotoConnection, data: bytes) -> None:
        if self._tracker is None:
            self._tracker = FrameTracker()
        self._tracker.feed(data)
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._take_part(event.data if isinstance(event.data, str | bytes) else bytes(event.data), event.message_finished)
            elif isinstance(event, WsprotoPing):
                await self._send_bytes(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                # The client's close (or wsproto's for a protocol error): answered once.
                if ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING) and not self.closed:
                    self.closed = True
                    await self._send_bytes(ws.send(event.response()))
                self.disconnected = True
                return

    def _take_part(self, part: str | bytes, finished: bool) -> None:
        if not self._oversized:
            self._part_bytes += len(part)
            if self._part_bytes > self._max_message:
                # Told now, not at the message's end (a frame may claim 2**63 bytes).
                self._oversized = True
                self._parts = []
                self._loose = 0
                self._ready.append(OVERSIZED)
            elif part:
                # Empty parts count nothing and are not kept (a client could
                # send them for ever); small ones are joined every _JOIN_PARTS,
                # so a message's parts hold about its size, however many it
                # comes in, and each byte is copied twice at most.
                self._parts.append(part)
                self._loose += 1
                if self._loose == _JOIN_PARTS:
                    self._parts[-_JOIN_PARTS:] = [part[:0].join(self._parts[-_JOIN_PARTS:])]  # type: ignore[arg-type]
                    self._loose = 0
        if not finished:
            return
        if not self._oversized:
            parts = self._parts
            self._ready.append(parts[0] if len(parts) == 1 else part[:0].join(parts))  # type: ignore[arg-type]
        self._parts = []
        self._part_bytes = 0
        self._loose = 0
        self._oversized = False

    # --- writing ----------------------------------------------------------

    async def _send_bytes(self, data: bytes) -> None:
        if self.disconnected:
            await self._gone()
        try:
            async with self._lock():
                if self._unsent:
                    data, self._unsent = self._unsent + data, b""
                if data:
                    await self.stream.send_all(data)
        except _GONE:
            self.disconnected = True
            await self._gone()

    def _lock(self) -> trio.Lock:
        if self._send_lock is None:
            self._send_lock = trio.Lock()
        return self._send_lock

    async def _gone(self) -> NoReturn:
        self.scope.cancel()
        await trio.sleep_forever()  # cancelled at once: the client is gone
