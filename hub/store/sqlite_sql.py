"""SQLite's statements for the store algorithms (hub/store/core.py).

Parameters are `?`. The writer's BEGIN IMMEDIATE is the lock every append,
state change and delete needs: nobody else writes meanwhile, so no statement
here locks rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from hub.store.chunk import ChunkRow
from hub.store.sections import ROW as SECTION_ROW
from hub.store.steps import (
    CHUNK_FULL,
    CHUNK_HEAD,
    JSON_ROWS,
    TASK_SELECT,
    Dialect,
    ExtendedRange,
    HighMark,
    NewRange,
    Op,
    Steps,
    TaskSave,
)


class SQLiteSql(Dialect):
    PRODUCER_RANGES = """
        SELECT pseq_first, pseq_last, seq_first FROM keruta_producer_ranges
        WHERE task_id = ? AND producer = ? AND pseq_first <= ? AND pseq_last >= ?
    """
    LAST_CHUNKS = f"""
        SELECT bytes, {CHUNK_FULL} FROM keruta_chunks WHERE task_id = ? ORDER BY seq_last DESC LIMIT ?
    """
    DROP_CHUNKS_WITHIN = "DELETE FROM keruta_chunks WHERE task_id = ? AND seq_first >= ? AND seq_last <= ?"
    CHUNKS_COVERING = f"""
        SELECT {CHUNK_FULL} FROM keruta_chunks
        WHERE task_id = ?1 AND seq_last >= ?2 AND seq_first <= ?3 ORDER BY seq_last
    """
    SAVE_PRODUCER = """
        INSERT INTO keruta_producers (task_id, producer, run_no, high, last_write) VALUES (?, ?, 0, ?, ?)
        ON CONFLICT (task_id, producer) DO UPDATE SET high = excluded.high, last_write = excluded.last_write
    """
    # UPDATE ... FROM (VALUES row): the executor sends many rows in one
    # statement (hub/store/sqlite.py); each row's key is unique in an append.
    EXTEND_RANGE = """
        UPDATE keruta_producer_ranges SET pseq_last = v.column1 FROM (VALUES (?, ?, ?, ?)) AS v
        WHERE task_id = v.column2 AND producer = v.column3 AND pseq_first = v.column4
    """
    INSERT_RANGES = """
        INSERT INTO keruta_producer_ranges (task_id, producer, pseq_first, pseq_last, seq_first)
        VALUES (?, ?, ?, ?, ?)
    """
    ENSURE_TASK = """
        INSERT INTO keruta_tasks (task_id, state, exit_code, updated_at) VALUES (?, ?, ?, ?)
        ON CONFLICT (task_id) DO NOTHING
    """
    TASK_STATE = "SELECT state, exit_code, run_no FROM keruta_tasks WHERE task_id = ?"
    RUN_STATE = "SELECT state, exit_code, run_no FROM keruta_producers WHERE task_id = ? AND producer = ?"
    NUMBER_RUN = "UPDATE keruta_tasks SET runs = runs + 1 WHERE task_id = ? RETURNING runs"
    NEW_RUN = """
        INSERT INTO keruta_producers (task_id, producer, run_no, last_write) VALUES (?, ?, ?, ?)
        ON CONFLICT (task_id, producer) DO UPDATE SET run_no = excluded.run_no
    """
    SET_RUN_STATE = "UPDATE keruta_producers SET state = ?, exit_code = ? WHERE task_id = ? AND producer = ?"
    SET_TASK_STATE = "UPDATE keruta_tasks SET state = ?, exit_code = ?, updated_at = ?, run_no = ? WHERE task_id = ?"
    SET_SUMMARY = "UPDATE keruta_producers SET summary = ? WHERE task_id = ? AND producer = ?"
    SUMMARIES = "SELECT producer, summary, run_no > 0 FROM keruta_producers WHERE task_id = ? ORDER BY run_no, producer"
    TASK_RANGES = """
        SELECT producer, pseq_first, pseq_last, seq_first FROM keruta_producer_ranges
        WHERE task_id = ? ORDER BY seq_first
    """
    SET_VERDICT = "UPDATE keruta_tasks SET verdict = ? WHERE task_id = ?"
    TASK = f"SELECT {TASK_SELECT} FROM keruta_tasks WHERE task_id = ?"
    TASKS = f"SELECT {TASK_SELECT} FROM keruta_tasks ORDER BY task_id"
    DURABLE_SEQ = "SELECT durable_seq FROM keruta_tasks WHERE task_id = ?"
    TOTAL_LOGS = "SELECT total_logs FROM keruta_tasks WHERE task_id = ?"
    SEQ_BOUNDS = """
        SELECT total_logs,
            (SELECT seq_first FROM keruta_chunks WHERE task_id = ?1 ORDER BY seq_last LIMIT 1),
            (SELECT max(seq_last) FROM keruta_chunks WHERE task_id = ?1)
        FROM keruta_tasks WHERE task_id = ?1
    """
    COUNTED = """
        SELECT coalesce(sum(n), 0) FROM keruta_counts
        WHERE task_id = ?1 AND (?2 IS NULL OR source = ?2) AND (?3 IS NULL OR level = ?3)
    """
    CHUNKS_AFTER = f"""
        SELECT {CHUNK_FULL} FROM keruta_chunks
        WHERE task_id = ? AND seq_last > ? AND ts_last >= ? AND ts_first <= ? ORDER BY seq_last LIMIT ?
    """
    CHUNK_HEADS_AFTER = f"""
        SELECT {CHUNK_HEAD} FROM keruta_chunks
        WHERE task_id = ? AND seq_last > ? AND ts_last >= ? AND ts_first <= ? ORDER BY seq_last LIMIT ?
    """
    CHUNKS_BETWEEN = f"""
        SELECT {CHUNK_FULL} FROM keruta_chunks
        WHERE task_id = ? AND seq_last > ? AND seq_first <= ? ORDER BY seq_last LIMIT ?
    """
    STATS = """
        SELECT t.total_logs, t.first_ts, t.last_ts, t.updated_at, c.source, c.level, c.n
        FROM keruta_tasks t LEFT JOIN keruta_counts c ON c.task_id = t.task_id
        WHERE t.task_id = ?
    """
    LOCK_TASK = "SELECT 1 FROM keruta_tasks WHERE task_id = ?"
    CHUNKS_BEFORE = f"""
        SELECT {CHUNK_FULL} FROM keruta_chunks WHERE task_id = ? AND ts_first < ? ORDER BY seq_last LIMIT ?
    """
    DELETE_CHUNK = "DELETE FROM keruta_chunks WHERE task_id = ? AND seq_last = ? RETURNING bytes"
    REPLACE_CHUNK = """
        UPDATE keruta_chunks SET seq_first = ?2, seq_last = ?3, n = ?4, ts_first = ?5, ts_last = ?6,
            tally = ?7, lines = ?8, body = ?9, bytes = ?11
        WHERE task_id = ?1 AND seq_last = ?10
    """
    CHUNK_BYTES = "SELECT bytes FROM keruta_chunks WHERE task_id = ? AND seq_last = ?"
    ADD_STORED_BYTES = "UPDATE keruta_tasks SET stored_bytes = max(stored_bytes + ?, 0) WHERE task_id = ?"
    SUBTRACT_COUNTS = "UPDATE keruta_counts SET n = n - ? WHERE task_id = ? AND source = ? AND level = ?"
    DROP_EMPTY_COUNTS = "DELETE FROM keruta_counts WHERE task_id = ? AND n <= 0"
    PRUNE_RANGES = """
        DELETE FROM keruta_producer_ranges WHERE task_id = ?1
        AND seq_first + (pseq_last - pseq_first) < coalesce(
            (SELECT seq_first FROM keruta_chunks WHERE task_id = ?1 ORDER BY seq_last LIMIT 1),
            9223372036854775807)
    """
    AFTER_DELETE = """
        UPDATE keruta_tasks SET
            total_logs = max(total_logs - ?1, 0),
            first_ts = (SELECT min(ts_first) FROM keruta_chunks WHERE task_id = ?3),
            last_ts = (SELECT max(ts_last) FROM keruta_chunks WHERE task_id = ?3),
            updated_at = ?2
        WHERE task_id = ?3
    """
    PRUNE_IDLE_RANGES = """
        DELETE FROM keruta_producer_ranges WHERE (task_id, producer) IN (
            SELECT task_id, producer FROM keruta_producers
            WHERE last_write < ? AND coalesce(state, 'succeeded') NOT IN ('pending', 'running'))
    """
    PRUNE_IDLE_PRODUCERS = """
        DELETE FROM keruta_producers
        WHERE last_write < ? AND coalesce(state, 'succeeded') NOT IN ('pending', 'running') RETURNING 1
    """
    OLD_TASKS = "SELECT task_id FROM keruta_tasks WHERE first_ts < ? ORDER BY task_id"
    TASK_MAX_SEQ = "SELECT max_seq FROM keruta_tasks WHERE task_id = ?"
    SECTION_OPEN = """
        INSERT INTO keruta_sections (task_id, start_seq, name, title, style, collapsed, started_at)
        VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task_id, start_seq) DO NOTHING
    """
    SECTION_CLOSE = """
        UPDATE keruta_sections SET end_seq = ?3, ended_at = ?4
        WHERE task_id = ?1 AND start_seq = (
            SELECT max(start_seq) FROM keruta_sections
            WHERE task_id = ?1 AND end_seq IS NULL AND start_seq < ?3 AND (?2 IS NULL OR name = ?2))
    """
    SECTIONS = f"""
        SELECT {SECTION_ROW} FROM keruta_sections WHERE task_id = ? AND start_seq > ? ORDER BY start_seq LIMIT ?
    """
    SECTIONS_DROP = "DELETE FROM keruta_sections WHERE task_id = ? AND start_seq BETWEEN ? AND ?"
    LOCK_TASK_STATE = "SELECT state FROM keruta_tasks WHERE task_id = ?"
    CAP_STATE = "SELECT stored_bytes, max_bytes, cap_gap_seq FROM keruta_tasks WHERE task_id = ?"
    OVER_CAP = """
        SELECT task_id FROM keruta_tasks
        WHERE stored_bytes > MIN(COALESCE(max_bytes, ?), COALESCE(?, max_bytes)) LIMIT ?"""
    CHUNK_BYTES_AFTER = """
        SELECT seq_first, seq_last, bytes FROM keruta_chunks WHERE task_id = ? AND seq_last > ?
        ORDER BY seq_last LIMIT ?
    """
    RANGES_FOR_SEQS = """
        SELECT producer, pseq_first, pseq_last, seq_first FROM keruta_producer_ranges
        WHERE task_id = ?1 AND seq_first <= ?3 AND seq_first + (pseq_last - pseq_first) >= ?2
    """
    SAVE_TASK = """
        UPDATE keruta_tasks SET
            max_seq = max(max_seq, v.column2),
            durable_seq = v.column3,
            total_logs = total_logs + v.column4,
            stored_bytes = stored_bytes + v.column8,
            first_ts = CASE WHEN first_ts IS NULL OR first_ts > v.column5 THEN v.column5 ELSE first_ts END,
            last_ts = CASE WHEN last_ts IS NULL OR last_ts < v.column6 THEN v.column6 ELSE last_ts END,
            updated_at = v.column7
        FROM (VALUES (?, ?, ?, ?, ?, ?, ?, ?)) AS v
        WHERE task_id = v.column1
    """
    NEW_TASK = """
        INSERT INTO keruta_tasks
            (task_id, state, first_ts, last_ts, total_logs, durable_seq, updated_at, max_seq, stored_bytes)
        VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?)
    """
    ADD_COUNTS = """
        INSERT INTO keruta_counts (task_id, source, level, n) VALUES (?, ?, ?, ?)
        ON CONFLICT (task_id, source, level) DO UPDATE SET n = n + excluded.n
    """
    AFTER_TRIM = """
        UPDATE keruta_tasks SET total_logs = max(total_logs - ?1 + ?2, 0), cap_gap_seq = ?3, updated_at = ?4
        WHERE task_id = ?5
    """
    SET_MAX_BYTES = """
        UPDATE keruta_tasks SET max_bytes = CASE WHEN max_bytes IS NULL OR max_bytes > ?1 THEN ?1 ELSE max_bytes END
        WHERE task_id = ?2
    """

    # SQLite's host-parameter limit is 32766.
    in_chunk = 500

    def section_errors(self, task_id: str, runs: Sequence[tuple[int, int]]) -> Op:
        return self.exec(
            """
            UPDATE keruta_sections SET errors = errors + (
                SELECT coalesce(sum(json_extract(value, '$[1]')), 0) FROM json_each(?2)
                WHERE json_extract(value, '$[0]') > start_seq)
            WHERE task_id = ?1 AND end_seq IS NULL AND start_seq < ?3
            """,
            task_id, orjson.dumps([list(run) for run in runs]).decode(), max(s for s, _ in runs),
        )

    def lock_tasks(self, task_ids: Sequence[str], skip_locked: bool = False) -> Op:
        # No row locks: the writer's BEGIN IMMEDIATE holds the whole database.
        marks = ",".join("?" * len(task_ids))
        # One row of JSON, not a row per task: each row read is a step, and
        # every step lets the GIL go and waits to take it back (hub/store/sqlite.py).
        return Op(
            JSON_ROWS,
            "SELECT json_group_array(json_array(task_id, max_seq, durable_seq, stored_bytes, max_bytes)) FROM ("
            f"SELECT * FROM keruta_tasks WHERE task_id IN ({marks}) ORDER BY task_id)",
            tuple(task_ids),
        )

    def producer_highs(self, keys: Sequence[tuple[str, str]]) -> Op:
        pairs = ",".join(["(?, ?)"] * len(keys))
        return Op(
            JSON_ROWS,
            "SELECT json_group_array(json_array(task_id, producer, high, pseq_first, seq_first)) FROM ("
            # The keys drive (CROSS JOIN keeps them the outer loop): each
            # producer is found by its key. `(p.task_id, p.producer) IN
            # (VALUES ...)` scanned the whole table, every append.
            f"""
            SELECT p.task_id, p.producer, p.high, r.pseq_first, r.seq_first
            FROM (VALUES {pairs}) AS k CROSS JOIN keruta_producers p
                ON p.task_id = k.column1 AND p.producer = k.column2
            LEFT JOIN keruta_producer_ranges r ON r.task_id = p.task_id AND r.producer = p.producer
                AND r.pseq_first = (
                    SELECT MAX(pseq_first) FROM keruta_producer_ranges
                    WHERE task_id = p.task_id AND producer = p.producer
                ) AND r.pseq_last = p.high
            )""",
            tuple(value for key in keys for value in key),
        )

    def save_producers(self, highs: list[HighMark], ranges: list[NewRange], extended: list[ExtendedRange]) -> Steps[None]:
        yield self.many(self.SAVE_PRODUCER, highs)
        if ranges:
            yield self.many(self.INSERT_RANGES, ranges)
        if extended:
            yield self.many(self.EXTEND_RANGE, extended)

    def insert_chunks(self, rows: list[ChunkRow]) -> Op:
        # Plain INSERT: under BEGIN IMMEDIATE nobody else writes, so a conflict
        # here would be a bug, and rolls everything back.
        return self.many(
            """
            INSERT INTO keruta_chunks (task_id, seq_first, seq_last, n, ts_first, ts_last, tally, lines, body, bytes)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """,
            [(*r.values(), r.bytes) for r in rows],
        )

    def save_tasks(self, tasks: Sequence[TaskSave], now: str) -> Steps[None]:
        updated = [
            (task_id, t.inserted_max, t.durable_seq, t.count, t.first_ts, t.last_ts, now, t.bytes)
            for task_id, t, _ in tasks
            if t.exists
        ]
        if updated:
            yield self.many(self.SAVE_TASK, updated)
        if len(updated) < len(tasks):
            yield self.many(
                self.NEW_TASK,
                [
                    (task_id, t.first_ts, t.last_ts, t.count, t.durable_seq, now, t.inserted_max, t.bytes)
                    for task_id, t, _ in tasks
                    if not t.exists
                ],
            )
        yield self.many(
            self.ADD_COUNTS, [(task_id, s, lv, n) for task_id, t, _ in tasks for (s, lv), n in t.counts.items()]
        )
