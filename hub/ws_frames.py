"""The common WebSocket frames without wsproto: sans-IO, no trio.

A fleet's producers each send small one-frame messages, and wsproto's
generator-driven parser cost the hub more CPU per such frame than decoding
the frame's JSON (docs/hypercorn-patches.md, patch 5). `ClientFrames` parses
what almost every client sends, a whole message in one final, masked text or
binary frame, no extension, and pings and pongs; the first frame it does not
handle (a close, a fragment, reserved bits, an unmasked or very large frame) and every
byte after it go to wsproto instead, for the rest of the connection. wsproto
then starts at a frame boundary with nothing of its own consumed, so it sees
the same stream it would have seen from that frame on, and answers pings,
closes and protocol errors as before.

`server_frame` is the other direction: a server's text frame (unmasked, one
frame), what wsproto would write for it with no extension.
"""

from __future__ import annotations

import attrs

# A frame longer than this goes to wsproto (and the connection with it): the
# fast path holds at most one such frame in memory while it arrives, wsproto
# streams larger ones in pieces. An agent's frame of 500 records of 80-byte
# lines is ~100 KiB: at 64 KiB every agent's connection went to wsproto with
# its first full frame, at ~2 us a record more (its parser and unmasking).
FAST_FRAME_LIMIT = 256 * 1024

_TEXT = 0x1
_BINARY = 0x2
_PING = 0x9
_PONG = 0xA


@attrs.frozen
class Ping:
    """A client's ping: answer it with `pong_frame(payload)`."""

    payload: bytes


# Byte i XOR k, for every k: one translate table per mask byte.
_XOR_TABLES = [bytes(i ^ k for i in range(256)) for k in range(256)]
# From this length on, four strided translates beat one big integer's XOR
# (~3x at 100 KiB; the integer wins for a fleet's small frames).
_TRANSLATE_FROM = 2048


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask` repeated."""
    n = len(payload)
    if n == 0:
        return b""
    if n >= _TRANSLATE_FROM:
        data = bytearray(payload)
        for i in range(4):
            data[i::4] = data[i::4].translate(_XOR_TABLES[mask[i]])
        return bytes(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def pong_frame(payload: bytes) -> bytes:
    """The server's answer to a ping carrying `payload` (at most 125 bytes)."""
    return bytes((0x80 | _PONG, len(payload))) + payload


def server_frame(text: str) -> bytes:
    """One final, unmasked text frame carrying `text`."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        return bytes((0x80 | _TEXT, n)) + payload
    if n < 65536:
        return bytes((0x80 | _TEXT, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | _TEXT, 127)) + n.to_bytes(8, "big") + payload


class ClientFrames:
    """A client's byte stream as whole messages, until it sends a frame this
    does not handle; from then on `feed` hands everything over."""

    def __init__(self, limit: int = FAST_FRAME_LIMIT) -> None:
        self.limit = limit
        # The start of a frame not yet complete (at most one frame of `limit`),
        # as it came: joined once the frame is whole, so a frame that comes a
        # byte at a time costs its size to gather, not its size squared.
        self._pending: list[bytes] | None = None
        self._have = 0
        # What `_pending` must hold before it is looked at again.
        self._need = 0
        self.handed_over = False

    @property
    def held(self) -> int:
        """Bytes held of a frame not yet whole."""
        return self._have if self._pending is not None else 0

    @property
    def to_come(self) -> int:
        """Bytes of the frame begun that are still to come, as far as its
        header says (a header not yet whole: the bytes it needs at least)."""
        return self._need - self._have if self._pending is not None else 0

    def feed(self, data: bytes) -> tuple[list[str | bytes | Ping], bytes | None]:
        """The messages and pings `data` completes, in order (pongs are
        dropped, as hypercorn does), and what to give wsproto:
        None while the fast path holds on, else the bytes from the first frame
        it does not handle (once handed over, all of `data`)."""
        if self.handed_over:
            return [], data
        pending = self._pending
        if pending is None:
            buf = data
        else:
            pending.append(data)
            self._have += len(data)
            if self._have < self._need:
                return [], None
            buf = b"".join(pending)
        messages: list[str | bytes | Ping] = []
        pos = 0
        end = len(buf)
        need = 0
        while pos < end:
            if end - pos < 2:
                need = 2
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            if b0 & 0xF0 != 0x80 or opcode not in (_TEXT, _BINARY, _PING, _PONG) or not b1 & 0x80:
                return self._hand_over(messages, buf, pos)
            length = b1 & 0x7F
            if opcode >= _PING and length > 125:
                return self._hand_over(messages, buf, pos)
            head = pos + 2
            if length == 126:
                if end - head < 2:
                    need = 4
                    break
                length = int.from_bytes(buf[head : head + 2], "big")
                head += 2
                minimal = length >= 126
            elif length == 127:
                if end - head < 8:
                    need = 10
                    break
                length = int.from_bytes(buf[head : head + 8], "big")
                head += 8
                minimal = length >= 65536
            else:
                minimal = True
            # A length not in its shortest form is wsproto's to refuse.
            if length > self.limit or not minimal:
                return self._hand_over(messages, buf, pos)
            if end - head < 4 + length:
                need = head + 4 + length - pos
                break
            mask = buf[head : head + 4]
            payload = unmask(buf[head + 4 : head + 4 + length], mask)
            if opcode == _PING:
                messages.append(Ping(payload))
            elif opcode == _PONG:
                pass
            elif opcode == _TEXT:
                try:
                    messages.append(payload.decode("utf-8"))
                except UnicodeDecodeError:
                    # wsproto closes with 1007 and says why.
                    return self._hand_over(messages, buf, pos)
            else:
                messages.append(payload)
            pos = head + 4 + length
        if pos < end:
            self._pending = [buf[pos:]]
            self._have = end - pos
            self._need = need
        else:
            self._pending = None
        return messages, None

    def stop(self) -> bytes:
        """Hand over from here on: the start of a frame held so far, for wsproto."""
        pending, self._pending = self._pending, None
        self.handed_over = True
        return b"".join(pending) if pending is not None else b""

    def _hand_over(self, messages: list[str | bytes | Ping], buf: bytes, pos: int) -> tuple[list[str | bytes | Ping], bytes]:
        self.handed_over = True
        self._pending = None
        return messages, bytes(buf[pos:])


class FrameTracker:
    """How much of the current frame is still to come, in a client's byte
    stream that wsproto parses (it does not say): each frame's header is
    read here too, its payload only counted."""

    __slots__ = ("_head", "_left")

    def __init__(self) -> None:
        self._head = b""
        self._left = 0

    @property
    def to_come(self) -> int:
        """Payload bytes of the current frame not yet seen (0 between frames
        or while its header is not yet whole)."""
        return self._left

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                step = min(self._left, end - pos)
                self._left -= step
                pos += step
                continue
            had = len(self._head)
            self._head += data[pos : pos + 14 - had]
            size = _header_size(self._head)
            if size is None:
                pos = end
                continue
            pos += size - had
            self._left = _payload_length(self._head)
            self._head = b""


def _header_size(head: bytes) -> int | None:
    """A client frame header's size, None while `head` holds too little to say."""
    if len(head) < 2:
        return None
    code = head[1] & 0x7F
    size = 2 + (2 if code == 126 else 8 if code == 127 else 0) + (4 if head[1] & 0x80 else 0)
    return size if len(head) >= size else None


def _payload_length(head: bytes) -> int:
    code = head[1] & 0x7F
    if code == 126:
        return int.from_bytes(head[2:4], "big")
    if code == 127:
        return int.from_bytes(head[2:10], "big")
    return code
