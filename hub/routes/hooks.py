"""App-wide request hooks (Origin/Host checks, body first) and errors as JSON."""

from __future__ import annotations

import logging

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from hub.access import Access
from hub.errors import ApiError
from hub.metrics import Metrics
from hub.routes.common import json_response
from hub.store.base import StoreUnavailable

log = logging.getLogger("keruta.hub.app")


def install(app: QuartTrio, *, access: Access, metrics: Metrics, max_frame_bytes: int) -> None:
    @app.before_request
    async def read_body_first() -> None:
        # An answer given before the body is read would leave the body on a
        # keep-alive connection and wedge the next request on it. Only an
        # admitted request gets here (hub/admission.py); its read has a
        # deadline (BODY_TIMEOUT: 408) and a size bound (413).
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            await request.get_data()

    @app.before_request
    async def check_place() -> None:
        # A request that may carry a body was judged on these before its body
        # was read (hub/admission.py); this covers the rest. Registered after
        # read_body_first, so a refusal never leaves a body unread.
        refusal = access.place_refusal(request)
        if refusal is not None:
            raise refusal

    @app.after_request
    async def close_after_oversized(response: Response) -> Response:
        # A record's text is the client's: never let a browser take a JSON
        # page or a raw download for HTML or script.
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if response.status_code in (408, 413):
            # The rest of a stalled or oversized body is never read: end the connection.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        metrics.error(exc.code)
        return json_response({"error": exc.code, "message": exc.message}, exc.status, exc.headers)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = {
            404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 408: "REQUEST_TIMEOUT", 413: "TOO_LARGE",
        }.get(status, "BAD_REQUEST")
        message = exc.description or exc.name
        if status == 408:
            message = f"the request body did not arrive within {app.config['BODY_TIMEOUT']:g} s"
        if status == 413:
            message = f"request body is larger than {max_frame_bytes} bytes"
        metrics.error(code)
        # A 405 names the methods the resource has (RFC 9110, 15.5.6).
        allow = dict(exc.get_headers()).get("Allow") if status == 405 else None
        return json_response({"error": code, "message": message}, status, {"Allow": allow} if allow else None)

    @app.errorhandler(StoreUnavailable)
    async def store_unavailable(exc: StoreUnavailable) -> Response:
        metrics.error("STORE_UNAVAILABLE")
        return json_response({"error": "STORE_UNAVAILABLE", "message": "the store is unavailable; retry"}, 503, {"Retry-After": "1"})

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        metrics.error("INTERNAL")
        return json_response({"error": "INTERNAL", "message": "internal error; see the hub's log"}, 500)
