"""The hub's addresses: its base URL as the user gives it, and what we derive."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

WS_PATH = "/api/v1/ws"


class BadHubUrl(ValueError):
    pass


def _split(hub_url: str) -> tuple[str, str, str]:
    parts = urlsplit(hub_url.strip())
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise BadHubUrl(f"not a hub URL: {hub_url!r} (expected http://HOST:PORT or https://...)")
    secure = parts.scheme in ("https", "wss")
    path = parts.path.rstrip("/")
    if path.endswith(WS_PATH):
        path = path[: -len(WS_PATH)]
    return ("https" if secure else "http"), parts.netloc, path


def http_base(hub_url: str) -> str:
    """http(s)://HOST:PORT[/prefix], without a trailing slash."""
    scheme, netloc, path = _split(hub_url)
    return urlunsplit((scheme, netloc, path, "", ""))


def ws_url(hub_url: str) -> str:
    scheme, netloc, path = _split(hub_url)
    return urlunsplit(("wss" if scheme == "https" else "ws", netloc, path + WS_PATH, "", ""))


def auth_headers(token: str | None) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + token.encode())] if token else []
