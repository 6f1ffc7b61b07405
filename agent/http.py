"""A minimal HTTP/1.1 GET on trio, for the few REST reads `tail` makes.

The agent's runtime needs only this much HTTP; a client library would be a
dependency for one call.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlencode, urlsplit

import orjson
import trio

MAX_BODY = 64 * 1024 * 1024
# A whole request, connect to last byte: a hub that accepts and never answers
# (or a half-open connection) must not hang `tail`.
TIMEOUT = 30.0


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        try:
            detail = orjson.loads(body).get("message") or body[:200].decode("utf-8", "replace")
        except (orjson.JSONDecodeError, AttributeError):
            detail = body[:200].decode("utf-8", "replace")
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.body = body


async def get(
    url: str,
    params: dict[str, object] | None = None,
    token: str | None = None,
    timeout: float = TIMEOUT,
) -> bytes:
    """GET `url`; the body of a 2xx answer, or HttpError; TimeoutError (an
    OSError, like every other failure to reach the hub) after `timeout`."""
    with trio.move_on_after(timeout):
        return await _get(url, params, token)
    raise TimeoutError(f"no complete answer from {urlsplit(url).netloc} within {timeout:g} s")


async def _get(url: str, params: dict[str, object] | None, token: str | None) -> bytes:
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    target = parts.path or "/"
    query = {k: v for k, v in (params or {}).items() if v is not None}
    if parts.query or query:
        target += "?" + "&".join(q for q in (parts.query, urlencode(query)) if q)
    headers = [
        f"GET {target} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Accept: application/json",
        "Connection: close",
        "User-Agent: keruta-agent",
    ]
    if token:
        headers.append(f"Authorization: Bearer {token}")
    request = ("\r\n".join(headers) + "\r\n\r\n").encode()
    stream: trio.abc.Stream
    if secure:
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl.create_default_context()
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(request)
        data = bytearray()
        # Read until the body is complete: servers may keep the connection open
        # for a while despite "Connection: close".
        while not _complete(data):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_BODY:
                raise HttpError(0, b"response too large")
    status, body = parse_response(bytes(data))
    if not 200 <= status < 300:
        raise HttpError(status, body)
    return body


def _complete(data: bytearray) -> bool:
    end = data.find(b"\r\n\r\n")
    if end == -1:
        return False
    headers = _headers(bytes(data[:end]).split(b"\r\n")[1:])
    body = len(data) - end - 4
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        return data.endswith(b"0\r\n\r\n")
    if b"content-length" in headers:
        return body >= int(headers[b"content-length"])
    return False


def _headers(lines: list[bytes]) -> dict[bytes, bytes]:
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return headers


async def get_json(
    url: str,
    params: dict[str, object] | None = None,
    token: str | None = None,
    timeout: float = TIMEOUT,
) -> object:
    return orjson.loads(await get(url, params, token, timeout))


def parse_response(data: bytes) -> tuple[int, bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ConnectionError("incomplete HTTP response")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise ConnectionError(f"not an HTTP response: {lines[0][:80]!r}") from None
    headers = _headers(lines[1:])
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    elif b"content-length" in headers:
        body = body[: int(headers[b"content-length"])]
    return status, body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end == -1:
            raise ConnectionError("truncated chunked body")
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        start = end + 2
        out += data[start : start + size]
        pos = start + size + 2
