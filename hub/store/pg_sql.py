"""PostgreSQL's statements for the store algorithms (hub/store/core.py).

Parameters are `$n`. Several hubs may share the database: an append, a state
change or a delete holds its tasks' rows (`FOR UPDATE`, taken in task_id
order) until it commits, so two hubs never give one seq twice. Here too the
steps PostgreSQL does in fewer round trips: chunks in one INSERT from
arrays, and all an append writes -- its chunks, task rows and counts,
producers, and the NOTIFY of each moved watermark -- in one statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hub.store.chunk import ChunkRow
from hub.store.pg_notices import NOTIFY_CHANNEL
from hub.store.sections import ROW as SECTION_ROW
from hub.store.steps import (
    CHUNK_FULL,
    CHUNK_HEAD,
    TASK_SELECT,
    Dialect,
    ExtendedRange,
    HighMark,
    NewRange,
    Op,
    Steps,
    TaskSave,
)

_LOCK_TASKS = """
    SELECT task_id, max_seq, durable_seq, stored_bytes, max_bytes FROM keruta_tasks
    WHERE task_id = ANY($1::text[]) ORDER BY task_id FOR UPDATE
"""
# The writer's own commits: a row another session holds is left to a commit
# of its own (hub/actors/writer.py parks its task) instead of holding every task's.
_LOCK_TASKS_SKIPPING = """
    SELECT task_id, max_seq, durable_seq, stored_bytes, max_bytes FROM keruta_tasks
    WHERE task_id = ANY($1::text[]) ORDER BY task_id FOR UPDATE SKIP LOCKED
"""


class PostgresSql(Dialect):
    """`origin` names the store in its notices; `notify`: send them at all."""

    PRODUCER_RANGES = """
        SELECT pseq_first, pseq_last, seq_first FROM keruta_producer_ranges
        WHERE task_id = $1 AND producer = $2 AND pseq_first <= $3 AND pseq_last >= $4
    """
    LAST_CHUNKS = f"""
        SELECT bytes, {CHUNK_FULL} FROM keruta_chunks WHERE task_id = $1 ORDER BY seq_last DESC LIMIT $2
    """
    DROP_CHUNKS_WITHIN = "DELETE FROM keruta_chunks WHERE task_id = $1 AND seq_first >= $2 AND seq_last <= $3"
    CHUNKS_COVERING = f"""
        SELECT {CHUNK_FULL} FROM keruta_chunks
        WHERE task_id = $1 AND seq_last >= $2 AND seq_first <= $3 ORDER BY seq_last
    """
    ENSURE_TASK = """
        INSERT INTO keruta_tasks (task_id, state, exit_code, updated_at) VALUES ($1, $2, $3, $4)
        ON CONFLICT (task_id) DO NOTHING
    """
    TASK_STATE = "SELECT state, exit_code, run_no FROM keruta_tasks WHERE task_id = $1 FOR UPDATE"
    RUN_STATE = "SELECT state, exit_code, run_no FROM keruta_producers WHERE task_id = $1 AND producer = $2"
    NUMBER_RUN = "UPDATE keruta_tasks SET runs = runs + 1 WHERE task_id = $1 RETURNING runs"
    NEW_RUN = """
        INSERT INTO keruta_producers (task_id, producer, run_no, last_write) VALUES ($1, $2, $3, $4)
        ON CONFLICT (task_id, producer) DO UPDATE SET run_no = excluded.run_no
    """
    SET_RUN_STATE = "UPDATE keruta_producers SET state = $1, exit_code = $2 WHERE task_id = $3 AND producer = $4"
    SET_TASK_STATE = (
        "UPDATE keruta_tasks SET state = $1, exit_code = $2, updated_at = $3, run_no = $4 WHERE task_id = $5"
    )
    SET_SUMMARY = "UPDATE keruta_producers SET summary = $1 WHERE task_id = $2 AND producer = $3"
    SUMMARIES = "SELECT producer, summary, run_no > 0 FROM keruta_producers WHERE task_id = $1 ORDER BY run_no, producer"
    TASK_RANGES = """
        SELECT producer, pseq_first, pseq_last, seq_first FROM keruta_producer_ranges
        WHERE task_id = $1 ORDER BY seq_first
    """
    SET_VERDICT = "UPDATE keruta_tasks SET verdict = $1 WHERE task_id = $2"
    TASK = f"SELECT {TASK_SELECT} FROM keruta_tasks WHERE task_id = $1"
    TASKS = f"SELECT {TASK_SELECT} FROM keruta_tasks ORDER BY task_id"
    DURABLE_SEQ = "SELECT durable_seq FROM keruta_tasks WHERE task_id = $1"
    TOTAL_LOGS = "SELECT total_logs FROM keruta_tasks WHERE task_id = $1"
    SEQ_BOUNDS = """
        SELECT total_logs,
            (SELECT seq_first FROM keruta_chunks WHERE task_id = $1 ORDER BY seq_last LIMIT 1),
            (SELECT max(seq_last) FROM keruta_chunks WHERE task_id = $1)
        FROM keruta_tasks WHERE task_id = $1
    """
    COUNTED = """
        SELECT CAST(coalesce(sum(n), 0) AS BIGINT) FROM keruta_counts
        WHERE task_id = $1 AND ($2::text IS NULL OR source = $2) AND ($3::text IS NULL OR level = $3)
    """
    CHUNKS_AFTER = f"""
        SELECT {CHUNK_FULL} FROM keruta_chunks
        WHERE task_id = $1 AND seq_last > $2 AND ts_last >= $3 AND ts_first <= $4 ORDER BY seq_last LIMIT $5
    """
    CHUNK_HEADS_AFTER = f"""
        SELECT {CHUNK_HEAD} FROM keruta_chunks
        WHERE task_id = $1 AND seq_last > $2 AND ts_last >= $3 AND ts_first <= $4 ORDER BY seq_last LIMIT $5
    """
    CHUNKS_BETWEEN = f"""
        SELECT {CHUNK_FULL} FROM keruta_chunks
        WHERE task_id = $1 AND seq_last > $2 AND seq_first <= $3 ORDER BY seq_last LIMIT $4
    """
    STATS = """
        SELECT t.total_logs, t.first_ts, t.last_ts, t.updated_at, c.source, c.level, c.n
        FROM keruta_tasks t LEFT JOIN keruta_counts c ON c.task_id = t.task_id
        WHERE t.task_id = $1
    """
    LOCK_TASK = "SELECT 1 FROM keruta_tasks WHERE task_id = $1 FOR UPDATE"
    CHUNKS_BEFORE = f"""
        SELECT {CHUNK_FULL} FROM keruta_chunks WHERE task_id = $1 AND ts_first < $2 ORDER BY seq_last LIMIT $3
    """
    DELETE_CHUNK = "DELETE FROM keruta_chunks WHERE task_id = $1 AND seq_last = $2 RETURNING bytes"
    REPLACE_CHUNK = """
        UPDATE keruta_chunks SET seq_first = $2, seq_last = $3, n = $4, ts_first = $5, ts_last = $6,
            tally = $7, lines = $8, body = $9, bytes = $11
        WHERE task_id = $1 AND seq_last = $10
    """
    CHUNK_BYTES = "SELECT bytes FROM keruta_chunks WHERE task_id = $1 AND seq_last = $2"
    ADD_STORED_BYTES = "UPDATE keruta_tasks SET stored_bytes = GREATEST(stored_bytes + $1, 0) WHERE task_id = $2"
    SUBTRACT_COUNTS = "UPDATE keruta_counts SET n = n - $1 WHERE task_id = $2 AND source = $3 AND level = $4"
    DROP_EMPTY_COUNTS = "DELETE FROM keruta_counts WHERE task_id = $1 AND n <= 0"
    PRUNE_RANGES = """
        DELETE FROM keruta_producer_ranges WHERE task_id = $1
        AND seq_first + (pseq_last - pseq_first) < coalesce(
            (SELECT seq_first FROM keruta_chunks WHERE task_id = $1 ORDER BY seq_last LIMIT 1),
            9223372036854775807)
    """
    AFTER_DELETE = """
        UPDATE keruta_tasks SET
            total_logs = GREATEST(total_logs - $1, 0),
            first_ts = (SELECT min(ts_first) FROM keruta_chunks WHERE task_id = $3),
            last_ts = (SELECT max(ts_last) FROM keruta_chunks WHERE task_id = $3),
            updated_at = $2
        WHERE task_id = $3
    """
    PRUNE_IDLE_RANGES = """
        DELETE FROM keruta_producer_ranges WHERE (task_id, producer) IN (
            SELECT task_id, producer FROM keruta_producers
            WHERE last_write < $1 AND coalesce(state, 'succeeded') NOT IN ('pending', 'running'))
    """
    PRUNE_IDLE_PRODUCERS = """
        DELETE FROM keruta_producers
        WHERE last_write < $1 AND coalesce(state, 'succeeded') NOT IN ('pending', 'running') RETURNING 1
    """
    OLD_TASKS = "SELECT task_id FROM keruta_tasks WHERE first_ts < $1 ORDER BY task_id"
    TASK_MAX_SEQ = "SELECT max_seq FROM keruta_tasks WHERE task_id = $1"
    SECTION_OPEN = """
        INSERT INTO keruta_sections (task_id, start_seq, name, title, style, collapsed, started_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (task_id, start_seq) DO NOTHING
    """
    SECTION_CLOSE = """
        UPDATE keruta_sections SET end_seq = $3, ended_at = $4
        WHERE task_id = $1 AND start_seq = (
            SELECT max(start_seq) FROM keruta_sections
            WHERE task_id = $1 AND end_seq IS NULL AND start_seq < $3 AND ($2::text IS NULL OR name = $2))
    """
    SECTIONS = f"""
        SELECT {SECTION_ROW} FROM keruta_sections WHERE task_id = $1 AND start_seq > $2 ORDER BY start_seq LIMIT $3
    """
    SECTIONS_DROP = "DELETE FROM keruta_sections WHERE task_id = $1 AND start_seq BETWEEN $2 AND $3"
    LOCK_TASK_STATE = "SELECT state FROM keruta_tasks WHERE task_id = $1 FOR UPDATE"
    CAP_STATE = "SELECT stored_bytes, max_bytes, cap_gap_seq FROM keruta_tasks WHERE task_id = $1 FOR UPDATE"
    OVER_CAP = """
        SELECT task_id FROM keruta_tasks
        WHERE stored_bytes > LEAST(COALESCE(max_bytes, $1::bigint), COALESCE($2::bigint, max_bytes)) LIMIT $3"""
    CHUNK_BYTES_AFTER = """
        SELECT seq_first, seq_last, bytes FROM keruta_chunks WHERE task_id = $1 AND seq_last > $2
        ORDER BY seq_last LIMIT $3
    """
    RANGES_FOR_SEQS = """
        SELECT producer, pseq_first, pseq_last, seq_first FROM keruta_producer_ranges
        WHERE task_id = $1 AND seq_first <= $3 AND seq_first + (pseq_last - pseq_first) >= $2
    """
    ADD_COUNTS = """
        INSERT INTO keruta_counts (task_id, source, level, n) VALUES ($1, $2, $3, $4)
        ON CONFLICT (task_id, source, level) DO UPDATE SET n = keruta_counts.n + excluded.n
    """
    AFTER_TRIM = """
        UPDATE keruta_tasks SET total_logs = GREATEST(total_logs - $1 + $2, 0), cap_gap_seq = $3, updated_at = $4
        WHERE task_id = $5
    """
    SET_MAX_BYTES = """
        UPDATE keruta_tasks SET max_bytes = LEAST(coalesce(max_bytes, $1), $1) WHERE task_id = $2
    """

    in_chunk = 1 << 30  # one array parameter, whatever its length
    delete_chunks = 50

    def __init__(self, notify: bool, origin: str) -> None:
        super().__init__()
        self.notify = notify
        self.origin = origin

    def lock_tasks(self, task_ids: Sequence[str], skip_locked: bool = False) -> Op:
        return self.fetch(
            _LOCK_TASKS_SKIPPING if skip_locked else _LOCK_TASKS,
            list(task_ids),
        )

    def lock_wait(self, seconds: float | None) -> Op | None:
        if seconds is None:
            return self.exec("SET LOCAL lock_timeout TO DEFAULT")
        # SET takes no parameters; a whole number of milliseconds, never 0 (no limit).
        return self.exec(f"SET LOCAL lock_timeout = {max(1, round(seconds * 1000))}")

    def existing_tasks(self, task_ids: Sequence[str]) -> Op:
        return self.fetch("SELECT task_id FROM keruta_tasks WHERE task_id = ANY($1::text[])", list(task_ids))

    def create_tasks(self, task_ids: list[str], now: str) -> Op | None:
        return self.exec(
            """
            INSERT INTO keruta_tasks (task_id, state, updated_at)
            SELECT t, 'running', $1 FROM unnest($2::text[]) AS t ORDER BY t
            ON CONFLICT (task_id) DO NOTHING
            """,
            now,
            task_ids,
        )

    def producer_highs(self, keys: Sequence[tuple[str, str]]) -> Op:
        return self.fetch(
            """
            SELECT p.task_id, p.producer, p.high, r.pseq_first, r.seq_first FROM keruta_producers p
            JOIN unnest($1::text[], $2::text[]) AS k(task_id, producer) USING (task_id, producer)
            LEFT JOIN LATERAL (
                SELECT pseq_first, pseq_last, seq_first FROM keruta_producer_ranges
                WHERE task_id = p.task_id AND producer = p.producer
                ORDER BY pseq_first DESC LIMIT 1
            ) r ON r.pseq_last = p.high
            """,
            [task_id for task_id, _ in keys],
            [producer for _, producer in keys],
        )

    def insert_chunks(self, rows: list[ChunkRow]) -> Op:
        # Plain INSERT: the seqs were given under the tasks' row locks, so a
        # conflict would be a bug, and rolls everything back.
        columns = list(zip(*(r.values() for r in rows), strict=True))
        return self.exec(
            """
            INSERT INTO keruta_chunks (task_id, seq_first, seq_last, n, ts_first, ts_last, tally, lines, body, bytes)
            SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::integer[], $5::text[],
                                 $6::text[], $7::text[], $8::bytea[], $9::bytea[], $10::bigint[])
            """,
            *[list(c) for c in columns],
            [r.bytes for r in rows],
        )

    def save_append(
        self,
        rows: list[ChunkRow],
        tasks: Sequence[TaskSave],
        producers: tuple[list[HighMark], list[NewRange], list[ExtendedRange]],
        now: str,
    ) -> Steps[None]:
        """One statement, one round trip, for all of it: the chunks; the task
        rows (they exist: `create_tasks` made them before the lock), their
        counts and the NOTIFY of each moved watermark; the producers' marks,
        new ranges and stored ranges extended. Each part writes rows no other
        part does."""
        highs, ranges, extended = producers
        if not (rows or tasks or highs):
            return
        counts = [(task_id, s, lv, n) for task_id, t, _ in tasks for (s, lv), n in t.counts.items()]
        yield self.exec(
            """
            WITH chunks AS (
                INSERT INTO keruta_chunks
                    (task_id, seq_first, seq_last, n, ts_first, ts_last, tally, lines, body, bytes)
                SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::integer[], $5::text[],
                                     $6::text[], $7::text[], $8::bytea[], $9::bytea[], $10::bigint[])
            ), task AS (
                UPDATE keruta_tasks t SET
                    max_seq = GREATEST(t.max_seq, u.max_seq),
                    durable_seq = u.durable_seq,
                    total_logs = t.total_logs + u.n,
                    stored_bytes = t.stored_bytes + u.bytes,
                    first_ts = LEAST(t.first_ts, u.first_ts),
                    last_ts = GREATEST(t.last_ts, u.last_ts),
                    updated_at = $18
                FROM unnest($11::text[], $12::bigint[], $13::bigint[], $14::bigint[], $15::text[], $16::text[],
                            $17::bigint[]) AS u(task_id, max_seq, durable_seq, n, first_ts, last_ts, bytes)
                WHERE t.task_id = u.task_id
            ), counts AS (
                INSERT INTO keruta_counts (task_id, source, level, n)
                SELECT * FROM unnest($19::text[], $20::text[], $21::text[], $22::bigint[])
                ON CONFLICT (task_id, source, level) DO UPDATE SET n = keruta_counts.n + excluded.n
            ), saved AS (
                INSERT INTO keruta_producers (task_id, producer, run_no, high, last_write)
                SELECT task_id, producer, 0, high, last_write
                FROM unnest($23::text[], $24::text[], $25::bigint[], $26::text[])
                    AS h(task_id, producer, high, last_write)
                ON CONFLICT (task_id, producer) DO UPDATE SET high = excluded.high, last_write = excluded.last_write
            ), ranges AS (
                INSERT INTO keruta_producer_ranges (task_id, producer, pseq_first, pseq_last, seq_first)
                SELECT * FROM unnest($27::text[], $28::text[], $29::bigint[], $30::bigint[], $31::bigint[])
            ), extended AS (
                UPDATE keruta_producer_ranges r SET pseq_last = e.pseq_last
                FROM unnest($32::bigint[], $33::text[], $34::text[], $35::bigint[])
                    AS e(pseq_last, task_id, producer, pseq_first)
                WHERE r.task_id = e.task_id AND r.producer = e.producer AND r.pseq_first = e.pseq_first
            )
            SELECT pg_notify($36, m) FROM unnest($37::text[]) AS m
            """,
            *_columns([r.values() for r in rows], 9),
            [r.bytes for r in rows],
            [task_id for task_id, _, _ in tasks],
            [t.inserted_max for _, t, _ in tasks],
            [t.durable_seq for _, t, _ in tasks],
            [t.count for _, t, _ in tasks],
            [t.first_ts for _, t, _ in tasks],
            [t.last_ts for _, t, _ in tasks],
            [t.bytes for _, t, _ in tasks],
            now,
            *_columns(counts, 4),
            *_columns(highs, 4),
            *_columns(ranges, 5),
            *_columns(extended, 4),
            NOTIFY_CHANNEL,
            [f"{task_id} {t.durable_seq} {self.origin}" for task_id, t, moved in tasks if moved] if self.notify else [],
        )

    def section_errors(self, task_id: str, runs: Sequence[tuple[int, int]]) -> Op:
        return self.exec(
            """
            UPDATE keruta_sections SET errors = errors + (
                SELECT coalesce(sum(r.n), 0) FROM unnest($2::bigint[], $3::bigint[]) AS r(s, n) WHERE r.s > start_seq)
            WHERE task_id = $1 AND end_seq IS NULL AND start_seq < $4
            """,
            task_id, [s for s, _ in runs], [n for _, n in runs], max(s for s, _ in runs),
        )

    def notice(self, task_id: str, seq: int) -> Op | None:
        if not self.notify:
            return None
        return self.exec("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, f"{task_id} {seq} {self.origin}")


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as the arrays `unnest` takes, one per column."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]
