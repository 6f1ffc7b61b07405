"""Many producers against one hub: what it holds for their writes is bounded in
bytes whatever their number (past the bound it stops reading), and its acks
are coalesced yet never cover a record before its commit. On both stores."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import orjson
import trio
import trio.testing
from trio_websocket import open_websocket_url

from hub.ingest_budget import IngestBudget
from hub.messages import WriteOutcome, WriteRequest, Written, answer
from keruta.frames import LogsFrame
from keruta.wire import encode_bytes
from tests import hubclient
from tests.hubclient import Ws, logs_path, make_record, parse_metrics, stored
from tests.inprocess import InProcessHub, InProcessHubFactory

hub_factory = hubclient.hub_factory  # fixture

BOUND = 64 * 1024
CONNECTIONS = 200
FRAMES = 10
TASKS = 10


def one_record(task_id: str, producer: str, seq: int) -> str:
    record = make_record(task_id, seq, f"{producer} line {seq}")
    return encode_bytes(LogsFrame(task_id, [record], producer)).decode()


async def metrics(hub: InProcessHub) -> dict[str, float]:
    async with hub.http() as client:
        return parse_metrics((await client.get("/metrics")).text)


async def test_a_flood_of_small_frames_from_many_connections_stays_within_the_ingest_bound(
    hub_factory: InProcessHubFactory,
) -> None:
    # Commits wait a little for more, so the flood outruns the writer.
    hub = await hub_factory.astart("--ingest-queue-bytes", str(BOUND), "--write-flush-interval", "0.05")

    async def producer(i: int) -> None:
        task, name = f"flood-{i % TASKS}", f"p{i:03d}"
        async with open_websocket_url(hub.ws_url) as conn:
            ws = Ws(conn)
            # Back to back, waiting for nothing: the hub has to hold or stop reading.
            for seq in range(1, FRAMES + 1):
                await ws.send(one_record(task, name, seq))
            with trio.fail_after(120):
                await ws.wait_ack(task, FRAMES)

    async with trio.open_nursery() as nursery:
        for i in range(CONNECTIONS):
            nursery.start_soon(producer, i)

    seen = await metrics(hub)
    assert seen["keruta_ingest_queue_bytes_peak"] <= BOUND, "the hub held more than its bound"
    assert seen["keruta_ingest_queue_bytes_peak"] > BOUND // 2, "the flood never pressed on the bound"
    # Given back once answered: a client's last ack can reach it before the
    # hub has handled the answers of the frames other clients sent with it.
    with trio.move_on_after(10):
        while seen["keruta_ingest_queue_bytes"] != 0:
            await trio.sleep(0.05)
            seen = await metrics(hub)
    assert seen["keruta_ingest_queue_bytes"] == 0, "every frame's bytes are given back once answered"
    for t in range(TASKS):
        records = await stored(hub, f"flood-{t}")
        expected = sorted(
            f"p{i:03d} line {seq}" for i in range(t, CONNECTIONS, TASKS) for seq in range(1, FRAMES + 1)
        )
        assert sorted(r["message"] for r in records) == expected, "every line stored once"
        assert [r["seq"] for r in records] == list(range(1, len(expected) + 1))


@asynccontextmanager
async def commits_held(db: str) -> AsyncIterator[None]:
    """Another database session holds what the hub needs to commit any write
    (SQLite: the write lock; PostgreSQL: the chunks table, against inserts)
    until the block ends. (A task's row held elsewhere would hold up only
    that task's writes: the writer commits the others apart.)"""
    locked, release = threading.Event(), threading.Event()

    def hold_sqlite() -> None:
        conn = sqlite3.connect(db.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(60)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    def hold_pg() -> None:
        import asyncpg

        async def hold() -> None:
            conn = await asyncpg.connect(db)
            try:
                async with conn.transaction():
                    await conn.execute("LOCK TABLE keruta_chunks IN SHARE MODE")
                    locked.set()
                    while not release.is_set():
                        await asyncio.sleep(0.01)
            finally:
                await conn.close()

        asyncio.run(hold())

    hold = hold_sqlite if db.startswith("sqlite://") else hold_pg
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, hold)
        await trio.to_thread.run_sync(locked.wait, 30)
        try:
            yield
        finally:
            release.set()


async def nothing_for(ws: Ws, seconds: float) -> None:
    with trio.move_on_after(seconds):
        frame = await ws.recv()
        raise AssertionError(f"the hub answered before the commit: {frame}")


async def test_acks_wait_for_the_commit_then_one_ack_covers_every_frame_it_committed(
    hub_factory: InProcessHubFactory,
) -> None:
    hub = await hub_factory.astart()
    async with hub.ws() as blocker, hub.ws() as fleet:
        await blocker.send(one_record("blocker", "pa", 1))
        with trio.fail_after(30):
            await blocker.wait_ack("blocker", 1)
        async with commits_held(hub.db):
            # The writer is stuck committing this one...
            await blocker.send(one_record("blocker", "pa", 2))
            await trio.sleep(0.3)
            # ...while ten one-record frames of another producer wait for it.
            for seq in range(1, 11):
                await fleet.send(one_record("fleet", "pb", seq))
            await nothing_for(fleet, 1.5)
            await nothing_for(blocker, 0.1)
        with trio.fail_after(30):
            assert await blocker.recv() == {"type": "ack", "taskId": "blocker", "seq": 2, "producer": "pa"}
            assert await fleet.recv() == {"type": "ack", "taskId": "fleet", "seq": 10, "producer": "pb"}, (
                "one ack for the ten frames committed together"
            )
        await nothing_for(fleet, 0.5)
    assert [r["message"] for r in await stored(hub, "fleet")] == [f"pb line {s}" for s in range(1, 11)]


POSTS = 10
POST_MESSAGE = 15_000  # bytes of each POST's one record: ten of them are more than BOUND


def post_body(i: int) -> bytes:
    return orjson.dumps({"source": "stdout", "level": "INFO", "message": f"post {i} " + "x" * POST_MESSAGE,
                         "producer": f"poster-{i}", "seq": 1})


async def posts(hub: InProcessHub, task_id: str, answers: dict[int, httpx.Response]) -> None:
    """POSTS requests at once, each its own connection and record; their answers by index."""

    async def one(i: int) -> None:
        async with hub.http() as client:
            answers[i] = await client.post(logs_path(task_id), content=post_body(i),
                                           headers={"Content-Type": "application/json"})

    async with trio.open_nursery() as nursery:
        for i in range(POSTS):
            nursery.start_soon(one, i)


async def test_post_bodies_wait_unread_for_room_in_the_ingest_budget_then_are_stored(
    hub_factory: InProcessHubFactory,
) -> None:
    """A POST's body is held until its records are committed: it takes its
    bytes from the ingest budget as a WebSocket frame does, so while commits
    are held the hub holds no more than the bound of them, and the rest wait
    unread until room comes back -- then each is stored once."""
    hub = await hub_factory.astart("--ingest-queue-bytes", str(BOUND), "--post-timeout", "60")
    answers: dict[int, httpx.Response] = {}
    async with trio.open_nursery() as nursery:
        async with commits_held(hub.db):
            nursery.start_soon(posts, hub, "posts", answers)
            with trio.fail_after(30):
                while (await metrics(hub))["keruta_ingest_queue_bytes"] < BOUND // 2:
                    await trio.sleep(0.05)
            await trio.sleep(0.5)
            held = await metrics(hub)
            assert held["keruta_ingest_queue_bytes"] <= BOUND, "the hub read more POST bodies than its bound"
            assert not answers, "answered before the commit"
    assert sorted(answers) == list(range(POSTS))
    assert all(a.status_code == 200 for a in answers.values()), [a.text for a in answers.values()]
    records = await stored(hub, "posts")
    assert sorted(r["message"].split(" x")[0] for r in records) == sorted(f"post {i}" for i in range(POSTS))
    seen = await metrics(hub)
    assert seen["keruta_ingest_queue_bytes_peak"] <= BOUND
    assert seen["keruta_ingest_queue_bytes"] == 0, "every body's bytes are given back once answered"


async def test_a_post_that_finds_no_room_within_the_post_timeout_is_503_unread_and_never_stored(
    hub_factory: InProcessHubFactory,
) -> None:
    hub = await hub_factory.astart("--ingest-queue-bytes", str(BOUND), "--post-timeout", "1", "--db-timeout", "3")
    answers: dict[int, httpx.Response] = {}
    async with commits_held(hub.db):
        # Those admitted are answered once the commit under way at their
        # deadline ends (PostgreSQL: its lock wait, up to --db-timeout); those
        # waiting for room, at their deadline.
        with trio.fail_after(60):
            await posts(hub, "posts", answers)
    assert [a.status_code for a in answers.values()] == [503] * POSTS
    assert all(a.json()["error"] == "STORE_UNAVAILABLE" and "Retry-After" in a.headers for a in answers.values())
    unread = [a for a in answers.values() if "--ingest-queue-bytes" in a.json()["message"]]
    assert unread, "no POST waited for room: the budget never bound them"
    assert all(a.headers.get("connection") == "close" for a in unread), "an unread body ends its connection"
    assert await stored(hub, "posts") == [], "a POST answered 503 was stored"
    assert (await metrics(hub))["keruta_ingest_queue_bytes"] == 0


# --- the parts, by plain calls ------------------------------------------------


async def test_the_ingest_budget_lets_waiters_in_in_order_as_room_comes_back() -> None:
    budget = IngestBudget(100)
    await budget.take(100)
    let_in: list[str] = []

    async def waiter(name: str, size: int) -> None:
        await budget.take(size)
        let_in.append(name)

    async with trio.open_nursery() as nursery:
        for name, size in (("a", 50), ("b", 60), ("c", 10)):
            nursery.start_soon(waiter, name, size)
            await trio.testing.wait_all_tasks_blocked()
        assert not budget.try_take(1), "a new frame does not pass the waiting ones"
        budget.release(100)
        await trio.testing.wait_all_tasks_blocked()
        assert (let_in, budget.used) == (["a"], 50), "b does not fit yet, and c does not pass it"
        budget.release(50)
    assert sorted(let_in[1:]) == ["b", "c"] and budget.used == 70 and budget.peak == 100


async def test_a_frame_larger_than_the_budget_goes_alone() -> None:
    budget = IngestBudget(100)
    await budget.take(10)
    with trio.move_on_after(0.1):
        await budget.take(500)
        raise AssertionError("taken past the bound")
    budget.release(10)
    assert budget.used == 0
    await budget.take(500)
    assert budget.used == 500


async def test_a_cancelled_waiter_takes_nothing_and_lets_the_next_one_in() -> None:
    budget = IngestBudget(100)
    await budget.take(100)
    async with trio.open_nursery() as nursery:
        got: list[int] = []

        async def waiter(size: int) -> None:
            await budget.take(size)
            got.append(size)

        scope = trio.CancelScope()

        async def cancellable() -> None:
            with scope:
                await budget.take(90)
                got.append(90)

        nursery.start_soon(cancellable)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, 10)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and budget.used == 100, "no room yet: the next waiter still waits"
        budget.release(100)
    assert got == [10] and budget.used == 10, "the cancelled waiter holds nothing"


async def test_messages_still_arriving_hold_at_most_half_the_budget() -> None:
    budget = IngestBudget(100)
    await budget.take_partial(30)
    await budget.take_partial(20)
    with trio.move_on_after(0.1):
        await budget.take_partial(10)
        raise AssertionError("a message still arriving took past half the budget")
    assert (budget.used, budget.partial_used) == (50, 50)
    assert budget.try_take(50), "whole frames still find the other half"
    budget.release(50)
    budget.release_partial(30)
    assert (budget.used, budget.partial_used) == (20, 20)


async def test_one_message_still_arriving_always_goes_alone() -> None:
    """Even past the share or the whole budget: else a message larger than
    them could never be read to its end."""
    budget = IngestBudget(100)
    await budget.take(100)
    await budget.take_partial(200)
    assert (budget.used, budget.partial_used) == (300, 200)


async def test_a_message_still_arriving_does_not_go_alone_beside_a_whole_frame_that_did() -> None:
    budget = IngestBudget(100)
    await budget.take(500)  # alone: larger than the budget
    with trio.move_on_after(0.1):
        await budget.take_partial(200)
        raise AssertionError("two past the bound at once")
    budget.release(500)
    await budget.take_partial(200)
    assert (budget.used, budget.partial_used) == (200, 200)


async def test_partial_waiters_go_in_order_after_whole_frames() -> None:
    budget = IngestBudget(100)
    await budget.take_partial(50)
    await budget.take(50)
    order: list[str] = []

    async def partial(name: str) -> None:
        await budget.take_partial(20)
        order.append(name)

    async def whole() -> None:
        await budget.take(30)
        order.append("whole")

    scope = trio.CancelScope()

    async def cancelled() -> None:
        with scope:
            await budget.take_partial(20)
            order.append("cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled)
        await trio.testing.wait_all_tasks_blocked()
        for name in ("p1", "p2"):
            nursery.start_soon(partial, name)
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(whole)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        budget.release(50)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["whole"], "a whole frame waiting goes before messages still arriving"
        budget.release_partial(50)
    # Both let in by the one release; the cancelled waiter took nothing.
    assert order[0] == "whole" and sorted(order[1:]) == ["p1", "p2"]
    assert (budget.used, budget.partial_used) == (70, 40)


def test_answers_go_to_each_connection_as_one_message_in_commit_order() -> None:
    class Box:
        def __init__(self) -> None:
            self.messages: list[Written] = []

        def deliver(self, message: Written) -> None:
            self.messages.append(message)

    a, b = Box(), Box()
    posted: list[WriteOutcome] = []
    outcomes = [WriteOutcome(producers={("t", str(i)): i}) for i in range(5)]
    answer([
        (WriteRequest(reply_to=a), outcomes[0]),
        (WriteRequest(reply_to=b), outcomes[1]),
        (WriteRequest(done=posted.append), outcomes[2]),
        (WriteRequest(reply_to=a), outcomes[3]),
        (WriteRequest(reply_to=a), outcomes[4]),
    ])
    assert [m.outcomes for m in a.messages] == [[outcomes[0], outcomes[3], outcomes[4]]]
    assert [m.outcomes for m in b.messages] == [[outcomes[1]]]
    assert posted == [outcomes[2]]
