"""PostgreSQL's SQL for the store algorithms (hub/store/core.py).

Where the text differs only in spelling the templates are shared; here are
the steps PostgreSQL does in fewer round trips: inserting a batch (COPY or
unnest, reporting exactly the rows inserted), and the task row, its counts and
the NOTIFY of a moved watermark in one statement.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

import attrs

from hub.store.base import Incoming
from hub.store.pg_notices import NOTIFY_CHANNEL
from hub.store.pg_schema import STAGE_TABLE
from hub.store.rows import LOG_SELECT, log_values
from hub.store.rules import TaskProgress
from hub.store.steps import COPY, Dialect, Op, Steps
from keruta.records import LogRecord

_MARK = re.compile(r"\?")


class PostgresDialect(Dialect):
    """`insert_method`: see PostgresStore. `origin` names the store in its notices."""

    names = {
        "logs": "keruta_logs",
        "tasks": "keruta_tasks",
        "counts": "keruta_counts",
        "producers": "keruta_producers",
        "ranges": "keruta_producer_ranges",
        "greatest": "GREATEST",
        "contains": "strpos",
        # Several hubs may share the database: an append or a delete holds
        # its tasks' rows (taken in task_id order) until it commits.
        "lock": " FOR UPDATE",
    }
    in_chunk = 1 << 30  # one array parameter, whatever its length
    delete_chunk = 5000
    delete_returning = (
        "WITH gone AS ({delete} RETURNING source, level) SELECT source, level, count(*) FROM gone GROUP BY source, level"
    )
    COPY_FROM = 200

    def __init__(self, insert_method: str, notify: bool, origin: str) -> None:
        super().__init__()
        self.insert_method = insert_method
        self.notify = notify
        self.origin = origin

    def number(self, sql: str) -> str:
        counter = itertools.count(1)
        return _MARK.sub(lambda _: f"${next(counter)}", sql)

    def in_list(self, column: str, values: Sequence[Any], cast: str) -> tuple[str, list[Any]]:
        return f"{column} = ANY(?::{cast}[])", [list(values)]

    def text(self, value: str) -> str:
        # PostgreSQL text cannot hold NUL; stored lines have U+FFFD instead.
        return value.replace("\x00", "\ufffd")

    def storable(self, item: Incoming) -> Incoming:
        # A line may hold NUL (binary output): it becomes U+FFFD, like
        # undecodable bytes, so the line is stored instead of poisoning its
        # batch; the returned records show what was stored.
        if "\x00" in item.message:
            return attrs.evolve(item, message=self.text(item.message))
        return item

    def create_tasks(self, task_ids: list[str], now: str) -> Op | None:
        return self.exec(
            """
            INSERT INTO {tasks} (task_id, state, updated_at)
            SELECT t, 'running', ? FROM unnest(?::text[]) AS t ORDER BY t
            ON CONFLICT (task_id) DO NOTHING
            """,
            now,
            task_ids,
        )

    def insert(self, records: list[LogRecord]) -> Steps[list[LogRecord]]:
        """Every way reports exactly the rows it inserted (ON CONFLICT DO NOTHING RETURNING)."""
        rows = [log_values(r, r.partial) for r in records]
        method = self.insert_method
        if method == "copy" or (method == "auto" and len(records) >= self.COPY_FROM):
            yield Op(COPY, STAGE_TABLE, rows)
            keys = yield self.fetch(
                f"""
                INSERT INTO {{logs}} ({LOG_SELECT}) SELECT {LOG_SELECT} FROM {STAGE_TABLE}
                ON CONFLICT (task_id, seq) DO NOTHING RETURNING task_id, seq
                """
            )
        else:
            keys = yield self.fetch(
                f"""
                INSERT INTO {{logs}} ({LOG_SELECT})
                SELECT * FROM unnest(?::text[], ?::bigint[], ?::text[], ?::text[], ?::text[],
                                     ?::text[], ?::text[], ?::bigint[], ?::text[], ?::boolean[],
                                     ?::text[])
                ON CONFLICT (task_id, seq) DO NOTHING RETURNING task_id, seq
                """,
                *[list(column) for column in zip(*rows, strict=True)],
            )
        if len(keys) == len(records):
            return records
        stored = {(k[0], k[1]) for k in keys}
        return [r for r in records if (r.task_id, r.seq) in stored]

    def save_task(self, task_id: str, task: TaskProgress, now: str, moved: bool) -> Steps[None]:
        """The task row, its counts and (when the watermark moved) the NOTIFY, in one round trip.
        The row exists: `create_tasks` made it before the lock."""
        counts = list(task.counts.items())
        yield self.exec(
            """
            WITH task AS (
                UPDATE {tasks} SET
                    max_seq = GREATEST(max_seq, $2),
                    durable_seq = $3,
                    total_logs = total_logs + $4,
                    first_ts = LEAST(first_ts, $5),
                    last_ts = GREATEST(last_ts, $6),
                    updated_at = $7
                WHERE task_id = $1
            ), counts AS (
                INSERT INTO {counts} (task_id, source, level, n)
                SELECT $1, s, l, c FROM unnest($8::text[], $9::text[], $10::bigint[]) AS x(s, l, c)
                ON CONFLICT (task_id, source, level) DO UPDATE SET n = {counts}.n + excluded.n
            )
            SELECT CASE WHEN $11 THEN pg_notify($12, $1 || ' ' || $3::text || ' ' || $13) END
            """,
            task_id,
            task.inserted_max,
            task.durable_seq,
            task.count,
            task.first_ts,
            task.last_ts,
            now,
            [s for (s, _), _ in counts],
            [lv for (_, lv), _ in counts],
            [n for _, n in counts],
            self.notify and moved,
            NOTIFY_CHANNEL,
            self.origin,
        )

    def notice(self, task_id: str, seq: int) -> Op | None:
        if not self.notify:
            return None
        return self.exec("SELECT pg_notify(?, ?)", NOTIFY_CHANNEL, f"{task_id} {seq} {self.origin}")

