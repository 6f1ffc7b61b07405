"""tail's printing: order, no duplicates, pieces joined, colours on a terminal."""

from __future__ import annotations

import io

from agent.tail import COLOURS, RESET, STDERR_COLOUR, Printer
from keruta.records import LogRecord


def rec(
    seq: int, message: str, source: str = "stdout", level: str = "INFO", partial: bool = False
) -> LogRecord:
    return LogRecord(
        "t", seq, "2026-01-01T00:00:00.000000Z", source, level, message, seq, {}, partial
    )


def test_prints_each_seq_once_and_joins_pieces() -> None:
    out = io.BytesIO()
    p = Printer(out, colour=False)  # type: ignore[arg-type]
    p.records([rec(1, "a"), rec(2, "long-", partial=True), rec(3, "line")])
    # A resend after a reconnect overlaps what was printed: printed once.
    p.records([rec(2, "long-", partial=True), rec(3, "line"), rec(4, "é ✓")])
    assert out.getvalue() == "a\nlong-line\né ✓\n".encode()
    assert p.next_seq == 5 and p.printed == 4


def test_colours_only_when_asked() -> None:
    out = io.BytesIO()
    p = Printer(out, colour=True)  # type: ignore[arg-type]
    p.records([rec(1, "fine"), rec(2, "boom", level="ERROR"), rec(3, "meh", source="stderr")])
    assert out.getvalue() == (
        b"fine\n"
        + COLOURS["ERROR"]
        + b"boom"
        + RESET
        + b"\n"
        + STDERR_COLOUR
        + b"meh"
        + RESET
        + b"\n"
    )
