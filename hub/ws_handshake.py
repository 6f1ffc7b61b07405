"""A WebSocket opening handshake read off a connection's first request: sans-IO.

hub/listener.py reads a new connection's request head and asks `upgrade_of`
whether it is a WebSocket handshake for a path the hub serves on Trio itself
(hub/ws/stream_socket.py). A request for such a path that asks for a
WebSocket but whose handshake is wrong (another version, no key, bytes that
are not ASCII) is refused here, with the answer RFC 6455 section 4.2.2 asks
for, and its connection closed: hypercorn's answer to those left the
connection open for as long as the client liked. Anything else, well-formed
or not, goes to hypercorn untouched, which answers it as it always did.

`accept_response` is the server's 101 (RFC 6455 section 4.2.2): no extension
is negotiated, so every frame is one hub/ws_frames.py parses without wsproto.
"""

from __future__ import annotations

import re
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


# A head's blank line, as h11 finds it: a line may end in a bare LF (RFC 9112 2.2).
_BLANK_LINE = re.compile(b"\n\r?\n")


def head_end(buffer: bytes) -> int:
    """Where the request head in `buffer` ends (past its blank line), or -1."""
    found = _BLANK_LINE.search(buffer)
    return -1 if found is None else found.end()


@attrs.frozen
class Refusal:
    """A WebSocket handshake for one of the hub's paths that cannot be
    accepted: `answer` is the whole HTTP response; the connection closes after it."""

    answer: bytes


def refusal(status: int, reason: str, why: str, *headers: bytes) -> Refusal:
    body = why.encode() + b"\n"
    lines = [
        f"HTTP/1.1 {status} {reason}".encode(),
        *headers,
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: " + str(len(body)).encode(),
        b"Connection: close",
    ]
    return Refusal(b"\r\n".join(lines) + b"\r\n\r\n" + body)


def upgrade_of(head: bytes, paths: frozenset[str]) -> Upgrade | Refusal | None:
    """The handshake `head` (one whole request head) makes for one of `paths`;
    a Refusal for a GET of one of them that asks to upgrade to a WebSocket
    (`Connection: upgrade`, `Upgrade: websocket`) in a way the hub cannot
    accept; None for anything else (not a GET, another path, no upgrade asked
    for, not a request h11 reads): hypercorn's."""
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(head)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request) or event.method != b"GET":
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
    body = False
    try:
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
            elif name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0")):
                body = True
    except UnicodeDecodeError:
        # h11 lets bytes 0x80-0xFF through in a header's value; these are lists of ASCII tokens.
        return refusal(400, "Bad Request", "a WebSocket handshake's header is not ASCII")
    if "upgrade" not in connection or "websocket" not in upgrade:
        return None  # a plain request of the path: the app answers it (426)
    if event.http_version != b"1.1":
        return refusal(400, "Bad Request", "a WebSocket handshake is an HTTP/1.1 request")
    if version != b"13":
        return refusal(
            426, "Upgrade Required", "this hub speaks WebSocket version 13",
            b"Upgrade: websocket", b"Sec-WebSocket-Version: 13",
        )
    if not key:
        return refusal(400, "Bad Request", "a WebSocket handshake needs a Sec-WebSocket-Key")
    if body:
        # What follows the head would be read as the client's frames.
        return refusal(400, "Bad Request", "a WebSocket handshake has no body")
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
