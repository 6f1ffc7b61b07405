"""agent/http.py (httpx): what `tail` sees of an answer, an error answer, no
answer, and no hub, against a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from agent import http

Handler = Callable[[trio.SocketStream, bytes], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[str]:
    """A one-request-per-connection HTTP server on loopback; yields its base URL."""

    async def serve(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            request += chunk
        await handler(stream, request)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


def answer(status: int, body: bytes, chunked: bool = False) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nConnection: close\r\n"
    if chunked:
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def test_a_json_answer_with_the_token_and_the_query() -> None:
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream, request: bytes) -> None:
        seen.append(request)
        await stream.send_all(answer(200, b'{"content": [1, 2]}', chunked=True))

    async with server(handler) as base:
        body = await http.get_json(f"{base}/api/v1/tasks/t/logs?x=1", {"afterSeq": 0, "source": None, "level": "INFO"}, "s3cret")
    assert body == {"content": [1, 2]}
    first_line, _, headers = seen[0].partition(b"\r\n")
    assert first_line == b"GET /api/v1/tasks/t/logs?x=1&afterSeq=0&level=INFO HTTP/1.1"
    assert b"authorization: bearer s3cret" in headers.lower()
    assert b"user-agent: keruta-agent" in headers.lower()


async def test_an_error_answer_is_an_http_error_with_the_hubs_message() -> None:
    async def handler(stream: trio.SocketStream, _request: bytes) -> None:
        await stream.send_all(answer(404, b'{"error": "NOT_FOUND", "message": "no task t"}'))

    async with server(handler) as base:
        with pytest.raises(http.HttpError) as caught:
            await http.get(f"{base}/api/v1/tasks/t")
    assert caught.value.status == 404
    assert str(caught.value) == "HTTP 404: no task t"
    # Permanent: not an OSError, which callers retry or report as unreachable.
    assert not isinstance(caught.value, OSError)


async def test_no_answer_within_the_timeout_is_a_timeout_error(autojump_clock: trio.testing.MockClock) -> None:
    async def handler(_stream: trio.SocketStream, _request: bytes) -> None:
        await trio.sleep_forever()

    async with server(handler) as base:
        with pytest.raises(TimeoutError, match="within 5 s"):
            await http.get(f"{base}/x", timeout=5)


async def test_no_hub_is_an_os_error() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with pytest.raises(OSError):
        await http.get(f"http://127.0.0.1:{port}/x")


async def test_a_body_past_the_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "MAX_BODY", 1000)

    async def handler(stream: trio.SocketStream, _request: bytes) -> None:
        await stream.send_all(answer(200, b"x" * 5000))

    async with server(handler) as base:
        with pytest.raises(http.HttpError, match="too large"):
            await http.get(f"{base}/x")
