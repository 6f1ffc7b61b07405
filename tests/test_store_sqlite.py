"""What only the SQLite store does: URLs, files, settings, schema version."""

from __future__ import annotations

import sqlite3

import pytest

from hub.store.base import StoreUnavailable
from hub.store.sqlite import SQLiteStore
from tests.storedata import rec


def test_sqlite_url_forms(tmp_path):
    assert SQLiteStore.from_url("sqlite:///keruta.db").path == "keruta.db"
    assert SQLiteStore.from_url("sqlite:///data/k.db").path == "data/k.db"
    assert SQLiteStore.from_url(f"sqlite:///{tmp_path}/k.db").path == f"{tmp_path}/k.db"
    assert SQLiteStore.from_url("sqlite:////var/lib/k.db").path == "/var/lib/k.db"
    for bad in ("sqlite:///:memory:", "sqlite://", "sqlite:///", "sqlite://host/x.db"):
        with pytest.raises(ValueError):
            SQLiteStore.from_url(bad)


async def test_sqlite_creates_missing_directories(tmp_path):
    store = SQLiteStore.from_url(f"sqlite:///{tmp_path}/a/b/k.db")
    await store.open()
    try:
        await store.append([rec(1)])
    finally:
        await store.close()
    assert (tmp_path / "a" / "b" / "k.db").exists()


async def test_sqlite_unopenable_file_is_store_unavailable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreUnavailable):
        await SQLiteStore(tmp_path / "file" / "k.db").open()
    (tmp_path / "garbage.db").write_bytes(b"this is not a database, not at all" * 200)
    with pytest.raises(StoreUnavailable):
        await SQLiteStore(tmp_path / "garbage.db").open()


async def test_sqlite_newer_schema_is_refused(tmp_path):
    path = tmp_path / "k.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        await SQLiteStore(path).open()


async def test_sqlite_settings_make_commits_durable(tmp_path):
    store = SQLiteStore(tmp_path / "k.db")
    await store.open()
    try:
        assert store._writer is not None
        assert store._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # NORMAL: commits do not wait for the disk; Store.sync does (docs/durability.md).
        assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        await store.close()
    await store.close()  # closing twice is harmless
