"""/api/v1/ws: refuse what may not connect, then hand the socket to a Connection.

Two ways in, one judgement (`WebSocketEndpoint.serve`): hub/listener.py's own
route (the handshake read off the connection, a StreamWebSocket on the Trio
stream: hub/ws/stream_socket.py), which is how clients normally arrive; and
hypercorn's ASGI interface, below Quart (hub/admission.py dispatches a
WebSocket scope for this path here) for a WebSocket opened on a kept-alive
HTTP connection: Quart-Trio runs a task per socket that copies each message
into a queue of its own, wraps it and signals it, which cost more hub CPU
than decoding the frame; here a Connection's `receive` is hypercorn's own.
"""

from __future__ import annotations

import logging
from typing import NoReturn, Protocol, cast

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    WebsocketReceiveEvent,
    WebsocketScope,
)

from hub.access import UNAUTHORIZED, Access, origin_refusal
from hub.admission import head_of
from hub.auth import WS_SUBPROTOCOL, Role, bearer_token, subprotocol_token
from hub.deps import ConnectionDeps
from hub.hypercorn_patches import InlineLink, current_link
from hub.ws.connection import CLOSE_POLICY, Connection, WebSocket
from keruta.frames import ErrorFrame
from keruta.wire import dumps

log = logging.getLogger("keruta.hub.ws")

WS_PATH = "/api/v1/ws"
CLOSE_NORMAL = 1000
CLOSE_INTERNAL_ERROR = 1011
# A refused client's close reply (and what it sent before it) is read this long at most.
REFUSAL_LINGER = 2.0


class AdmittedSocket(WebSocket, Protocol):
    """A socket the endpoint serves: AsgiWebSocket under hypercorn,
    hub/ws/stream_socket.py's StreamWebSocket on hub/listener.py's own route."""

    closed: bool
    disconnected: bool

    async def accept(self, subprotocol: str | None) -> None: ...


class AsgiWebSocket:
    """hub.ws.connection.WebSocket over one ASGI WebSocket scope.

    The client's disconnect cancels `scope` (which the endpoint runs the
    Connection in) from the `receive` that meets it, as Quart cancels a
    handler whose client went away: whatever the Connection was doing ends.
    """

    def __init__(
        self,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        scope: trio.CancelScope,
        link: InlineLink | None = None,
    ) -> None:
        self._receive = receive
        self._send = send
        self._scope = scope
        # hypercorn's reads and writes without a task hop (hub/hypercorn_patches.py, patch 6).
        self.link = link
        self.accepted = False
        self.closed = False
        self.disconnected = False

    async def accept(self, subprotocol: str | None) -> None:
        self.accepted = True
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol, "headers": []})

    async def receive(self) -> str | bytes:
        while not self.disconnected:
            message = await self._receive()
            if message["type"] == "websocket.receive":
                received = cast(WebsocketReceiveEvent, message)
                data = received.get("bytes")
                if data is not None:
                    return data
                return received.get("text") or ""
            if message["type"] == "websocket.disconnect":
                self.disconnected = True
            # Anything else (the opening websocket.connect) carries nothing to read.
        await self._gone()

    async def _gone(self) -> NoReturn:
        self._scope.cancel()
        await trio.sleep_forever()  # cancelled at once: the client is gone

    async def send(self, data: str) -> None:
        await self._send({"type": "websocket.send", "bytes": None, "text": data})

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


class WebSocketEndpoint:
    """The ASGI app of /api/v1/ws (hub/admission.py calls it for a WebSocket scope on WS_PATH)."""

    def __init__(self, access: Access, deps: ConnectionDeps) -> None:
        self.access = access
        self.deps = deps

    async def __call__(self, scope: WebsocketScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        with trio.CancelScope() as connected:
            await self.serve(scope, AsgiWebSocket(receive, send, connected, current_link()))

    async def serve(self, scope: WebsocketScope, ws: AdmittedSocket) -> None:
        """Runs one WebSocket to its end; `ws`'s disconnect cancels the scope this runs in."""
        # Judged in a call of its own: the request's head is not kept for the
        # connection's life (5,000 idle connections each held one).
        role, refusal, subprotocol = self._admit(scope)
        del scope
        try:
            # A browser that offered subprotocols drops a connection accepted with none.
            await ws.accept(subprotocol)
            if refusal is not None:
                await self._refuse(ws, refusal)
            else:
                await Connection(self.deps, ws, role).run()
        except Exception:
            log.exception("a WebSocket connection failed; closing it")
            self.deps.metrics.error("INTERNAL")
            if not ws.closed and not ws.disconnected:
                await ws.close(CLOSE_INTERNAL_ERROR, "internal error")
            return
        if not ws.closed and not ws.disconnected:
            # The Connection ended without a close of its own (a client that
            # did not take its last frames at shutdown): as Quart ended it.
            await ws.close(CLOSE_NORMAL)

    def _admit(self, scope: WebsocketScope) -> tuple[Role, ErrorFrame | None, str | None]:
        """The client's role, why it is refused (None: it is not), and the subprotocol to accept."""
        head = head_of(scope)
        offered = list(scope.get("subprotocols") or [])
        access = self.access
        role = access.authorizer.role(
            bearer_token(head.headers.get("Authorization"), subprotocol_token(offered) or head.args.get("token"))
        )
        origin = head.headers.get("Origin")
        # Refused like a missing token (accepted, one error frame, close 1008),
        # so a client sees why; nothing it sends is read as a frame.
        refusal: ErrorFrame | None = None
        bad_host = access.host_refusal(head.host)
        if bad_host is not None:
            refusal = ErrorFrame("FORBIDDEN_HOST", bad_host)
        elif not access.origins.permits(origin, head.scheme, head.host):
            refusal = ErrorFrame("FORBIDDEN_ORIGIN", origin_refusal(str(origin)))
        elif role is Role.NONE:
            refusal = ErrorFrame("UNAUTHORIZED", UNAUTHORIZED)
        return role, refusal, WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None

    async def _refuse(self, ws: AdmittedSocket, refusal: ErrorFrame) -> None:
        self.deps.metrics.error(refusal.code)
        await ws.send(dumps(refusal))
        await ws.close(CLOSE_POLICY, refusal.code.lower())
        # Stay until the client answers the close (its disconnect cancels us),
        # so frames it already sent are read, not reset, and it sees 1008.
        with trio.move_on_after(REFUSAL_LINGER):
            while True:
                await ws.receive()
