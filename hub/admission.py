"""A request must prove its token before the hub reads its body (CONTRACT.md).

An ASGI layer in front of the Quart app. Quart starts buffering a request's
body as soon as the request arrives, concurrently with its handler, up to
MAX_CONTENT_LENGTH (4 MiB) for as long as the client takes to send it; a
refusal from a hook or a route came too late to save that. So a request that
may carry a body is judged here on its head (method, URL, headers) first:
Host, Origin and token, as hub/routes/access.py `Access.body_refusal` says.
A refused one is answered at once with `Connection: close` and never passed
to the app; the body that arrives meanwhile is dropped as it comes, and the
connection closes after the answer. Only an admitted request is handed to
Quart, whose body read has a deadline (`--body-timeout`, BODY_TIMEOUT: 408)
and a size bound (MAX_CONTENT_LENGTH: 413).

A request with both Content-Length and Transfer-Encoding is refused the same
way, whoever sends it (RFC 9112 6.1).

A WebSocket for a path in `websockets` is served by its own ASGI app
(hub/ws/endpoint.py), never by Quart: its handshake carries no body, and the
app judges it the same way before it reads a frame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import orjson
import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
    WebsocketScope,
)
from werkzeug.datastructures import Headers
from werkzeug.sansio.request import Request as RequestHead

from hub.access import READ_METHODS, Access
from hub.errors import ApiError
from hub.hypercorn_patches import CONTINUE
from hub.metrics import Metrics

SMUGGLING = ApiError(400, "INVALID_REQUEST", "a request may not carry both Content-Length and Transfer-Encoding")

WebSocketApp = Callable[[WebsocketScope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


def head_of(scope: HTTPScope | WebsocketScope) -> RequestHead:
    """The request's method, URL and headers as the app will see them (a Quart
    Request is this class with a body, a Quart Websocket this class with a
    socket): the same Host, token and Origin. A WebSocket's handshake is a GET."""
    headers = Headers([(name.decode("latin1").title(), value.decode("latin1")) for name, value in scope["headers"]])
    return RequestHead(
        scope["method"] if scope["type"] == "http" else "GET", scope["scheme"], scope.get("server"), scope.get("root_path", ""),
        scope["path"], scope["query_string"], headers, None,
    )


def may_carry_body(head: RequestHead) -> bool:
    # A read that declares no body has none (HTTP/1.1). Anything else may send
    # one, declared or not (HTTP/2 needs no Content-Length).
    return head.method not in READ_METHODS or bool(head.content_length) or "Transfer-Encoding" in head.headers


class Admission:
    """Wraps the app's ASGI callable (`app.asgi_app = Admission(app.asgi_app, ...)`);
    `websockets` maps a path to the app that serves its WebSocket scopes."""

    def __init__(
        self, app: ASGIFramework, access: Access, metrics: Metrics, websockets: Mapping[str, WebSocketApp] | None = None
    ) -> None:
        self.app = app
        self.access = access
        self.metrics = metrics
        self.websockets = dict(websockets or {})

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http":
            head = head_of(scope)
            if "Content-Length" in head.headers and "Transfer-Encoding" in head.headers:
                # Request smuggling's shape: a proxy in front may frame the body
                # by the one while h11 framed it by the other. RFC 9112 6.1:
                # answered, and the connection closed after it.
                await self.refuse(SMUGGLING, receive, send)
                return
            if may_carry_body(head):
                refusal = self.access.body_refusal(head)
                if refusal is not None:
                    await self.refuse(refusal, receive, send)
                    return
                if "100-continue" in head.headers.get("Expect", "").lower():
                    # Admitted: now the client may send its body (hypercorn patch 8).
                    await send({"type": CONTINUE})  # type: ignore[misc, arg-type]
        elif scope["type"] == "websocket":
            websocket = self.websockets.get(scope["path"][len(scope.get("root_path", "")):])
            if websocket is not None:
                await websocket(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def refuse(self, error: ApiError, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        self.metrics.error(error.code)
        body = orjson.dumps({"error": error.code, "message": error.message})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            # The body is not read: this connection can carry no other request.
            (b"connection", b"close"),
            *((name.lower().encode("latin1"), value.encode("latin1")) for name, value in error.headers.items()),
        ]
        async with trio.open_nursery() as nursery:
            # Hypercorn queues what arrives for `receive` (a few chunks) and,
            # once the queue is full, waits; its close after the answer waits
            # on that queue too. What arrives is taken and dropped, never kept.
            nursery.start_soon(_discard, receive)
            await send({"type": "http.response.start", "status": error.status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            nursery.cancel_scope.cancel()


async def _discard(receive: ASGIReceiveCallable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
