"""Bytes from a pipe -> lines of text, with bounded buffering.

A line is split on ``\\n`` (a ``\\r`` right before it is dropped too). Bytes
are decoded as UTF-8 with U+FFFD for what does not decode. A line whose text
would be longer than `max_line_bytes` (UTF-8 encoded) travels as several
pieces; every piece but the last is marked `partial`. Pieces are cut only
between characters (never inside a UTF-8 sequence or an invalid run that
decodes to one U+FFFD), so the pieces' texts joined together equal the whole
line decoded at once. At most `max_line_bytes` bytes stay buffered between
calls, however long a line is.
"""

from __future__ import annotations

import attrs

from keruta.limits import DEFAULT_LIMITS


@attrs.frozen(slots=True)
class Line:
    text: str
    # True: more of the same line follows in the next piece.
    partial: bool = False


@attrs.frozen(slots=True)
class Block:
    """Consecutive complete lines whose text is exactly their bytes: valid
    UTF-8, no `\\r`, none longer than the limit. The common case of a pipe
    read, kept as bytes, not split: capturing and spooling it takes no Python
    (nor a `Line`, a str or a bytes object) per line."""

    # The lines joined by b"\n" (as read), and how many there are.
    data: bytes
    count: int

    @classmethod
    def of(cls, lines: list[bytes]) -> Block:
        return cls(b"\n".join(lines), len(lines))

    @property
    def lines(self) -> list[bytes]:
        return self.data.split(b"\n")

    def texts(self) -> list[Line]:
        return [Line(raw.decode("utf-8")) for raw in self.lines]


def each_line(items: list[tuple[Line | Block, int]]) -> list[tuple[Line, int]]:
    """Numbered items (a Block numbered by its first line) as numbered Lines."""
    out: list[tuple[Line, int]] = []
    for item, number in items:
        if isinstance(item, Block):
            out += [(line, number + k) for k, line in enumerate(item.texts())]
        else:
            out.append((item, number))
    return out


def expand(items: list[Line | Block]) -> list[Line]:
    """`items` with every Block turned into its Lines."""
    out: list[Line] = []
    for item in items:
        if isinstance(item, Block):
            out += item.texts()
        else:
            out.append(item)
    return out


def _is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def char_boundary(data: bytes | bytearray, cut: int) -> int:
    """The largest position <= `cut` (and > 0) that does not split a character.

    A position is safe when the byte there is not a UTF-8 continuation byte:
    whatever started before it (a character or an invalid run) has ended.
    After four continuation bytes in a row no sequence can still be open, so
    `cut` itself is safe then.
    """
    if cut >= len(data):
        return len(data)
    pos = cut
    for _ in range(3):
        if not _is_continuation(data[pos]):
            break
        pos -= 1
    if pos <= 0 or _is_continuation(data[pos]):
        return cut
    return pos


# A Block holds about this many bytes of lines at most (a longer line, up to
# the line limit, goes alone): the spool keeps one as one checksummed frame.
BLOCK_BYTES = 16 * 1024


class LineSplitter:
    """Feed it bytes as they come; it hands back complete lines and pieces."""

    def __init__(self, max_line_bytes: int = DEFAULT_LIMITS.max_line_bytes) -> None:
        if max_line_bytes < 4:
            raise ValueError("max_line_bytes must be at least 4 (one UTF-8 character)")
        self.max_line_bytes = max_line_bytes
        self._pending = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def feed(self, data: bytes) -> list[Line]:
        return expand(self.feed_blocks(data))

    def feed_blocks(self, data: bytes) -> list[Line | Block]:
        """What `feed` gives, its runs of plain complete lines kept as Blocks."""
        lines: list[Line | Block] = []
        if not data:
            return lines
        buf = self._pending
        start = 0
        if buf:
            newline = data.find(b"\n")
            if newline != -1:
                buf += data[:newline]
                self._emit_line(buf, lines)
                buf.clear()
                start = newline + 1
        start = self._feed_short_lines(data, start, lines)
        newline = data.find(b"\n", start)
        while newline != -1:
            if buf:
                buf += data[start:newline]
                whole: bytes | bytearray = buf
            else:
                whole = data[start:newline]
            self._emit_line(whole, lines)
            buf.clear()
            start = newline + 1
            newline = data.find(b"\n", start)
        buf += data[start:]
        # An unfinished line longer than the limit: send what we can now so that
        # no more than `max_line_bytes` waits for the rest.
        while len(buf) > self.max_line_bytes:
            cut = self._piece_end(buf, self.max_line_bytes)
            lines.append(Line(buf[:cut].decode("utf-8", "replace"), partial=True))
            del buf[:cut]
        return lines

    def _feed_short_lines(self, data: bytes, start: int, out: list[Line | Block]) -> int:
        """The common case in one go: complete lines from `start`, none over
        the limit, no `\r`, valid UTF-8 (so each line's text is its bytes),
        as Blocks of about BLOCK_BYTES. Returns how far `data` was consumed
        (`start`: not this case at all).

        Checking the lines together checks each: `\n` is ASCII, so no UTF-8
        sequence reaches across it."""
        last = data.rfind(b"\n", start)
        if last == -1 or data.find(b"\r", start, last) != -1:
            return start
        pos = start
        while pos <= last:
            if last - pos <= BLOCK_BYTES:
                end = last
            else:
                end = data.rfind(b"\n", pos, pos + BLOCK_BYTES)
                if end == -1:
                    # A line longer than BLOCK_BYTES: a Block of its own, if it fits.
                    end = data.find(b"\n", pos + BLOCK_BYTES)
                    if end - pos > self.max_line_bytes:
                        return pos
            piece = data[pos:end]
            if len(piece) > self.max_line_bytes and max(map(len, piece.split(b"\n"))) > self.max_line_bytes:
                # Only with a limit below BLOCK_BYTES (tests): a line to cut in pieces.
                return pos
            if not piece.isascii():
                try:
                    piece.decode("utf-8")
                except UnicodeDecodeError:
                    return pos
            out.append(Block(piece, data.count(b"\n", pos, end) + 1))
            pos = end + 1
        return last + 1

    def finish(self) -> list[Line]:
        """The last line, when the stream ended without a newline."""
        lines: list[Line | Block] = []
        if self._pending:
            # No newline came, so a final "\r" is content, not a line ending.
            self._emit_line(self._pending, lines, ending=False)
            self._pending = bytearray()
        return expand(lines)

    def _emit_line(self, raw: bytes | bytearray, out: list[Line | Block], ending: bool = True) -> None:
        end = len(raw) - 1 if ending and raw[-1:] == b"\r" else len(raw)
        limit = self.max_line_bytes
        if end <= limit // 3:
            # Even all-invalid bytes (3 encoded bytes each) fit: the common case.
            out.append(Line(raw[:end].decode("utf-8", "replace")))
            return
        view = memoryview(raw)[:end]
        pos = 0
        while True:
            rest = view[pos:]
            if len(rest) <= limit:
                text = bytes(rest).decode("utf-8", "replace")
                if len(text.encode("utf-8")) <= limit:
                    out.append(Line(text))
                    return
            cut = self._piece_end(rest, limit)
            out.append(Line(bytes(rest[:cut]).decode("utf-8", "replace"), partial=True))
            pos += cut

    @staticmethod
    def _piece_end(data: bytes | bytearray | memoryview, limit: int) -> int:
        """How many bytes of `data` to take so that the piece's *decoded* text
        fits in `limit` UTF-8 bytes (an invalid byte becomes U+FFFD: 3 bytes)."""
        window = bytes(data[: limit + 4])

        def fits(cut: int) -> bool:
            return len(window[:cut].decode("utf-8", "replace").encode("utf-8")) <= limit

        best = char_boundary(window, min(limit, len(window)))
        if fits(best):
            return best
        # Only text with invalid bytes gets here: find the longest piece that fits.
        lo, hi = 1, best - 1
        best = 1
        while lo <= hi:
            mid = (lo + hi) // 2
            cut = char_boundary(window, mid)
            if fits(cut):
                best = max(best, cut)
                lo = mid + 1
            else:
                hi = mid - 1
        return best
