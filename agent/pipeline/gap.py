"""A run of output lines the agent knowingly did not keep, and what its one
`gap` record says (CONTRACT.md, Words: `kind`; docs/agent.md, "Spool full").

The record is `source: "agent"`, `level: "WARN"`, `kind: "gap"`, timestamped
when the first of its lines was read, with a message for people
("1,234 lines (77,784 bytes) not kept: the agent's spool was full") and the
numbers for programs in `metadata.gap`::

    {"reason": "spool_full", "lines": 1234, "bytes": 77784,
     "from": TIMESTAMP, "to": TIMESTAMP,
     "sources": {"stdout": {"lines": 1200, "bytes": 76000,
                            "firstLine": 301, "lastLine": 1500}, ...}}

`lines` counts records not kept (each piece of a split long line is one),
`bytes` their text in UTF-8 without the line ending, `firstLine`/`lastLine`
their `lineNumber`s, `from`/`to` when the first and last were read.
"""

from __future__ import annotations

from typing import Any

import attrs

from keruta.limits import INT64_MAX
from keruta.records import SOURCES

SPOOL_FULL = "spool_full"  # past --spool-max-bytes
SPOOL_ERROR = "spool_error"  # the spool's disk refused the write (full, failing)

_WHY = {
    SPOOL_FULL: "the agent's spool was full",
    SPOOL_ERROR: "the agent could not write to its spool",
}


@attrs.define
class SourceGap:
    lines: int = 0
    bytes: int = 0
    first_line: int = 0
    last_line: int = 0


@attrs.define
class Gap:
    """Lines dropped one after another, counted until the gap record is written."""

    reason: str
    first_ts: str
    last_ts: str = ""
    lines: int = 0
    bytes: int = 0
    sources: dict[str, SourceGap] = attrs.field(factory=dict)

    def add(self, source: str, line_number: int, nbytes: int, ts: str) -> None:
        counts = self.sources.get(source)
        if counts is None:
            counts = self.sources[source] = SourceGap(first_line=line_number)
        counts.lines += 1
        counts.bytes += nbytes
        counts.last_line = line_number
        self.lines += 1
        self.bytes += nbytes
        self.last_ts = ts

    def message(self) -> str:
        return f"{self.lines:,} lines ({self.bytes:,} bytes) not kept: {_WHY.get(self.reason, self.reason)}"

    def metadata(self) -> dict[str, Any]:
        return {
            "gap": {
                "reason": self.reason,
                "lines": self.lines,
                "bytes": self.bytes,
                "from": self.first_ts,
                "to": self.last_ts or self.first_ts,
                "sources": {
                    source: {
                        "lines": c.lines,
                        "bytes": c.bytes,
                        "firstLine": c.first_line,
                        "lastLine": c.last_line,
                    }
                    for source, c in self.sources.items()
                },
            }
        }

    @classmethod
    def largest(cls, ts: str) -> Gap:
        """A gap whose record is as long as any can be: every source, every
        number at its widest (what the spool keeps room for)."""
        big = INT64_MAX
        gap = cls(max(_WHY, key=lambda r: len(_WHY[r]) + len(r)), ts, ts, big, big)
        gap.sources = {s: SourceGap(big, big, big, big) for s in SOURCES}
        return gap


def text_bytes(text: str) -> int:
    """A line's size as counted in a gap: its UTF-8 bytes."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
