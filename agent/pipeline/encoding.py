"""A record's JSON as the agent writes it, on keruta/recordjson.py's encoder:
`encode_line` for one record, `LineEncoder` for the lines of one read (which
share task, timestamp, source and metadata) and for a whole Block, and
`LineRun`: a read's plain lines as the spool keeps them, raw, encoded into
records only when they are read back to be sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import orjson

from agent.pipeline.linesplit import Block
from keruta import recordjson
from keruta.levels import determine_level

# Bytes that a JSON string holds as they are (orjson escapes `"`, `\\` and
# controls only), plus the `\n` that separates a Block's lines: what is left
# of a Block after deleting these needs escaping.
_VERBATIM = bytes(b for b in range(256) if (b >= 0x20 and b not in b'"\\') or b == 0x0A)
# Lowered, every word a level looks for holds one of these ("trace" covers
# "traceback", "warn" covers "warning").
_LEVEL_HINTS = (b"error", b"fatal", b"critical", b"panic", b"exception", b"trace", b"warn", b"deprecated", b"debug")
# Past this many lines with a hint in a Block, every line's level is looked at.
_HINTED_LINES_MAX = 64


class LineEncoder(recordjson.LineEncoder):
    """keruta.recordjson's LineEncoder (the one encoder of a record's JSON),
    plus a Block encoded with no Python code run per line (`encode_block`;
    a test holds it to encode_line's bytes): the recorder's hot path is the
    one place that gets a read's lines as one buffer, and one line's work must
    be a few C calls."""

    def __init__(self, task_id: str, ts: str, source: str, metadata: dict[str, Any]) -> None:
        super().__init__(task_id, ts, source, metadata)
        # One line of a Block, level INFO: seq, message, lineNumber; the rest
        # fixed (its own `%` doubled, a task id or metadata may hold one).
        head, mid, tail = (part.replace(b"%", b"%%") for part in (self.head, self.mid, self.tail))
        self._info_verbatim = head + b"%d" + mid + b'INFO","message":"%b","lineNumber":%d' + tail
        self._info_escaped = head + b"%d" + mid + b'INFO","message":%b,"lineNumber":%d' + tail

    def encode_block(self, seq: int, block: Block, line_number: int) -> list[bytes]:
        """The records of `block`'s lines, from `seq` and `line_number` on."""
        raws = block.lines
        count = len(raws)
        seqs = range(seq, seq + count)
        numbers = range(line_number, line_number + count)
        if block.data.translate(None, _VERBATIM):
            # Quotes, backslashes or control characters: orjson escapes each line.
            messages = map(orjson.dumps, map(bytes.decode, raws))
            records = list(map(self._info_escaped.__mod__, zip(seqs, messages, numbers, strict=True)))
        else:
            records = list(map(self._info_verbatim.__mod__, zip(seqs, raws, numbers, strict=True)))
        for i in _maybe_not_info(block):
            text = raws[i].decode()
            level = determine_level(text)
            if level != "INFO":
                records[i] = self.encode(seq + i, level, text, line_number + i, False)
        return records


def _maybe_not_info(block: Block) -> Iterable[int]:
    """The indexes of `block`'s lines whose level may not be INFO: those that
    hold a level's word in ASCII letters of any case, and those that are not
    ASCII (determine_level matches case-insensitively beyond ASCII there)."""
    data = block.data
    low = data.lower()
    hits = []
    for hint in _LEVEL_HINTS:
        at = low.find(hint)
        while at != -1:
            hits.append(at)
            if len(hits) > _HINTED_LINES_MAX:
                return range(block.count)
            at = low.find(hint, at + len(hint))
    lines: set[int] = set()
    if hits:
        hits.sort()
        line, counted = 0, 0
        for at in hits:
            line += data.count(b"\n", counted, at)
            counted = at
            lines.add(line)
    if not data.isascii():
        lines.update(i for i, raw in enumerate(block.lines) if not raw.isascii())
    return sorted(lines)


@attrs.frozen
class LineRun:
    """Plain lines of one read (a Block, or up to RUN_LINES of one), as the
    spool keeps them: their bytes as read and what their records share. The
    records' JSON is made only when they are read back to be sent
    (`records`), so that capturing a line costs no encoding: with the hub
    away the agent only splits, checksums and writes."""

    task_id: str
    ts: str
    source: str
    first_line: int
    metadata: dict[str, Any]
    block: Block

    @property
    def count(self) -> int:
        return self.block.count

    def head(self) -> bytes:
        """What the lines' records share, as the spool stores it (JSON, one line)."""
        return orjson.dumps(
            {"taskId": self.task_id, "ts": self.ts, "source": self.source, "line": self.first_line,
             "metadata": self.metadata}
        )

    @classmethod
    def parse(cls, stored: bytes) -> LineRun:
        """`head() + b"\\n" + block.data` back into a LineRun."""
        head, _, data = stored.partition(b"\n")
        shared = orjson.loads(head)
        return cls(
            shared["taskId"], shared["ts"], shared["source"], shared["line"], shared["metadata"],
            Block(data, data.count(b"\n") + 1),
        )

    def records(self, first_seq: int) -> list[bytes]:
        """The lines' records, seqs from `first_seq` on."""
        encoder = LineEncoder(self.task_id, self.ts, self.source, self.metadata)
        return encoder.encode_block(first_seq, self.block, self.first_line)

    def split(self, most_bytes: int) -> list[LineRun]:
        """Runs of whole lines, in order, each of at most `most_bytes` (or one
        longer line), cut without splitting the lines apart."""
        data = self.block.data
        if len(data) <= most_bytes:
            return [self]
        out = []
        start, line = 0, self.first_line
        while start <= len(data):
            if len(data) - start <= most_bytes:
                end = len(data)
            else:
                end = data.rfind(b"\n", start, start + most_bytes)
                if end == -1:
                    # One line longer than most_bytes: it alone.
                    end = data.find(b"\n", start + most_bytes)
                    end = len(data) if end == -1 else end
            count = data.count(b"\n", start, end) + 1
            out.append(attrs.evolve(self, first_line=line, block=Block(data[start:end], count)))
            line += count
            start = end + 1
        return out
