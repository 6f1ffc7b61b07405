"""Which browser origins may open a WebSocket or change something.

A page on any site can make the user's browser open `ws://127.0.0.1:8080/...`
or send a `text/plain` POST there; the browser then sets `Origin` to the
page's own origin. The hub answers those only when the origin is its own
(the scheme and Host the request came to) or one given with
`--allow-origin`. Clients that send no `Origin` (the agent, curl, scripts)
are not browsers acting for some page, and are not affected.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

from hub.config import is_loopback_host

_DEFAULT_PORTS = {"http": 80, "https": 443}
# The WebSocket schemes a browser's page origin corresponds to.
_HTTP_SCHEME = {"http": "http", "ws": "http", "https": "https", "wss": "https"}


def normalize_origin(value: str) -> str | None:
    """`scheme://host[:port]`, lower-case, default port left out; None if it is
    not an http(s) origin (`null`, a path, garbage)."""
    try:
        parts = urllib.parse.urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/") or parts.query:
        return None
    if parts.username is not None or parts.password is not None or parts.fragment:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def own_origin(scheme: str, host_header: str) -> str | None:
    """The origin of a page the hub served on this scheme and Host."""
    http_scheme = _HTTP_SCHEME.get(scheme.lower())
    if http_scheme is None or not host_header:
        return None
    return normalize_origin(f"{http_scheme}://{host_header}")


def host_name(host_header: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[::1]:port`), lower-case."""
    try:
        return urllib.parse.urlsplit(f"http://{host_header.strip()}").hostname
    except ValueError:
        return None


class OriginPolicy:
    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(o for o in (normalize_origin(a) for a in allowed) if o is not None)
        self.allowed_hosts = frozenset(host_name(o.split("://", 1)[1]) for o in self.allowed)

    def host_permitted(self, host_header: str) -> bool:
        """For a hub without tokens (loopback only): is the request addressed to
        this machine by a loopback name? A page whose own name its DNS points at
        127.0.0.1 (DNS rebinding) is "same origin" with the hub in the browser's
        eyes and could read everything; its Host header gives it away."""
        name = host_name(host_header)
        return name is not None and (is_loopback_host(name) or name in self.allowed_hosts)

    def permits(self, origin: str | None, scheme: str, host_header: str) -> bool:
        if origin is None:
            return True
        normal = normalize_origin(origin)
        if normal is None:
            return False
        return normal in self.allowed or normal == own_origin(scheme, host_header)
