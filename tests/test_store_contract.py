"""The `Store` contract, run on both stores: real SQLite and real PostgreSQL
(the `store` fixture is parametrised over them)."""

from __future__ import annotations

import random

import pytest
import trio

from hub.store import open_store_from_url
from hub.store.base import DUPLICATE, GAP, INSERTED, LogQuery, record_id, with_ids
from keruta.records import InvalidField
from tests.storedata import all_seqs, rec, ts


async def test_append_then_query_pages_in_seq_order(store):
    # Three producers interleaved: the task's seqs follow the order of commit.
    order = [(p, n) for n in range(1, 10) for p in ("a", "b", "c")][:25]
    random.Random(7).shuffle(order)
    per: dict[str, int] = {}
    items = []
    for p, _ in order:
        per[p] = per.get(p, 0) + 1
        items.append(rec(per[p], f"line {len(items) + 1}", producer=p, at=len(items) + 1))
    await store.append(items)

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


async def test_a_commit_of_many_producers_across_many_tasks_keeps_each_ones_place(store):
    # A fleet's commit: a record from each of more producers than one lookup
    # statement takes (SQLite's 500), half of them sharing one task.
    keys = [(f"t{n % 700}", f"p{n}") for n in range(1200)]
    first = await store.append([rec(1, task=t, producer=p) for t, p in keys])
    assert first.status == [INSERTED] * len(keys)
    second = await store.append([rec(2, task=t, producer=p) for t, p in keys])
    assert second.status == [INSERTED] * len(keys)
    assert {second.producers[key] for key in keys} == {2}
    again = await store.append([rec(seq, task=t, producer=p) for t, p in keys[:3] for seq in (1, 2)])
    assert again.status == [DUPLICATE] * 6
    ahead = await store.append([rec(4, task=t, producer=p) for t, p in keys[-2:]])
    assert ahead.status == [GAP, GAP]


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


async def test_a_quiet_task_stored_a_record_a_commit_reads_back_whole_from_few_chunks(store):
    # One record a commit, as a quiet job's agent sends them: the small chunks
    # are merged when the appends say so (hub/store/chunk.py, SMALL_CHUNK), and
    # nothing of the records, their order, counts or filters may change.
    rnd = random.Random(3)
    sent = []
    for seq in range(1, 301):
        r = rec(
            seq, f"line {seq} " + "x" * rnd.randint(0, 40), producer="quiet",
            source=rnd.choice(["stdout", "stderr"]), level=rnd.choice(["INFO", "INFO", "WARN", "ERROR"]),
            line_number=seq, metadata={"n": seq} if seq % 7 == 0 else {}, partial=seq % 11 == 0,
        )
        sent.append(r)
        result = await store.append([r])
        assert result.status == [INSERTED]
        # As the writer does: merges run apart, when an append says they are due.
        await store.compact(result.compact)
        if seq % 97 == 0:
            # Another producer's batch of its own in between.
            assert (await store.append([rec(seq // 97, "other", producer="b")])).status == [INSERTED]
    page = (await store.query(LogQuery(task_id="t1", size=1_000))).content
    quiet = [r for r in page if r.producer == "quiet"]
    assert [(r.message, r.source, r.level, r.line_number, r.metadata, r.partial) for r in quiet] == [
        (r.message, r.source, r.level, r.line_number, r.metadata, r.partial) for r in sent
    ]
    assert [r.seq for r in page] == list(range(1, 304))
    stats = await store.stats("t1")
    assert stats.total_logs == 303
    assert stats.level_counts["ERROR"] == sum(r.level == "ERROR" for r in sent)
    errors = (await store.query(LogQuery(task_id="t1", level="ERROR", size=1_000))).content
    assert [r.message for r in errors] == [r.message for r in sent if r.level == "ERROR"]
    after = (await store.query(LogQuery(task_id="t1", after_seq=150, size=5))).content
    assert [r.seq for r in after] == [151, 152, 153, 154, 155]
    if store.url.startswith("sqlite"):
        import sqlite3

        # Merged at every 64th seq: what came before seq 256 is in a few
        # chunks; the one-record chunks since wait for the next merge.
        with sqlite3.connect(store.path) as conn:
            merged = conn.execute("SELECT count(*) FROM keruta_chunks WHERE seq_last <= 256").fetchone()[0]
        assert merged <= 4, merged


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


async def test_after_seq_totals_with_and_without_holes(store):
    """The total of an afterSeq page is arithmetic while seqs are unbroken,
    and must stay exact once a delete leaves holes."""
    await store.append([rec(s) for s in range(1, 301)])
    for after, expected in ((0, 300), (149, 151), (299, 1), (300, 0), (1000, 0)):
        page = await store.query(LogQuery(task_id="t1", after_seq=after, size=2))
        assert page.total_elements == expected, after
    await store.append([rec(s) for s in range(400, 411)])  # ahead of the producer: not stored
    await store.append([rec(s) for s in range(301, 312)])
    for after, expected in ((0, 311), (300, 11), (305, 6), (1000, 0)):
        page = await store.query(LogQuery(task_id="t1", after_seq=after, size=2))
        assert page.total_elements == expected, after
    await store.append([rec(s, task="t2", at=10.0 + s) for s in range(1, 11)])
    await store.delete("t2", ts(13.5))  # deletes seqs 1..3: the rest is unbroken again
    page = await store.query(LogQuery(task_id="t2", after_seq=5, size=2))
    assert page.total_elements == 5
    page = await store.query(LogQuery(task_id="t2", after_seq=0, size=2))
    assert page.total_elements == 7
    # A delete by time can cut a hole in the middle (timestamps are the producers').
    await store.append([rec(s, task="t3", at=1.0 if s == 5 else 20.0) for s in range(1, 11)])
    await store.delete("t3", ts(5.0))
    for after, expected in ((0, 9), (3, 6), (4, 5), (5, 5)):
        page = await store.query(LogQuery(task_id="t3", after_seq=after, size=2))
        assert page.total_elements == expected, after
    page = await store.query(LogQuery(task_id="nothing", after_seq=0, size=2))
    assert page.total_elements == 0


async def test_duplicates_are_ignored_and_keep_their_id(store):
    first = await store.append([rec(1, "one"), rec(2, "two"), rec(2, "two again")])
    assert [r.seq for r in first.inserted] == [1, 2]
    # What an append stored has no id until it is shown (AppendResult).
    assert [r.id for r in first.inserted] == [None, None]
    with_ids(first.records)
    assert [r.id for r in first.records] == [
        record_id("t1", 1),
        record_id("t1", 2),
        record_id("t1", 2),
    ]

    again = await store.append([rec(2, "changed"), rec(3, "three"), rec(1, "changed")])
    assert [r.seq for r in again.inserted] == [3]
    with_ids(again.records)
    assert [r.id for r in again.records] == [record_id("t1", s) for s in (2, 3, 1)]
    assert again.durable == {"t1": 3}

    content = (await store.query(LogQuery(task_id="t1"))).content
    assert [(r.seq, r.message) for r in content] == [(1, "one"), (2, "two"), (3, "three")]
    assert (await store.stats("t1")).total_logs == 3
    info = await store.task("t1")
    assert info is not None and info.total_logs == 3


async def test_each_producer_numbers_its_own_and_the_task_counts_on(store):
    result = await store.append([rec(1, "a", producer="p"), rec(2, "b", producer="p"), rec(1, "c", task="t2", producer="p")])
    assert [(r.task_id, r.seq) for r in result.records] == [("t1", 1), ("t1", 2), ("t2", 1)]
    with_ids(result.records)
    assert [r.id for r in result.records] == [
        record_id("t1", 1),
        record_id("t1", 2),
        record_id("t2", 1),
    ]
    result = await store.append([rec(1, "q1", producer="q"), rec(3, "p3", producer="p"), rec(1, "anonymous")])
    assert [r.seq for r in result.records] == [3, 4, 5]
    assert result.durable == {"t1": 5}
    assert result.producers == {("t1", "q"): 1, ("t1", "p"): 3, ("t1", ""): 1}
    # One identity twice in a batch: the second is a duplicate of the first.
    result = await store.append([rec(2, "q2", producer="q"), rec(2, "q2", producer="q")])
    assert [r.seq for r in result.records] == [6, 6]
    assert [r.message for r in result.inserted] == ["q2"]
    # Deleting never makes a seq reusable.
    await store.delete("t1", None)
    result = await store.append([rec(3, "q3", producer="q")])
    assert [r.seq for r in result.records] == [7]


async def test_concurrent_appends_never_share_a_seq(store):
    async def writer(n: int) -> None:
        for k in range(5):
            await store.append([rec(2 * k + 1, f"w{n}", producer=f"w{n}"), rec(2 * k + 2, f"w{n}", producer=f"w{n}")])

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(writer, n)
    assert await all_seqs(store) == list(range(1, 41))
    assert await store.durable_seq("t1") == 40


async def test_durable_seq_is_the_highest_seq(store):
    assert await store.durable_seq("t1") == 0
    result = await store.append([rec(1), rec(2), rec(4), rec(1, task="t2")])
    assert result.status == [INSERTED, INSERTED, GAP, INSERTED]
    assert result.durable == {"t1": 2, "t2": 1}
    assert await store.durable_seq("t1") == 2
    assert (await store.append([rec(3), rec(4)])).durable == {"t1": 4}
    assert (await store.append([rec(4)])).durable == {"t1": 4}  # duplicate only
    info = await store.task("t1")
    assert info is not None and info.durable_seq == 4


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
    # Finished: their old records go without a trace (a running task's
    # head leaves a gap record: tests/test_trimming.py).
    for task in ("a", "c"):
        await store.set_state(task, "succeeded", 0)
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
    await store.append([rec(1, "a"), rec(2, "b"), rec(3, "d", source="stderr")])
    await store.set_state("t1", "failed", 2)
    await store.close()
    reopened = open_store_from_url(store.url)
    await reopened.open()
    try:
        assert await all_seqs(reopened) == [1, 2, 3]
        info = await reopened.task("t1")
        assert info is not None
        assert (info.state, info.exit_code, info.durable_seq, info.total_logs) == (
            "failed",
            2,
            3,
            3,
        )
        assert (await reopened.stats("t1")).log_counts == {"stdout": 2, "stderr": 1}
        assert (await reopened.append([rec(3, "d", source="stderr"), rec(4, "e")])).durable == {"t1": 4}
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
            for k in range(5):
                await target.append([rec(3 * k + i, f"w{n}", producer=f"w{n}") for i in (1, 2, 3)])

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
