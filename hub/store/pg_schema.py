"""The PostgreSQL schema, its migrations, and the connection setup they need.

Text columns that are compared or ordered use COLLATE "C": canonical
timestamps order as strings, and task ids order byte-wise as in SQLite.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from hub.store.base import StoreRefused
from hub.store.chunk import lines_json, message_bytes
from hub.store.to_chunks import OLD_COLUMNS, chunks_from_rows

SCHEMA_VERSION = 7
# pg_advisory_xact_lock key for schema changes ("keruta" in ASCII).
_SCHEMA_LOCK = 0x6B6572757461

_SCHEMA_V1 = (
    """
    CREATE TABLE IF NOT EXISTS keruta_logs (
        task_id text COLLATE "C" NOT NULL,
        seq bigint NOT NULL,
        id text NOT NULL,
        ts text COLLATE "C" NOT NULL,
        source text NOT NULL,
        level text NOT NULL,
        message text NOT NULL,
        line_number bigint,
        metadata text,
        partial boolean NOT NULL DEFAULT false,
        PRIMARY KEY (task_id, seq)
    )
    """,
    "CREATE INDEX IF NOT EXISTS keruta_logs_task_ts ON keruta_logs (task_id, ts)",
    "CREATE INDEX IF NOT EXISTS keruta_logs_task_level ON keruta_logs (task_id, level, seq)",
    "CREATE INDEX IF NOT EXISTS keruta_logs_task_source ON keruta_logs (task_id, source, seq)",
    """
    CREATE TABLE IF NOT EXISTS keruta_tasks (
        task_id text COLLATE "C" PRIMARY KEY,
        state text NOT NULL,
        exit_code integer,
        durable_seq bigint NOT NULL DEFAULT 0,
        max_seq bigint NOT NULL DEFAULT 0,
        first_ts text COLLATE "C",
        last_ts text COLLATE "C",
        total_logs bigint NOT NULL DEFAULT 0,
        updated_at text
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS keruta_counts (
        task_id text COLLATE "C" NOT NULL,
        source text NOT NULL,
        level text NOT NULL,
        n bigint NOT NULL,
        PRIMARY KEY (task_id, source, level)
    )
    """,
)
# Producers (docs/identity.md): one row per agent run, its highest own seq stored
# and its state; ranges map its seqs to task seqs.
_SCHEMA_V2 = (
    "ALTER TABLE keruta_tasks ADD COLUMN IF NOT EXISTS run_no bigint NOT NULL DEFAULT 0",
    """
    CREATE TABLE IF NOT EXISTS keruta_producers (
        task_id text COLLATE "C" NOT NULL,
        producer text COLLATE "C" NOT NULL,
        run_no bigint NOT NULL,
        high bigint NOT NULL DEFAULT 0,
        state text,
        exit_code integer,
        PRIMARY KEY (task_id, producer)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS keruta_producer_ranges (
        task_id text COLLATE "C" NOT NULL,
        producer text COLLATE "C" NOT NULL,
        pseq_first bigint NOT NULL,
        pseq_last bigint NOT NULL,
        seq_first bigint NOT NULL,
        PRIMARY KEY (task_id, producer, pseq_first)
    )
    """,
)
# One identity rule (docs/identity.md): the hub gives every task seq, so a
# task's seqs have no holes and its watermark is its highest; a run is
# numbered from the task's own counter (`runs`), not by scanning its
# producers; `last_write` lets retention prune what identity keeps. And a
# record's kind (keruta.records.KINDS), NULL for a line.
_SCHEMA_V3 = (
    "ALTER TABLE keruta_tasks ADD COLUMN IF NOT EXISTS runs bigint NOT NULL DEFAULT 0",
    """
    UPDATE keruta_tasks t SET runs = (SELECT coalesce(max(run_no), 0) FROM keruta_producers p
                                      WHERE p.task_id = t.task_id)
    """,
    "UPDATE keruta_tasks SET durable_seq = max_seq",
    'ALTER TABLE keruta_producers ADD COLUMN IF NOT EXISTS last_write text COLLATE "C"',
    """
    UPDATE keruta_producers
    SET last_write = to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    """,
    "CREATE INDEX IF NOT EXISTS keruta_producers_last_write ON keruta_producers (last_write)",
    "ALTER TABLE keruta_logs ADD COLUMN IF NOT EXISTS kind text",
)


async def _logs_to_chunks(conn: Any) -> None:
    after: tuple[str, int] = ("", 0)
    while True:
        rows = await conn.fetch(
            f"SELECT {OLD_COLUMNS} FROM keruta_logs WHERE (task_id, seq) > ($1, $2) ORDER BY task_id, seq LIMIT 20000",
            *after,
        )
        if not rows:
            return
        # Whole tasks per round where it can, so no chunk is cut at its end.
        if len(rows) == 20000 and rows[0][0] != rows[-1][0]:
            last_task = rows[-1][0]
            rows = [r for r in rows if r[0] != last_task]
        chunks = [c.values() for c in chunks_from_rows(rows)]
        await conn.executemany(
            "INSERT INTO keruta_chunks (task_id, seq_first, seq_last, n, ts_first, ts_last, tally, lines, body)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            chunks,
        )
        after = (rows[-1][0], rows[-1][1])


# Chunked storage (hub/store/chunk.py): a task's records in chunks of up to
# 500, one row each, instead of a row per line with three indexes.
_SCHEMA_V4: tuple[Any, ...] = (
    """
    CREATE TABLE keruta_chunks (
        task_id text COLLATE "C" NOT NULL,
        seq_first bigint NOT NULL,
        seq_last bigint NOT NULL,
        n integer NOT NULL,
        ts_first text COLLATE "C" NOT NULL,
        ts_last text COLLATE "C" NOT NULL,
        tally text NOT NULL,
        lines bytea NOT NULL,
        body bytea NOT NULL,
        PRIMARY KEY (task_id, seq_last)
    )
    """,
    # Both parts are compressed already: no second try at compressing them.
    "ALTER TABLE keruta_chunks ALTER COLUMN lines SET STORAGE EXTERNAL",
    "ALTER TABLE keruta_chunks ALTER COLUMN body SET STORAGE EXTERNAL",
    _logs_to_chunks,
    "DROP TABLE keruta_logs",
)
# Sections (hub/store/sections.py): a row per section a task's records open,
# written with them, so listing them opens no chunk. Records stored before
# have no sections: no agent sent section records then.
_SCHEMA_V5: tuple[Any, ...] = (
    """
    CREATE TABLE keruta_sections (
        task_id text COLLATE "C" NOT NULL,
        start_seq bigint NOT NULL,
        end_seq bigint,
        name text NOT NULL,
        title text NOT NULL,
        style text,
        collapsed boolean NOT NULL,
        started_at text COLLATE "C" NOT NULL,
        ended_at text COLLATE "C",
        errors bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, start_seq)
    )
    """,
    "CREATE INDEX keruta_sections_open ON keruta_sections (task_id, start_seq) WHERE end_seq IS NULL",
)
# Logs you can verify (hub/store/verify.py): the summary a run's final status
# carried, and the task's verdict as last computed.
_SCHEMA_V6: tuple[Any, ...] = (
    "ALTER TABLE keruta_producers ADD COLUMN IF NOT EXISTS summary text",
    "ALTER TABLE keruta_tasks ADD COLUMN IF NOT EXISTS verdict text",
)


async def _count_chunk_bytes(conn: Any) -> None:
    after: tuple[str, int] = ("", 0)
    while True:
        rows = await conn.fetch(
            "SELECT task_id, seq_last, lines FROM keruta_chunks WHERE (task_id, seq_last) > ($1, $2)"
            " ORDER BY task_id, seq_last LIMIT 1000",
            *after,
        )
        if not rows:
            break
        await conn.executemany(
            "UPDATE keruta_chunks SET bytes = $1 WHERE task_id = $2 AND seq_last = $3",
            [(message_bytes(orjson.loads(lines_json(r[2]))["m"]), r[0], r[1]) for r in rows],
        )
        after = (rows[-1][0], rows[-1][1])
    await conn.execute(
        "UPDATE keruta_tasks t SET stored_bytes ="
        " (SELECT coalesce(sum(bytes), 0) FROM keruta_chunks c WHERE c.task_id = t.task_id)"
    )


# Caps and redaction: the UTF-8 bytes of each chunk's messages and of each
# task's stored records (what a cap counts), the cap an agent asked for
# (--max-bytes), and the seq of the task's cap gap record (docs/identity.md).
_SCHEMA_V7: tuple[Any, ...] = (
    "ALTER TABLE keruta_chunks ADD COLUMN bytes bigint NOT NULL DEFAULT 0",
    "ALTER TABLE keruta_tasks ADD COLUMN stored_bytes bigint NOT NULL DEFAULT 0",
    "ALTER TABLE keruta_tasks ADD COLUMN max_bytes bigint",
    "ALTER TABLE keruta_tasks ADD COLUMN cap_gap_seq bigint",
    _count_chunk_bytes,
)
_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3, 4: _SCHEMA_V4, 5: _SCHEMA_V5, 6: _SCHEMA_V6, 7: _SCHEMA_V7}


def quote_ident(name: str) -> str:
    """`name` as a PostgreSQL identifier, for a setting's value (search_path)."""
    return '"' + name.replace('"', '""') + '"'


async def tables_schema(conn: Any) -> str:
    """The schema the hub's tables are in: the first of the session's
    search_path (the URL's, the role's or the database's). Refused if that
    names no schema, or if the tables are in another schema while this one
    has none: a search_path changed since, which would make a second, empty
    set of tables beside the first."""
    schema = await conn.fetchval("SELECT current_schema()")
    if schema is None:
        raise StoreRefused("the session's search_path names no schema that exists: the hub has nowhere to keep its tables")
    elsewhere = [
        row[0]
        for row in await conn.fetch(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'keruta_schema' ORDER BY 1"
        )
    ]
    if elsewhere and schema not in elsewhere:
        raise StoreRefused(
            f"keruta's tables are in schema {', '.join(elsewhere)}, but this session's search_path leads to "
            f"{schema} (was search_path changed?): name the schema in the URL (?search_path={elsewhere[0]}) "
            "or set it back"
        )
    return str(schema)


async def migrate(conn: Any) -> None:
    async with conn.transaction():
        # Two hubs starting at once: the second waits here, then finds the schema.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS keruta_schema (version integer NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM keruta_schema") or 0
        if version > SCHEMA_VERSION:
            raise StoreRefused(
                f"the database has schema version {version}; this hub knows up to {SCHEMA_VERSION}"
            )
        if 0 < version < SCHEMA_VERSION:
            await _hold_off_older_hubs(conn)
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                if callable(statement):
                    await statement(conn)
                else:
                    await conn.execute(statement)
        if version < SCHEMA_VERSION:
            await conn.execute("DELETE FROM keruta_schema")
            await conn.execute("INSERT INTO keruta_schema (version) VALUES ($1)", SCHEMA_VERSION)


async def keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset on release (asyncio side). asyncpg still rolls back an open
    transaction; its default reset would also run RESET ALL, UNLISTEN *, ... on
    every release, a round trip per call for session state we never change
    (LISTEN has its own connection)."""


async def _hold_off_older_hubs(conn: Any) -> None:
    """Hubs of the older version may still be writing (a rolling upgrade):
    each of their commits would land in tables this migration has read
    already, and be dropped with them. Their tables are locked against
    writes (EXCLUSIVE: plain reads go on) until the migration commits; the
    task table first, as their appends lock it first, so a commit under way
    finishes before the migration reads anything, and the next waits, then
    fails against the new schema without being acknowledged."""
    present = {
        row[0] for row in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    }
    for table, lock in _OLDER_HUBS_TABLES:
        if table in present:
            await conn.execute(lock)


# Every table a hub of an older version writes, the task table first.
_OLDER_HUBS_TABLES = tuple(
    (table, f"LOCK TABLE {table} IN EXCLUSIVE MODE")
    for table in (
        "keruta_tasks", "keruta_logs", "keruta_chunks", "keruta_counts", "keruta_producers",
        "keruta_producer_ranges", "keruta_sections",
    )
)
