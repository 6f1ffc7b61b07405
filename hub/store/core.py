"""The store algorithms, written once for SQLite and PostgreSQL.

Each is a generator of `Op`s (hub/store/steps.py) that a driver runs inside
the transaction the store chose; the statements are the dialect's
(hub/store/sqlite_sql.py, hub/store/pg_sql.py), the rules hub/store/rules.py's,
the chunk format hub/store/chunk.py's. Nothing here does I/O.

A task's records are stored in chunks (hub/store/chunk.py): a reader asks for
the chunks by seq and time range, skips those whose per (source, level) tally
says nothing matches, and opens only the rest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson

from hub.store import chunk, sections, trimming
from hub.store.accounts import carried_accounts
from hub.store.base import AppendResult, Incoming, LogQuery, LogStats, Page, SectionPage
from hub.store.rows import SEQ_MAX, stats_from_rows, task_from_row
from hub.store.rules import (
    ProducerProgress,
    TaskProgress,
    counted_filters,
    decide_state,
    plan_batch,
    resolve,
)
from hub.store.steps import (
    TS_HIGH,
    TS_LOW,
    Dialect,
    ExtendedRange,
    HighMark,
    NewRange,
    Steps,
    TaskSave,
)
from keruta.records import HUB_KINDS, LogRecord, TaskInfo
from keruta.timefmt import now_ts

# A notice with this seq means "the task's state changed", not a watermark.
STATUS_NOTICE = -1
# Chunks read per statement: heads (no body) when tallies may let a reader
# skip them, whole chunks when every one must be opened.
_HEADS_PER_READ = 1000
_CHUNKS_PER_READ = 16
# How long an append that waits for no row (busy_wait 0) waits for a task row
# another session is creating; past it, its tasks are busy.
CREATE_WAIT = 0.1
# A scan that reads on past the page (a text search's total, a raw
# download) takes more per statement: each is a round trip, and on
# PostgreSQL a pass through trio-asyncio (~64 compressed chunks: about 1 MB).
_SCAN_CHUNKS_PER_READ = 64
# Wanted seqs closer than this are read with one statement.
_LOOKUP_SPAN = 4 * chunk.CHUNK_RECORDS


# -- appending -----------------------------------------------------------------


def append(d: Dialect, items: Sequence[Incoming], busy_wait: float | None = None) -> Steps[AppendResult]:
    """Store a batch (see `Store.append`); run inside a write transaction.

    The task rows are read under the dialect's lock (SQLite: the writer's
    BEGIN IMMEDIATE; PostgreSQL: FOR UPDATE in task_id order), so nobody else
    appends to these tasks meanwhile: the task seqs given here are the next
    ones, and what is not stored now is new. The new records of each task go
    in as chunks of consecutive seqs. With `busy_wait` 0, if another session
    holds a task's row, nothing is stored and the result names those tasks
    (`busy`); above 0, a lock is waited for that long at most (the store
    turns a longer wait into `busy`: PostgresStore.append).
    """
    task_ids = sorted({i.task_id for i in items})
    now = now_ts()
    if busy_wait:
        yield from _lock_wait(d, busy_wait)
    locked = yield from _lock_tasks(d, task_ids, now, busy_wait == 0)
    if isinstance(locked, list):
        return AppendResult(records=[], inserted=[], durable={}, busy=locked)
    progress = locked
    if len(task_ids) == 1:
        # One task (an agent's batch): its producers told apart by name alone,
        # the strings' hashes already known.
        keys = [(task_ids[0], producer) for producer in dict.fromkeys([i.producer for i in items])]
    else:
        keys = list(dict.fromkeys([(i.task_id, i.producer) for i in items]))
    producers = {key: ProducerProgress(high=0) for key in keys}
    for start in range(0, len(keys), d.in_chunk):
        for task_id, producer, high, last_first, last_seq in (yield d.producer_highs(keys[start : start + d.in_chunk])):
            run = producers[(task_id, producer)]
            run.high = high
            if last_first is not None:
                run.last_range = (last_first, last_seq)
    plan = plan_batch(items, progress, producers)
    ranges: dict[tuple[str, str], list[Sequence[int]]] = {}
    for key, (low, high) in plan.producer_lookups.items():
        ranges[key] = yield d.fetch(d.PRODUCER_RANGES, *key, high, low)
    stored: dict[tuple[str, int], LogRecord] = {}
    for task_id, seqs in plan.seqs_to_read(ranges, producers).items():
        for record in (yield from _records_at(d, task_id, seqs)):
            stored[(task_id, record.seq)] = record
    resolve(plan, producers, ranges, stored)
    fresh = plan.inserted()
    by_task: dict[str, list[LogRecord]] = {}
    if fresh and len(task_ids) == 1:
        by_task[task_ids[0]] = fresh
    else:
        for r in fresh:
            by_task.setdefault(r.task_id, []).append(r)
    rows: list[chunk.ChunkRow] = []
    if by_task:
        for task_id, records in by_task.items():
            task = progress[task_id]
            for part in chunk.split(records) if len(records) > 1 else (records,):
                row = chunk.encode(part)
                task.add_chunk(row)
                rows.append(row)
        for task_id, records in by_task.items():
            yield from _save_sections(d, task_id, records)

    durable: dict[str, int] = {}
    saves: list[TaskSave] = []
    for task_id, task in progress.items():
        before = task.durable_seq
        task.durable_seq = task.durable_after_batch()
        durable[task_id] = task.durable_seq
        if task.count:
            saves.append((task_id, task, task.durable_seq > before))
    yield from d.save_append(rows, saves, _producer_rows(producers, now), now)
    result = plan.result(fresh, durable, producers)
    result.sizes.update(
        (task_id, (task.stored_bytes + task.bytes, task.max_bytes)) for task_id, task in progress.items() if task.count
    )
    result.compact.extend(task_id for task_id, records in by_task.items() if chunk.compaction_due(records))
    return result


def compact(d: Dialect, task_ids: Sequence[str]) -> Steps[None]:
    """`Store.compact`; run inside a write transaction, the tasks' rows
    locked as an append locks them (another hub may be appending)."""
    ordered = sorted(set(task_ids))
    if not ordered:
        return
    for start in range(0, len(ordered), d.in_chunk):
        yield d.lock_tasks(ordered[start : start + d.in_chunk])
    for task_id in ordered:
        yield from _compact_tail(d, task_id)


def _compact_tail(d: Dialect, task_id: str) -> Steps[None]:
    """Merge the task's trailing run of small chunks into full ones (chunk.py,
    SMALL_CHUNK): the same records, seqs, tallies and bytes, in fewer rows."""
    tail: list[tuple[Any, dict[str, Any]]] = []
    for nbytes, *row in (yield d.fetch(d.LAST_CHUNKS, task_id, chunk.COMPACT_EVERY + 1)):  # newest first
        if not chunk.small(row[2], nbytes):
            break
        cols = chunk.columns(row[-2], row[-1])
        # A cap's or a delete's gap record, a redaction's record: each is kept
        # in a chunk of its own, which their steps find by its last seq.
        if any(kind in HUB_KINDS for kind in cols.get("k") or ()):
            break
        tail.append((row, cols))
    if len(tail) < 2:
        return
    tail.reverse()
    yield d.exec(d.DROP_CHUNKS_WITHIN, task_id, tail[0][0][0], tail[-1][0][1])
    yield d.insert_chunks(chunk.merge(task_id, [(row[0], cols) for row, cols in tail]))


def _lock_tasks(
    d: Dialect, task_ids: list[str], now: str, skip_busy: bool = False
) -> Steps[dict[str, TaskProgress] | list[str]]:
    """The tasks' progress, their rows locked (made first where missing);
    with `skip_busy`, the tasks whose rows another session holds instead,
    if there are any."""
    rows: list[Any] = []
    for start in range(0, len(task_ids), d.in_chunk):
        rows += yield d.lock_tasks(task_ids[start : start + d.in_chunk], skip_busy)
    if skip_busy and len(rows) < len(task_ids):
        locked = {r[0] for r in rows}
        existing: set[str] = set()
        for start in range(0, len(task_ids), d.in_chunk):
            existing.update(r[0] for r in (yield d.existing_tasks(task_ids[start : start + d.in_chunk])))
        busy = sorted(existing - locked)
        if busy:
            return busy
    create = d.create_tasks(task_ids, now) if len(rows) < len(task_ids) else None
    if create is not None:
        if skip_busy:
            # A row another session is creating, not committed yet, was not
            # seen above: its INSERT would wait for that session.
            yield from _lock_wait(d, CREATE_WAIT)
        yield create
        if skip_busy:
            yield from _lock_wait(d, None)
        # Created rows are locked by this transaction; take them all again in order.
        return (yield from _lock_tasks(d, task_ids, now))
    found = {r[0]: r for r in rows}
    progress = {}
    for tid in task_ids:
        r = found.get(tid)
        progress[tid] = (
            TaskProgress(max_seq=0, durable_seq=0, exists=False)
            if r is None
            else TaskProgress(max_seq=r[1], durable_seq=r[2], stored_bytes=r[3], max_bytes=r[4])
        )
    return progress


def _lock_wait(d: Dialect, seconds: float | None) -> Steps[None]:
    op = d.lock_wait(seconds)
    if op is not None:
        yield op


def _records_at(d: Dialect, task_id: str, seqs: list[int]) -> Steps[list[LogRecord]]:
    """The stored records with these seqs (sorted), from the chunks holding them."""
    found: list[LogRecord] = []
    wanted = set(seqs)
    i = 0
    while i < len(seqs):
        low = high = seqs[i]
        while i < len(seqs) and seqs[i] - low <= _LOOKUP_SPAN:
            high = seqs[i]
            i += 1
        for row in (yield d.fetch(d.CHUNKS_COVERING, task_id, low, high)):
            found += [r for r in d.cache.records(task_id, row) if r.seq in wanted]
    return found


def _save_sections(d: Dialect, task_id: str, records: list[LogRecord]) -> Steps[None]:
    """The task's section rows after storing `records` (in seq order)."""
    marked = sections.marked(records)
    if not marked:
        return
    for step in sections.plan(marked):
        if isinstance(step, sections.Open):
            yield d.exec(
                d.SECTION_OPEN, task_id, step.seq, step.name, step.title, step.style, step.collapsed, step.ts
            )
        elif isinstance(step, sections.Close):
            yield d.exec(d.SECTION_CLOSE, task_id, step.name, step.seq, step.ts)
        else:
            yield d.section_errors(task_id, step.runs)


def _producer_rows(
    producers: dict[tuple[str, str], ProducerProgress], now: str
) -> tuple[list[HighMark], list[NewRange], list[ExtendedRange]]:
    """A producer's high mark and its new ranges: one row each, found by key,
    whatever the number of the task's producers (`Dialect.save_producers`)."""
    moved = [(key, run) for key, run in producers.items() if run.new_ranges]
    return (
        [(task_id, producer, run.high, now) for (task_id, producer), run in moved],
        [
            (task_id, producer, first, last, seq)
            for (task_id, producer), run in moved
            for first, last, seq in run.new_ranges[1 if run.extends_stored else 0 :]
        ],
        [(run.new_ranges[0][1], task_id, producer, run.new_ranges[0][0]) for (task_id, producer), run in moved if run.extends_stored],
    )


# -- states ----------------------------------------------------------------------


def set_state(
    d: Dialect, task_id: str, state: str, exit_code: int | None, producer: str | None,
    summary: dict[str, Any] | None = None, busy_wait: float | None = None,
) -> Steps[TaskInfo]:
    """Record a task's (or run's) state, and the summary a run sent with it;
    run inside a write transaction. `busy_wait`: the longest wait for a lock
    (the store turns a longer one into TaskBusy)."""
    if busy_wait is not None:
        yield from _lock_wait(d, busy_wait)
    # A new task starts in the state given; its row's lock then orders this
    # against appends and other hubs.
    yield d.exec(d.ENSURE_TASK, task_id, state, exit_code, now_ts())
    task = yield d.row(d.TASK_STATE, task_id)
    run = None
    if producer is not None:
        run = yield d.row(d.RUN_STATE, task_id, producer)
        if run is None or run[2] == 0:
            # A run is numbered at its first status, from the task's own
            # counter: one row read, however many producers the task has had.
            numbered = yield d.row(d.NUMBER_RUN, task_id)
            yield d.exec(d.NEW_RUN, task_id, producer, numbered[0], now_ts())
            run = (None, None, numbered[0]) if run is None else (run[0], run[1], numbered[0])
    decision = decide_state(task, run, state, exit_code)
    if decision.run is not None:
        yield d.exec(d.SET_RUN_STATE, *decision.run, task_id, producer)
    if producer is not None:
        if summary is not None:
            yield d.exec(d.SET_SUMMARY, orjson.dumps(summary).decode(), task_id, producer)
        # A run started or finished: the verdict last computed is stale.
        yield d.exec(d.SET_VERDICT, None, task_id)
    if decision.task is not None:
        yield d.exec(d.SET_TASK_STATE, *decision.task, now_ts(), run[2] if run else task[2], task_id)
    row = yield d.row(d.TASK, task_id)
    notice = d.notice(task_id, STATUS_NOTICE)
    if notice is not None:
        # Other hubs' subscribers learn the new state; seq STATUS_NOTICE says "read it".
        yield notice
    return task_from_row(row)


def verify_start(
    d: Dialect, task_id: str
) -> Steps[tuple[list[tuple[str, Any, bool]], list[tuple[str, int, int, int]]] | None]:
    """What a verification starts from: each producer's summary (JSON text
    or None) and whether it is a run (it sent a status), and the task's
    producer ranges; None for an unknown task."""
    row = yield d.row(d.DURABLE_SEQ, task_id)
    if row is None:
        return None
    summaries = yield d.fetch(d.SUMMARIES, task_id)
    ranges = yield d.fetch(d.TASK_RANGES, task_id)
    return [(r[0], r[1], bool(r[2])) for r in summaries], [(r[0], r[1], r[2], r[3]) for r in ranges]


def chunks_after(d: Dialect, task_id: str, after_seq: int) -> Steps[list[Any]]:
    """The next few whole chunks after `after_seq`, undecoded."""
    rows = yield d.fetch(d.CHUNKS_BETWEEN, task_id, after_seq, SEQ_MAX, _CHUNKS_PER_READ)
    return list(rows)


def set_verdict(d: Dialect, task_id: str, verdict: str) -> Steps[None]:
    yield d.exec(d.SET_VERDICT, verdict, task_id)


def run_state(d: Dialect, task_id: str, producer: str) -> Steps[tuple[str, int | None] | None]:
    row = yield d.row(d.RUN_STATE, task_id, producer)
    return None if row is None or row[0] is None else (row[0], row[1])


# -- reading ---------------------------------------------------------------------


def task(d: Dialect, task_id: str) -> Steps[TaskInfo | None]:
    row = yield d.row(d.TASK, task_id)
    return task_from_row(row) if row else None


def tasks(d: Dialect) -> Steps[list[TaskInfo]]:
    rows = yield d.fetch(d.TASKS)
    return [task_from_row(r) for r in rows]


def durable_seq(d: Dialect, task_id: str) -> Steps[int]:
    row = yield d.row(d.DURABLE_SEQ, task_id)
    return row[0] if row else 0


def query(d: Dialect, query: LogQuery) -> Steps[Page]:
    """A page and its total; run inside one read snapshot."""
    filtered = any(
        v is not None for v in (query.source, query.level, query.start, query.end, query.q, query.after_seq)
    )
    only_after = query.after_seq is not None and all(
        v is None for v in (query.source, query.level, query.start, query.end, query.q)
    )
    counted = counted_filters(query)
    # The total from a row when one holds it; else counted while paging.
    count_all = filtered and counted is None and not only_after
    content, matched = yield from _scan(d, query, count_all)
    if not filtered:
        row = yield d.row(d.TOTAL_LOGS, query.task_id)
        total = row[0] if row else 0
    elif count_all:
        total = matched
    elif len(content) < query.size and (content or query.page == 0):
        total = query.page * query.size + len(content)
    elif only_after:
        assert query.after_seq is not None
        total = yield from _count_after(d, query.task_id, query.after_seq)
    else:
        row = yield d.row(d.COUNTED, query.task_id, query.source, query.level)
        total = row[0] if row else 0
    return Page(content=content, total_elements=total or 0, number=query.page, size=query.size)


def _scan(d: Dialect, query: LogQuery, count_all: bool) -> Steps[tuple[list[LogRecord], int]]:
    """The records of the page, in seq order, and how many records matched
    the filters: all of them when `count_all`, else those seen until the page
    was full."""
    skip = query.page * query.size
    content: list[LogRecord] = []
    matched = 0
    after = query.after_seq or 0
    cursor = after
    # Without a time or text filter, a chunk's tally says how many records it
    # holds of a source and level: whole chunks are skipped unopened.
    by_heads = query.q is None and query.start is None and query.end is None
    needle = orjson.dumps(query.q)[1:-1] if query.q else None
    low, high = query.start or TS_LOW, query.end or TS_HIGH
    per_read = _SCAN_CHUNKS_PER_READ if count_all else _CHUNKS_PER_READ
    # A first page needs a chunk or two: heads are read a few first, then more.
    heads_per_read = 16
    while True:
        if by_heads:
            rows = yield d.fetch(d.CHUNK_HEADS_AFTER, query.task_id, cursor, low, high, heads_per_read)
        else:
            rows = yield d.fetch(d.CHUNKS_AFTER, query.task_id, cursor, low, high, per_read)
        if not rows:
            return content, matched
        for row in rows:
            full = len(content) >= query.size
            if full and not count_all:
                return content, matched
            seq_first, seq_last, n, _, _, tally_json = row[:6]
            if by_heads and seq_first > after:
                m = chunk.tally_count(tally_json, n, query.source, query.level)
                if full or skip >= m:
                    matched += m
                    skip -= 0 if full else m
                    continue
            if by_heads:
                row = yield d.row(d.CHUNKS_BETWEEN, query.task_id, seq_first - 1, seq_last, 1)
            elif needle is not None and needle not in chunk.lines_json(row[6]):
                continue
            hits = [r for r in d.cache.records(query.task_id, row) if _matches(r, query, after)]
            matched += len(hits)
            if full:
                continue
            if skip >= len(hits):
                skip -= len(hits)
                continue
            content += hits[skip : skip + query.size - len(content)]
            skip = 0
        if len(rows) < (heads_per_read if by_heads else per_read):
            return content, matched
        heads_per_read = min(heads_per_read * 8, _HEADS_PER_READ)
        if len(content) >= query.size and not count_all:
            return content, matched
        cursor = rows[-1][1]


def _matches(r: LogRecord, query: LogQuery, after: int) -> bool:
    return (
        r.seq > after
        and (query.source is None or r.source == query.source)
        and (query.level is None or r.level == query.level)
        and (query.start is None or r.timestamp >= query.start)
        and (query.end is None or r.timestamp <= query.end)
        and (query.q is None or query.q in r.message)
    )


def _count_after(d: Dialect, task_id: str, after_seq: int) -> Steps[int]:
    """How many records come after `after_seq`: arithmetic when the task's
    seqs are one unbroken run (no delete cut one), else counted from the
    chunks' heads."""
    row = yield d.row(d.SEQ_BOUNDS, task_id)
    if row is None or row[1] is None:
        return 0
    total, low, high = row
    if total == high - low + 1:
        return max(0, high - max(after_seq, low - 1))
    _, matched = yield from _scan(d, LogQuery(task_id, after_seq=after_seq, size=0), True)
    return matched


def read_range(
    d: Dialect, task_id: str, after_seq: int, through_seq: int, limit: int, source: str | None, level: str | None
) -> Steps[list[LogRecord]]:
    content: list[LogRecord] = []
    cursor = after_seq
    while len(content) < limit:
        # Enough chunks for what is still wanted when every record matches.
        per_read = min(_CHUNKS_PER_READ, (limit - len(content)) // chunk.CHUNK_RECORDS + 2)
        rows = yield d.fetch(d.CHUNKS_BETWEEN, task_id, cursor, through_seq, per_read)
        for row in rows:
            if chunk.tally_count(row[5], row[2], source, level) == 0:
                continue
            content += [
                r
                for r in d.cache.records(task_id, row)
                # Past what earlier reads covered: chunks merged since the
                # last read come back whole (each read is its own snapshot).
                if cursor < r.seq <= through_seq
                and (source is None or r.source == source)
                and (level is None or r.level == level)
            ]
            if len(content) >= limit:
                return content[:limit]
        if len(rows) < per_read:
            return content
        cursor = rows[-1][1]
    return content[:limit]


def raw_after(d: Dialect, task_id: str, after_seq: int) -> Steps[tuple[str, int]]:
    """The raw text of the next few chunks after `after_seq`, and the last
    seq they hold (`after_seq`: none left)."""
    rows = yield d.fetch(d.CHUNKS_BETWEEN, task_id, after_seq, SEQ_MAX, _SCAN_CHUNKS_PER_READ)
    return "".join(chunk.raw_text(row[6]) for row in rows), (rows[-1][1] if rows else after_seq)


def task_sections(d: Dialect, task_id: str, after_seq: int, limit: int) -> Steps[SectionPage | None]:
    """The first `limit` of the task's sections that start after `after_seq`,
    nested (hub/store/sections.py); None: no such task."""
    row = yield d.row(d.TASK_MAX_SEQ, task_id)
    if row is None:
        return None
    # One more than asked for: whether there is more to list after these.
    rows = yield d.fetch(d.SECTIONS, task_id, after_seq, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return SectionPage(sections.tree(rows, row[0]), rows[-1][0] if more else None)


def stats(d: Dialect, task_id: str) -> Steps[LogStats]:
    rows = yield d.fetch(d.STATS, task_id)
    task_row = rows[0][:4] if rows else None
    counts = [(r[4], r[5], r[6]) for r in rows if r[4] is not None]
    return stats_from_rows(task_id, task_row, counts)


# -- deleting --------------------------------------------------------------------


def delete_chunk(
    d: Dialect, task_id: str, before: str | None, *, gap: str | None = None
) -> Steps[tuple[int, bool, LogRecord | None]]:
    """Delete a task's records older than `before` (all when None) from up to
    `d.delete_chunks` chunks, under its row lock; return (deleted, more may
    remain, the gap record this left or grew). Run inside a write transaction.

    A chunk wholly older goes; one that holds records on both sides of
    `before` is rewritten with the newer ones (its seqs then skip). With
    `gap` and `before`, what went leaves a `gap` record in its place
    (hub/store/trimming.py `deleted_gap`): reason `deleted` (an admin's
    DELETE) always, `retention` only for the head cut off a task still running.
    """
    if gap == trimming.RETENTION and before is not None:
        locked = yield d.row(d.LOCK_TASK_STATE, task_id)
        reason = gap if bool(locked) and locked[0] in ("pending", "running") else None
    else:
        locked = yield d.row(d.LOCK_TASK, task_id)
        reason = gap if before is not None else None
    if not locked:
        return 0, False, None
    rows = yield d.fetch(d.CHUNKS_BEFORE, task_id, before or TS_HIGH, d.delete_chunks)
    if not rows:
        return 0, False, None
    gone: Counter[tuple[str, str]] = Counter()
    dropped: list[LogRecord] = []
    bytes_delta = 0
    for row in rows:
        seq_first, seq_last, _, _, ts_last, tally_json, lines, body = row
        if before is None or ts_last < before:
            if reason:
                dropped += chunk.decode(task_id, seq_first, lines, body)
            old = yield d.row(d.DELETE_CHUNK, task_id, seq_last)
            bytes_delta -= old[0] if old else 0
            yield d.exec(d.SECTIONS_DROP, task_id, seq_first, seq_last)
            for s, lv, k in orjson.loads(tally_json):
                gone[(s, lv)] += k
            continue
        records = chunk.decode(task_id, seq_first, lines, body)
        kept = [r for r in records if r.timestamp >= before]
        older = [r for r in records if r.timestamp < before]
        gone.update((r.source, r.level) for r in older)
        starts = [(task_id, r.seq, r.seq) for r in older if r.kind == "section_start"]
        if starts:
            yield d.many(d.SECTIONS_DROP, starts)
        parts = [kept]
        if reason:
            if not dropped and older:
                # The gap goes at the first seq dropped: the records kept on
                # either side of it become two chunks, never one around it.
                at = older[0].seq
                parts = [[r for r in kept if r.seq < at], [r for r in kept if r.seq > at]]
            dropped += older
        bytes_delta += yield from trimming.rewrite(d, task_id, seq_last, parts)
    deleted = sum(gone.values())
    yield d.many(d.SUBTRACT_COUNTS, [(k, task_id, s, lv) for (s, lv), k in gone.items()])
    yield d.exec(d.DROP_EMPTY_COUNTS, task_id)
    yield d.exec(d.ADD_STORED_BYTES, bytes_delta, task_id)
    gap_record = None
    if reason and dropped:
        # The gap record counts as one stored record.
        gap_record = yield from trimming.deleted_gap(d, task_id, dropped, reason)
        deleted -= 1
    # What identity keeps stays bounded by what is stored: a producer's ranges
    # map its seqs to stored records, so those wholly below the task's lowest
    # go (its high mark stays: a resent record is still a duplicate).
    yield d.exec(d.PRUNE_RANGES, task_id)
    # durable_seq and max_seq stay: the watermark never goes backwards.
    yield d.exec(d.AFTER_DELETE, deleted, now_ts(), task_id)
    # Records went: the verdict last computed no longer says what is stored.
    yield d.exec(d.SET_VERDICT, None, task_id)
    # A gap reports the records deleted, not the gap records it folded in
    # (an earlier transaction's of the same delete among them).
    real = sum(1 for r in dropped if carried_accounts(r) is None) if dropped else deleted
    return real, len(rows) == d.delete_chunks, gap_record


def prune_producers(d: Dialect, before: str) -> Steps[int]:
    """Retention: forget producers that wrote nothing since `before` and are
    not a run still under way, with their ranges (docs/identity.md: the
    identity horizon; a quiet agent still running resends above its mark,
    which a forgotten mark would answer with SEQ_GAP from 1). Returns how many."""
    yield d.exec(d.PRUNE_IDLE_RANGES, before)
    rows = yield d.fetch(d.PRUNE_IDLE_PRODUCERS, before)
    return len(rows)


def old_tasks(d: Dialect, before: str) -> Steps[list[str]]:
    """Tasks with records older than `before` (for retention)."""
    rows = yield d.fetch(d.OLD_TASKS, before)
    return [r[0] for r in rows]
