"""Stores behind one interface: SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from hub.store.base import (
    AppendResult,
    Incoming,
    LogQuery,
    LogStats,
    Page,
    Store,
    StoreUnavailable,
)


def open_store_from_url(url: str, *, db_timeout: float = 30.0, db_ping_interval: float = 15.0) -> Store:
    """Build (not yet open) the store a `--db` URL names; the PostgreSQL store
    takes the hub's --db-timeout and --db-ping-interval."""
    if url.startswith("sqlite://"):
        from hub.store.sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if url.startswith(("postgresql://", "postgres://")):
        from hub.store.postgres import PostgresStore

        return PostgresStore(
            url,
            command_timeout=db_timeout,
            connect_timeout=min(PostgresStore.CONNECT_TIMEOUT, db_timeout),
            ping_interval=db_ping_interval,
        )
    raise ValueError(
        f"unsupported --db URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
    )


__all__ = [
    "AppendResult",
    "Incoming",
    "LogQuery",
    "LogStats",
    "Page",
    "Store",
    "StoreUnavailable",
    "open_store_from_url",
]
