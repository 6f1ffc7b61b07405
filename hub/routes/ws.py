"""/api/v1/ws: refuse what may not connect, then hand the socket to a Connection."""

from __future__ import annotations

import trio
from quart import Blueprint, Response, websocket

from hub.auth import WS_SUBPROTOCOL, Role, bearer_token, subprotocol_token
from hub.deps import ConnectionDeps
from hub.routes.access import UNAUTHORIZED, Access, origin_refusal
from hub.routes.common import json_response
from hub.ws.connection import CLOSE_POLICY, Connection
from keruta.frames import ErrorFrame
from keruta.wire import dumps


def blueprint(*, access: Access, deps: ConnectionDeps) -> Blueprint:
    bp = Blueprint("ws", __name__)

    @bp.websocket("/api/v1/ws")
    async def ws_endpoint() -> None:
        offered = websocket.requested_subprotocols
        token = bearer_token(
            websocket.headers.get("Authorization"), subprotocol_token(offered) or websocket.args.get("token")
        )
        r = access.authorizer.role(token)
        origin = websocket.headers.get("Origin")
        # Refused like a missing token (accepted, one error frame, close 1008),
        # so a client sees why; nothing it sends is read as a frame.
        refusal: ErrorFrame | None = None
        bad_host = access.host_refusal(websocket.host)
        if bad_host is not None:
            refusal = ErrorFrame("FORBIDDEN_HOST", bad_host)
        elif not access.origins.permits(origin, websocket.scheme, websocket.host):
            refusal = ErrorFrame("FORBIDDEN_ORIGIN", origin_refusal(str(origin)))
        elif r is Role.NONE:
            refusal = ErrorFrame("UNAUTHORIZED", UNAUTHORIZED)
        # A browser that offered subprotocols drops a connection accepted with none.
        await websocket.accept(subprotocol=WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None)
        if refusal is not None:
            deps.metrics.error(refusal.code)
            await websocket.send(dumps(refusal))
            await websocket.close(CLOSE_POLICY, refusal.code.lower())
            # Stay until the client answers the close (then we are cancelled), so
            # frames it already sent are read, not reset, and it sees 1008.
            with trio.move_on_after(2):
                while True:
                    await websocket.receive()
            return
        await Connection(deps, websocket._get_current_object(), r).run()  # type: ignore[attr-defined]

    @bp.get("/api/v1/ws")
    async def not_a_handshake() -> Response:
        # A plain GET (no Upgrade, or an incomplete handshake Quart does not
        # route here as a WebSocket): RFC 9110's answer names what to send.
        return json_response(
            {"error": "UPGRADE_REQUIRED", "message": "this is the WebSocket endpoint: open it with a WebSocket handshake"},
            426,
            {"Upgrade": "websocket", "Connection": "Upgrade"},
        )

    return bp
