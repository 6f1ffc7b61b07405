"""/api/v1/ws over plain HTTP: the answer to a GET that is not a WebSocket handshake.

The WebSocket itself is served below Quart (hub/ws/endpoint.py, dispatched by
hub/admission.py); only an HTTP request for the path gets here.
"""

from __future__ import annotations

from quart import Blueprint, Response

from hub.routes.common import json_response
from hub.ws.endpoint import WS_PATH


def blueprint() -> Blueprint:
    bp = Blueprint("ws", __name__)

    @bp.get(WS_PATH)
    async def not_a_handshake() -> Response:
        # A plain GET (no Upgrade, or a handshake hypercorn did not take as
        # one): RFC 9110's answer names what to send.
        return json_response(
            {"error": "UPGRADE_REQUIRED", "message": "this is the WebSocket endpoint: open it with a WebSocket handshake"},
            426,
            {"Upgrade": "websocket", "Connection": "Upgrade"},
        )

    return bp
