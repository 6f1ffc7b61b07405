"""The hub's port: a Trio listener that serves /api/v1/ws's WebSocket itself
and hands every other connection to hypercorn.

    serve_http()
      ├─ lifespan            (hypercorn's: the app's startup and shutdown)
      ├─ accept loop         (trio.serve_listeners)
      ├─ pinger              (every served socket's keep-alive ping, at --ping-interval)
      └─ one task a connection, in `connections`:
           reads the request head, then either
           ├─ a WebSocket handshake for a path in `websockets`:
           │    StreamWebSocket (hub/ws/stream_socket.py), served by
           │    hub/ws/endpoint.py to its end
           ├─ a wrong one for such a path (hub/ws_handshake.py Refusal):
           │    answered 400 or 426 here, then closed
           └─ anything else: hypercorn's TCPServer, handed the bytes read so far

A fleet's producer is a WebSocket; under hypercorn each cost its protocol,
stream and ASGI layers and their tasks more CPU a frame than keruta's own
work, and ~26 KB idle (README, issue 20). The handshake is the only part
read twice (by `upgrade_of`, then by hypercorn if it is not ours).

What hypercorn's own `worker_serve` does for a Trio worker is done here the
same way (lifespan, graceful timeout, keep-alive connections told to close),
for plain TCP listeners: the hub binds no TLS or QUIC socket.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState, WebsocketScope
from hypercorn.utils import repr_socket_addr, wrap_app

from hub.ingest_budget import IngestBudget
from hub.ws.stream_socket import CLOSE_LINGER, StreamWebSocket
from hub.ws_handshake import MAX_HEAD_BYTES, Refusal, head_end, upgrade_of

log = logging.getLogger("keruta.hub.http")

# hub/ws/endpoint.py WebSocketEndpoint.serve: runs one admitted socket to its end.
ServeWebSocket = Callable[[WebsocketScope, StreamWebSocket], Awaitable[None]]


class PrefixedTCPServer(TCPServer):
    """Hypercorn's connection server for a connection whose first bytes were
    already read (to see whether it was a WebSocket of ours)."""

    def __init__(
        self, app: AppWrapper, config: HypercornConfig, context: WorkerContext, state: LifespanState,
        stream: trio.SocketStream, prefix: bytes,
    ) -> None:
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self._prefix = prefix

    async def _read_data(self) -> None:
        if self._prefix:
            prefix, self._prefix = self._prefix, b""
            await self.protocol.handle(RawData(prefix))
        await super()._read_data()


class Listener:
    """Routes each accepted connection: ours (a WebSocket handshake for a
    path in `websockets`) or hypercorn's; pings the sockets it serves."""

    def __init__(
        self, app: AppWrapper, config: HypercornConfig, context: WorkerContext, state: LifespanState,
        websockets: Mapping[str, ServeWebSocket], *, max_message: int, ping_interval: float | None,
        budget: IngestBudget, message_timeout: float,
    ) -> None:
        self.app = app
        self.config = config
        self.context = context
        self.state = state
        self.websockets = dict(websockets)
        self._paths = frozenset(self.websockets)
        self.max_message = max_message
        self.ping_interval = ping_interval
        self.budget = budget
        self.message_timeout = message_timeout
        # Where a socket's unsent bytes are sent from when no send follows (serve_http sets it).
        self.flushes: trio.Nursery
        # The sockets served here, for the pinger.
        self._sockets: set[StreamWebSocket] = set()

    async def ping_all(self) -> None:
        """Every socket's keep-alive pings, from one task: a task per socket
        for it cost 5,000 idle producers ~3 KB each."""
        if not self.ping_interval:
            return
        while True:
            await trio.sleep(self.ping_interval)
            for ws in list(self._sockets):
                ws.ping()

    async def handle(self, stream: trio.SocketStream) -> None:
        ws = None
        try:
            buffer = await self._read_head(stream)
            if buffer is None:
                return
            ws = self._websocket_for(stream, buffer)
            if ws is None:
                await PrefixedTCPServer(self.app, self.config, self.context, self.state, stream, buffer)
                return
            if isinstance(ws, Refusal):
                await _refuse(stream, ws)
                return
            # In this frame, not a call of its own: 5,000 idle producers each
            # hold it. The head is not kept for the connection's life.
            del buffer
            serve = self.websockets[ws.path]
            self._sockets.add(ws)
            with ws.scope:
                await serve(ws.asgi_scope(), ws)
            if ws.closed and not ws.disconnected:
                await ws.linger()
        except Exception:
            # One connection's bug ends that connection, not the hub (as hub/hypercorn_patches.py patch 2).
            log.exception("a connection's handler failed; that connection is closed, the hub serves on")
        finally:
            if isinstance(ws, StreamWebSocket):
                self._sockets.discard(ws)
                ws.give_back()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _websocket_for(self, stream: trio.SocketStream, buffer: bytes) -> StreamWebSocket | Refusal | None:
        """The WebSocket of ours `buffer` opens, its handshake's refusal, or None: hypercorn's."""
        end = head_end(buffer)
        if end < 0 or not _may_be_upgrade(buffer):
            return None
        upgrade = upgrade_of(buffer[:end], self._paths)
        if upgrade is None or isinstance(upgrade, Refusal):
            return upgrade
        return StreamWebSocket(
            stream, upgrade, buffer[end:], trio.CancelScope(), self.max_message, self.flushes, self.budget,
            self.message_timeout,
        )

    async def _read_head(self, stream: trio.SocketStream) -> bytes | None:
        """The connection's first bytes through its request head's end (or
        MAX_HEAD_BYTES, or EOF); None for a client that sent nothing in time."""
        buffer = b""
        with trio.move_on_after(self.config.keep_alive_timeout):
            while head_end(buffer) < 0 and len(buffer) <= MAX_HEAD_BYTES:
                try:
                    data = await stream.receive_some(MAX_HEAD_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                if not data:
                    break
                buffer += data
            return buffer or None
        # Nothing whole in time: hypercorn's idle timeout would close it too.
        return None


async def _refuse(stream: trio.SocketStream, refused: Refusal) -> None:
    """Answers a refused handshake and ends the connection: the answer, our
    end of the stream, then what the client still sends is read and dropped
    for a moment (closing on unread bytes would reset the connection, and the
    client could lose the answer)."""
    try:
        await stream.send_all(refused.answer)
        await stream.send_eof()
        with trio.move_on_after(CLOSE_LINGER):
            while await stream.receive_some(MAX_HEAD_BYTES):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _may_be_upgrade(buffer: bytes) -> bool:
    # Before any parsing: most of the port's requests are REST calls.
    return buffer.startswith(b"GET ") and b"websocket" in buffer.lower()


async def serve_http(
    app: object,
    config: HypercornConfig,
    websockets: Mapping[str, ServeWebSocket],
    *,
    max_message: int,
    ping_interval: float | None,
    budget: IngestBudget,
    message_timeout: float,
    shutdown_trigger: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves `app` (ASGI) and `websockets` on `config.bind` until
    `shutdown_trigger` returns, then lets connections finish within
    `config.graceful_timeout`."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)  # type: ignore[arg-type]
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            sockets = config.create_sockets()
            listeners = []
            binds = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            listener = Listener(
                wrapped, config, context, ConnectionState(lifespan_state.copy()), websockets,
                max_message=max_message, ping_interval=ping_interval, budget=budget,
                message_timeout=message_timeout,
            )
            listener.flushes = connections
            task_status.started(binds)
            async with trio.open_nursery() as accepting:
                accepting.start_soon(partial(trio.serve_listeners, listener.handle, listeners, handler_nursery=connections))
                accepting.start_soon(listener.ping_all)
                await shutdown_trigger()
                accepting.cancel_scope.cancel()
            for each in listeners:
                await each.aclose()
            # Keep-alive HTTP connections close; WebSockets close on the hub's own shutdown.
            await context.terminated.set()
            connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
