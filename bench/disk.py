"""What a store's database takes on disk, measured from outside the store.

Only files and catalog views, never the store's tables or SQL, so it measures
whatever layout the store has. Call it after the store closed.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from typing import Any


def sqlite_path(url: str) -> str:
    """The file of a sqlite:///PATH URL (sqlite:////abs.db is absolute)."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a SQLite URL: {url!r}")
    return url[len("sqlite:///") :].split("?", 1)[0]


def sqlite_bytes(url: str) -> dict[str, Any]:
    """The database file plus its WAL after a TRUNCATE checkpoint (which moves
    every committed page into the file and empties the WAL)."""
    path = sqlite_path(url)
    conn = sqlite3.connect(path)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    if busy:
        raise RuntimeError("wal_checkpoint(TRUNCATE) was blocked: is a store still open?")
    db = os.path.getsize(path)
    wal = os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
    return {"bytes": db + wal, "db": db, "wal": wal}


# Every ordinary table of the database whose name starts with "keruta" (its
# indexes, TOAST, free-space and visibility maps included); and, to be sure
# nothing is missed, the same total over every other user table.
_PG_SIZES = """
SELECT coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname LIKE 'keruta%'), 0),
       coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname NOT LIKE 'keruta%'), 0),
       string_agg(c.relname, ',' ORDER BY c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%'
"""


def psql_rows(dsn: str, sql: str, timeout: float = 60.0) -> list[list[str]]:
    r = subprocess.run(
        ["psql", dsn, "-v", "ON_ERROR_STOP=1", "-qAt", "-F", "\t", "-c", sql],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0:
        raise RuntimeError(f"psql: {r.stderr.strip()[:200]}")
    return [line.split("\t") for line in r.stdout.splitlines() if line]


def pg_bytes(dsn: str, timeout: float = 1800.0, full: bool = False) -> dict[str, Any]:
    """`VACUUM ANALYZE` (the state autovacuum would leave), then the sizes;
    `full`: `VACUUM FULL` first (the live rows alone, dead ones' space given back)."""
    if full:
        psql_rows(dsn, "VACUUM FULL", timeout)
    psql_rows(dsn, "VACUUM ANALYZE", timeout)
    ((keruta, other, names),) = psql_rows(dsn, _PG_SIZES, timeout)
    return {"bytes": int(keruta), "other_tables_bytes": int(other), "tables": names}
