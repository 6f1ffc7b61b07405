"""Caps, retention of a running task's head and redaction, in the store, on
both stores: what is kept, the one gap record and that its numbers add up
(counts, bytes, and per producer the sum of the dropped records' leaves),
identity kept for what was dropped, and redaction everywhere a reader looks."""

from __future__ import annotations

import random
import sqlite3

import attrs
import pytest
import trio

from hub.redaction import redact
from hub.store import chunk
from hub.store.accounts import ProducerSeqs
from hub.store.base import DUPLICATE, INSERTED, LogQuery
from hub.store.redacting import RedactStep
from hub.store.sqlite import SQLiteStore
from hub.store.trimming import cap_slack
from keruta import digest
from keruta.summary import Tally
from tests.storedata import rec, ts


def leaf_of(pseq: int, message: str, source: str = "stdout") -> int:
    return digest.leaf(pseq, source, None, False, 0, message)


def message(producer: str, pseq: int) -> str:
    return f"{producer}{pseq:06d} " + "x" * 92  # 100 bytes


async def cap_all(store, task: str, cap: int) -> int:  # type: ignore[no-untyped-def]
    steps = 0
    while True:
        step = await store.cap_step(task, cap)
        if step is None:
            return steps
        steps += 1
        if not step.more:
            return steps


async def everything(store, task: str = "t1"):  # type: ignore[no-untyped-def]
    return (await store.query(LogQuery(task_id=task, size=100_000))).content


def sent(producer: str, first: int, last: int) -> list:  # type: ignore[type-arg]
    return [rec(p, message(producer, p), producer=producer, at=p) for p in range(first, last + 1)]


async def test_a_cap_keeps_head_and_tail_and_one_gap_that_adds_up(store):
    cap = 60_000
    for i in range(8):
        # Two producers, interleaved batch by batch.
        await store.append(sent("a", 250 * i + 1, 250 * (i + 1)) + sent("b", 100 * i + 1, 100 * (i + 1)))
        await cap_all(store, "t1", cap)
    records = await everything(store)
    gaps = [r for r in records if r.kind == "gap"]
    assert len(gaps) == 1
    gap = gaps[0]
    info = gap.metadata["gap"]
    kept = [r for r in records if r.kind is None]
    kept_bytes = sum(len(r.message) for r in kept)
    assert kept_bytes + len(gap.message.encode()) <= cap
    assert kept_bytes >= cap - cap_slack(cap) - 200 - len(gap.message.encode())
    head = [r for r in kept if r.seq < gap.seq]
    tail = [r for r in kept if r.seq > gap.seq]
    # The first half, from the first record on; the last half, up to the last.
    assert [r.seq for r in head] == list(range(1, len(head) + 1))
    assert abs(sum(len(r.message) for r in head) - cap // 2) <= 100
    assert tail[-1].seq == 2800 and [r.seq for r in tail] == list(range(tail[0].seq, 2801))
    assert (info["reason"], info["fromSeq"], info["toSeq"]) == ("cap", gap.seq, tail[0].seq - 1)
    assert gap.seq == head[-1].seq + 1
    assert info["lines"] == 2800 - len(kept)
    assert info["bytes"] == 100 * info["lines"]
    assert gap.message == f"… {info['lines']:,} lines ({info['bytes'] / 1024:.0f} KB) not kept: task over its 59 KB cap"
    # Per producer: what is stored plus the gap's account is what was sent.
    stored_pseqs: dict[str, set[int]] = {"a": set(), "b": set()}
    for r in kept:
        stored_pseqs[r.message[0]].add(int(r.message[1:7]))
    for producer, sent_count in (("a", 2000), ("b", 800)):
        account = info["accounts"][producer]
        dropped = [p for p in range(1, sent_count + 1) if p not in stored_pseqs[producer]]
        assert account["records"] == len(dropped)
        assert account["lines"] == {"stdout": len(dropped)}
        assert account["bytes"] == {"stdout": 100 * len(dropped)}
        total = 0
        for p in dropped:
            total = digest.add(total, leaf_of(p, message(producer, p)))
        assert account["digest"] == digest.to_text(total)
    stats = await store.stats("t1")
    # totalLogs counts what is stored: the records kept and the gap record.
    assert stats.total_logs == len(records) == len(kept) + 1
    assert stats.log_counts == {"stdout": len(kept), "agent": 1}
    # A raw download says what is not kept, where it is not.
    raw = "".join([text async for text in store.iter_raw("t1")])
    lines = raw.splitlines()
    assert lines[len(head)] == gap.message and len(lines) == len(kept) + 1


async def test_the_gap_grows_in_place_as_the_tail_slides(store):
    cap = 30_000
    await store.append(sent("a", 1, 600))
    await cap_all(store, "t1", cap)
    first = [r for r in await everything(store) if r.kind == "gap"][0]
    await store.append(sent("a", 601, 900))
    await cap_all(store, "t1", cap)
    records = await everything(store)
    second = [r for r in records if r.kind == "gap"]
    assert len(second) == 1 and second[0].seq == first.seq and second[0].id == first.id
    assert second[0].metadata["gap"]["lines"] > first.metadata["gap"]["lines"]
    assert second[0].metadata["gap"]["fromSeq"] == first.seq
    assert second[0].metadata["gap"]["toSeq"] == [r for r in records if r.seq > first.seq][0].seq - 1
    # Under its cap again, a step changes nothing.
    assert await store.cap_step("t1", cap) is None


async def test_a_dropped_record_sent_again_is_a_duplicate(store):
    await store.append(sent("a", 1, 600))
    await cap_all(store, "t1", 20_000)
    gap = [r for r in await everything(store) if r.kind == "gap"][0]
    dropped_pseq = gap.metadata["gap"]["toSeq"] - 1  # one producer, seqs as sent
    result = await store.append(sent("a", dropped_pseq, dropped_pseq) + sent("a", 601, 601))
    assert result.status == [DUPLICATE, INSERTED]
    assert [r.seq for r in result.inserted] == [601]
    assert dropped_pseq not in [r.seq for r in await everything(store)]


async def test_no_cap_no_cut_and_the_agents_cap_where_lower(store):
    await store.append(sent("a", 1, 300))
    assert await store.cap_step("t1", None) is None
    assert await store.cap_step("t1", 10_000_000) is None
    await store.set_max_bytes("t1", 10_000)
    await store.set_max_bytes("t1", 50_000)  # the lowest asked stays
    assert await cap_all(store, "t1", None) >= 1
    kept = [r for r in await everything(store) if r.kind is None]
    assert sum(len(r.message) for r in kept) <= 10_000


async def test_retention_leaves_a_gap_for_a_running_task(store):
    await store.append(sent("a", 1, 1200))
    await store.set_state("t1", "running", None)
    deleted = await store.delete_older_than(ts(1001))
    assert deleted == 1000
    records = await everything(store)
    assert [r.seq for r in records] == [1, *range(1001, 1201)]
    gap = records[0]
    info = gap.metadata["gap"]
    assert (gap.kind, gap.source, gap.level) == ("gap", "agent", "WARN")
    assert (info["reason"], info["fromSeq"], info["toSeq"], info["lines"]) == ("retention", 1, 1000, 1000)
    total = 0
    for p in range(1, 1001):
        total = digest.add(total, leaf_of(p, message("a", p)))
    assert info["accounts"]["a"]["digest"] == digest.to_text(total)
    assert (await store.stats("t1")).total_logs == 201
    # A later pass folds the earlier gap into its own, at the same seq.
    assert await store.delete_older_than(ts(1101)) == 100
    records = await everything(store)
    assert [r.seq for r in records] == [1, *range(1101, 1201)]
    info = records[0].metadata["gap"]
    assert (info["fromSeq"], info["toSeq"], info["lines"], info["accounts"]["a"]["records"]) == (1, 1100, 1100, 1100)
    # A resend of a deleted record is a duplicate.
    assert (await store.append(sent("a", 5, 5))).status == [DUPLICATE]


async def test_redaction_replaces_values_everywhere_and_accounts_for_it(store):
    items = sent("a", 1, 1500)
    items[9] = attrs.evolve(items[9], message="token=hunter2 and hunter2 again")
    items[700] = attrs.evolve(items[700], metadata={"env": {"TOKEN": "s3cr3t"}})
    items[1400] = attrs.evolve(items[1400], message="nothing here but s3cr3t")
    await store.append(items)
    # Read once, so the chunks are in the cache before they change.
    before = await store.query(LogQuery(task_id="t1", q="hunter2"))
    assert before.total_elements == 1
    seen: list[int] = []
    done = await redact(store, "t1", ["hunter2", "s3cr3t"], lambda step: seen.extend(step.seqs))
    assert done.records == 3 and sorted(seen) == [10, 701, 1401]
    assert (await store.query(LogQuery(task_id="t1", q="hunter2"))).total_elements == 0
    assert (await store.query(LogQuery(task_id="t1", q="***"))).total_elements == 2
    one = (await store.query(LogQuery(task_id="t1", after_seq=9, size=1))).content[0]
    assert one.message == "token=*** and *** again"
    meta = (await store.query(LogQuery(task_id="t1", after_seq=700, size=1))).content[0]
    assert meta.metadata == {"env": {"TOKEN": "***"}}
    raw = "".join([text async for text in store.iter_raw("t1")])
    assert "hunter2" not in raw and "s3cr3t" not in raw and "nothing here but ***" in raw
    # Old minus new, per producer: stored leaves + this = what was sent.
    account = done.accounts.to_json(counts=False)["a"]
    assert account["bytes"] == {"stdout": 2 * (7 - 3) + (6 - 3)}
    expected = 0
    for pseq, old, new in (
        (10, "token=hunter2 and hunter2 again", "token=*** and *** again"),
        (1401, "nothing here but s3cr3t", "nothing here but ***"),
    ):
        expected = digest.add(expected, digest.sub(leaf_of(pseq, old), leaf_of(pseq, new)))
    assert account["digest"] == digest.to_text(expected)
    # The audit record, appended after the task's records, names the count,
    # never a value, and holds the accounts.
    stored = (await everything(store))[-1]
    assert done.record == stored and stored.seq == 1501 and stored.producer is None
    assert stored.kind == "redaction" and stored.metadata["redaction"]["records"] == 3
    assert stored.metadata["redaction"]["accounts"] == done.accounts.to_json(counts=False)
    assert "hunter2" not in str(stored.metadata) and stored.message.startswith("3 records redacted by admin")


async def test_a_redaction_of_nothing_changes_nothing(store):
    await store.append(sent("a", 1, 50))
    done = await redact(store, "t1", ["absent"])
    assert done.records == 0 and done.accounts.to_json() == {}
    # Only its record, saying so, is added.
    records = await everything(store)
    assert [r.message for r in records[:50]] == [r.message for r in sent("a", 1, 50)]
    assert done.record == records[50] and records[50].metadata["redaction"]["records"] == 0
    nobody = await redact(store, "nobody", ["x"])
    assert (nobody.records, nobody.record) == (0, None)
    assert await store.task("nobody") is None


def test_the_chunk_cache_never_serves_a_rewritten_chunk():
    cache = chunk.ChunkCache()
    a = chunk.encode([_record(1, "secret"), _record(2, "b")])
    b = chunk.encode([_record(1, "***"), _record(2, "b")])
    # Same task, seqs and count: only the content differs.
    assert (a.seq_first, a.seq_last, a.n) == (b.seq_first, b.seq_last, b.n)
    head = (a.seq_first, a.seq_last, a.n, a.ts_first, a.ts_last, a.tally)
    assert cache.records("t1", (*head, a.lines, a.body))[0].message == "secret"
    assert cache.records("t1", (*head, b.lines, b.body))[0].message == "***"


def _record(seq: int, text: str):  # type: ignore[no-untyped-def]
    from keruta.records import LogRecord

    return LogRecord("t1", seq, ts(seq), "stdout", "INFO", text)


async def test_appends_during_a_redaction_are_all_kept(store):
    # A chunk per append, so the redaction takes several steps and the
    # appends land between them.
    for start in range(1, 3001, 50):
        await store.append([rec(p, f"line {p} secret-{p % 7}", producer="a", at=p) for p in range(start, start + 50)])
    done: list[int] = []
    # The appends start once the redaction has (its first step committed):
    # what it redacts is what was stored when it read the task's extent.
    started = trio.Event()

    def changed(step: RedactStep) -> None:
        done.extend(step.seqs)
        started.set()

    async def appending() -> None:
        await started.wait()
        for start in range(3001, 4001, 50):
            await store.append([rec(p, f"late {p} secret-1", producer="a", at=p) for p in range(start, start + 50)])
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(appending)
        result = await redact(store, "t1", ["secret-1"], changed)
    records = await everything(store)
    # The redaction's record was appended by its first step, before the appends.
    assert [r.seq for r in records] == list(range(1, 4002))
    assert records[3000].kind == "redaction" and records[3000].metadata["redaction"]["records"] == result.records
    before = [r for r in records if r.seq <= 3000]
    assert all("secret-1" not in r.message for r in before)
    assert result.records == len([p for p in range(1, 3001) if p % 7 == 1])
    # What came after the redaction started is stored as sent, whatever it holds.
    assert all(r.message.startswith("late ") for r in records if r.seq > 3001)


async def test_a_retention_pass_over_many_chunks_leaves_one_gap(store):
    for start in range(1, 3001, 100):  # a chunk per append: 30 of them
        await store.append(sent("a", start, start + 99))
    await store.set_state("t1", "running", None)
    assert await store.delete_older_than(ts(2501)) == 2500
    records = await everything(store)
    assert [r.seq for r in records] == [1, *range(2501, 3001)]
    info = records[0].metadata["gap"]
    assert (info["fromSeq"], info["toSeq"], info["lines"], info["accounts"]["a"]["records"]) == (1, 2500, 2500, 2500)
    assert (await store.stats("t1")).total_logs == 501


async def test_a_database_from_before_caps_counts_its_bytes_when_migrated(tmp_path):
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    await store.open()
    await store.append(sent("a", 1, 300))
    await store.close()
    # Back to schema 6, the one before caps: no byte counts, no caps.
    conn = sqlite3.connect(path)
    for statement in (
        "ALTER TABLE keruta_chunks DROP COLUMN bytes",
        "ALTER TABLE keruta_tasks DROP COLUMN stored_bytes",
        "ALTER TABLE keruta_tasks DROP COLUMN max_bytes",
        "ALTER TABLE keruta_tasks DROP COLUMN cap_gap_seq",
        "PRAGMA user_version = 6",
    ):
        conn.execute(statement)
    conn.commit()
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await store.cap_step("t1", 30_000) is None  # 300 lines of 100 bytes: at the cap
        step = await store.cap_step("t1", 29_900)
        assert step is not None and step.gap.metadata["gap"]["reason"] == "cap"
    finally:
        await store.close()


def test_producer_seqs_map_task_seqs_through_their_ranges():
    # (producer, pseq_first, pseq_last, seq_first): a from 1, b between, a again.
    seqs = ProducerSeqs([("a", 1, 10, 1), ("b", 1, 5, 11), ("a", 11, 20, 16), ("~hub", 1, 1, 40)])
    assert [seqs.of(s) for s in (1, 10, 11, 15, 16, 25, 26, 39, 40, 41, 0)] == [
        ("a", 1), ("a", 10), ("b", 1), ("b", 5), ("a", 11), ("a", 20), None, None, ("~hub", 1), None, None,
    ]


async def test_caps_of_every_size_keep_their_promises(store):
    for seed in range(6):
        rnd = random.Random(seed)
        task = f"r{seed}"
        cap = rnd.choice([2_000, 9_000, 40_000, 150_000])
        sent_messages: dict[int, str] = {}
        pseq = 0
        for _ in range(rnd.randint(3, 12)):
            batch = []
            for _ in range(rnd.randint(1, 700)):
                pseq += 1
                text = f"{pseq}:" + "m" * rnd.choice([0, 5, 60, 300, 1500])
                sent_messages[pseq] = text
                batch.append(rec(pseq, text, task=task, producer="p", at=pseq))
            await store.append(batch)
            await cap_all(store, task, cap)
        records = await everything(store, task)
        kept = [r for r in records if r.kind is None]
        gaps = [r for r in records if r.kind == "gap"]
        total = sum(len(m) for m in sent_messages.values())
        if total <= cap:
            assert not gaps and len(kept) == pseq
            continue
        assert len(gaps) == 1, (seed, cap)
        gap, info = gaps[0], gaps[0].metadata["gap"]
        # One producer alone: task seq == producer seq.
        assert all(r.message == sent_messages[r.seq] for r in kept)
        assert [r.seq for r in kept if r.seq < gap.seq] == list(range(1, gap.seq))
        tail = [r.seq for r in kept if r.seq > gap.seq]
        assert tail == list(range(info["toSeq"] + 1, pseq + 1))
        assert sum(len(r.message) for r in kept) + len(gap.message.encode()) <= cap
        dropped = list(range(gap.seq, info["toSeq"] + 1))
        assert info["lines"] == len(dropped) == info["accounts"]["p"]["records"]
        assert info["bytes"] == sum(len(sent_messages[p]) for p in dropped)
        expected = 0
        for p in dropped:
            expected = digest.add(expected, leaf_of(p, sent_messages[p]))
        assert info["accounts"]["p"]["digest"] == digest.to_text(expected)
        assert (await store.stats(task)).total_logs == len(kept) + 1


async def test_gaps_from_caps_and_retention_still_add_up_to_what_was_sent(store):
    await store.append(sent("a", 1, 2000))
    await cap_all(store, "t1", 30_000)
    cap_gap = [r for r in await everything(store) if r.kind == "gap"][0]
    # Retention takes the head and the cap's gap with it: the retention gap carries its accounts on.
    await store.set_state("t1", "running", None)
    await store.delete_older_than(ts(cap_gap.seq + 1))
    await store.append(sent("a", 2001, 4000))
    await cap_all(store, "t1", 30_000)
    records = await everything(store)
    stored_sum, stored_count = 0, 0
    gap_sum, gap_count = 0, 0
    for r in records:
        if r.kind is None:
            stored_sum = digest.add(stored_sum, leaf_of(r.seq, r.message))
            stored_count += 1
        else:
            account = r.metadata["gap"]["accounts"]["a"]
            gap_sum = digest.add(gap_sum, digest.from_text(account["digest"]))
            gap_count += account["records"]
    everything_sent = 0
    for p in range(1, 4001):
        everything_sent = digest.add(everything_sent, leaf_of(p, message("a", p)))
    assert stored_count + gap_count == 4000
    assert digest.add(stored_sum, gap_sum) == everything_sent
    assert {r.metadata["gap"]["reason"] for r in records if r.kind == "gap"} <= {"cap", "retention"}


async def test_a_section_whose_start_a_cap_cut_out_is_no_longer_listed(store):
    def marker(p: int, kind: str, name: str) -> object:
        section = {"style": "github", "name": name, "title": name, "collapsed": True, "depth": 0}
        text = f"::group::{name}" if kind == "section_start" else "::endgroup::"
        return rec(p, text, producer="a", at=p, kind=kind, metadata={"section": section})

    body = sent("a", 1, 600)
    # Three sections: one in the head, one in the middle a cap cuts, one in the tail.
    for first, name in ((10, "head"), (300, "middle"), (590, "tail")):
        body[first - 1] = marker(first, "section_start", name)
        body[first + 4] = marker(first + 5, "section_end", name)
    await store.append(body)
    assert [s["name"] for s in (await store.sections("t1")).sections] == ["head", "middle", "tail"]
    await cap_all(store, "t1", 20_000)
    assert [s["name"] for s in (await store.sections("t1")).sections] == ["head", "tail"]


@pytest.mark.parametrize("reason", ["deleted", "retention"])
async def test_a_delete_cutting_inside_a_chunk_leaves_its_gap_between_the_records_kept(store, reason):
    # One chunk, two producers interleaved: a's records are new, b's old.
    items = []
    for p in range(1, 21):
        items += [rec(p, message("a", p), producer="a", at=1000 + p), rec(p, message("b", p), producer="b", at=p)]
    await store.append(items)
    if reason == "retention":
        await store.set_state("t1", "running", None)
    else:
        for producer in ("a", "b"):
            tally = Tally()
            for p in range(1, 21):
                tally.add(p, "stdout", None, False, 0, message(producer, p))
            await store.set_state("t1", "succeeded", 0, producer, tally.summary(20))
    before = await everything(store)
    assert await store.delete("t1", ts(500), gap=reason) == 20
    records = await everything(store)
    # Seq order, as every reader reads the chunks: the gap, at the first seq
    # deleted, lies between the records kept, not inside a chunk of theirs.
    assert [r.seq for r in records] == sorted(r.seq for r in records)
    kept = [r for r in before if r.producer == "a"]
    (gap,) = [r for r in records if r.kind == "gap"]
    assert gap.seq == min(r.seq for r in before if r.producer == "b")
    assert [r for r in records if r.kind is None] == kept
    assert (gap.metadata["gap"]["reason"], gap.metadata["gap"]["lines"]) == (reason, 20)
    assert [r.seq for r in (await store.query(LogQuery(task_id="t1", after_seq=gap.seq, size=3))).content] == [
        r.seq for r in kept if r.seq > gap.seq
    ][:3]
    if reason == "deleted":
        assert (await store.verify("t1")).verdict == "complete"


async def test_an_admin_delete_of_a_finished_task_leaves_a_gap_and_retention_none(store):
    await store.append(sent("a", 1, 10))
    await store.set_state("t1", "succeeded", 0)
    assert await store.delete("t1", ts(4), gap="retention") == 3
    assert [r.seq for r in await everything(store)] == list(range(4, 11))
    assert await store.delete("t1", ts(6), gap="deleted") == 2
    records = await everything(store)
    assert [r.seq for r in records] == [4, 6, 7, 8, 9, 10] and records[0].kind == "gap"
    # Everything: no gap, nothing left.
    assert await store.delete("t1", None, gap="deleted") == 6
    assert await everything(store) == []
