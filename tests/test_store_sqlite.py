"""What only the SQLite store does: URLs, files, settings, schema version."""

from __future__ import annotations

import os
import secrets
import sqlite3

import pytest
import trio

from hub.store.base import StoreRefused, StoreUnavailable
from hub.store.sqlite import SQLiteStore, run_op, wal_held_bytes
from hub.store.steps import JSON_ROWS, MANY, Op
from tests.storedata import all_seqs, rec


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
    # Not an outage: no wait makes it a database.
    (tmp_path / "garbage.db").write_bytes(b"this is not a database, not at all" * 200)
    with pytest.raises(StoreRefused, match="not a SQLite database"):
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
        # Nor for a checkpoint: Store.upkeep runs those, after a sync.
        assert store._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    finally:
        await store.close()
    await store.close()  # closing twice is harmless


async def test_a_small_append_waits_for_another_writer_without_stopping_the_hub(tmp_path):
    """Another process holds the write lock (a `sqlite3` shell left in a
    transaction, say): a small append waits for the lock in a worker thread,
    as every commit runs, while every other task of the hub runs on. Here the other writer lets go only after the loop has
    ticked on during the append; a commit waiting on the loop's own thread
    would stop that, and fail after the busy timeout."""
    store = SQLiteStore(tmp_path / "k.db")
    await store.open()
    other = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        ticks = 0
        appending = trio.Event()

        async def tick() -> None:
            nonlocal ticks
            await appending.wait()
            while other.in_transaction:
                ticks += 1
                if ticks == 5:
                    other.execute("COMMIT")
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            appending.set()
            with trio.fail_after(30):  # a hang guard
                result = await store.append([rec(1)])
        assert ticks >= 5
        assert [r.seq for r in result.inserted] == [1]
        # And with the lock free again, small appends commit as before.
        assert [r.seq for r in (await store.append([rec(2)])).inserted] == [2]
    finally:
        other.close()
        await store.close()


def wal_bytes(path) -> int:  # type: ignore[no-untyped-def]
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


async def test_syncs_keep_the_wal_bounded(tmp_path):
    """SQLite's own checkpoints are off (they fsync inside a commit); the
    syncs that follow commits, and the upkeep after each (the writer's syncer
    asks for it once it has answered), checkpoint instead, so a WAL written
    on and on stays near `checkpoint_at` rather than growing with the data."""
    path = tmp_path / "k.db"
    store = SQLiteStore(path, checkpoint_at=256 * 1024)
    await store.open()
    try:
        largest = 0
        for n in range(100):  # about 5 MB of records
            await store.append([rec(n * 10 + i, secrets.token_hex(2_500)) for i in range(1, 11)])
            await store.sync()
            await store.upkeep()
            largest = max(largest, wal_bytes(path))
        assert largest < 1024 * 1024, f"the WAL grew to {largest} bytes"
        assert await all_seqs(store) == list(range(1, 1001))
    finally:
        await store.close()


def test_what_a_wal_holds_is_what_sqlite_says_not_its_size(tmp_path):
    path = tmp_path / "w.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (v BLOB)")
    conn.execute("INSERT INTO t VALUES (randomblob(300000))")
    wal = str(path) + "-wal"

    def held() -> int:
        fd = os.open(wal, os.O_RDONLY)
        try:
            return wal_held_bytes(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    page = conn.execute("PRAGMA page_size").fetchone()[0]
    before = held()
    _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert frames == copied > 70 and before == 32 + frames * (24 + page)
    size = os.path.getsize(wal)
    conn.execute("INSERT INTO t VALUES (x'00')")  # the WAL starts over, the file as large
    assert os.path.getsize(wal) == size
    now = held()
    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert 0 < frames < 5 and now == 32 + frames * (24 + page)
    conn.close()


async def test_a_large_wal_file_that_holds_little_is_not_checkpointed_again(tmp_path):
    """A burst leaves the WAL file large; once checkpointed, SQLite writes it
    again from its start: small commits after it checkpoint no more often
    than the WAL they fill calls for (they once checkpointed every time)."""
    path = tmp_path / "k.db"
    store = SQLiteStore(path, checkpoint_at=512 * 1024)
    await store.open()
    try:
        await store.append([rec(i, secrets.token_hex(2_500)) for i in range(1, 401)])
        await store.sync()
        await store.upkeep()
        assert store.checkpoints == 1 and wal_bytes(path) > 512 * 1024
        for seq in range(401, 411):  # a few pages each, well under 512 KiB in all
            await store.append([rec(seq)])
            await store.sync()
            await store.upkeep()
        assert store.checkpoints == 1
        assert await all_seqs(store) == list(range(1, 411))
    finally:
        await store.close()


async def test_a_wal_an_old_reader_kept_growing_is_cut_back_once_it_lets_go(tmp_path):
    """A reader that holds an old snapshot (a `sqlite3` shell left in a read
    transaction, say) keeps every later commit in the WAL, past
    `truncate_at`. Appends go on meanwhile; once the reader lets go, the next
    sync's upkeep checkpoints everything and cuts the file back to nothing."""
    path = tmp_path / "k.db"
    store = SQLiteStore(path, checkpoint_at=32 * 1024, truncate_at=256 * 1024)
    await store.open()
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        await store.append([rec(1)])
        await store.sync()
        reader.execute("BEGIN")
        assert reader.execute("SELECT sum(n) FROM keruta_chunks").fetchone()[0] == 1
        for n in range(10):
            await store.append([rec(n * 10 + i, secrets.token_hex(2_500)) for i in range(2, 12)])
            await store.sync()
            await store.upkeep()
        assert wal_bytes(path) > 256 * 1024
        reader.execute("COMMIT")
        await store.append([rec(102)])
        await store.sync()
        await store.upkeep()
        assert wal_bytes(path) == 0
        # And the store writes and reads on.
        await store.append([rec(103)])
        assert await all_seqs(store) == list(range(1, 104))
    finally:
        reader.close()
        await store.close()


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 150])
def test_many_rows_sent_several_to_a_statement_do_what_one_each_would(n: int) -> None:
    # hub/store/sqlite.py sends an INSERT's or an UPDATE ... FROM (VALUES row)'s
    # rows several to a statement (each step lets the GIL go): the same rows
    # end up written as executemany writes them.
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, a INTEGER, b BLOB, c TEXT)")
    rows = [(f"k{i}", i * 7, bytes([i % 256]) * 3, None if i % 3 else "x") for i in range(n)]
    run_op(conn, Op(MANY, "INSERT INTO t (k, a, b, c) VALUES (?, ?, ?, ?)", rows))
    assert conn.execute("SELECT k, a, b, c FROM t ORDER BY a").fetchall() == rows
    run_op(conn, Op(MANY, "INSERT INTO t (k, a, b, c) VALUES (?, ?, 0, NULL) ON CONFLICT (k) DO UPDATE SET a = a + excluded.a",
                    [(k, 1) for k, *_ in rows]))
    assert dict(conn.execute("SELECT k, a FROM t")) == {f"k{i}": i * 7 + 1 for i in range(n)}
    run_op(conn, Op(MANY, "UPDATE t SET c = v.column2 FROM (VALUES (?, ?)) AS v WHERE k = v.column1",
                    [(k, f"new {k}") for k, *_ in rows[::2]]))
    changed = dict(conn.execute("SELECT k, c FROM t"))
    assert changed == {k: f"new {k}" if i % 2 == 0 else c for i, (k, _a, _b, c) in enumerate(rows)}


def test_rows_read_as_one_json_row_are_the_rows() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (k TEXT, a INTEGER, c TEXT)")
    rows = [("ü-k", 2**63 - 1, None), ("k2", -5, "x\\y\"z")]
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    got = run_op(conn, Op(JSON_ROWS, "SELECT json_group_array(json_array(k, a, c)) FROM (SELECT * FROM t ORDER BY a DESC)", ()))
    assert [tuple(r) for r in got] == rows
    assert run_op(conn, Op(JSON_ROWS, "SELECT json_group_array(json_array(k)) FROM t WHERE a > ?", (2**63 - 1,))) == []


async def test_a_database_restored_from_a_dump_is_served_when_its_tables_are_this_versions(tmp_path):
    """`.dump` keeps no PRAGMA user_version: tables, version 0. Exactly this
    version's tables are taken as this version, their records kept; any
    other layout is refused at once (never retried as an outage), naming
    the way out."""
    path = tmp_path / "keruta.db"
    store = SQLiteStore(path)
    await store.open()
    await store.append([rec(1), rec(2)])
    await store.close()
    restored = tmp_path / "restored.db"
    with sqlite3.connect(path) as old, sqlite3.connect(restored) as new:
        new.executescript("\n".join(old.iterdump()))
        assert new.execute("PRAGMA user_version").fetchone()[0] == 0
    store = SQLiteStore(restored)
    await store.open()
    try:
        assert await all_seqs(store) == [1, 2]
        await store.append([rec(3)])
        assert await all_seqs(store) == [1, 2, 3]
    finally:
        await store.close()

    other = tmp_path / "other.db"
    with sqlite3.connect(restored) as old, sqlite3.connect(other) as new:
        new.executescript("\n".join(old.iterdump()))
        new.execute("PRAGMA user_version = 0")
        new.execute("ALTER TABLE keruta_tasks DROP COLUMN cap_gap_seq")  # an older version's tasks
    with pytest.raises(StoreRefused, match=r"no schema version .*restored from a \.dump"):
        await SQLiteStore(other).open()
