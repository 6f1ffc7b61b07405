"""The few REST reads `tail` makes, through httpx (on Trio, via anyio).

Failures come out as the rest of the agent sees them: an HTTP error answer is
`HttpError` (permanent: asking again gets the same answer); failing to reach
the hub, a broken connection or no answer in time is an OSError
(ConnectionError, TimeoutError), transient like every other network failure
(agent/link/failures.py).
"""

from __future__ import annotations

import functools
import ssl
from urllib.parse import urlsplit

import httpx
import orjson
import trio

MAX_BODY = 64 * 1024 * 1024
# A whole request, connect to last byte: a hub that accepts and never answers
# (or a half-open connection) must not hang `tail`. httpx's own timeouts are
# per phase, so the deadline is Trio's.
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
        try:
            return await _get(url, params, token)
        except httpx.TimeoutException as exc:
            raise TimeoutError(str(exc) or "timed out") from exc
        except httpx.TransportError as exc:
            raise _os_error(exc) from exc
    raise TimeoutError(f"no complete answer from {urlsplit(url).netloc} within {timeout:g} s")


async def _get(url: str, params: dict[str, object] | None, token: str | None) -> bytes:
    headers = {"Accept": "application/json", "User-Agent": "keruta-agent"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    query = {k: str(v) for k, v in (params or {}).items() if v is not None}
    async with httpx.AsyncClient(verify=system_tls(), timeout=None) as client:
        # Merged: `params=` would replace a query the URL already has.
        target = httpx.URL(url).copy_merge_params(query)
        async with client.stream("GET", target, headers=headers) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY:
                    raise HttpError(0, b"response too large")
    if not response.is_success:
        raise HttpError(response.status_code, bytes(body))
    return bytes(body)


@functools.cache
def system_tls() -> ssl.SSLContext:
    """The system's CA store, as the WebSocket side uses. Loading it costs
    about 40 ms of CPU: once per process, not once per request (`tail` asks
    for a page at a time)."""
    return ssl.create_default_context()


def _os_error(exc: httpx.TransportError) -> OSError:
    """The OSError under httpx's error (refused, reset, no route...), for its
    strerror; else one saying what httpx said."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return ConnectionError(cause.errno, cause.strerror)
        cause = cause.__cause__ or cause.__context__
    return ConnectionError(str(exc) or type(exc).__name__)


async def get_json(
    url: str,
    params: dict[str, object] | None = None,
    token: str | None = None,
    timeout: float = TIMEOUT,
) -> object:
    return orjson.loads(await get(url, params, token, timeout))
