"""The store algorithms, written once for SQLite and PostgreSQL.

Each is a generator of `Op`s (hub/store/steps.py) that a driver runs inside
the transaction the store chose; the rules they apply are in
hub/store/rules.py. Nothing here does I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from hub.store.base import AppendResult, Incoming, LogQuery, LogStats, Page
from hub.store.rows import (
    LOG_SELECT,
    SEQ_MAX,
    TASK_SELECT,
    chunks,
    record_from_row,
    stats_from_rows,
    task_from_row,
)
from hub.store.rules import (
    ProducerProgress,
    TaskProgress,
    counted_filters,
    decide_state,
    plan_batch,
    resolve,
    tally,
)
from hub.store.steps import Dialect, Steps
from keruta.records import LogRecord, TaskInfo
from keruta.timefmt import now_ts

# A notice with this seq means "the task's state changed", not a watermark.
STATUS_NOTICE = -1
_TASK_STATE = "SELECT state, exit_code, run_no FROM {tasks} WHERE task_id = ?{lock}"


# -- appending -----------------------------------------------------------------


def append(d: Dialect, items: Sequence[Incoming]) -> Steps[AppendResult]:
    """Store a batch (see `Store.append`); run inside a write transaction.

    The task rows are read under the dialect's lock (SQLite: the writer's
    BEGIN IMMEDIATE; PostgreSQL: FOR UPDATE in task_id order), so nobody else
    appends to these tasks meanwhile: the task seqs given here are the next
    ones, and what is not stored now is new.
    """
    task_ids = sorted(dict.fromkeys(i.task_id for i in items))
    now = now_ts()
    progress = yield from _lock_tasks(d, task_ids, now)
    producers: dict[tuple[str, str], ProducerProgress] = {}
    for key in dict.fromkeys((i.task_id, i.producer) for i in items):
        row = yield d.row("SELECT high FROM {producers} WHERE task_id = ? AND producer = ?", *key)
        producers[key] = ProducerProgress(high=0 if row is None else row[0])
    plan = plan_batch(items, progress, producers)
    ranges: dict[tuple[str, str], list[Sequence[int]]] = {}
    for key, (low, high) in plan.producer_lookups.items():
        ranges[key] = yield d.fetch(
            """
            SELECT pseq_first, pseq_last, seq_first FROM {ranges}
            WHERE task_id = ? AND producer = ? AND pseq_first <= ? AND pseq_last >= ?
            """,
            *key,
            high,
            low,
        )
    stored: dict[tuple[str, int], LogRecord] = {}
    for task_id, seqs in plan.seqs_to_read(ranges, producers).items():
        for chunk in chunks(seqs, d.in_chunk):
            where, args = d.in_list("seq", chunk, "bigint")
            rows = yield d.fetch(f"SELECT {LOG_SELECT} FROM {{logs}} WHERE task_id = ? AND {where}", task_id, *args)
            for row in rows:
                record = record_from_row(row)
                stored[(task_id, record.seq)] = record
    resolve(plan, producers, ranges, stored)
    fresh = plan.inserted()
    inserted = (yield from d.insert(fresh)) if fresh else []
    tally(inserted, progress)

    durable: dict[str, int] = {}
    for task_id, task in progress.items():
        before = task.durable_seq
        task.durable_seq = task.durable_after_batch()
        durable[task_id] = task.durable_seq
        if task.count:
            yield from d.save_task(task_id, task, now, task.durable_seq > before)
    yield from _save_producers(d, producers, now)
    return plan.result(inserted, durable, producers)


def _lock_tasks(d: Dialect, task_ids: list[str], now: str) -> Steps[dict[str, TaskProgress]]:
    rows: list[Any] = []
    for chunk in chunks(task_ids, d.in_chunk):
        where, args = d.in_list("task_id", chunk, "text")
        rows += yield d.fetch(
            f"SELECT task_id, max_seq, durable_seq FROM {{tasks}} WHERE {where} ORDER BY task_id{{lock}}",
            *args,
        )
    create = d.create_tasks(task_ids, now) if len(rows) < len(task_ids) else None
    if create is not None:
        # Created rows are locked by this transaction; take them all again in order.
        yield create
        return (yield from _lock_tasks(d, task_ids, now))
    progress = {tid: TaskProgress(max_seq=0, durable_seq=0, exists=False) for tid in task_ids}
    progress.update({r[0]: TaskProgress(max_seq=r[1], durable_seq=r[2]) for r in rows})
    return progress


def _save_producers(d: Dialect, producers: dict[tuple[str, str], ProducerProgress], now: str) -> Steps[None]:
    """A producer's high mark and its new ranges: one row each, found by key,
    whatever the number of the task's producers."""
    for (task_id, producer), run in producers.items():
        if not run.new_ranges:
            continue
        yield d.exec(
            """
            INSERT INTO {producers} (task_id, producer, run_no, high, last_write) VALUES (?, ?, 0, ?, ?)
            ON CONFLICT (task_id, producer) DO UPDATE SET high = excluded.high, last_write = excluded.last_write
            """,
            task_id,
            producer,
            run.high,
            now,
        )
        yield d.many(
            "INSERT INTO {ranges} (task_id, producer, pseq_first, pseq_last, seq_first) VALUES (?, ?, ?, ?, ?)",
            [(task_id, producer, *r) for r in run.new_ranges],
        )


# -- states ----------------------------------------------------------------------


def set_state(d: Dialect, task_id: str, state: str, exit_code: int | None, producer: str | None) -> Steps[TaskInfo]:
    """Record a task's (or run's) state; run inside a write transaction."""
    # A new task starts in the state given; its row's lock then orders this
    # against appends and other hubs.
    yield d.exec(
        """
        INSERT INTO {tasks} (task_id, state, exit_code, updated_at) VALUES (?, ?, ?, ?)
        ON CONFLICT (task_id) DO NOTHING
        """,
        task_id,
        state,
        exit_code,
        now_ts(),
    )
    task = yield d.row(_TASK_STATE, task_id)
    run = None
    if producer is not None:
        run = yield d.row(
            "SELECT state, exit_code, run_no FROM {producers} WHERE task_id = ? AND producer = ?", task_id, producer
        )
        if run is None or run[2] == 0:
            # A run is numbered at its first status, from the task's own
            # counter: one row read, however many producers the task has had.
            numbered = yield d.row("UPDATE {tasks} SET runs = runs + 1 WHERE task_id = ? RETURNING runs", task_id)
            yield d.exec(
                """
                INSERT INTO {producers} (task_id, producer, run_no, last_write) VALUES (?, ?, ?, ?)
                ON CONFLICT (task_id, producer) DO UPDATE SET run_no = excluded.run_no
                """,
                task_id,
                producer,
                numbered[0],
                now_ts(),
            )
            run = (None, None, numbered[0]) if run is None else (run[0], run[1], numbered[0])
    decision = decide_state(task, run, state, exit_code)
    if decision.run is not None:
        yield d.exec(
            "UPDATE {producers} SET state = ?, exit_code = ? WHERE task_id = ? AND producer = ?",
            *decision.run,
            task_id,
            producer,
        )
    if decision.task is not None:
        yield d.exec(
            "UPDATE {tasks} SET state = ?, exit_code = ?, updated_at = ?, run_no = ? WHERE task_id = ?",
            *decision.task,
            now_ts(),
            run[2] if run else task[2],
            task_id,
        )
    row = yield d.row(f"SELECT {TASK_SELECT} FROM {{tasks}} WHERE task_id = ?", task_id)
    notice = d.notice(task_id, STATUS_NOTICE)
    if notice is not None:
        # Other hubs' subscribers learn the new state; seq STATUS_NOTICE says "read it".
        yield notice
    return task_from_row(row)


def run_state(d: Dialect, task_id: str, producer: str) -> Steps[tuple[str, int | None] | None]:
    row = yield d.row("SELECT state, exit_code FROM {producers} WHERE task_id = ? AND producer = ?", task_id, producer)
    return None if row is None or row[0] is None else (row[0], row[1])


# -- reading ---------------------------------------------------------------------


def task(d: Dialect, task_id: str) -> Steps[TaskInfo | None]:
    row = yield d.row(f"SELECT {TASK_SELECT} FROM {{tasks}} WHERE task_id = ?", task_id)
    return task_from_row(row) if row else None


def tasks(d: Dialect) -> Steps[list[TaskInfo]]:
    rows = yield d.fetch(f"SELECT {TASK_SELECT} FROM {{tasks}} ORDER BY task_id")
    return [task_from_row(r) for r in rows]


def durable_seq(d: Dialect, task_id: str) -> Steps[int]:
    row = yield d.row("SELECT durable_seq FROM {tasks} WHERE task_id = ?", task_id)
    return row[0] if row else 0


def where(d: Dialect, query: LogQuery) -> tuple[str, list[Any]]:
    """The filters of a query as SQL (`?` parameters) and its arguments."""
    filters = (
        ("source = ?", query.source),
        ("level = ?", query.level),
        ("ts >= ?", query.start),
        ("ts <= ?", query.end),
        # A function, not LIKE: LIKE treats % and _ as wildcards (and is
        # case-insensitive in SQLite).
        ("{contains}(message, ?) > 0", d.text(query.q) if query.q else None),
        ("seq > ?", query.after_seq),
    )
    clauses = ["task_id = ?"] + [sql for sql, value in filters if value is not None]
    return " AND ".join(clauses), [query.task_id] + [v for _, v in filters if v is not None]


def query(d: Dialect, query: LogQuery) -> Steps[Page]:
    """A page and its total; run inside one read snapshot."""
    filters, params = where(d, query)
    rows = yield d.fetch(
        f"SELECT {LOG_SELECT} FROM {{logs}} WHERE {filters} ORDER BY seq LIMIT ? OFFSET ?",
        *params,
        query.size,
        query.page * query.size,
    )
    if len(params) == 1:
        row = yield d.row("SELECT total_logs FROM {tasks} WHERE task_id = ?", query.task_id)
    elif len(rows) < query.size and (rows or query.page == 0):
        row = (query.page * query.size + len(rows),)
    elif len(params) == 2 and query.after_seq is not None:
        row = yield from _count_after(d, query.task_id, query.after_seq, filters, params)
    elif (counted := counted_filters(query)) is not None:
        # Kept in the same transactions as the rows: exact, without a scan.
        sql = "SELECT CAST(coalesce(sum(n), 0) AS BIGINT) FROM {counts} WHERE task_id = ?"
        sql += "".join(f" AND {column} = ?" for column, _ in counted)
        row = yield d.row(sql, query.task_id, *(v for _, v in counted))
    else:
        row = yield d.row(f"SELECT count(*) FROM {{logs}} WHERE {filters}", *params)
    return Page(
        content=[record_from_row(r) for r in rows],
        total_elements=(row[0] if row else 0) or 0,
        number=query.page,
        size=query.size,
    )


def _count_after(d: Dialect, task_id: str, after_seq: int, filters: str, params: list[Any]) -> Steps[tuple[int]]:
    """How many records come after `after_seq`: arithmetic when the task's
    seqs are one unbroken run (the usual case: no client-chosen seqs left
    holes, no delete cut one), else a count."""
    row = yield d.row(
        "SELECT total_logs, (SELECT min(seq) FROM {logs} WHERE task_id = ?),"
        " (SELECT max(seq) FROM {logs} WHERE task_id = ?) FROM {tasks} WHERE task_id = ?",
        task_id,
        task_id,
        task_id,
    )
    if row is None or row[1] is None:
        return (0,)
    total, low, high = row
    if total == high - low + 1:
        return (max(0, high - max(after_seq, low - 1)),)
    counted = yield d.row(f"SELECT count(*) FROM {{logs}} WHERE {filters}", *params)
    return (counted[0] if counted else 0,)


def read_range(
    d: Dialect, task_id: str, after_seq: int, through_seq: int, limit: int, source: str | None, level: str | None
) -> Steps[list[LogRecord]]:
    sql = f"SELECT {LOG_SELECT} FROM {{logs}} WHERE task_id = ? AND seq > ? AND seq <= ?"
    params: list[Any] = [task_id, after_seq, through_seq]
    if source is not None:
        sql += " AND source = ?"
        params.append(source)
    if level is not None:
        sql += " AND level = ?"
        params.append(level)
    rows = yield d.fetch(sql + " ORDER BY seq LIMIT ?", *params, limit)
    return [record_from_row(r) for r in rows]


def stats(d: Dialect, task_id: str) -> Steps[LogStats]:
    rows = yield d.fetch(
        """
        SELECT t.total_logs, t.first_ts, t.last_ts, t.updated_at, c.source, c.level, c.n
        FROM {tasks} t LEFT JOIN {counts} c ON c.task_id = t.task_id
        WHERE t.task_id = ?
        """,
        task_id,
    )
    task_row = rows[0][:4] if rows else None
    counts = [(r[4], r[5], r[6]) for r in rows if r[4] is not None]
    return stats_from_rows(task_id, task_row, counts)


# -- deleting --------------------------------------------------------------------


def delete_chunk(d: Dialect, task_id: str, before: str | None) -> Steps[tuple[int, bool]]:
    """Delete up to one chunk of a task's records under its row lock; return
    (deleted, more may remain). Run inside a write transaction."""
    locked = yield d.row("SELECT 1 FROM {tasks} WHERE task_id = ?{lock}", task_id)
    if not locked:
        return 0, False
    older = "" if before is None else " AND ts < ?"
    delete = f"DELETE FROM {{logs}} WHERE task_id = ? AND seq IN (SELECT seq FROM {{logs}} WHERE task_id = ?{older} LIMIT ?)"
    args = [task_id, task_id] + ([] if before is None else [before]) + [d.delete_chunk]
    rows = yield d.fetch(d.delete_returning.replace("{delete}", delete), *args)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for source, level, n in rows:
        counts[(source, level)] += n
    deleted = sum(counts.values())
    if not deleted:
        return 0, False
    yield d.many(
        "UPDATE {counts} SET n = n - ? WHERE task_id = ? AND source = ? AND level = ?",
        [(n, task_id, s, lv) for (s, lv), n in counts.items()],
    )
    yield d.exec("DELETE FROM {counts} WHERE task_id = ? AND n <= 0", task_id)
    # What identity keeps stays bounded by what is stored: a producer's ranges
    # map its seqs to rows, so those wholly below the task's lowest row go
    # (its high mark stays: a resent record is still a duplicate).
    yield d.exec(
        """
        DELETE FROM {ranges} WHERE task_id = ?
        AND seq_first + (pseq_last - pseq_first) < coalesce((SELECT min(seq) FROM {logs} WHERE task_id = ?), ?)
        """,
        task_id,
        task_id,
        SEQ_MAX,
    )
    # durable_seq and max_seq stay: the watermark never goes backwards.
    yield d.exec(
        """
        UPDATE {tasks} SET
            total_logs = {greatest}(total_logs - ?, 0),
            first_ts = (SELECT min(ts) FROM {logs} WHERE task_id = ?),
            last_ts = (SELECT max(ts) FROM {logs} WHERE task_id = ?),
            updated_at = ?
        WHERE task_id = ?
        """,
        deleted,
        task_id,
        task_id,
        now_ts(),
        task_id,
    )
    return deleted, deleted == d.delete_chunk


# Producers retention may forget: idle past the horizon and not a run still
# under way (a quiet agent that is still running resends above its mark, which
# a forgotten mark would answer with SEQ_GAP from 1: records its spool no
# longer holds).
_PRUNABLE = "last_write < ? AND coalesce(state, 'succeeded') NOT IN ('pending', 'running')"


def prune_producers(d: Dialect, before: str) -> Steps[int]:
    """Retention: forget producers that wrote nothing since `before`, and
    their ranges (docs/identity.md: the identity horizon). Returns how many."""
    yield d.exec(
        f"DELETE FROM {{ranges}} WHERE (task_id, producer) IN (SELECT task_id, producer FROM {{producers}} WHERE {_PRUNABLE})",
        before,
    )
    rows = yield d.fetch(f"DELETE FROM {{producers}} WHERE {_PRUNABLE} RETURNING 1", before)
    return len(rows)


def old_tasks(d: Dialect, before: str) -> Steps[list[str]]:
    """Tasks with records older than `before` (for retention)."""
    rows = yield d.fetch("SELECT task_id FROM {tasks} WHERE first_ts < ? ORDER BY task_id", before)
    return [r[0] for r in rows]
