"""The SQLite schema and its migrations (`PRAGMA user_version` counts them)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import orjson

from hub.store.base import StoreRefused
from hub.store.chunk import lines_json, message_bytes
from hub.store.to_chunks import OLD_COLUMNS, chunks_from_rows

SCHEMA_VERSION = 7

_SCHEMA_V1 = (
    """
    CREATE TABLE IF NOT EXISTS logs (
        task_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        ts TEXT NOT NULL,
        source TEXT NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        line_number INTEGER,
        metadata TEXT,
        partial INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, seq)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS logs_task_ts ON logs (task_id, ts)",
    "CREATE INDEX IF NOT EXISTS logs_task_level ON logs (task_id, level, seq)",
    "CREATE INDEX IF NOT EXISTS logs_task_source ON logs (task_id, source, seq)",
    """
    CREATE TABLE IF NOT EXISTS tasks (
        task_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        exit_code INTEGER,
        durable_seq INTEGER NOT NULL DEFAULT 0,
        max_seq INTEGER NOT NULL DEFAULT 0,
        first_ts TEXT,
        last_ts TEXT,
        total_logs INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS counts (
        task_id TEXT NOT NULL,
        source TEXT NOT NULL,
        level TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (task_id, source, level)
    ) WITHOUT ROWID
    """,
)
# Producers (docs/identity.md): one row per run of an agent, with the highest of
# its own seqs stored and its state; `producer_ranges` maps its seqs to task seqs
# (one row per run of consecutive seqs, so a few rows per batch at most).
_SCHEMA_V2 = (
    "ALTER TABLE tasks ADD COLUMN run_no INTEGER NOT NULL DEFAULT 0",
    """
    CREATE TABLE IF NOT EXISTS producers (
        task_id TEXT NOT NULL,
        producer TEXT NOT NULL,
        run_no INTEGER NOT NULL,
        high INTEGER NOT NULL DEFAULT 0,
        state TEXT,
        exit_code INTEGER,
        PRIMARY KEY (task_id, producer)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS producer_ranges (
        task_id TEXT NOT NULL,
        producer TEXT NOT NULL,
        pseq_first INTEGER NOT NULL,
        pseq_last INTEGER NOT NULL,
        seq_first INTEGER NOT NULL,
        PRIMARY KEY (task_id, producer, pseq_first)
    ) WITHOUT ROWID
    """,
)
# One identity rule (docs/identity.md): the hub gives every task seq, so a
# task's seqs have no holes and its watermark is its highest; a run is
# numbered from the task's own counter (`runs`), not by scanning its
# producers; `last_write` lets retention prune what identity keeps. And a
# record's kind (keruta.records.KINDS), NULL for a line.
_SCHEMA_V3 = (
    "ALTER TABLE tasks ADD COLUMN runs INTEGER NOT NULL DEFAULT 0",
    "UPDATE tasks SET runs = (SELECT coalesce(max(run_no), 0) FROM producers p WHERE p.task_id = tasks.task_id)",
    "UPDATE tasks SET durable_seq = max_seq",
    "ALTER TABLE producers ADD COLUMN last_write TEXT",
    "UPDATE producers SET last_write = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
    "CREATE INDEX IF NOT EXISTS producers_last_write ON producers (last_write)",
    "ALTER TABLE logs ADD COLUMN kind TEXT",
)


def _logs_to_chunks(conn: sqlite3.Connection) -> None:
    cursor = conn.execute(f"SELECT {OLD_COLUMNS} FROM logs ORDER BY task_id, seq")
    rows = iter(lambda: cursor.fetchmany(5000), [])
    conn.executemany(
        "INSERT INTO keruta_chunks (task_id, seq_first, seq_last, n, ts_first, ts_last, tally, lines, body)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (c.values() for c in chunks_from_rows(row for batch in rows for row in batch)),
    )


# Chunked storage (hub/store/chunk.py): a task's records in chunks of up to
# 500, one row each, instead of a row per line with three indexes; and every
# table named as in PostgreSQL.
_SCHEMA_V4: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    """
    CREATE TABLE keruta_chunks (
        task_id TEXT NOT NULL,
        seq_first INTEGER NOT NULL,
        seq_last INTEGER NOT NULL,
        n INTEGER NOT NULL,
        ts_first TEXT NOT NULL,
        ts_last TEXT NOT NULL,
        tally TEXT NOT NULL,
        lines BLOB NOT NULL,
        body BLOB NOT NULL
    )
    """,
    # A rowid table, the key an index: the bodies are kilobytes, and a
    # WITHOUT ROWID table's b-tree is for small rows.
    "CREATE UNIQUE INDEX keruta_chunks_seq ON keruta_chunks (task_id, seq_last)",
    _logs_to_chunks,
    "DROP TABLE logs",
    "ALTER TABLE tasks RENAME TO keruta_tasks",
    "ALTER TABLE counts RENAME TO keruta_counts",
    "ALTER TABLE producers RENAME TO keruta_producers",
    "ALTER TABLE producer_ranges RENAME TO keruta_producer_ranges",
)
# Sections (hub/store/sections.py): a row per section a task's records open,
# written with them, so listing them opens no chunk. Records stored before
# have no sections: no agent sent section records then.
_SCHEMA_V5 = (
    """
    CREATE TABLE keruta_sections (
        task_id TEXT NOT NULL,
        start_seq INTEGER NOT NULL,
        end_seq INTEGER,
        name TEXT NOT NULL,
        title TEXT NOT NULL,
        style TEXT,
        collapsed INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        errors INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, start_seq)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX keruta_sections_open ON keruta_sections (task_id, start_seq) WHERE end_seq IS NULL",
)
# Logs you can verify (hub/store/verify.py): the summary a run's final status
# carried, and the task's verdict as last computed.
_SCHEMA_V6 = (
    "ALTER TABLE keruta_producers ADD COLUMN summary TEXT",
    "ALTER TABLE keruta_tasks ADD COLUMN verdict TEXT",
)


def _count_chunk_bytes(conn: sqlite3.Connection) -> None:
    cursor = conn.execute("SELECT task_id, seq_last, lines FROM keruta_chunks")
    updates = (
        (message_bytes(orjson.loads(lines_json(lines))["m"]), task_id, seq_last)
        for task_id, seq_last, lines in iter(cursor.fetchone, None)
    )
    conn.executemany("UPDATE keruta_chunks SET bytes = ? WHERE task_id = ? AND seq_last = ?", list(updates))
    conn.execute(
        "UPDATE keruta_tasks SET stored_bytes ="
        " (SELECT coalesce(sum(bytes), 0) FROM keruta_chunks c WHERE c.task_id = keruta_tasks.task_id)"
    )


# Caps and redaction: the UTF-8 bytes of each chunk's messages and of each
# task's stored records (what a cap counts), the cap an agent asked for
# (--max-bytes), and the seq of the task's cap gap record (docs/identity.md).
_SCHEMA_V7: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    "ALTER TABLE keruta_chunks ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE keruta_tasks ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE keruta_tasks ADD COLUMN max_bytes INTEGER",
    "ALTER TABLE keruta_tasks ADD COLUMN cap_gap_seq INTEGER",
    _count_chunk_bytes,
)
_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3, 4: _SCHEMA_V4, 5: _SCHEMA_V5, 6: _SCHEMA_V6, 7: _SCHEMA_V7}


def create_schema(conn: sqlite3.Connection) -> None:
    """Create or migrate the schema; run inside a write transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreRefused(
            f"the database has schema version {version}; this hub knows up to {SCHEMA_VERSION}"
        )
    layout = _layout(conn) if version == 0 else None
    if layout:
        # Tables, but no version: a `.dump` (or iterdump) restored, which
        # keeps no PRAGMA user_version. Taken as this version when its tables
        # are exactly this version's; no older layout is guessed at.
        if layout != _current_layout():
            raise StoreRefused(
                "the database holds tables but no schema version (PRAGMA user_version 0: restored from a "
                f".dump?), and they are not those of this hub's version {SCHEMA_VERSION}: set PRAGMA "
                "user_version to the version of the hub that made it, and start again"
            )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in _MIGRATIONS[step]:
            if callable(statement):
                statement(conn)
            else:
                conn.execute(statement)
    if version < SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _layout(conn: sqlite3.Connection) -> set[tuple[str, str, str, str]]:
    """Every table's and index's columns: (kind, table, name, column)."""
    return set(
        conn.execute(
            "SELECT m.type, m.tbl_name, m.name, coalesce(c.name, '') FROM sqlite_master m"
            " LEFT JOIN pragma_index_info(m.name) c ON m.type = 'index'"
            " WHERE m.name NOT LIKE 'sqlite_%' AND m.type IN ('table', 'index')"
            " UNION ALL SELECT 'column', m.name, c.name, c.type FROM sqlite_master m JOIN pragma_table_info(m.name) c"
            " WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'"
        ).fetchall()
    )


def _current_layout() -> set[tuple[str, str, str, str]]:
    """What `create_schema` makes of an empty database."""
    fresh = sqlite3.connect(":memory:", isolation_level=None)
    try:
        create_schema(fresh)
        return _layout(fresh)
    finally:
        fresh.close()
