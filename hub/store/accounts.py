"""What the hub owes a producer's summary when it changes a log on purpose.

A record the hub drops (a cap, retention) leaves its counts and its leaf
(keruta/digest.py) in the `accounts` of a `gap` record; a record it
redacts leaves the difference between its old and new leaf and bytes in the
`accounts` of a `redaction` record. Then, per producer, stored leaves + the
gaps' digests + the redactions' digests still sum to the summary's digest
(docs/identity.md, "Gaps and redactions"). Plain data, no I/O.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from hub.store.base import Incoming
from keruta import digest
from keruta.records import LogRecord


def record_leaf(pseq: int, r: LogRecord) -> int:
    # A record without a line number hashes as line 0.
    return digest.leaf(pseq, r.source, r.kind, r.partial, r.line_number or 0, r.message)


def message_bytes(r: LogRecord) -> int:
    return len(r.message.encode("utf-8", "surrogatepass"))


@attrs.define
class Account:
    records: int = 0
    lines: Counter[str] = attrs.field(factory=Counter)
    bytes: Counter[str] = attrs.field(factory=Counter)
    digest: int = 0

    def to_json(self, *, counts: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"bytes": dict(self.bytes), "digest": digest.to_text(digest.add(0, self.digest))}
        if counts:
            out = {"records": self.records, "lines": dict(self.lines), **out}
        return out


@attrs.define
class Accounts:
    """Per producer: what was dropped (a gap) or what a redaction changed."""

    by_producer: dict[str, Account] = attrs.field(factory=dict)

    def _of(self, producer: str) -> Account:
        account = self.by_producer.get(producer)
        if account is None:
            account = self.by_producer[producer] = Account()
        return account

    def dropped(self, producer: str, pseq: int, r: LogRecord) -> None:
        a = self.by_producer.get(producer) or self._of(producer)
        a.records += 1
        a.lines[r.source] += 1
        a.bytes[r.source] += len(r.message.encode("utf-8", "surrogatepass"))
        # Reduced mod 2**512 once, in to_json: a sum of a few million leaves stays small.
        a.digest += record_leaf(pseq, r)

    def changed(self, producer: str, pseq: int, old: LogRecord, new: LogRecord) -> None:
        """A redaction: old minus new, in bytes and in leaves."""
        a = self._of(producer)
        a.bytes[old.source] += message_bytes(old) - message_bytes(new)
        a.digest = digest.add(a.digest, digest.sub(record_leaf(pseq, old), record_leaf(pseq, new)))

    def merge_json(self, accounts: Any) -> None:
        """Add the accounts a gap or redaction record carries (one being dropped
        or merged): what it owed the summaries is owed by this one now."""
        if not isinstance(accounts, dict):
            return
        for producer, account in accounts.items():
            if not isinstance(account, dict):
                continue
            a = self._of(producer)
            a.records += int(account.get("records", 0))
            a.lines.update({s: int(n) for s, n in (account.get("lines") or {}).items()})
            a.bytes.update({s: int(n) for s, n in (account.get("bytes") or {}).items()})
            text = account.get("digest")
            if isinstance(text, str):
                a.digest = digest.add(a.digest, digest.from_text(text))

    def merge(self, other: Accounts) -> None:
        for producer, b in other.by_producer.items():
            a = self._of(producer)
            a.records += b.records
            a.lines.update(b.lines)
            a.bytes.update(b.bytes)
            a.digest = digest.add(a.digest, b.digest)

    def to_json(self, *, counts: bool = True) -> dict[str, Any]:
        return {p: a.to_json(counts=counts) for p, a in sorted(self.by_producer.items())}


def carried_accounts(r: LogRecord | Incoming) -> Any:
    """The accounts a hub-made gap or redaction record carries, or None (an
    agent's own spool gap carries none: it is one of its producer's records)."""
    if r.kind == "gap":
        return (r.metadata.get("gap") or {}).get("accounts")
    if r.kind == "redaction":
        return (r.metadata.get("redaction") or {}).get("accounts")
    return None


class ProducerSeqs:
    """Task seq -> (producer, producer seq), from keruta_producer_ranges rows
    (producer, pseq_first, pseq_last, seq_first)."""

    def __init__(self, ranges: Iterable[Sequence[Any]]) -> None:
        # Task seqs are given once: the ranges never overlap, and one lookup
        # is a binary search (a cut spans as many ranges as batches).
        self._ranges = sorted((int(r[3]), int(r[3]) + int(r[2]) - int(r[1]), str(r[0]), int(r[1])) for r in ranges)
        self._firsts = [r[0] for r in self._ranges]

    def of(self, seq: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self._firsts, seq) - 1
        if i < 0:
            return None
        first, last, producer, pseq_first = self._ranges[i]
        return (producer, pseq_first + seq - first) if seq <= last else None


def account_dropped(accounts: Accounts, seqs: ProducerSeqs, records: Iterable[LogRecord]) -> None:
    """Records dropped: each producer record in its producer's account; a
    dropped gap or redaction record hands its own accounts on."""
    for r in records:
        # First: a hub-made gap holds the seq of a producer record it replaced.
        carried = carried_accounts(r)
        if carried is not None:
            accounts.merge_json(carried)
            continue
        owner = seqs.of(r.seq)
        if owner is not None:
            accounts.dropped(owner[0], owner[1], r)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{n} bytes"


def gap_message(reason: str, lines: int, nbytes: int, cap: int | None) -> str:
    what = f"… {lines:,} lines ({human_bytes(nbytes)}) not kept: "
    if reason == "cap":
        return what + f"task over its {human_bytes(cap or 0)} cap"
    if reason == "deleted":
        return what + "deleted by an admin"
    return what + "older than the hub's retention period"
