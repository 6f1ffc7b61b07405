"""The digest a producer's summary carries over its records (CONTRACT.md,
Guarantee 7), and what the hub recomputes from what it stored.

The digest is a sum, modulo 2**512, of one BLAKE2b-512 leaf per record, and
each leaf covers the record's producer seq: the order is bound by the seqs, and
the sum can be taken apart. That is what lets the hub stay able to verify a log
it changed on purpose:

- records it knowingly dropped (a cap, retention) leave a `gap` record holding
  the sum of their leaves (and their counts), so stored + gaps = summary;
- a redaction leaves, per producer, the difference between the old and the new
  leaves of the records it changed, so no record's own hash is kept.

A sum of hashes is not meant to stand up to someone forging a log with the
hub's database in hand (that would take a signature); it is meant to notice a
record lost, doubled, reordered or changed on the way or at rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from hashlib import blake2b
from operator import methodcaller

DIGEST_NAME = "adhash-blake2b-512"
_MODULUS = 1 << 512
_SEP = "\x1f"


def leaf(pseq: int, source: str, kind: str | None, partial: bool, line_number: int, message: str) -> int:
    """The leaf of one record, sent as the producer's `pseq`-th record."""
    head = f"{pseq}{_SEP}{source}{_SEP}{kind or ''}{_SEP}{'p' if partial else ''}{_SEP}{line_number}{_SEP}"
    return int.from_bytes(blake2b((head + message).encode("utf-8", "surrogatepass")).digest(), "big")


def add(total: int, value: int) -> int:
    return (total + value) % _MODULUS


def sub(total: int, value: int) -> int:
    return (total - value) % _MODULUS


def to_text(total: int) -> str:
    """A sum as the summary and gap/redaction records carry it."""
    return f"{DIGEST_NAME}:{total:0128x}"


def from_text(text: str) -> int:
    """A sum from its text; ValueError for anything else."""
    name, sep, digits = text.partition(":")
    if name != DIGEST_NAME or not sep or len(digits) != 128:
        raise ValueError(f"a digest is {DIGEST_NAME}:<128 hex digits>")
    return int(digits, 16)


def block_sum(first_pseq: int, source: str, first_line: int, lines: Sequence[bytes]) -> int:
    """The sum (not reduced) of the leaves of plain lines sent as producer
    seqs `first_pseq`, `first_pseq + 1`, ... with line numbers from
    `first_line` on: each `leaf(pseq, source, None, False, number, line)` for
    `lines` that are valid UTF-8 (a Block's), with no Python run per line."""
    sep = _SEP.encode()
    fmt = b"%d" + (sep + source.encode() + sep * 3).replace(b"%", b"%%") + b"%d" + sep + b"%b"
    count = len(lines)
    numbered = zip(range(first_pseq, first_pseq + count), range(first_line, first_line + count), lines, strict=True)
    return _leaf_sum(map(fmt.__mod__, numbered))


_PLAIN = b"%d" + _SEP.encode() + b"%b" + _SEP.encode() * 3 + b"%d" + _SEP.encode() + b"%b"


def plain_sum(pseqs: Iterable[int], sources: Iterable[str], line_numbers: Iterable[int], messages: Iterable[str]) -> int:
    """The sum (not reduced) of the leaves of records with no kind, not
    partial: `leaf(pseq, source, None, False, number, message)` for each, with
    no Python run per record (the hub's check of a stored chunk)."""
    encoded = map(methodcaller("encode", "utf-8", "surrogatepass"), messages)
    source_bytes = map(str.encode, sources)
    return _leaf_sum(map(_PLAIN.__mod__, zip(pseqs, source_bytes, line_numbers, encoded, strict=True)))


def _leaf_sum(inputs: Iterable[bytes]) -> int:
    """The sum (not reduced) of the leaves of encoded leaf inputs, in C calls only."""
    return sum(map(int.from_bytes, map(_DIGEST, map(blake2b, inputs))))


# The unbound method: a C call per leaf, cheaper than a methodcaller.
_DIGEST = type(blake2b()).digest
