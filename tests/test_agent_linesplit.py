"""The line splitter: bytes in arbitrary reads -> lines and partial pieces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.pipeline.linesplit import BLOCK_BYTES, Block, Line, LineSplitter, char_boundary, expand


def split_all(data: bytes, chunks: list[int], max_line_bytes: int) -> list[Line]:
    """Feed `data` cut at the given chunk sizes, then finish."""
    splitter = LineSplitter(max_line_bytes)
    out: list[Line] = []
    pos = 0
    for size in chunks:
        out += splitter.feed(data[pos : pos + size])
        assert splitter.buffered <= max_line_bytes
        pos += size
    out += splitter.feed(data[pos:])
    assert splitter.buffered <= max_line_bytes
    return out + splitter.finish()


def join_pieces(pieces: list[Line]) -> list[str]:
    lines: list[str] = []
    current: list[str] = []
    for piece in pieces:
        current.append(piece.text)
        if not piece.partial:
            lines.append("".join(current))
            current = []
    assert not current, "the last piece of a line must not be partial"
    return lines


def reference_lines(data: bytes) -> list[str]:
    """What the lines are: split on \\n, drop a \\r before it, decode with U+FFFD."""
    if not data:
        return []
    raw = data.split(b"\n")
    complete, last = raw[:-1], raw[-1]
    lines = [(r[:-1] if r.endswith(b"\r") else r).decode("utf-8", "replace") for r in complete]
    if last:
        lines.append(last.decode("utf-8", "replace"))
    return lines


def test_lines_and_crlf() -> None:
    s = LineSplitter()
    assert s.feed(b"one\r\ntwo\nthr") == [Line("one"), Line("two")]
    assert s.feed(b"ee\n\n") == [Line("three"), Line("")]
    assert s.finish() == []


def test_last_line_without_newline() -> None:
    s = LineSplitter()
    assert s.feed(b"a\nlast") == [Line("a")]
    assert s.finish() == [Line("last")]
    assert s.finish() == []


def test_lone_carriage_returns_are_content() -> None:
    s = LineSplitter()
    assert s.feed(b"10%\r20%\r\n") == [Line("10%\r20%")]
    assert s.feed(b"end\r") == []
    assert s.finish() == [Line("end\r")]


def test_multibyte_character_split_across_reads() -> None:
    s = LineSplitter()
    euro = "€".encode()
    assert s.feed(b"price " + euro[:1]) == []
    assert s.feed(euro[1:] + b"5\n") == [Line("price €5")]


def test_invalid_utf8_becomes_replacement_characters() -> None:
    s = LineSplitter()
    assert s.feed(b"bad \xff\xfe ok \xe2\x82\n") == [Line("bad \ufffd\ufffd ok \ufffd")]


def test_long_line_is_split_into_partial_pieces() -> None:
    s = LineSplitter(10)
    pieces = s.feed(b"0123456789abcdefghij-rest\n")
    assert pieces == [Line("0123456789", True), Line("abcdefghij", True), Line("-rest")]


def test_long_line_without_newline_is_never_buffered_whole() -> None:
    s = LineSplitter(16)
    out: list[Line] = []
    for _ in range(100):
        out += s.feed(b"x" * 7)
        assert s.buffered <= 16
    out += s.finish()
    assert all(p.partial for p in out[:-1]) and not out[-1].partial
    assert "".join(p.text for p in out) == "x" * 700


def test_pieces_never_cut_a_character() -> None:
    s = LineSplitter(8)
    data = "€€€€€€€€".encode()  # 24 bytes, 3 per character
    pieces = s.feed(data + b"\n")
    assert [p.text for p in pieces] == ["€€", "€€", "€€", "€€"]
    assert all(len(p.text.encode()) <= 8 for p in pieces)


def test_invalid_bytes_count_as_three_bytes_each() -> None:
    """U+FFFD is three bytes in UTF-8: a piece's *text* must fit the limit."""
    s = LineSplitter(8)
    pieces = s.feed(b"\xff" * 7 + b"\n")
    assert all(len(p.text.encode()) <= 8 for p in pieces)
    assert "".join(p.text for p in pieces) == "\ufffd" * 7


def test_three_megabyte_line() -> None:
    line = bytes(range(32, 127)) * (3 * 1024 * 1024 // 95 + 1)
    pieces = split_all(line + b"\ntail", [65536] * 60, 64 * 1024)
    assert join_pieces(pieces) == [line.decode(), "tail"]
    assert all(len(p.text.encode()) <= 64 * 1024 for p in pieces)
    assert len(pieces) > 40


def test_char_boundary() -> None:
    data = "a€b".encode()  # 61 e2 82 ac 62
    assert [char_boundary(data, i) for i in range(6)] == [0, 1, 1, 1, 4, 5]
    # Four continuation bytes in a row: no character can be open, cut anywhere.
    assert char_boundary(b"a\x80\x80\x80\x80\x80", 5) == 5


fragments = st.sampled_from(
    [
        b"a",
        b"bc",
        b"\n",
        b"\r",
        b"\r\n",
        "é".encode(),
        "€".encode(),
        "😀".encode(),
        b"\xff",
        b"\xe2\x82",
        b"\xf0\x9f",
        b"\x80",
        b"\xed\xa0\x80",
        b"  ",
        b"xyz",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(fragments, max_size=80),
    cuts=st.lists(st.integers(1, 9), max_size=40),
    limit=st.integers(4, 24),
)
def test_pieces_rejoin_to_the_decoded_lines(
    parts: list[bytes], cuts: list[int], limit: int
) -> None:
    data = b"".join(parts)
    pieces = split_all(data, cuts, limit)
    assert join_pieces(pieces) == reference_lines(data)
    for piece in pieces:
        assert len(piece.text.encode("utf-8")) <= limit
        assert "\n" not in piece.text


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(1, 50), max_size=20),
    limit=st.integers(4, 64),
)
def test_arbitrary_bytes(data: bytes, cuts: list[int], limit: int) -> None:
    pieces = split_all(data, cuts, limit)
    assert join_pieces(pieces) == reference_lines(data)
    assert all(len(p.text.encode("utf-8")) <= limit for p in pieces)


class _LineByLine(LineSplitter):
    """The splitter without its many-lines-at-once path: the oracle."""

    def _feed_short_lines(self, data: bytes, start: int, out: list[Line | Block]) -> int:
        return start


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(fragments | st.sampled_from([b"\n", b"ok\n", b"\r\n", b"x" * 30 + b"\n"]), max_size=80),
    cuts=st.lists(st.integers(1, 60), max_size=20),
    limit=st.integers(4, 64),
)
def test_agent_linesplit_fast_path_gives_what_the_line_by_line_path_gives(
    parts: list[bytes], cuts: list[int], limit: int
) -> None:
    data = b"".join(parts)
    fast, slow = LineSplitter(limit), _LineByLine(limit)
    got: list[list[Line]] = [[], []]
    pos = 0
    for cut in [*cuts, len(data)]:
        chunk = data[pos : pos + cut]
        pos += cut
        got[0] += fast.feed(chunk)
        got[1] += slow.feed(chunk)
    assert got[0] + fast.finish() == got[1] + slow.finish()


def test_agent_linesplit_plain_lines_come_as_blocks_not_lines() -> None:
    """Issue 17: a read of plain lines is not split into objects per line: it
    comes as Blocks of at most BLOCK_BYTES, which hold every line."""
    data = b"".join(b"line %d %s\n" % (i, b"x" * (i % 90)) for i in range(20_000))
    items = LineSplitter().feed_blocks(data)
    assert all(isinstance(item, Block) for item in items)
    assert all(len(item.data) <= BLOCK_BYTES for item in items)  # type: ignore[union-attr]
    assert sum(item.count for item in items) == 20_000  # type: ignore[union-attr]
    assert [line.text for line in expand(items)] == data.decode().splitlines()
