"""How the store algorithms talk to a database without doing I/O.

An algorithm (hub/store/core.py) is a generator: it yields an `Op` -- SQL and
its arguments -- and is sent the answer. A driver runs it: SQLite's runs the
whole generator in one worker thread (one thread hop per transaction),
PostgreSQL's awaits each op on a triopg connection. A `Dialect` turns SQL
templates into its database's text and holds the few steps whose SQL differs
in shape, not just in spelling.

Templates name tables `{logs}`, `{tasks}`, `{counts}`, `{producers}`,
`{ranges}` and write parameters as `?`; `{greatest}`, `{contains}` and
`{lock}` stand for what the two databases spell differently.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, NamedTuple, TypeVar

from hub.store.base import Incoming
from hub.store.rows import LOG_COLUMNS, LOG_SELECT, log_values
from hub.store.rules import TaskProgress
from keruta.records import LogRecord

T = TypeVar("T")

FETCH = "fetch"  # -> list of rows
ROW = "row"  # -> one row or None
EXEC = "exec"  # -> nothing useful
MANY = "many"  # args: a list of argument tuples -> nothing useful
COPY = "copy"  # PostgreSQL only: sql is the table, args the rows (LOG_COLUMNS)


class Op(NamedTuple):
    kind: str
    sql: str
    args: Sequence[Any]


Steps = Generator[Op, Any, T]


def drive_sync(steps: Steps[T], do: Callable[[Op], Any]) -> T:
    """Run an algorithm against a blocking driver."""
    answer = None
    try:
        while True:
            answer = do(steps.send(answer))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def drive(steps: Steps[T], do: Callable[[Op], Awaitable[Any]]) -> T:
    """Run an algorithm against an async driver."""
    answer = None
    try:
        while True:
            answer = await do(steps.send(answer))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


class Dialect:
    """One database's SQL text. The base spells SQLite."""

    names = {
        "logs": "logs",
        "tasks": "tasks",
        "counts": "counts",
        "producers": "producers",
        "ranges": "producer_ranges",
        "greatest": "max",
        "contains": "instr",
        "lock": "",
    }
    # Most values in one `IN (...)` (SQLite's host-parameter limit is 32766).
    in_chunk = 500
    # Rows deleted per transaction, so a big delete never holds the writer for long.
    delete_chunk = 2000
    # Wraps `DELETE ... WHERE ...` into a statement answering (source, level, n) rows.
    delete_returning = "{delete} RETURNING source, level, 1"

    def __init__(self) -> None:
        self._texts: dict[str, str] = {}

    def sql(self, template: str) -> str:
        text = self._texts.get(template)
        if text is None:
            text = self._texts[template] = self.number(template.format(**self.names))
        return text

    def number(self, sql: str) -> str:
        """Parameters as the driver wants them (SQLite takes `?` as it is)."""
        return sql

    def fetch(self, template: str, *args: Any) -> Op:
        return Op(FETCH, self.sql(template), args)

    def row(self, template: str, *args: Any) -> Op:
        return Op(ROW, self.sql(template), args)

    def exec(self, template: str, *args: Any) -> Op:
        return Op(EXEC, self.sql(template), args)

    def many(self, template: str, args: list[tuple[Any, ...]]) -> Op:
        return Op(MANY, self.sql(template), args)

    def in_list(self, column: str, values: Sequence[Any], cast: str) -> tuple[str, list[Any]]:
        """`column` is one of `values`: the SQL and its arguments."""
        return f"{column} IN ({','.join('?' * len(values))})", list(values)

    def text(self, value: str) -> str:
        """A string as the database can hold it."""
        return value

    def storable(self, item: Incoming) -> Incoming:
        """An incoming record as the database can hold it."""
        return item

    # -- the steps of an append whose SQL differs in shape ---------------------

    def create_tasks(self, task_ids: list[str], now: str) -> Op | None:
        """Create missing task rows before locking them (None: not needed)."""
        return None

    def insert(self, records: list[LogRecord]) -> Steps[list[LogRecord]]:
        """Insert records not stored yet; return the ones inserted."""
        # Plain INSERT: under BEGIN IMMEDIATE nobody else writes, so a conflict
        # here would be a bug, and rolls everything back.
        yield self.many(
            f"INSERT INTO {{logs}} ({LOG_SELECT}) VALUES ({','.join('?' * len(LOG_COLUMNS))})",
            [log_values(r, 1 if r.partial else 0) for r in records],
        )
        return records

    def save_task(self, task_id: str, task: TaskProgress, now: str, moved: bool) -> Steps[None]:
        """The task row and its counts after an append that stored records."""
        if task.exists:
            yield self.exec(
                """
                UPDATE {tasks} SET
                    max_seq = max(max_seq, ?),
                    durable_seq = ?,
                    total_logs = total_logs + ?,
                    first_ts = CASE WHEN first_ts IS NULL OR first_ts > ? THEN ? ELSE first_ts END,
                    last_ts = CASE WHEN last_ts IS NULL OR last_ts < ? THEN ? ELSE last_ts END,
                    updated_at = ?
                WHERE task_id = ?
                """,
                task.inserted_max,
                task.durable_seq,
                task.count,
                task.first_ts,
                task.first_ts,
                task.last_ts,
                task.last_ts,
                now,
                task_id,
            )
        else:
            yield self.exec(
                """
                INSERT INTO {tasks} (task_id, state, first_ts, last_ts, total_logs, durable_seq, updated_at, max_seq)
                VALUES (?, 'running', ?, ?, ?, ?, ?, ?)
                """,
                task_id,
                task.first_ts,
                task.last_ts,
                task.count,
                task.durable_seq,
                now,
                task.inserted_max,
            )
        yield self.many(
            """
            INSERT INTO {counts} (task_id, source, level, n) VALUES (?, ?, ?, ?)
            ON CONFLICT (task_id, source, level) DO UPDATE SET n = n + excluded.n
            """,
            [(task_id, s, lv, n) for (s, lv), n in task.counts.items()],
        )

    def notice(self, task_id: str, seq: int) -> Op | None:
        """Tell other hubs about a task (None: nobody to tell)."""
        return None
