"""A producer's summary of what it sent (CONTRACT.md, Guarantee 7): the
final `status` frame carries it, the hub checks its store against it.

`Summary` is the wire form (camelCase keys are single words here)::

    {"records": N, "lines": {source: n}, "bytes": {source: n},
     "digest": "adhash-blake2b-512:<128 hex>"}

`records` is the producer's last seq (its seqs are 1..N); `lines` counts
records per source, `bytes` their messages in UTF-8; the digest is
keruta/digest.py's sum over every record. `Tally` accumulates one as
records go by, on the agent (what it spooled) and on the hub (what it stored).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import attrs

from keruta import digest
from keruta.limits import INT64_MAX
from keruta.records import SOURCES, InvalidField


def _counts(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if not isinstance(value, dict) or any(
        k not in SOURCES or type(n) is not int or not 0 <= n <= INT64_MAX for k, n in value.items()
    ):
        raise InvalidField(attr.name, f"must map a source ({', '.join(SOURCES)}) to a count from 0 to {INT64_MAX}")


def _records(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    # Bounded as every integer the stores keep: one past 64 bits could not be stored.
    if type(value) is not int or not 0 <= value <= INT64_MAX:
        raise InvalidField("records", f"must be an integer from 0 to {INT64_MAX}")


def _digest(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    try:
        digest.from_text(value if isinstance(value, str) else "")
    except ValueError as exc:
        raise InvalidField("digest", str(exc)) from None


@attrs.frozen
class Summary:
    records: int = attrs.field(validator=_records)
    lines: dict[str, int] = attrs.field(validator=_counts)
    bytes: dict[str, int] = attrs.field(validator=_counts)
    digest: str = attrs.field(validator=_digest)

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "lines": self.lines, "bytes": self.bytes, "digest": self.digest}

    @classmethod
    def from_json(cls, data: Any) -> Summary:
        """From its JSON object; InvalidField for anything else."""
        if not isinstance(data, dict):
            raise InvalidField("summary", "must be an object")
        try:
            return cls(data["records"], data["lines"], data["bytes"], data["digest"])
        except KeyError as exc:
            raise InvalidField(f"summary.{exc.args[0]}", "is required") from None


def text_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


@attrs.define
class Tally:
    """Counts and the digest sum of records as they go by."""

    records: int = 0
    lines: dict[str, int] = attrs.field(factory=dict)
    bytes: dict[str, int] = attrs.field(factory=dict)
    total: int = 0

    def add(self, pseq: int, source: str, kind: str | None, partial: bool, line_number: int, message: str) -> None:
        self.records += 1
        self.lines[source] = self.lines.get(source, 0) + 1
        self.bytes[source] = self.bytes.get(source, 0) + text_bytes(message)
        self.total = digest.add(self.total, digest.leaf(pseq, source, kind, partial, line_number, message))

    def add_record(self, pseq: int, record: dict[str, Any]) -> None:
        """A record as its JSON object (camelCase) holds it."""
        self.add(
            pseq, record["source"], record.get("kind"), bool(record.get("partial")),
            record.get("lineNumber") or 0, record["message"],
        )

    def add_lines(self, first_pseq: int, source: str, first_line: int, lines: Sequence[builtins.bytes]) -> None:
        """Plain lines (valid UTF-8, no kind, not partial), as a Block holds them."""
        if not lines:
            return
        self.records += len(lines)
        self.lines[source] = self.lines.get(source, 0) + len(lines)
        self.bytes[source] = self.bytes.get(source, 0) + sum(map(len, lines))
        self.total = digest.add(self.total, digest.block_sum(first_pseq, source, first_line, lines))

    def summary(self, last_seq: int) -> Summary:
        return Summary(last_seq, dict(self.lines), dict(self.bytes), digest.to_text(self.total))

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "lines": self.lines, "bytes": self.bytes, "digest": digest.to_text(self.total)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        return cls(data["records"], dict(data["lines"]), dict(data["bytes"]), digest.from_text(data["digest"]))
