"""hub/actors/writer.py and hub/actors/syncer.py on their own: batching (the flush interval on
the autojump clock), what a commit acknowledges, withdrawing a REST POST out
of time, and answers given only after the store's sync, in commit order.
The store is a real SQLite file."""

from __future__ import annotations

import trio
import trio.testing

from hub.actors.broadcaster import Broadcaster
from hub.actors.pacing import CommitPacing
from hub.actors.syncer import Settled, run_syncer
from hub.actors.writer import Writer, settle, write_within
from hub.messages import StatusChange, WriteOutcome, WriteRequest
from hub.metrics import Metrics
from hub.store.base import CONFLICT, DUPLICATE, GAP, INSERTED, AppendResult, Incoming
from hub.store.sqlite import SQLiteStore
from keruta.records import LogRecord

TS = "2026-01-01T00:00:00.000000Z"


def item(task: str, seq: int | None, message: str = "", producer: str = "") -> Incoming:
    return Incoming(task, seq, TS, "stdout", "INFO", message or f"line {seq}", producer=producer)


def request(*items: Incoming, into: list[WriteOutcome] | None = None) -> WriteRequest:
    return WriteRequest(done=(into.append if into is not None else lambda _o: None), items=list(items))


def writer_for(store: SQLiteStore | None = None, **kwargs: float) -> Writer:
    return Writer(store, Broadcaster(), Metrics(), **kwargs)  # type: ignore[arg-type]


# --- _gather: what goes in one transaction ----------------------------------------


async def test_zero_flush_interval_takes_only_what_is_waiting(autojump_clock: trio.testing.MockClock) -> None:
    send, inbox = trio.open_memory_channel[WriteRequest](10)
    first, second = request(item("t", 1)), request(item("t", 2))
    send.send_nowait(second)
    start = trio.current_time()
    batch, status = await writer_for()._gather(inbox, first)
    assert batch == [first, second] and status is None
    assert trio.current_time() == start


async def test_flush_interval_waits_that_long_for_more(autojump_clock: trio.testing.MockClock) -> None:
    send, inbox = trio.open_memory_channel[WriteRequest](10)
    first, soon, late = request(item("t", 1)), request(item("t", 2)), request(item("t", 3))
    got: list[list[WriteRequest]] = []

    async def gather() -> None:
        batch, _status = await writer_for(flush_interval=1.0)._gather(inbox, first)
        got.append(batch)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gather)
        await trio.sleep(0.3)
        await send.send(soon)
        await trio.sleep(1.0)
        await send.send(late)
    assert got == [[first, soon]], "the one sent after the interval waits for the next batch"
    assert inbox.receive_nowait() is late


async def test_flush_interval_deadline_counts_from_the_first_request(autojump_clock: trio.testing.MockClock) -> None:
    send, inbox = trio.open_memory_channel[WriteRequest](10)
    first = request(item("t", 1))
    start = trio.current_time()
    ended: list[float] = []

    async def gather() -> None:
        await writer_for(flush_interval=2.0)._gather(inbox, first)
        ended.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gather)
        for seq in range(2, 6):
            await trio.sleep(0.5)
            await send.send(request(item("t", seq)))
    assert ended == [2.0], "more requests do not push the commit further out"


def test_pacing_holds_a_commit_back_only_while_commits_follow_each_other() -> None:
    pacing = CommitPacing(0.01)
    assert pacing.earliest(5.0) == 5.0, "the first commit"
    pacing.started(5.0)
    pacing.ended(waiting=False)
    assert pacing.earliest(5.004) == 5.004, "the last commit left nothing waiting: a quiet line goes at once"
    pacing.started(5.25)
    pacing.ended(waiting=True)
    assert pacing.earliest(5.252) == 5.26, "requests were waiting: one interval after the last start"
    assert pacing.earliest(5.75) == 5.75, "a commit that took longer than the interval: at once"


async def test_paced_writes_gather_into_one_commit_and_a_lone_one_goes_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, inbox = trio.open_memory_channel[WriteRequest](10)
    writer = writer_for(pace=1.0)
    start = trio.current_time()
    lone = request(item("t", 1))
    batch, _status = await writer._gather(inbox, lone)
    assert batch == [lone] and trio.current_time() == start, "nothing committed lately: at once"
    writer.pacing.started(trio.current_time())
    writer.pacing.ended(waiting=False)
    after_quiet = request(item("t", 9))
    batch, _status = await writer._gather(inbox, after_quiet)
    assert batch == [after_quiet] and trio.current_time() == start, "the last commit left nothing waiting"
    writer.pacing.started(trio.current_time())
    writer.pacing.ended(waiting=True)
    got: list[tuple[list[WriteRequest], float]] = []
    first, second, third = request(item("t", 2)), request(item("t", 3)), request(item("t", 4))

    async def gather() -> None:
        batch, _status = await writer._gather(inbox, first)
        got.append((batch, trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gather)
        await trio.sleep(0.4)
        await send.send(second)
        await trio.sleep(0.4)
        await send.send(third)
    assert got == [([first, second, third], 1.0)], "gathered until one interval after the last commit started"


async def test_batch_size_ends_the_batch(autojump_clock: trio.testing.MockClock) -> None:
    send, inbox = trio.open_memory_channel[WriteRequest](10)
    first = request(item("t", 1), item("t", 2))
    second = request(item("t", 3), item("t", 4))
    third = request(item("t", 5))
    send.send_nowait(second)
    send.send_nowait(third)
    batch, _ = await writer_for(batch_size=4, flush_interval=5.0)._gather(inbox, first)
    assert batch == [first, second]
    assert inbox.receive_nowait() is third


async def test_a_status_change_ends_the_batch_and_comes_back(autojump_clock: trio.testing.MockClock) -> None:
    send, inbox = trio.open_memory_channel[WriteRequest](10)
    first, after = request(item("t", 1)), request(item("t", 2))
    status = WriteRequest(done=lambda _o: None, status=StatusChange("t", "succeeded", 0))
    send.send_nowait(status)
    send.send_nowait(after)
    batch, returned = await writer_for(flush_interval=5.0)._gather(inbox, first)
    assert batch == [first] and returned is status
    assert inbox.receive_nowait() is after


# --- settle: what one request may acknowledge --------------------------------------


def record(task: str, seq: int) -> LogRecord:
    return LogRecord(task_id=task, seq=seq, timestamp=TS, source="stdout", level="INFO", message=f"line {seq}")


def test_settle_acknowledges_each_producer_in_its_own_seqs() -> None:
    items = [item("a", 1), item("a", 2), item("b", 1, producer="run")]
    result = AppendResult(
        records=[record("a", 1), record("a", 2), record("b", 1)],
        inserted=[record("a", 1), record("b", 1)],
        durable={"a": 2, "b": 1},
        status=[INSERTED, DUPLICATE, INSERTED],
        producers={("a", ""): 2, ("b", "run"): 1},
    )
    outcome = settle(items[:2], result, 0)
    assert outcome.producers == {("a", ""): 2} and outcome.refusals == []
    assert settle(items[2:], result, 2).producers == {("b", "run"): 1}


def test_settle_acknowledges_no_hub_made_producer() -> None:
    items = [item("a", 1, producer="~writer")]
    result = AppendResult(
        records=[record("a", 1)], inserted=[record("a", 1)], durable={"a": 1},
        status=[INSERTED], producers={("a", "~writer"): 1},
    )
    assert settle(items, result, 0).producers == {}


def test_settle_caps_the_ack_below_a_conflict_and_names_it_once() -> None:
    items = [item("a", 1), item("a", 2, "other"), item("a", 3, "other")]
    result = AppendResult(
        records=[record("a", 1), record("a", 2), record("a", 3)],
        inserted=[record("a", 1)],
        durable={"a": 3},
        status=[INSERTED, CONFLICT, CONFLICT],
        producers={("a", ""): 3},
    )
    outcome = settle(items, result, 0)
    assert outcome.producers == {("a", ""): 1}, "an ack never covers a record that was not stored"
    [refusal] = outcome.refusals
    assert refusal.code == "SEQ_CONFLICT" and refusal.cap == 1 and refusal.key == ("a", "")
    assert "seq 2" in refusal.message and "1 more records" in refusal.message


def test_settle_acknowledges_a_request_no_further_than_its_own_seqs() -> None:
    # One commit: a request of 4..5, another request's (another connection's)
    # different 6..7 stored, and a third request's 6..7 refused against them.
    # The first must not be acknowledged to 7: its connection's own 6..7 are
    # the refused ones.
    items = [item("a", 4), item("a", 5), item("a", 6), item("a", 7), item("a", 6, "mine"), item("a", 7, "mine")]
    result = AppendResult(
        records=[record("a", 4), record("a", 5), record("a", 6), record("a", 7), record("a", 6), record("a", 7)],
        inserted=[record("a", 4), record("a", 5), record("a", 6), record("a", 7)],
        durable={"a": 7},
        status=[INSERTED, INSERTED, INSERTED, INSERTED, CONFLICT, CONFLICT],
        producers={("a", ""): 7},
    )
    assert settle(items[:2], result, 0).producers == {("a", ""): 5}
    assert settle(items[2:4], result, 2).producers == {("a", ""): 7}
    refused = settle(items[4:], result, 4)
    assert refused.producers == {("a", ""): 5} and refused.refusals[0].cap == 5


def test_settle_resumes_a_gap_after_what_is_stored_whatever_is_refused() -> None:
    # The producer holds 1..3; a request sends 2 changed and 10: SEQ_GAP from 4.
    items = [item("a", 2, "changed"), item("a", 10)]
    result = AppendResult(
        records=[record("a", 2), None], inserted=[], durable={"a": 3},
        status=[CONFLICT, GAP], producers={("a", ""): 3},
    )
    gap = next(r for r in settle(items, result, 0).refusals if r.code == "SEQ_GAP")
    assert gap.resume_from == 4


# --- write_within: a REST POST out of time -----------------------------------------


async def test_write_within_withdraws_what_the_writer_never_took(autojump_clock: trio.testing.MockClock) -> None:
    send, inbox = trio.open_memory_channel[WriteRequest](1)
    start = trio.current_time()
    assert await write_within(send, [item("t", 1)], 8.0) is None
    assert trio.current_time() - start == 8.0
    # Delivered to the inbox but withdrawn: the writer drops it without storing it.
    withdrawn = inbox.receive_nowait()
    assert withdrawn.withdrawn and not withdrawn.attempting


async def test_write_within_returns_the_committed_outcome(sqlite_store: SQLiteStore) -> None:
    send, inbox = trio.open_memory_channel[WriteRequest](4)
    writer = writer_for(sqlite_store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, inbox)
        with send:
            outcome = await write_within(send, [item("t", 1), item("t", 2)], 30.0)
    assert outcome is not None and outcome.error is None
    assert outcome.producers == {("t", ""): 2}
    assert await sqlite_store.durable_seq("t") == 2


# --- Writer.run with a real store ---------------------------------------------------


async def test_writer_commits_acknowledges_and_drops_withdrawn_requests(sqlite_store: SQLiteStore) -> None:
    send, inbox = trio.open_memory_channel[WriteRequest](8)
    writer = writer_for(sqlite_store)
    outcomes: list[WriteOutcome] = []
    withdrawn = request(item("w", 1), into=outcomes)
    assert withdrawn.withdraw(), "not attempted yet: it can be withdrawn"
    send.send_nowait(withdrawn)
    send.send_nowait(request(item("t", 1), item("t", 2), into=outcomes))
    done = trio.Event()
    send.send_nowait(WriteRequest(done=lambda o: (outcomes.append(o), done.set()), status=StatusChange("t", "succeeded", 0)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, inbox)
        await done.wait()
        send.close()
    assert [type(o.error).__name__ for o in outcomes] == ["Withdrawn", "NoneType", "NoneType"]
    assert outcomes[1].producers == {("t", ""): 2}
    assert outcomes[2].task is not None and outcomes[2].task.state == "succeeded"
    assert await sqlite_store.durable_seq("w") == 0
    assert writer.metrics.records_ingested == 2


async def test_writer_publishes_commits_to_live_viewers(sqlite_store: SQLiteStore) -> None:
    send, inbox = trio.open_memory_channel[WriteRequest](8)
    writer = writer_for(sqlite_store)
    published: list[tuple[list[int], dict[str, int]]] = []
    writer.broadcaster.publish_records = lambda inserted, durable: published.append(  # type: ignore[method-assign]
        ([r.seq for r in inserted], dict(durable))
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, inbox)
        with send:
            await write_within(send, [item("t", 1), item("t", 2)], 30.0)
            await write_within(send, [item("t", 2), item("t", 3)], 30.0)
    assert published == [([1, 2], {"t": 2}), ([3], {"t": 3})], "a duplicate is not published again"


# --- the syncer ---------------------------------------------------------------------


class CountingSyncs:
    """A real SQLite store that counts its syncs and can hold one back."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.syncs = 0
        self.release = trio.Event()
        self.release.set()
        self.syncing = trio.Event()

    async def sync(self) -> None:
        self.syncing.set()
        await self.release.wait()
        await self.store.sync()
        self.syncs += 1

    async def upkeep(self) -> None:
        await self.store.upkeep()


async def test_syncer_answers_after_the_sync_in_commit_order(sqlite_store: SQLiteStore) -> None:
    store = CountingSyncs(sqlite_store)
    store.release = trio.Event()
    send, inbox = trio.open_memory_channel[Settled](8)
    answered: list[str] = []

    def answering(name: str) -> tuple[WriteRequest, WriteOutcome]:
        return WriteRequest(done=lambda _o: answered.append(name)), WriteOutcome()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_syncer, store, inbox)
        await send.send(Settled([answering("a1"), answering("a2")]))
        await store.syncing.wait()
        # While the first sync runs, two more batches commit and wait.
        await send.send(Settled([answering("b")]))
        await send.send(Settled([answering("c")]))
        assert answered == [], "nothing is answered before its sync"
        store.release.set()
        send.close()
    assert answered == ["a1", "a2", "b", "c"]
    assert store.syncs == 2, "the batches that waited share one sync (group fsync)"


class SlowUpkeep(CountingSyncs):
    """A real SQLite store whose upkeep (a WAL checkpoint) takes until released."""

    def __init__(self, store: SQLiteStore) -> None:
        super().__init__(store)
        self.upkeep_started = trio.Event()
        self.upkeep_done = trio.Event()
        self.upkeeps = 0

    async def upkeep(self) -> None:
        self.upkeeps += 1
        self.upkeep_started.set()
        await self.upkeep_done.wait()
        await self.store.upkeep()


async def test_answers_never_wait_for_the_upkeep_a_sync_leaves(sqlite_store: SQLiteStore) -> None:
    # A checkpoint can take tens of milliseconds: the acks of the commits
    # that follow go out meanwhile, after their own syncs.
    store = SlowUpkeep(sqlite_store)
    send, inbox = trio.open_memory_channel[Settled](8)
    answered: list[str] = []

    def answering(name: str) -> tuple[WriteRequest, WriteOutcome]:
        return WriteRequest(done=lambda _o: answered.append(name)), WriteOutcome()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_syncer, store, inbox)
            await send.send(Settled([answering("a")]))
            await store.upkeep_started.wait()
            for name in ("b", "c", "d"):
                await send.send(Settled([answering(name)]))
                while name not in answered:
                    await trio.sleep(0.001)
            assert store.syncs >= 2 and store.upkeeps == 1, "one upkeep at a time, asked again at most once"
            store.upkeep_done.set()
            send.close()
    assert answered == ["a", "b", "c", "d"]
