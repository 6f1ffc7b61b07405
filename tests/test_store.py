"""Both stores against the `Store` interface, on real SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import subprocess
import sys

import pytest
import trio

from hub.store import open_store_from_url
from hub.store.base import DUPLICATE, INSERTED, Incoming, LogQuery, StoreUnavailable, record_id
from hub.store.batching import PENDING, TaskProgress, advance, plan_batch
from hub.store.postgres import parse_notice
from hub.store.sqlite import SQLiteStore
from keruta.records import InvalidField
from keruta.timefmt import format_ts

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def ts(second: float) -> str:
    return format_ts(T0 + dt.timedelta(seconds=second))


def rec(
    seq: int | None,
    message: str | None = None,
    *,
    task: str = "t1",
    at: float | None = None,
    source: str = "stdout",
    level: str = "INFO",
    **extra: object,
) -> Incoming:
    return Incoming(
        task_id=task,
        seq=seq,
        timestamp=ts(at if at is not None else (seq or 0)),
        source=source,
        level=level,
        message=message if message is not None else f"line {seq}",
        **extra,  # type: ignore[arg-type]
    )


async def all_seqs(store, task: str = "t1", **filters) -> list[int]:  # type: ignore[no-untyped-def]
    page = await store.query(LogQuery(task_id=task, size=10_000, **filters))
    return [r.seq for r in page.content]


async def test_append_then_query_pages_in_seq_order(store):
    seqs = list(range(1, 26))
    random.Random(7).shuffle(seqs)
    await store.append([rec(s) for s in seqs])

    pages = [await store.query(LogQuery(task_id="t1", page=n, size=10)) for n in range(4)]
    assert [p.total_elements for p in pages] == [25] * 4
    assert [p.total_pages for p in pages] == [3] * 4
    assert [[r.seq for r in p.content] for p in pages] == [
        list(range(1, 11)),
        list(range(11, 21)),
        list(range(21, 26)),
        [],
    ]
    first = pages[0].content[0]
    assert first.id == record_id("t1", 1)
    assert (first.task_id, first.message, first.timestamp) == ("t1", "line 1", ts(1))
    assert pages[1].number == 1 and pages[1].size == 10


async def test_query_of_unknown_task_is_empty(store):
    page = await store.query(LogQuery(task_id="nobody"))
    assert (page.content, page.total_elements, page.total_pages) == ([], 0, 0)


async def test_record_fields_round_trip(store):
    await store.append(
        [
            rec(1, "x", line_number=7, metadata={"processId": 42, "nested": {"a": [1, "é"]}}),
            rec(2, "piece", partial=True, source="stderr", level="ERROR"),
            rec(3, "", source="agent"),
        ]
    )
    one, two, three = (await store.query(LogQuery(task_id="t1"))).content
    assert (one.line_number, one.metadata, one.partial) == (
        7,
        {"processId": 42, "nested": {"a": [1, "é"]}},
        False,
    )
    assert (two.line_number, two.metadata, two.partial, two.source, two.level) == (
        None,
        {},
        True,
        "stderr",
        "ERROR",
    )
    assert (three.message, three.source) == ("", "agent")


async def test_filters_by_source_level_and_time(store):
    await store.append(
        [
            rec(1, source="stdout", level="INFO"),
            rec(2, source="stderr", level="ERROR"),
            rec(3, source="stdout", level="WARN"),
            rec(4, source="stderr", level="INFO"),
            rec(5, source="agent", level="INFO"),
            rec(6, source="stdout", level="ERROR"),
        ]
    )
    assert await all_seqs(store, source="stdout") == [1, 3, 6]
    assert await all_seqs(store, level="INFO") == [1, 4, 5]
    assert await all_seqs(store, source="stderr", level="ERROR") == [2]
    # start and end are inclusive
    assert await all_seqs(store, start=ts(2), end=ts(4)) == [2, 3, 4]
    assert await all_seqs(store, start=ts(5)) == [5, 6]
    assert await all_seqs(store, end=ts(1)) == [1]
    assert await all_seqs(store, start=ts(2.5), end=ts(3.5)) == [3]
    page = await store.query(LogQuery(task_id="t1", source="stdout", page=0, size=2))
    assert ([r.seq for r in page.content], page.total_elements, page.total_pages) == ([1, 3], 3, 2)


async def test_q_is_a_literal_case_sensitive_substring(store):
    messages = [
        "100% done",
        "100 done",
        "a_b",
        "axb",
        "Error here",
        "error here",
        "back\\slash",
        "none",
    ]
    await store.append([rec(i + 1, m) for i, m in enumerate(messages)])
    assert await all_seqs(store, q="%") == [1]
    assert await all_seqs(store, q="0%") == [1]
    assert await all_seqs(store, q="_") == [3]
    assert await all_seqs(store, q="a_b") == [3]
    assert await all_seqs(store, q="Error") == [5]
    assert await all_seqs(store, q="error") == [6]
    assert await all_seqs(store, q="\\") == [7]
    assert await all_seqs(store, q="done") == [1, 2]
    assert await all_seqs(store, q="zzz") == []
    assert await all_seqs(store, q="") == list(range(1, 9))
    assert await all_seqs(store, q="done", after_seq=1) == [2]


async def test_nul_in_a_line_is_stored_and_what_is_stored_is_returned(store):
    result = await store.append([rec(1, "bin\x00ary"), rec(2, "plain")])
    stored = (await store.query(LogQuery(task_id="t1"))).content
    assert [r.message for r in stored] == [r.message for r in result.records]
    assert stored[0].message in ("bin\x00ary", "bin\ufffdary")  # PostgreSQL text cannot hold NUL
    assert await all_seqs(store, q=stored[0].message[3]) == [1]


async def test_bad_page_or_size_is_invalid_field(store):
    for page, size in [(-1, 10), (0, 0), (0, -5)]:
        with pytest.raises(InvalidField):
            await store.query(LogQuery(task_id="t1", page=page, size=size))


async def test_after_seq_is_a_cursor(store):
    await store.append([rec(s) for s in range(1, 11)])
    page = await store.query(LogQuery(task_id="t1", after_seq=7))
    assert [r.seq for r in page.content] == [8, 9, 10]
    assert page.total_elements == 3
    assert await all_seqs(store, after_seq=0) == list(range(1, 11))
    assert await all_seqs(store, after_seq=10) == []
    page = await store.query(LogQuery(task_id="t1", after_seq=2, size=3, page=1))
    assert ([r.seq for r in page.content], page.total_elements) == ([6, 7, 8], 8)


async def test_duplicates_are_ignored_and_keep_their_id(store):
    first = await store.append([rec(1, "one"), rec(2, "two"), rec(2, "two again")])
    assert [r.seq for r in first.inserted] == [1, 2]
    assert [r.id for r in first.records] == [
        record_id("t1", 1),
        record_id("t1", 2),
        record_id("t1", 2),
    ]

    again = await store.append([rec(2, "changed"), rec(3, "three"), rec(1, "changed")])
    assert [r.seq for r in again.inserted] == [3]
    assert [r.id for r in again.records] == [record_id("t1", s) for s in (2, 3, 1)]
    assert again.durable == {"t1": 3}

    content = (await store.query(LogQuery(task_id="t1"))).content
    assert [(r.seq, r.message) for r in content] == [(1, "one"), (2, "two"), (3, "three")]
    assert (await store.stats("t1")).total_logs == 3
    info = await store.task("t1")
    assert info is not None and info.total_logs == 3


async def test_seq_none_gets_the_next_seq(store):
    result = await store.append([rec(None, "a"), rec(None, "b"), rec(None, "c", task="t2")])
    assert [(r.task_id, r.seq) for r in result.records] == [("t1", 1), ("t1", 2), ("t2", 1)]
    assert [r.id for r in result.records] == [
        record_id("t1", 1),
        record_id("t1", 2),
        record_id("t2", 1),
    ]
    result = await store.append([rec(10), rec(None, "after ten"), rec(None, "next")])
    assert [r.seq for r in result.records] == [10, 11, 12]
    assert result.durable == {"t1": 2}
    # A seq given later in the same batch that an assigned one already took is a duplicate.
    result = await store.append([rec(None, "x"), rec(13, "dup")])
    assert [r.seq for r in result.records] == [13, 13]
    assert [r.message for r in result.inserted] == ["x"]
    # Deleting never makes a seq reusable.
    await store.delete("t1", None)
    result = await store.append([rec(None, "after delete")])
    assert [r.seq for r in result.records] == [14]


async def test_concurrent_seq_none_appends_never_share_a_seq(store):
    async def writer(n: int) -> None:
        for _ in range(5):
            await store.append([rec(None, f"w{n}"), rec(None, f"w{n}")])

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(writer, n)
    assert await all_seqs(store) == list(range(1, 41))
    assert await store.durable_seq("t1") == 40


async def test_durable_seq_is_the_contiguous_prefix(store):
    assert await store.durable_seq("t1") == 0
    result = await store.append(
        [rec(1), rec(2), rec(4), rec(5), rec(1, task="t2"), rec(3, task="t3")]
    )
    assert result.durable == {"t1": 2, "t2": 1, "t3": 0}
    assert await store.durable_seq("t1") == 2
    assert (await store.append([rec(7)])).durable == {"t1": 2}
    assert (await store.append([rec(3)])).durable == {"t1": 5}
    assert (await store.append([rec(6)])).durable == {"t1": 7}
    assert (await store.append([rec(6)])).durable == {"t1": 7}  # duplicate only
    info = await store.task("t1")
    assert info is not None and info.durable_seq == 7
    assert (await store.append([rec(1, task="t3"), rec(2, task="t3")])).durable == {"t3": 3}


async def test_durable_seq_walks_a_long_run_filled_late(store):
    for start in range(2, 3002, 500):
        await store.append([rec(s) for s in range(start, min(start + 500, 3002))])
    assert await store.durable_seq("t1") == 0
    assert (await store.append([rec(1)])).durable == {"t1": 3001}


async def test_durable_seq_never_goes_back_after_delete(store):
    await store.append([rec(s) for s in range(1, 6)])
    assert await store.delete("t1", None) == 5
    assert await store.durable_seq("t1") == 5
    assert (await store.append([rec(6)])).durable == {"t1": 6}
    assert await all_seqs(store) == [6]


async def test_stats(store):
    empty = await store.stats("t1")
    assert (empty.total_logs, empty.log_counts, empty.level_counts, empty.start, empty.end) == (
        0,
        {},
        {},
        None,
        None,
    )
    await store.append(
        [
            rec(1, at=30, source="stdout", level="INFO"),
            rec(2, at=10, source="stderr", level="ERROR"),
            rec(3, at=20, source="stdout", level="ERROR"),
            rec(4, at=40, source="agent", level="WARN"),
        ]
    )
    stats = await store.stats("t1")
    assert stats.task_id == "t1"
    assert stats.total_logs == 4
    assert stats.log_counts == {"stdout": 2, "stderr": 1, "agent": 1}
    assert stats.level_counts == {"INFO": 1, "ERROR": 2, "WARN": 1}
    assert (stats.start, stats.end) == (ts(10), ts(40))
    assert stats.last_updated is not None
    await store.append([rec(2, at=10, source="stderr", level="ERROR")])  # duplicate: no change
    assert (await store.stats("t1")).total_logs == 4


async def test_delete_before_and_all(store):
    await store.append([rec(s, source="stderr" if s % 2 else "stdout") for s in range(1, 11)])
    await store.append([rec(s, task="other") for s in range(1, 4)])
    assert await store.delete("t1", ts(4)) == 3  # strictly older than `before`
    assert await all_seqs(store) == list(range(4, 11))
    stats = await store.stats("t1")
    assert (stats.total_logs, stats.start, stats.end) == (7, ts(4), ts(10))
    assert stats.log_counts == {"stdout": 4, "stderr": 3}
    info = await store.task("t1")
    assert info is not None and (info.total_logs, info.first_timestamp, info.durable_seq) == (
        7,
        ts(4),
        10,
    )
    assert await store.delete("t1", ts(4)) == 0
    assert await store.delete("t1", None) == 7
    assert await all_seqs(store) == []
    stats = await store.stats("t1")
    assert (stats.total_logs, stats.log_counts, stats.start, stats.end) == (0, {}, None, None)
    assert await store.delete("t1", None) == 0
    assert await store.delete("nobody", None) == 0
    assert await all_seqs(store, task="other") == [1, 2, 3]


async def test_delete_of_many_records_spans_several_chunks(store):
    for start in range(1, 5001, 1000):
        await store.append([rec(s) for s in range(start, start + 1000)])
    assert await store.delete("t1", ts(4500)) == 4499
    assert (await store.stats("t1")).total_logs == 501
    assert (await store.query(LogQuery(task_id="t1", size=1))).content[0].seq == 4500


async def test_delete_older_than_covers_every_task(store):
    await store.append([rec(s, task="a") for s in range(1, 6)])
    await store.append([rec(s, task="b", at=100 + s) for s in range(1, 6)])
    await store.append([rec(s, task="c") for s in range(1, 3)])
    await store.set_state("d", "pending", None)
    assert await store.delete_older_than(ts(4)) == 3 + 2
    assert await all_seqs(store, task="a") == [4, 5]
    assert await all_seqs(store, task="b") == [1, 2, 3, 4, 5]
    assert await all_seqs(store, task="c") == []
    assert {t.task_id: t.total_logs for t in await store.tasks()} == {
        "a": 2,
        "b": 5,
        "c": 0,
        "d": 0,
    }
    assert await store.delete_older_than(ts(4)) == 0


async def test_set_state_and_tasks(store):
    assert await store.task("t1") is None
    assert await store.tasks() == []
    info = await store.set_state("t1", "pending", None)
    assert (info.task_id, info.state, info.exit_code, info.total_logs, info.durable_seq) == (
        "t1",
        "pending",
        None,
        0,
        0,
    )
    await store.append([rec(1, at=5), rec(2, at=6)])
    info = await store.task("t1")
    assert info is not None and info.state == "pending"  # logs do not change a set state
    await store.append([rec(1, task="t2")])
    t2 = await store.task("t2")
    assert t2 is not None and t2.state == "running"  # logs create a task as running
    info = await store.set_state("t1", "failed", 3)
    assert (
        info.state,
        info.exit_code,
        info.total_logs,
        info.first_timestamp,
        info.last_timestamp,
    ) == (
        "failed",
        3,
        2,
        ts(5),
        ts(6),
    )
    assert info.durable_seq == 2 and info.updated_at is not None
    assert [(t.task_id, t.state, t.exit_code) for t in await store.tasks()] == [
        ("t1", "failed", 3),
        ("t2", "running", None),
    ]
    info = await store.set_state("t1", "succeeded", 0)
    assert (info.state, info.exit_code) == ("succeeded", 0)
    with pytest.raises(InvalidField):
        await store.set_state("t1", "exploded", None)


async def test_invalid_record_rolls_back_the_whole_batch(store):
    with pytest.raises(InvalidField):
        await store.append([rec(1), rec(2, source="nowhere")])
    with pytest.raises(InvalidField):
        await store.append([rec(1), rec(0)])
    assert await all_seqs(store) == []
    assert await store.task("t1") is None
    assert (await store.append([])).records == []


async def test_iter_task_yields_everything_in_chunks(store):
    await store.append([rec(s) for s in range(1, 26)])
    await store.append([rec(1, task="other")])
    chunks = [chunk async for chunk in store.iter_task("t1", chunk=10)]
    assert [len(c) for c in chunks] == [10, 10, 5]
    assert [r.seq for c in chunks for r in c] == list(range(1, 26))
    assert [c async for c in store.iter_task("nobody")] == []


async def test_read_range_with_filters(store):
    await store.append(
        [
            rec(s, source="stderr" if s % 3 == 0 else "stdout", level="ERROR" if s % 2 else "INFO")
            for s in range(1, 21)
        ]
    )

    async def seqs(*args, **kwargs):  # type: ignore[no-untyped-def]
        return [r.seq for r in await store.read_range("t1", *args, **kwargs)]

    assert await seqs(0, 5, 100) == [1, 2, 3, 4, 5]
    assert await seqs(5, 20, 3) == [6, 7, 8]
    assert await seqs(18, 100, 100) == [19, 20]
    assert await seqs(5, 5, 100) == []
    assert await seqs(0, 20, 100, source="stderr") == [3, 6, 9, 12, 15, 18]
    assert await seqs(0, 20, 100, level="INFO") == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert await seqs(0, 20, 2, source="stderr", level="ERROR") == [3, 9]
    assert await seqs(0, 20, 0) == []


async def test_reopening_keeps_everything(store):
    await store.append([rec(1, "a"), rec(2, "b"), rec(4, "d", source="stderr")])
    await store.set_state("t1", "failed", 2)
    await store.close()
    reopened = open_store_from_url(store.url)
    await reopened.open()
    try:
        assert await all_seqs(reopened) == [1, 2, 4]
        info = await reopened.task("t1")
        assert info is not None
        assert (info.state, info.exit_code, info.durable_seq, info.total_logs) == (
            "failed",
            2,
            2,
            3,
        )
        assert (await reopened.stats("t1")).log_counts == {"stdout": 2, "stderr": 1}
        assert (await reopened.append([rec(3, "c"), rec(None, "e")])).durable == {"t1": 5}
    finally:
        await reopened.close()


async def test_opening_is_idempotent(store):
    await store.append([rec(1)])
    await store.open()
    second = open_store_from_url(store.url)
    await second.open()
    await second.open()
    try:
        assert await all_seqs(second) == [1]
        await second.append([rec(2)])
        assert await all_seqs(store) == [1, 2]
    finally:
        await second.close()


async def test_two_stores_on_one_database_share_seq_assignment(store):
    """Two hubs on one database: assigned seqs stay unique."""
    other = open_store_from_url(store.url)
    await other.open()
    try:

        async def writer(target, n):  # type: ignore[no-untyped-def]
            for _ in range(5):
                await target.append([rec(None, f"w{n}") for _ in range(3)])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, store, 1)
            nursery.start_soon(writer, other, 2)
        assert await all_seqs(store) == list(range(1, 31))
        assert await other.durable_seq("t1") == 30
    finally:
        await other.close()


@pytest.mark.parametrize("checkpoints", range(6))
async def test_cancelled_append_is_all_or_nothing(store, checkpoints):
    batch = [rec(s) for s in range(1, 301)]
    with trio.CancelScope() as scope:

        async def cancel_later() -> None:
            for _ in range(checkpoints):
                await trio.lowlevel.checkpoint()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_later)
            await store.append(batch)
    stored = await all_seqs(store)
    assert stored in ([], list(range(1, 301)))
    assert await store.durable_seq("t1") == len(stored)
    # The store still works afterwards.
    assert (await store.append(batch)).durable == {"t1": 300}


# SQLite only


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


# The batch rules, without a database


def test_plan_batch_assigns_seqs_and_finds_what_may_be_stored():
    progress = {
        "t1": TaskProgress(max_seq=5, durable_seq=3),
        "t2": TaskProgress(max_seq=0, durable_seq=0),
    }
    plan = plan_batch(
        [rec(None), rec(4), rec(None, task="t2"), rec(9), rec(None), rec(4)], progress
    )
    assert [(r.task_id, r.seq) for r in plan.records] == [
        ("t1", 6),
        ("t1", 4),
        ("t2", 1),
        ("t1", 9),
        ("t1", 10),
        ("t1", 4),
    ]
    # 4 may be stored (at or below max_seq): looked up; the second 4 is the same record.
    assert plan.status == [INSERTED, PENDING, INSERTED, INSERTED, INSERTED, DUPLICATE]
    assert plan.lookups == [1]
    assert all(r.id == record_id(r.task_id, r.seq) for r in plan.records)


def test_advance_and_durable_through_batch():
    assert advance(3, [4, 5, 7]) == (5, False)
    assert advance(3, [4, 5]) == (5, True)
    assert advance(3, []) == (3, True)

    def through(durable: int, max_seq: int, inserted: list[int]) -> tuple[int, bool]:
        task = TaskProgress(max_seq=max_seq, durable_seq=durable)
        task.inserted_seqs.extend(inserted)
        return task.durable_through_batch()

    assert through(0, 0, [1, 2, 3]) == (3, False)  # the newest rows: nothing above to look at
    assert through(2, 9, [3, 4]) == (4, True)  # rows up to 9 are stored: look further
    assert through(2, 9, [5, 6]) == (2, False)  # 3 still missing
    assert through(2, 2, [4, 3]) == (4, False)
    assert through(5, 5, [1, 2]) == (5, False)  # re-stored after a delete: no effect


def test_parse_notice():
    assert parse_notice("task-1 42") == ("task-1", 42, "")
    assert parse_notice("a:b.c 1") == ("a:b.c", 1, "")
    assert parse_notice("t 7 hubA") == ("t", 7, "hubA")
    assert parse_notice("nonsense") is None
    assert parse_notice("t x") is None
    assert parse_notice(" 5") is None


# PostgreSQL only (each test runs its own trio-asyncio loop through `pg_url`)


@pytest.mark.pg
@pytest.mark.parametrize("method", ["copy", "unnest"])
async def test_pg_insert_methods_report_exactly_what_they_inserted(pg_url, method):
    from hub.store.postgres import PostgresStore

    store = PostgresStore(pg_url, insert_method=method)
    await store.open()
    try:
        result = await store.append([rec(s) for s in range(1, 301)])
        assert len(result.inserted) == 300
        result = await store.append([rec(s) for s in range(250, 551)])
        assert [r.seq for r in result.inserted] == list(range(301, 551))
        assert result.durable == {"t1": 550}
        result = await store.append([rec(5), rec(600), rec(5), rec(None)])
        assert [r.seq for r in result.inserted] == [600, 601]
        assert (await store.stats("t1")).total_logs == 552
    finally:
        await store.close()


@pytest.mark.pg
async def test_pg_notices_tell_other_hubs_of_durable_progress(pg_url):
    from hub.store.postgres import STATUS_NOTICE, PostgresStore

    listener, writer = PostgresStore(pg_url), PostgresStore(pg_url)
    await listener.open()
    await writer.open()
    try:
        async with listener.listen() as notices:
            with trio.fail_after(30):
                await writer.append([rec(1), rec(2)])
                assert await anext(notices) == ("t1", 2)
                await writer.append([rec(4)])  # the watermark stays: no notice
                await writer.append([rec(3)])
                assert await anext(notices) == ("t1", 4)
                await writer.set_state("t1", "succeeded", 0)
                # A state change is announced too, so other hubs' subscribers see it.
                assert await anext(notices) == ("t1", STATUS_NOTICE)
                await writer.notify("t9", 7)
                assert await anext(notices) == ("t9", 7)
    finally:
        await listener.close()
        await writer.close()


@pytest.mark.pg
async def test_pg_notices_overflow_is_reported(pg_url):
    from hub.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.open()
    try:
        async with store.listen(buffer=2) as notices:
            for seq in range(1, 6):
                await store.append([rec(seq)])
            # A round trip on the listening connection: notices committed
            # before it are delivered before its answer.
            await notices._conn.fetchval("SELECT 1")
            with trio.fail_after(30):
                assert [await anext(notices) for _ in range(3)] == [("t1", 1), ("t1", 2), None]
                await store.append([rec(6)])
                assert await anext(notices) == ("t1", 6)
    finally:
        await store.close()


@pytest.mark.pg
async def test_pg_lost_listen_connection_raises_store_unavailable(pg_url):
    from hub.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.open()
    try:
        async with store.listen() as notices:
            pid = await notices._conn.fetchval("SELECT pg_backend_pid()")
            async with store._connection() as conn:
                await conn.execute("SELECT pg_terminate_backend($1)", pid)
            with trio.fail_after(30), pytest.raises(StoreUnavailable):
                await anext(notices)
    finally:
        await store.close()


@pytest.mark.pg
async def test_pg_lost_connections_surface_as_store_unavailable_then_recover(pg_url):
    from hub.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.open()
    try:
        await store.append([rec(1)])
        with pytest.raises(StoreUnavailable):
            async with store._connection() as conn:
                await conn.execute(
                    """
                    SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid()
                    """
                )
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        failures = 0
        for _ in range(5):
            try:
                await store.append([rec(2)])
                break
            except StoreUnavailable:
                failures += 1
        assert failures < 5
        assert await all_seqs(store) == [1, 2]
    finally:
        await store.close()


@pytest.mark.pg
async def test_pg_unreachable_server_is_store_unavailable(pg_url):
    from hub.store.postgres import PostgresStore

    with pytest.raises(StoreUnavailable):
        await PostgresStore("postgresql://postgres@127.0.0.1:1/nothing", connect_timeout=5).open()


@pytest.mark.pg
async def test_pg_hubs_starting_together_create_the_schema_once(pg_url):
    from hub.store.postgres import PostgresStore

    stores = [PostgresStore(pg_url) for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for s in stores:
            nursery.start_soon(s.open)
    try:
        await stores[0].append([rec(1)])
        assert await all_seqs(stores[3]) == [1]
        async with stores[0]._connection() as conn:
            assert await conn.fetch("SELECT version FROM keruta_schema") == [(2,)]
    finally:
        for s in stores:
            await s.close()


@pytest.mark.pg
async def test_pg_newer_schema_is_refused(pg_url):
    from hub.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.open()
    async with store._connection() as conn:
        await conn.execute("UPDATE keruta_schema SET version = 99")
    await store.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        await PostgresStore(pg_url).open()


_KILLED_WRITER = """
import sys, trio
from hub.store.base import Incoming
from hub.store.sqlite import SQLiteStore

async def main():
    store = SQLiteStore(sys.argv[1])
    await store.open()
    seq = 0
    while True:
        batch = [Incoming("t1", seq + i, "2026-01-01T00:00:00.000000Z", "stdout", "INFO", "x" * 100)
                 for i in range(1, 51)]
        result = await store.append(batch)
        seq += 50
        print(result.durable["t1"], flush=True)

trio.run(main)
"""


async def test_sqlite_acknowledged_appends_survive_sigkill(tmp_path):
    path = tmp_path / "k.db"
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE
    )
    acked = 0
    buffer = b""
    try:
        assert proc.stdout is not None
        with trio.fail_after(60):
            while acked < 2000:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the writer died"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if lines:
                    acked = int(lines[-1])
    finally:
        proc.kill()  # SIGKILL, in the middle of later appends
        await proc.wait()
    store = SQLiteStore(path)
    await store.open()
    try:
        durable = await store.durable_seq("t1")
        assert durable >= acked
        assert durable % 50 == 0  # whole batches only
        assert await all_seqs(store) == list(range(1, durable + 1))
        assert (await store.stats("t1")).total_logs == durable
    finally:
        await store.close()


async def test_filtered_totals_from_the_counts_are_exact_also_after_a_delete(store):
    sources = ["stdout", "stderr"]
    levels = ["INFO", "WARN", "ERROR"]
    await store.append(
        [rec(s, source=sources[s % 2], level=levels[s % 3], at=s) for s in range(1, 301)]
    )

    async def totals() -> dict[tuple[str | None, str | None], int]:
        out = {}
        for source in (None, *sources):
            for level in (None, *levels):
                # size 10, page 0: a full page, so the total is not read off the page itself
                page = await store.query(LogQuery(task_id="t1", source=source, level=level, size=10))
                assert type(page.total_elements) is int  # JSON-encodable, not a Decimal
                out[(source, level)] = page.total_elements
        return out

    def expected(seqs: range) -> dict[tuple[str | None, str | None], int]:
        return {
            (source, level): sum(
                1
                for s in seqs
                if (source is None or sources[s % 2] == source) and (level is None or levels[s % 3] == level)
            )
            for source in (None, *sources)
            for level in (None, *levels)
        }

    assert await totals() == expected(range(1, 301))
    await store.delete("t1", ts(101))
    assert await totals() == expected(range(101, 301))
