"""The hub's addresses: its base URL as the user gives it, and what we derive."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit, urlunsplit

import idna

WS_PATH = "/api/v1/ws"


class BadHubUrl(ValueError):
    pass


def _split(hub_url: str) -> tuple[str, str, str]:
    """The scheme, HOST[:PORT] and path prefix of a hub URL; BadHubUrl for
    one that cannot name a hub, so that it is said before COMMAND runs,
    not found by the uplink after."""
    expected = "expected http://HOST:PORT or https://..."
    try:
        parts = urlsplit(hub_url.strip())
        port = parts.port
    except ValueError as exc:  # an unclosed [IPv6, a port that is no number or out of range
        raise BadHubUrl(f"not a hub URL: {hub_url!r} ({exc}; {expected})") from None
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise BadHubUrl(f"not a hub URL: {hub_url!r} ({expected})")
    if not parts.hostname or port == 0:
        raise BadHubUrl(f"not a hub URL: {hub_url!r} (no host, or port 0; {expected})")
    if not _host_name_ok(parts.hostname):
        raise BadHubUrl(f"not a hub URL: {hub_url!r} ({parts.hostname!r} cannot be a host name)")
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


def _host_name_ok(host: str) -> bool:
    """An IP address, or a name as trio will look it up: ASCII as it is,
    anything else through IDNA 2008 (trio.socket.encode_hostname), in DNS's
    bounds (labels of 1-63 bytes, 253 in all)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        name = host.encode("ascii")
    except UnicodeEncodeError:
        try:
            name = idna.encode(host, uts46=True)
        except idna.IDNAError:
            return False
    labels = name.rstrip(b".").split(b".")
    return len(name) <= 253 and all(0 < len(label) <= 63 for label in labels)
