"""A redaction in the store: a leaked secret taken out of a task's records,
a few chunks per transaction, with its `redaction` record kept in step.

The first step appends the `redaction` record (a new seq, like any record)
in the same transaction as it rewrites its first chunks, and each later step
rewrites that record with its count and accounts (per producer, old minus
new, in bytes and in leaves: hub/store/accounts.py) in the transaction that
rewrites its chunks. So at every commit the stored leaves plus the
accounts add up to the producers' summaries, and a `verify` between two
steps finds the log as complete as before it (docs/identity.md, "Gaps and
redactions"). Generators of `Op`s like hub/store/core.py; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import orjson

from hub.store import chunk, core
from hub.store.accounts import Accounts, carried_accounts
from hub.store.base import HUB_MADE, AppendResult, Incoming, with_ids
from hub.store.steps import Dialect, Steps
from hub.store.trimming import producer_seqs, rewrite
from keruta.records import LogRecord
from keruta.timefmt import now_ts

# The producer a task's redaction records are numbered under: the hub's own
# (`~`), so each answers no producer and verify counts it by its accounts.
REDACTION_PRODUCER = HUB_MADE + "redaction"


def scrub(text: str, values: Sequence[str]) -> str:
    """`text` with every stretch any of `values` covers made `***`: where
    occurrences overlap (of one value, of two, or of a value with a `***`
    already there) the stretch they cover together is one `***`, so no piece
    of a value is left and redacting again changes nothing."""
    spans: list[tuple[int, int]] = []
    for v in values:
        at = text.find(v)
        while at != -1:
            spans.append((at, at + len(v)))
            at = text.find(v, at + 1)
    if not spans:
        return text
    spans.sort()
    out = []
    done = 0
    start, end = spans[0]
    for first, last in spans[1:]:
        if first <= end:
            end = max(end, last)
            continue
        out += [text[done:start], "***"]
        done = end
        start, end = first, last
    out += [text[done:start], "***", text[end:]]
    return "".join(out)


def _scrub_json(value: Any, values: Sequence[str]) -> Any:
    if isinstance(value, str):
        return scrub(value, values)
    if isinstance(value, dict):
        return {scrub(k, values): _scrub_json(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_json(v, values) for v in value]
    return value


def redacted(r: LogRecord, values: Sequence[str]) -> LogRecord:
    """`r` with every value in its message and metadata strings replaced by
    `***` (`scrub`); `r` itself when none occurs, and for a hub-made gap or
    redaction record: it holds no producer's text, only what verify reads
    (digests in hex, counts), which a value may happen to match."""
    if carried_accounts(r) is not None:
        return r
    message = scrub(r.message, values)
    metadata = _scrub_json(r.metadata, values) if r.metadata else r.metadata
    if message == r.message and metadata == r.metadata:
        return r
    return attrs.evolve(r, message=message, metadata=metadata)


def redaction_fields(records: int, accounts: Accounts, by: str, at: str) -> tuple[str, dict[str, Any]]:
    """A redaction record's message and metadata: how many records, who,
    when, and the accounts; never a value."""
    noun = "record" if records == 1 else "records"
    return f"{records:,} {noun} redacted by {by} at {at}", {
        "redaction": {"records": records, "by": by, "at": at, "accounts": accounts.to_json(counts=False)}
    }


@attrs.frozen
class RedactStep:
    seqs: list[int]  # of the records changed
    accounts: Accounts  # what this step changed
    cursor: int  # the last seq looked at
    done: bool
    # The redaction's record as this step left it: appended by this step
    # (`appended` then says what that commit stored, for live viewers) or
    # rewritten with this step's count and accounts added. None: no such
    # task, or (`full`) no seq left for the record: the values are redacted
    # all the same.
    record: LogRecord | None
    appended: AppendResult | None
    full: bool = False


def redact_step(
    d: Dialect, task_id: str, values: Sequence[str], after: int, through: int, record_seq: int | None, by: str
) -> Steps[RedactStep]:
    """Redact `values` in the chunks after seq `after` (up to `through`), at
    most `d.delete_chunks` of them (a chunk that holds none is not decoded),
    and bring the redaction's record at `record_seq` up to date; with no
    record yet (None, or it went since: a cap, retention or a DELETE took
    it, handing its accounts on), append one."""
    values = sorted(values, key=len, reverse=True)
    locked = yield d.row(d.LOCK_TASK, task_id)
    if not locked:
        return RedactStep([], Accounts(), through, True, None, None)
    rows = yield d.fetch(d.CHUNKS_BETWEEN, task_id, after, through, d.delete_chunks)
    needles = [orjson.dumps(v)[1:-1] for v in values]
    changed: list[tuple[LogRecord, LogRecord]] = []
    bytes_delta = 0
    for row in rows:
        text = chunk.lines_json(row[6])
        body = chunk.body_json(row[7])
        if not any(n in text or n in body for n in needles):
            continue
        records = chunk.decode_row(task_id, row)
        new = [redacted(r, values) for r in records]
        pairs = [(old, r) for old, r in zip(records, new, strict=True) if r is not old]
        if pairs:
            bytes_delta += yield from rewrite(d, task_id, row[1], [new])
            changed += pairs
    accounts = Accounts()
    if changed:
        seqs = yield from producer_seqs(d, task_id, [old for old, _ in changed])
        for old, new_record in changed:
            owner = seqs.of(old.seq)
            if owner is not None:
                accounts.changed(owner[0], owner[1], old, new_record)
    found = None if record_seq is None else (yield from _record_at(d, task_id, record_seq))
    appended: AppendResult | None = None
    full = False
    if found is None:
        appended = yield from _append_record(d, task_id, len(changed), accounts, by)
        if appended.inserted:
            record = appended.inserted[0]
            with_ids([record])  # the step's answer shows it
        else:
            # The task has given its last seq (TASK_FULL): the secrets go all
            # the same, without a record to say so.
            record, appended, full = None, None, True
    elif changed:
        record, delta = yield from _add_to_record(d, task_id, found, len(changed), accounts)
        bytes_delta += delta
    else:
        record = found[1]
    if changed:
        yield d.exec(d.ADD_STORED_BYTES, bytes_delta, task_id)
        # A verdict kept from before no longer holds.
        yield d.exec(d.SET_VERDICT, None, task_id)
    cursor = rows[-1][1] if rows else through
    return RedactStep(
        [old.seq for old, _ in changed], accounts, cursor, len(rows) < d.delete_chunks, record, appended, full
    )


def _record_at(d: Dialect, task_id: str, seq: int) -> Steps[tuple[Any, LogRecord] | None]:
    """The chunk row holding the redaction record at `seq`, and the record."""
    for row in (yield d.fetch(d.CHUNKS_COVERING, task_id, seq, seq)):
        for r in chunk.decode_row(task_id, row):
            if r.seq == seq and r.kind == "redaction":
                return row, r
    return None


def _append_record(d: Dialect, task_id: str, records: int, accounts: Accounts, by: str) -> Steps[AppendResult]:
    at = now_ts()
    message, metadata = redaction_fields(records, accounts, by, at)
    highs = yield d.producer_highs([(task_id, REDACTION_PRODUCER)])
    item = Incoming(
        task_id=task_id, seq=(highs[0][2] if highs else 0) + 1, timestamp=at, source="agent", level="WARN",
        message=message, metadata=metadata, producer=REDACTION_PRODUCER, kind="redaction",
    )
    return (yield from core.append(d, [item]))


def _add_to_record(
    d: Dialect, task_id: str, found: tuple[Any, LogRecord], records: int, accounts: Accounts
) -> Steps[tuple[LogRecord, int]]:
    """The record with this step's count and accounts added, rewritten in
    its chunk; and how the chunk's message bytes changed."""
    row, old = found
    info = old.metadata.get("redaction") or {}
    total = Accounts()
    total.merge_json(info.get("accounts"))
    total.merge(accounts)
    message, metadata = redaction_fields(
        int(info.get("records", 0)) + records, total, str(info.get("by", "admin")), str(info.get("at", old.timestamp))
    )
    new = attrs.evolve(old, message=message, metadata={**old.metadata, **metadata})
    part = [new if r.seq == old.seq else r for r in chunk.decode_row(task_id, row)]
    delta = yield from rewrite(d, task_id, row[1], [part])
    return new, delta
