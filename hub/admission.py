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

An admitted request's body is held in memory until it is answered (a POST's
records wait for their commit), so it takes its bytes from the hub's ingest
budget first, as a WebSocket frame does (hub/ingest_budget.py): its declared
length, or the body limit when none is declared. While the budget is full the
body is not read (TCP backpressure); a request that finds no room within
`--post-timeout` is answered 503 `STORE_UNAVAILABLE` unread, nothing stored.
The deadline it waited against is the one its commit has too
(`post_deadline`), so a POST is answered within `--post-timeout` in all.

A request with both Content-Length and Transfer-Encoding is refused the same
way, whoever sends it (RFC 9112 6.1).

A WebSocket for a path in `websockets` is served by its own ASGI app
(hub/ws/endpoint.py), never by Quart: its handshake carries no body, and the
app judges it the same way before it reads a frame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

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
from hub.ingest_budget import IngestBudget
from hub.metrics import Metrics

SMUGGLING = ApiError(400, "INVALID_REQUEST", "a request may not carry both Content-Length and Transfer-Encoding")
NO_ROOM = ApiError(
    503, "STORE_UNAVAILABLE",
    "the hub holds as many writes as it may (--ingest-queue-bytes) and none was answered in time; "
    "this request was not read and nothing of it was done (no record stored): retry later",
    {"Retry-After": "5"},
)
# The scope key of an admitted request's deadline (trio.current_time()).
DEADLINE = "keruta.post_deadline"

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


def body_bound(head: RequestHead, http_version: str, max_body: int) -> int:
    """The most an admitted request's body can hold once read: its declared
    length (one declared past `max_body` is refused before it is read), else
    `max_body` if it may still send one."""
    if head.content_length is not None:
        return min(head.content_length, max_body)
    if "Transfer-Encoding" in head.headers or http_version not in ("1.0", "1.1"):
        return max_body
    return 0  # HTTP/1: neither header, no body


def post_deadline(scope: Any, timeout: float) -> float:
    """When an admitted request must be answered by: the deadline it waited
    for budget against, or `timeout` from now for one that did not."""
    deadline = scope.get(DEADLINE)
    return float(deadline) if deadline is not None else trio.current_time() + timeout


class Admission:
    """Wraps the app's ASGI callable (`app.asgi_app = Admission(app.asgi_app, ...)`);
    `websockets` maps a path to the app that serves its WebSocket scopes."""

    def __init__(
        self,
        app: ASGIFramework,
        access: Access,
        metrics: Metrics,
        websockets: Mapping[str, WebSocketApp] | None = None,
        *,
        budget: IngestBudget,
        max_body: int,
        post_timeout: float,
    ) -> None:
        self.app = app
        self.access = access
        self.metrics = metrics
        self.websockets = dict(websockets or {})
        self.budget = budget
        self.max_body = max_body
        self.post_timeout = post_timeout

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
                await self.with_body(scope, head, receive, send)
                return
        elif scope["type"] == "websocket":
            websocket = self.websockets.get(scope["path"][len(scope.get("root_path", "")):])
            if websocket is not None:
                await websocket(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def with_body(
        self, scope: HTTPScope, head: RequestHead, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Serve an admitted request that may carry a body, its bytes held in
        the ingest budget until it is answered."""
        size = body_bound(head, scope["http_version"], self.max_body)
        deadline = trio.current_time() + self.post_timeout
        cast(dict[str, Any], scope)[DEADLINE] = deadline
        if size:
            with trio.move_on_at(deadline) as waiting:
                await self.budget.take(size)
            if waiting.cancelled_caught:
                await self.refuse(NO_ROOM, receive, send)
                return
        try:
            if "100-continue" in head.headers.get("Expect", "").lower():
                # Admitted: now the client may send its body (hypercorn patch 8).
                await send({"type": CONTINUE})  # type: ignore[misc, arg-type]
            await self.app(scope, receive, send)
        finally:
            if size:
                self.budget.release(size)

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
