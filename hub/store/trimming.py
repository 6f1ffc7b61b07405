"""The store algorithms that drop a task's stored records on purpose: a cap
dropping the middle of a task, retention dropping the old head of a task
still running, an admin's DELETE before a time. (A redaction, which rewrites
what a leaked secret touched, is hub/store/redacting.py.)

Each leaves a `gap` record saying so (hub/store/accounts.py), so a verifier can still add the
log up against its producers' summaries. Generators of `Op`s like
hub/store/core.py, run by the stores inside one write transaction each, under
the task's row lock: appends, deletes and other steps wait for it, and every
step reads the chunks it changes inside its own transaction, so nothing
appended meanwhile is lost. Nothing here does I/O.

Where a cap cuts: the task keeps its first half (by message bytes) and its
last half; the records between become one `gap` record, which takes the seq
of the first record it replaces and stays at that seq as the tail slides,
growing (docs/identity.md, "Gaps and redactions"). A record never moves: a
seq is never given twice, and a dropped record's producer identity stays in
keruta_producer_ranges, so a resend of it is still a duplicate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs

from hub.store import chunk
from hub.store.accounts import (
    Accounts,
    ProducerSeqs,
    account_dropped,
    gap_message,
    message_bytes,
)
from hub.store.base import record_id
from hub.store.rows import SEQ_MAX
from hub.store.steps import Dialect, Steps
from keruta.records import LogRecord, trusted_record

CAP = "cap"
RETENTION = "retention"
DELETED = "deleted"  # an admin's DELETE ...?before=
# A task is cut a little below its cap, so the next few commits do not each
# cut again: the tail slides by up to this much at a time.
_CAP_SLACK_MAX = chunk.CHUNK_BYTES
# Chunks a step reads before it commits and lets the writer in.
_CHUNKS_PER_READ = 4


def effective_cap(hub_cap: int | None, agent_cap: int | None) -> int | None:
    """The hub's --max-task-bytes, or the agent's --max-bytes where lower."""
    caps = [c for c in (hub_cap, agent_cap) if c is not None]
    return min(caps) if caps else None


def cap_slack(cap: int) -> int:
    return min(cap // 16, _CAP_SLACK_MAX)


def over_cap(hub_cap: int | None, stored: int, agent_cap: int | None) -> bool:
    cap = effective_cap(hub_cap, agent_cap)
    return cap is not None and stored > cap


def gap_record(
    task_id: str,
    seq: int,
    timestamp: str,
    reason: str,
    lines: int,
    nbytes: int,
    span: tuple[int, int],
    accounts: Accounts,
    cap: int | None = None,
) -> LogRecord:
    gap = {
        "reason": reason,
        "lines": lines,
        "bytes": nbytes,
        "fromSeq": span[0],
        "toSeq": span[1],
        "accounts": accounts.to_json(),
    }
    return trusted_record(
        task_id, seq, timestamp, "agent", "WARN", gap_message(reason, lines, nbytes, cap), None,
        {"gap": gap}, False, record_id(task_id, seq), "gap",
    )


def _gap_fields(r: LogRecord) -> dict[str, Any]:
    return r.metadata.get("gap") or {} if r.kind == "gap" else {}


def rewrite(d: Dialect, task_id: str, seq_last: int, parts: Sequence[Sequence[LogRecord]]) -> Steps[int]:
    """Replace the chunk ending at `seq_last` with a chunk per non-empty part
    (none: delete it). Returns how its stored message bytes changed."""
    old = yield d.row(d.DELETE_CHUNK, task_id, seq_last)
    rows = [chunk.encode(part) for part in parts if part]
    if rows:
        yield d.insert_chunks(rows)
    return sum(r.bytes for r in rows) - (old[0] if old else 0)


def producer_seqs(d: Dialect, task_id: str, records: Sequence[LogRecord]) -> Steps[ProducerSeqs]:
    """Whose these records are, by the producer ranges holding their seqs:
    what their accounts are kept under."""
    if not records:
        return ProducerSeqs(())
    low = min(r.seq for r in records)
    high = max(r.seq for r in records)
    return ProducerSeqs((yield d.fetch(d.RANGES_FOR_SEQS, task_id, low, high)))


def _after_drop(d: Dialect, task_id: str, dropped: Sequence[LogRecord], gap_added: bool, bytes_delta: int) -> Steps[None]:
    gone = Counter((r.source, r.level) for r in dropped)
    yield d.many(d.SUBTRACT_COUNTS, [(k, task_id, s, lv) for (s, lv), k in gone.items()])
    # A section whose start went is gone from /sections too (hub/store/sections.py).
    starts = [(task_id, r.seq, r.seq) for r in dropped if r.kind == "section_start"]
    if starts:
        yield d.many(d.SECTIONS_DROP, starts)
    if gap_added:
        yield d.many(d.ADD_COUNTS, [(task_id, "agent", "WARN", 1)])
    yield d.exec(d.DROP_EMPTY_COUNTS, task_id)
    yield d.exec(d.ADD_STORED_BYTES, bytes_delta, task_id)


# -- a cap -----------------------------------------------------------------------


@attrs.frozen
class CapStep:
    """One transaction of a cap: the gap record as it now is, and whether
    the task is still over its cap (another step is due)."""

    gap: LogRecord
    dropped: int
    more: bool


def cap_step(d: Dialect, task_id: str, hub_cap: int | None, now: str) -> Steps[CapStep | None]:
    """Cut a task over its cap, reading at most `d.delete_chunks` chunks; None
    when it is within its cap."""
    state = yield d.row(d.CAP_STATE, task_id)
    if state is None:
        return None
    stored, agent_cap, gap_seq = state
    cap = effective_cap(hub_cap, agent_cap)
    if cap is None or stored <= cap:
        return None
    excess = stored - (cap - cap_slack(cap))
    old_gap = None
    if gap_seq is not None:
        for row in (yield d.fetch(d.CHUNKS_COVERING, task_id, gap_seq, gap_seq)):
            old_gap = next(
                (r for r in d.cache.records(task_id, row) if r.seq == gap_seq and _gap_fields(r).get("reason") == CAP),
                old_gap,
            )
    dropped: list[LogRecord] = []
    dropped_bytes = 0
    bytes_delta = 0
    opened = 0
    if old_gap is None:
        # A first cut (or its gap record went with retention): where the head ends.
        found = yield from _head_end(d, task_id, cap // 2)
        if found is None:
            return None
        row, index = found
        records = chunk.decode_row(task_id, row)
        k = index
        while k < len(records) and dropped_bytes < excess:
            dropped_bytes += message_bytes(records[k])
            k += 1
        dropped += records[index:k]
        bytes_delta += yield from rewrite(d, task_id, row[1], [records[:index], records[k:]])
        gap_seq = records[index].seq
        cursor = row[1]
        opened = 1
    else:
        cursor = gap_seq
    while dropped_bytes < excess and opened < d.delete_chunks:
        rows = yield d.fetch(d.CHUNKS_BETWEEN, task_id, cursor, SEQ_MAX, _CHUNKS_PER_READ)
        if not rows:
            break
        for row in rows:
            opened += 1
            cursor = row[1]
            records = chunk.decode_row(task_id, row)
            k = 0
            while k < len(records) and dropped_bytes < excess:
                dropped_bytes += message_bytes(records[k])
                k += 1
            if k == 0:
                break
            dropped += records[:k]
            bytes_delta += yield from rewrite(d, task_id, row[1], [records[k:]])
            if dropped_bytes >= excess or opened >= d.delete_chunks:
                break
    if not dropped:
        return None
    seqs = yield from producer_seqs(d, task_id, dropped)
    before = _gap_fields(old_gap) if old_gap is not None else {}
    accounts = Accounts()
    accounts.merge_json(before.get("accounts"))
    account_dropped(accounts, seqs, dropped)
    gap = gap_record(
        task_id,
        gap_seq,
        old_gap.timestamp if old_gap is not None else dropped[0].timestamp,
        CAP,
        int(before.get("lines", 0)) + len(dropped),
        int(before.get("bytes", 0)) + dropped_bytes,
        (gap_seq, max(int(before.get("toSeq", 0)), dropped[-1].seq)),
        accounts,
        cap,
    )
    if old_gap is not None:
        bytes_delta += yield from rewrite(d, task_id, gap_seq, [[gap]])
    else:
        row = chunk.encode([gap])
        yield d.insert_chunks([row])
        bytes_delta += row.bytes
    yield from _after_drop(d, task_id, dropped, old_gap is None, bytes_delta)
    yield d.exec(d.AFTER_TRIM, len(dropped), 0 if old_gap is not None else 1, gap_seq, now, task_id)
    # A verification reading the task across this cut may have missed its gap.
    yield d.exec(d.SET_VERDICT, None, task_id)
    return CapStep(gap=gap, dropped=len(dropped), more=dropped_bytes < excess)


def over_cap_tasks(d: Dialect, hub_cap: int | None, limit: int) -> Steps[list[str]]:
    """Up to `limit` tasks over their cap (the hub's, or their agent's where lower)."""
    rows = yield d.fetch(d.OVER_CAP, hub_cap, hub_cap, limit)
    return [r[0] for r in rows]


def _head_end(d: Dialect, task_id: str, budget: int) -> Steps[tuple[Any, int] | None]:
    """The chunk row where the first `budget` bytes of messages end, and the
    index in it of the first record past them."""
    total = 0
    cursor = 0
    while True:
        heads = yield d.fetch(d.CHUNK_BYTES_AFTER, task_id, cursor, 256)
        if not heads:
            return None
        for seq_first, seq_last, nbytes in heads:
            cursor = seq_last
            if total + nbytes <= budget:
                total += nbytes
                continue
            row = yield d.row(d.CHUNKS_BETWEEN, task_id, seq_first - 1, seq_last, 1)
            for i, r in enumerate(d.cache.records(task_id, row)):
                size = message_bytes(r)
                if total + size > budget:
                    return row, i
                total += size


# -- a delete before a time: retention, an admin's DELETE --------------------------


def deleted_gap(d: Dialect, task_id: str, dropped: Sequence[LogRecord], reason: str) -> Steps[LogRecord]:
    """A delete before a time dropped these records (seq order): retention
    the head of a task still running (`retention`), an admin's DELETE with
    `before` (`deleted`). One gap record, at the lowest seq dropped, says
    so. An earlier gap of such a delete (the lowest seq, so always among
    them: it is stamped older than the cut) is merged into it; a cap gap or
    redaction record among them hands on its accounts. The caller does the
    counts, as for any deleted record, and adds the gap's. Returns the gap."""
    lines = 0
    nbytes = 0
    low = dropped[0].seq
    for r in dropped:
        fields = _gap_fields(r)
        if fields:
            lines += int(fields.get("lines", 0))
            nbytes += int(fields.get("bytes", 0))
            low = min(low, int(fields.get("fromSeq", r.seq)))
        elif r.kind != "redaction":
            lines += 1
            nbytes += message_bytes(r)
    seqs = yield from producer_seqs(d, task_id, dropped)
    accounts = Accounts()
    account_dropped(accounts, seqs, dropped)
    high = max(max(int(_gap_fields(r).get("toSeq", r.seq)) for r in dropped), dropped[-1].seq)
    # Stamped as the newest record it replaced, older than the cut: the next
    # transaction of this pass, or the next pass, takes it in again.
    stamp = max(r.timestamp for r in dropped)
    gap = gap_record(task_id, dropped[0].seq, stamp, reason, lines, nbytes, (low, high), accounts)
    row = chunk.encode([gap])
    yield d.insert_chunks([row])
    yield d.many(d.ADD_COUNTS, [(task_id, "agent", "WARN", 1)])
    yield d.exec(d.ADD_STORED_BYTES, row.bytes, task_id)
    return gap


def set_max_bytes(d: Dialect, task_id: str, max_bytes: int) -> Steps[None]:
    yield d.exec(d.SET_MAX_BYTES, max_bytes, task_id)
