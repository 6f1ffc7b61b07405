"""A WebSocket opening handshake read off a connection's first request: sans-IO.

hub/listener.py reads a new connection's request head and asks `upgrade_of`
whether it is a WebSocket handshake for a path the hub serves on Trio itself
(hub/ws/stream_socket.py); anything else, well-formed or not, goes to
hypercorn untouched, which answers it as it always did.

`accept_response` is the server's 101 (RFC 6455 section 4.2.2): no extension
is negotiated, so every frame is one hub/ws_frames.py parses without wsproto.
"""

from __future__ import annotations

from urllib.parse import unquote

import attrs
import h11
from wsproto.utilities import generate_accept_token, split_comma_header

# A request head longer than this is not looked at: hypercorn answers it
# (its own bound on an incomplete head is the same, h11's default).
MAX_HEAD_BYTES = 16 * 1024


@attrs.frozen
class Upgrade:
    """A WebSocket handshake: what an ASGI WebSocket scope would say of it."""

    path: str
    query_string: bytes
    raw_path: bytes
    # Lower-case names, as ASGI gives them.
    headers: list[tuple[bytes, bytes]]
    key: bytes
    subprotocols: list[str]


def head_end(buffer: bytes) -> int:
    """Where the request head in `buffer` ends (past its blank line), or -1."""
    end = buffer.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


def upgrade_of(head: bytes, paths: frozenset[str]) -> Upgrade | None:
    """The handshake `head` (one whole request head) makes for one of `paths`,
    or None: not a GET, another path, not an upgrade to WebSocket version 13,
    no key, or not HTTP/1.1 that h11 reads."""
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(head)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request) or event.method != b"GET" or event.http_version != b"1.1":
        return None
    raw_path, _, query = event.target.partition(b"?")
    try:
        path = unquote(raw_path.decode("ascii"))
    except UnicodeDecodeError:
        return None
    if path not in paths:
        return None
    connection: list[str] = []
    upgrade: list[str] = []
    key = b""
    version = b""
    subprotocols: list[str] = []
    for name, value in event.headers:
        if name == b"connection":
            connection += (token.lower() for token in split_comma_header(value))
        elif name == b"upgrade":
            upgrade += (token.lower() for token in split_comma_header(value))
        elif name == b"sec-websocket-key":
            key = value
        elif name == b"sec-websocket-version":
            version = value
        elif name == b"sec-websocket-protocol":
            subprotocols += (token for token in split_comma_header(value) if token)
    if "upgrade" not in connection or "websocket" not in upgrade or version != b"13" or not key:
        return None
    return Upgrade(path, query, raw_path, list(event.headers), key, subprotocols)


def accept_response(upgrade: Upgrade, subprotocol: str | None) -> bytes:
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + generate_accept_token(upgrade.key),
    ]
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n"
