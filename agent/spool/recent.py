"""The newest spooled records, kept in memory so the uplink rarely reads files."""

from __future__ import annotations

import collections
from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate

import attrs

from agent.pipeline.encoding import LineRun


@attrs.define
class _Run:
    """Records `first_seq`, `first_seq + 1`, ... as appended together: their
    JSON, or the plain lines they are encoded from when read."""

    first_seq: int
    count: int
    size: int
    payloads: list[bytes] | None = None
    lines: LineRun | None = None

    @property
    def end_seq(self) -> int:
        return self.first_seq + self.count


class RecentRecords:
    """The last records appended, up to `budget` bytes (of JSON, or of the
    plain lines a LineRun holds), oldest first.

    Kept as the runs they were appended in (a pipe read's records), so that
    appending and forgetting cost the same for a run of 800 records as for
    one: every line the command writes passes through here, so no work may
    be done per record. Consecutive seqs throughout.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._runs: collections.deque[_Run] = collections.deque()
        self._size = 0
        # The last LineRun encoded: a frame's records usually span two reads.
        self._encoded: tuple[_Run, list[bytes]] | None = None

    def append(self, entries: list[tuple[int, bytes]]) -> None:
        # A tight copy: orjson's bytes keep a 4 KiB allocation behind a
        # 200-byte record, which would make the cache 20 times its budget.
        if entries:
            self.append_run(entries[0][0], [bytes(memoryview(payload)) for _, payload in entries])

    def append_run(self, first_seq: int, records: list[bytes] | LineRun) -> None:
        """Records `first_seq`, `first_seq + 1`, ...: their JSON (tight bytes,
        built by formatting or joining, not orjson's spare room) or a LineRun."""
        if isinstance(records, LineRun):
            run = _Run(first_seq, records.count, len(records.block.data), lines=records)
        else:
            run = _Run(first_seq, len(records), sum(map(len, records)), payloads=records)
        if not run.count:
            return
        if self._runs and self._runs[-1].end_seq != first_seq:
            # Not consecutive (a new spool's numbering): start over.
            self._runs.clear()
            self._size = 0
        self._runs.append(run)
        self._size += run.size
        while self._size > self.budget and self._runs:
            self._size -= self._runs.popleft().size

    def release(self, through: int) -> None:
        """Forget records with seq <= `through` (the hub stored them)."""
        runs = self._runs
        while runs and runs[0].first_seq <= through:
            run = runs[0]
            if run.end_seq - 1 <= through:
                self._size -= runs.popleft().size
                continue
            # Partly acknowledged: keep the rest, as JSON.
            cut = through + 1 - run.first_seq
            rest = self._payloads(run)[cut:]
            self._size -= run.size
            runs[0] = _Run(through + 1, len(rest), sum(map(len, rest)), payloads=rest)
            self._size += runs[0].size
            break

    def _payloads(self, run: _Run) -> list[bytes]:
        if run.payloads is not None:
            return run.payloads
        if self._encoded is not None and self._encoded[0] is run:
            return self._encoded[1]
        assert run.lines is not None
        payloads = run.lines.records(run.first_seq)
        self._encoded = (run, payloads)
        return payloads

    def holds(self, seq: int) -> bool:
        """Whether `seq` is kept (and so every record after it)."""
        return bool(self._runs) and self._runs[0].first_seq <= seq < self._runs[-1].end_seq

    def runs_from(self, seq: int) -> Iterator[tuple[int, list[bytes] | LineRun]]:
        """The runs kept that hold `seq` or later, as appended: (first seq,
        their JSON or their LineRun)."""
        for run in self._runs:
            if run.end_seq > seq:
                yield run.first_seq, run.payloads if run.payloads is not None else self._lines(run)

    @staticmethod
    def _lines(run: _Run) -> LineRun:
        assert run.lines is not None
        return run.lines

    def read(self, from_seq: int, max_records: int, max_bytes: int) -> list[tuple[int, bytes]] | None:
        """Like Spool.read, or None when `from_seq` is older than what is kept."""
        if not self._runs or self._runs[0].first_seq > from_seq:
            return None
        out: list[tuple[int, bytes]] = []
        total = 0
        for run in self._runs:
            if run.end_seq <= from_seq:
                continue
            total, full = take(out, run.first_seq, self._payloads(run), from_seq, max_records, max_bytes, total)
            if full:
                break
        return out


def take(
    out: list[tuple[int, bytes]],
    first_seq: int,
    payloads: list[bytes],
    from_seq: int,
    max_records: int,
    max_bytes: int,
    total: int,
) -> tuple[int, bool]:
    """Add the records `payloads` (seqs from `first_seq`) from `from_seq` on to
    `out` while it holds at most `max_records` whose payloads total at most
    `max_bytes` (but always at least one record), `total` being what `out`
    holds now. Returns the new total and whether `out` is full. A slice and
    C loops, not a loop per record."""
    start = max(0, from_seq - first_seq)
    chunk = payloads[start : start + max(0, max_records - len(out))]
    totals = list(accumulate(map(len, chunk), initial=total))
    count = max(0, bisect_right(totals, max_bytes) - 1)
    if count == 0 and not out and chunk:
        count = 1
    out.extend(zip(range(first_seq + start, first_seq + start + count), chunk[:count], strict=True))
    return totals[count], count < len(chunk) or len(out) >= max_records
