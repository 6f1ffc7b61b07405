"""Guarantee 7: is the stored log what its producers sent?

Each run of an agent sends, with its final status, a summary of every record it
sent (keruta/summary.py). `Verification` is fed the task's stored records in
seq order, chunk by chunk, and holds each producer's stored records to its
summary. The rule, per producer that sent one:

- the sum of the stored records' leaves (keruta/digest.py), plus the digest
  of every hub-made gap's account and every redaction's account for it,
  equals the summary's digest;
- stored records plus the gaps' counts equal the summary's counts (bytes:
  plus the redactions' byte deltas);
- every producer seq 1..N is stored or inside a gap.

Hub-made records (a `gap` a cap or retention left, a `redaction`) belong to
the hub, not to any producer, and count only through their `accounts`. An
agent's own `gap` record (its spool was full) is a record it sent, counted
like any other. The digest binds each leaf to its producer seq, so a record
lost, doubled, moved or changed shows as a mismatch even where counts agree.

Verdicts: `complete` (some run sent a summary, every summary checks out, and
no run of an agent is still without one), `incomplete` (some summary does not
check out: what is missing is named), `unverified` (no run has sent one yet).
Nothing here does I/O.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs

from hub.answers import Counts, MissingRange, ProducerVerdict, Verify
from hub.store import chunk
from hub.store.base import ANONYMOUS, hub_made
from keruta import digest
from keruta.summary import Summary, Tally, text_bytes

COMPLETE = "complete"
INCOMPLETE = "incomplete"
UNVERIFIED = "unverified"
VERDICTS = (COMPLETE, INCOMPLETE, UNVERIFIED)
# At most this many missing ranges are named per producer.
MISSING_MAX = 100


@attrs.define
class _Producer:
    name: str
    summary: Summary | None
    stored: Tally = attrs.field(factory=Tally)
    accounted: Tally = attrs.field(factory=Tally)
    # Producer seqs seen, as merged [first, last] runs (they come in order).
    seen: list[list[int]] = attrs.field(factory=list)
    # Producer seqs a hub-made gap covers.
    gapped: list[list[int]] = attrs.field(factory=list)

    def see(self, pseq: int) -> None:
        _extend(self.seen, pseq, pseq)


def _extend(runs: list[list[int]], first: int, last: int) -> None:
    if runs and runs[-1][0] <= first <= runs[-1][1] + 1:
        runs[-1][1] = max(runs[-1][1], last)
    else:
        runs.append([first, last])


def _merged(runs: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for first, last in sorted(runs):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return out


def _holes(covered: list[list[int]], n: int) -> list[tuple[int, int]]:
    """The runs of 1..n not in `covered` (merged, sorted)."""
    holes = []
    nxt = 1
    for first, last in covered:
        if first > nxt:
            holes.append((nxt, min(first - 1, n)))
        nxt = max(nxt, last + 1)
        if nxt > n:
            break
    if nxt <= n:
        holes.append((nxt, n))
    return [h for h in holes if h[0] <= h[1]]


class Verification:
    """One pass over a task's records (`add_chunk` or `add`, in seq order)."""

    def __init__(
        self,
        task_id: str,
        summaries: Sequence[tuple[str, Summary | None]],
        ranges: Sequence[tuple[str, int, int, int]],
        runs: set[str] | None = None,
    ) -> None:
        """`summaries`: (producer, its summary or None) for each producer of
        the task; `ranges`: (producer, pseq_first, pseq_last, seq_first), the
        store's map of producer seqs to task seqs; `runs`: the producers that
        are runs of an agent (they sent a status), None: every named one."""
        self.task_id = task_id
        self.runs = runs
        self.producers = {name: _Producer(name, summary) for name, summary in summaries}
        self.ranges = sorted(ranges, key=lambda r: r[3])
        self._starts = [r[3] for r in self.ranges]
        self._at = 0

    def _owner(self, seq: int) -> tuple[str, int] | None:
        """The producer and producer seq of task seq `seq` (seqs come in order)."""
        ranges = self.ranges
        at = self._at
        if not (at < len(ranges) and ranges[at][3] <= seq):
            at = bisect_right(self._starts, seq) - 1
        while at + 1 < len(ranges) and ranges[at + 1][3] <= seq:
            at += 1
        self._at = max(at, 0)
        if at < 0:
            return None
        producer, first, last, seq_first = ranges[at]
        pseq = first + seq - seq_first
        return (producer, pseq) if pseq <= last else None

    def add(
        self, seq: int, source: str, kind: str | None, partial: bool, line_number: int | None,
        message: str, metadata: dict[str, Any] | None,
    ) -> None:
        # A record with accounts is the hub's whatever seq it sits at: a cap's
        # gap takes the seq of the first record it replaced, which the
        # producer's range still maps to that producer.
        meta = metadata or {}
        if kind == "gap" and isinstance(meta.get("gap"), dict) and "accounts" in meta["gap"]:
            self._account(meta["gap"], gap=True)
            return
        if kind == "redaction":
            self._account(meta.get("redaction"), gap=False)
            return
        owner = self._owner(seq)
        run = self.producers.get(owner[0]) if owner is not None else None
        if owner is not None and run is not None and run.summary is not None:
            run.stored.add(owner[1], source, kind, partial, line_number or 0, message)
            run.see(owner[1])

    def add_chunk(self, row: Sequence[Any]) -> None:
        """A stored chunk (seq_first, ..., lines, body), decoded here."""
        cols = chunk.columns(bytes(row[-2]), bytes(row[-1]))
        messages = cols["m"]
        n = len(messages)
        seqs = chunk.seqs_of(cols, row[0])
        sources = _expand(cols["s"], n)
        numbers = _expand(cols["n"], n)
        partial = cols.get("p") or [False] * n
        kinds = cols.get("k") or [None] * n
        metadata = cols.get("x") or [None] * n
        if not self._add_plain(seqs, sources, numbers, messages, cols):
            for i in range(n):
                self.add(seqs[i], sources[i], kinds[i], bool(partial[i]), numbers[i], messages[i], metadata[i])

    def _add_plain(
        self, seqs: Sequence[int], sources: list[str], numbers: list[int | None], messages: list[str],
        cols: dict[str, Any],
    ) -> bool:
        """A chunk of plain lines of one run with a summary, all at once (the
        common case); False when it is not one."""
        if cols.get("k") or any(cols.get("p") or ()) or None in numbers:
            return False
        first = self._owner(seqs[0])
        last = self._owner(seqs[-1])
        if first is None or last is None or first[0] != last[0] or last[1] - first[1] != seqs[-1] - seqs[0]:
            return False
        run = self.producers.get(first[0])
        if run is None or run.summary is None:
            return False
        offset = first[1] - seqs[0]
        pseqs = [s + offset for s in seqs]
        stored = run.stored
        stored.total = digest.add(stored.total, digest.plain_sum(pseqs, sources, numbers, messages))  # type: ignore[arg-type]
        stored.records += len(messages)
        if isinstance(cols["s"], str):
            source = cols["s"]
            stored.lines[source] = stored.lines.get(source, 0) + len(messages)
            stored.bytes[source] = stored.bytes.get(source, 0) + sum(map(text_bytes, messages))
        else:
            for source, count in Counter(sources).items():
                stored.lines[source] = stored.lines.get(source, 0) + count
            for source, message in zip(sources, messages, strict=True):
                stored.bytes[source] = stored.bytes.get(source, 0) + text_bytes(message)
        if isinstance(seqs, range):
            _extend(run.seen, pseqs[0], pseqs[-1])
        else:
            for pseq in pseqs:
                run.see(pseq)
        return True

    def _account(self, meta: Any, *, gap: bool) -> None:
        """A hub-made gap's or redaction's accounts: per producer, what it stands for."""
        if not isinstance(meta, dict) or not isinstance(meta.get("accounts"), dict):
            return
        for producer, account in meta["accounts"].items():
            run = self.producers.get(producer)
            if run is None or not isinstance(account, dict):
                continue
            into = run.accounted
            try:
                into.total = digest.add(into.total, digest.from_text(account.get("digest", "")))
            except ValueError:
                continue
            if gap:
                into.records += _count(account.get("records"))
                _add_counts(into.lines, account.get("lines"))
            _add_counts(into.bytes, account.get("bytes"))
        if gap and isinstance(meta.get("fromSeq"), int) and isinstance(meta.get("toSeq"), int):
            self._cover(meta["fromSeq"], meta["toSeq"])

    def _cover(self, from_seq: int, to_seq: int) -> None:
        """The producer seqs stored at task seqs from_seq..to_seq are inside a gap."""
        for producer, first, last, seq_first in self.ranges:
            seq_last = seq_first + last - first
            lo, hi = max(from_seq, seq_first), min(to_seq, seq_last)
            run = self.producers.get(producer)
            if lo <= hi and run is not None:
                run.gapped.append([first + lo - seq_first, first + hi - seq_first])

    def _task_seq(self, producer: str, pseq: int) -> int | None:
        for name, first, last, seq_first in self.ranges:
            if name == producer and first <= pseq <= last:
                return seq_first + pseq - first
        return None

    # -- the answer ----------------------------------------------------------------

    def result(self) -> Verify:
        entries = [self._producer_answer(run) for run in self.producers.values()]
        checked = [e for e in entries if e.verdict != UNVERIFIED]
        # A run without its summary yet holds the verdict back; a producer
        # that never sent a status (a REST client naming itself) has none to send.
        waiting = [
            e for e in entries
            if e.verdict == UNVERIFIED and not hub_made(e.producer) and e.producer != ANONYMOUS
            and (self.runs is None or e.producer in self.runs)
        ]
        if any(e.verdict == INCOMPLETE for e in checked):
            verdict = INCOMPLETE
        elif checked and not waiting:
            verdict = COMPLETE
        else:
            verdict = UNVERIFIED
        return Verify(self.task_id, verdict, _message(verdict, checked), entries)

    def _producer_answer(self, run: _Producer) -> ProducerVerdict:
        summary = run.summary
        stored = Counts(run.stored.records, dict(run.stored.lines), dict(run.stored.bytes))
        accounted = Counts(run.accounted.records, dict(run.accounted.lines), dict(run.accounted.bytes))
        if summary is None:
            return ProducerVerdict(run.name, UNVERIFIED, None, None, None, stored, accounted, [], None)
        digest_ok = digest.add(run.stored.total, run.accounted.total) == digest.from_text(summary.digest)
        counts_ok = (
            run.stored.records + run.accounted.records == summary.records
            and _sum_counts(run.stored.lines, run.accounted.lines) == _nonzero(summary.lines)
            and _sum_counts(run.stored.bytes, run.accounted.bytes) == _nonzero(summary.bytes)
        )
        holes: list[tuple[int, int]] = []
        if not (digest_ok and counts_ok):
            holes = _holes(_merged(run.seen + run.gapped), summary.records)
        missing = [
            MissingRange(a, b, self._task_seq(run.name, a), self._task_seq(run.name, b))
            for a, b in holes[:MISSING_MAX]
        ]
        verdict = COMPLETE if digest_ok and counts_ok else INCOMPLETE
        return ProducerVerdict(
            run.name, verdict, summary.records, dict(summary.lines), dict(summary.bytes), stored, accounted,
            missing, digest_ok,
        )


def _expand(value: Any, n: int) -> list[Any]:
    return value if isinstance(value, list) else [value] * n


def _count(value: Any) -> int:
    return value if type(value) is int else 0


def _add_counts(into: dict[str, int], counts: Any) -> None:
    if isinstance(counts, dict):
        for source, n in counts.items():
            if type(n) is int:
                into[source] = into.get(source, 0) + n


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def _sum_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    _add_counts(out, b)
    return _nonzero(out)


def _message(verdict: str, checked: list[ProducerVerdict]) -> str:
    """The verdict in a line, as `keruta-agent tail` prints it last."""
    if verdict == UNVERIFIED:
        return "unverified: no run of this task has sent its summary yet"
    records = sum(e.records or 0 for e in checked)
    if verdict == COMPLETE:
        return f"complete: {records:,} lines, digest ok"
    problems = []
    for e in checked:
        if e.verdict != INCOMPLETE:
            continue
        held = e.stored.records + e.accounted.records
        what = [f"{held:,} of {e.records or 0:,} records kept"]
        for m in e.missing:
            what.append(f"seqs {_span(m.from_pseq, m.to_pseq)} missing" + (
                "" if m.from_seq is None or m.to_seq is None else f" (task seqs {_span(m.from_seq, m.to_seq)})"
            ))
        if not e.digest_ok:
            what.append("digest mismatch")
        problems.append(f"run {e.producer[:12]}: " + ", ".join(what))
    return "incomplete: " + "; ".join(problems)


def _span(first: int, last: int) -> str:
    return f"{first:,}" if first == last else f"{first:,}-{last:,}"
