"""The broadcaster's fan-out rules, and the connection queues it offers into,
without sockets."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import trio
import trio.testing

from hub.actors.broadcaster import Broadcaster
from hub.messages import Refusal, WriteOutcome
from hub.metrics import Metrics
from hub.ws.acks import Replies
from hub.ws.queues import WAKE, Outbox, WriteQueue
from hub.ws.subscriber_frames import FRAME_RECORDS
from hub.ws.subscription import Outgoing, Subscription
from keruta.records import LogRecord, TaskInfo


def _records(seqs: range, task: str = "t1") -> list[LogRecord]:
    return [
        LogRecord(task, s, "2026-11-28T12:00:00.000000Z", "stderr" if s % 2 else "stdout", "INFO", f"m{s}")
        for s in seqs
    ]


def _into(offered: list[Outgoing]) -> Callable[[Outgoing], bool]:
    def offer(item: Outgoing) -> bool:
        offered.append(item)
        return True

    return offer


def _live(cursor: int, offered: list[Outgoing], source: str | None = None, task: str = "t1") -> Subscription:
    return Subscription(task, source, None, cursor=cursor, offer=_into(offered), live=True)


def _seqs(offered: list[Outgoing]) -> list[list[int]]:
    return [[r["seq"] for r in orjson.loads(o.payload)["records"]] for o in offered]


def _warm(broadcaster: Broadcaster, through: int) -> None:
    """A first commit, so that later ones are compared with a watermark."""
    broadcaster.publish_records(_records(range(1, through + 1)), {"t1": through})


def test_subscriptions_with_one_filter_share_one_encoding() -> None:
    broadcaster = Broadcaster()
    a: list[Outgoing] = []
    b: list[Outgoing] = []
    c: list[Outgoing] = []
    subs = [_live(0, a), _live(0, b), _live(0, c, "stderr")]
    for sub in subs:
        broadcaster.add(sub)
    _warm(broadcaster, 2)
    del a[:], b[:], c[:]
    broadcaster.publish_records(_records(range(3, 7)), {"t1": 6})
    assert a[0].payload is b[0].payload
    assert a[0].sub is subs[0] and b[0].sub is subs[1]
    assert _seqs(a) == [[3, 4, 5, 6]] and _seqs(c) == [[3, 5]]
    assert all(s.cursor == 6 for s in subs)


def test_the_first_commit_and_subscriptions_ahead_share_one_encoding_too() -> None:
    broadcaster = Broadcaster()
    a: list[Outgoing] = []
    b: list[Outgoing] = []
    c: list[Outgoing] = []
    subs = [_live(0, a), _live(0, b), _live(0, c, "stderr")]
    for sub in subs:
        broadcaster.add(sub)
    broadcaster.publish_records(_records(range(1, 5)), {"t1": 4})
    assert a[0].payload is b[0].payload and _seqs(a) == [[1, 2, 3, 4]] and _seqs(c) == [[1, 3]]
    # Two that read 5..6 from the store before going live, one that did not.
    subs[0].cursor = subs[1].cursor = 6
    del a[:], b[:], c[:]
    broadcaster.publish_records(_records(range(5, 9)), {"t1": 8})
    assert a[0].payload is b[0].payload and _seqs(a) == [[7, 8]]
    assert _seqs(c) == [[5, 7]]


def test_a_subscription_ahead_within_the_commit_gets_only_what_is_past_its_cursor() -> None:
    broadcaster = Broadcaster()
    offered: list[Outgoing] = []
    sub = _live(0, offered)
    broadcaster.add(sub)
    _warm(broadcaster, 2)
    sub.cursor = 4  # took 3..4 from the store before going live
    offered.clear()
    broadcaster.publish_records(_records(range(3, 7)), {"t1": 6})
    assert _seqs(offered) == [[5, 6]] and offered[-1].through == 6


def test_an_incomplete_range_sends_live_subscriptions_to_catch_up() -> None:
    broadcaster = Broadcaster()
    offered: list[Outgoing] = []
    woken: list[Subscription] = []
    subs = [_live(0, offered), _live(0, offered, "stderr")]
    for sub in subs:
        sub.wake = lambda sub=sub: woken.append(sub)  # type: ignore[misc]
        broadcaster.add(sub)
    _warm(broadcaster, 2)
    offered.clear()
    # Seq 3 was a gap filled late by another request: this commit holds only 4..5.
    broadcaster.publish_records(_records(range(4, 6)), {"t1": 5})
    assert offered == [] and sorted(map(id, woken)) == sorted(map(id, subs))
    assert all(not s.live and s.cursor == 2 for s in subs)
    # Catching-up subscriptions are the connection's business until they go live.
    broadcaster.publish_records(_records(range(6, 8)), {"t1": 7})
    assert offered == [] and all(s.cursor == 2 for s in subs)
    assert broadcaster.known_seq("t1") == 7


def test_a_subscription_behind_the_watermark_catches_up() -> None:
    broadcaster = Broadcaster()
    offered: list[Outgoing] = []
    ok, behind = _live(0, offered), _live(0, [])
    broadcaster.add(ok)
    broadcaster.add(behind)
    _warm(broadcaster, 2)
    behind.cursor = 1
    offered.clear()
    broadcaster.publish_records(_records(range(3, 5)), {"t1": 4})
    assert not behind.live and behind.cursor == 1
    assert ok.live and _seqs(offered) == [[3, 4]]


def test_notify_durable_from_another_hub_always_goes_through_the_store() -> None:
    broadcaster = Broadcaster()
    sub = _live(0, [])
    broadcaster.add(sub)
    _warm(broadcaster, 2)
    broadcaster.notify_durable("t1", 4)
    assert not sub.live and broadcaster.known_seq("t1") == 4
    # A notice for what this hub already published is not news.
    sub.live = True
    sub.cursor = 4
    broadcaster.notify_durable("t1", 3)
    broadcaster.publish_records([], {"t1": 4})
    assert sub.live and sub.cursor == 4


def test_a_full_queue_stops_the_commit_for_that_subscription_only() -> None:
    broadcaster = Broadcaster()
    outbox = Outbox(1, 10**9, Metrics())
    full = Subscription("t1", None, None, cursor=0, offer=lambda o: outbox.offer(o) == "queued", live=True)
    other: list[Outgoing] = []
    broadcaster.add(full)
    broadcaster.add(_live(0, other))
    many = _records(range(1, 2 * FRAME_RECORDS + 1))
    broadcaster.publish_records(many, {"t1": len(many)})
    # One frame fits the outbox; the second is refused (SLOW_CONSUMER for the connection).
    assert outbox.queued_bytes > 0 and outbox.offer(Outgoing("x")) == "full"
    assert len(other) == 2 and full.cursor == other[-1].through == len(many)


def test_status_goes_to_live_subscriptions_and_waits_for_catching_up_ones() -> None:
    broadcaster = Broadcaster()
    offered: list[Outgoing] = []
    live = _live(0, offered)
    catching_up = Subscription("t1", None, None, cursor=0, offer=_into(offered))
    broadcaster.add(live)
    broadcaster.add(catching_up)
    broadcaster.publish_status(TaskInfo("t1", "running"))
    broadcaster.publish_status(TaskInfo("t1", "running"))  # a re-read after a lost notice
    broadcaster.publish_status(TaskInfo("other", "running"))  # nobody subscribed
    assert [orjson.loads(o.payload)["state"] for o in offered] == ["running"]
    assert offered[0].sub is None
    assert catching_up.pending_status == offered[0].payload


def test_remove_forgets_a_task_with_no_subscribers_left() -> None:
    broadcaster = Broadcaster()
    a, b = _live(0, []), _live(0, [])
    broadcaster.add(a)
    broadcaster.add(b)
    broadcaster.add(_live(0, [], task="t2"))
    assert broadcaster.count == 3
    _warm(broadcaster, 2)
    broadcaster.publish_status(TaskInfo("t1", "running"))
    broadcaster.remove(a)
    assert broadcaster.known_seq("t1") == 2
    broadcaster.remove(b)
    broadcaster.remove(b)
    assert broadcaster.count == 1 and "t1" not in broadcaster.subs
    assert broadcaster.known_seq("t1") == 0 and "t1" not in broadcaster.last_status


def test_records_of_tasks_nobody_follows_are_ignored() -> None:
    broadcaster = Broadcaster()
    broadcaster.publish_records(_records(range(1, 3), "t9"), {"t9": 2})
    assert broadcaster.known == {} and broadcaster.count == 0


# --- the connection's queues -------------------------------------------------


async def test_the_outbox_is_bounded_in_bytes_but_lets_one_big_frame_through() -> None:
    metrics = Metrics()
    outbox = Outbox(8, 1000, metrics)
    big = Outgoing("x" * 5000)
    assert outbox.offer(big) == "queued"
    assert outbox.offer(Outgoing("y")) == "full"
    assert metrics.subscriber_queue_bytes_peak == big.size
    item = await outbox.receive()
    outbox.taken(item)
    assert outbox.queued_bytes == 0 and outbox.offer(Outgoing("y")) == "queued"
    assert outbox.try_put(WAKE)
    outbox.close()
    assert outbox.offer(Outgoing("z")) == "closed" and not outbox.try_put(WAKE)


async def test_history_waits_for_room_up_to_its_patience(autojump_clock: trio.testing.MockClock) -> None:
    outbox = Outbox(8, 1000, Metrics())
    assert outbox.offer(Outgoing("x" * 900)) == "queued"
    start = trio.current_time()
    assert not await outbox.put_within(Outgoing("y" * 900), 10.0)
    assert trio.current_time() - start == 10.0

    async def sender() -> None:
        await trio.sleep(3)
        outbox.taken(await outbox.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        assert await outbox.put_within(Outgoing("y" * 900), 10.0)
    assert trio.current_time() - start == 13.0


async def test_replies_and_the_room_held_for_them_count_against_the_byte_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics, replies = Metrics(), Replies()
    outbox = Outbox(8, 2000, metrics, replies)
    # Room held for a write's replies, then its answer (a SEQ_GAP) in place of it.
    assert await outbox.reserve_within(1000, 10.0) and outbox.bytes == 1000
    replies.on_written(WriteOutcome(refusals=[Refusal("SEQ_GAP", "g" * 700, 1)]))
    outbox.release(1000)
    held = outbox.bytes
    assert 700 < held < 1000 and outbox.offer(Outgoing("x" * 1500)) == "full"
    # Another write waits for room until the sender has taken the answer, or its patience runs out.
    start = trio.current_time()
    assert not await outbox.reserve_within(1500, 10.0)
    assert trio.current_time() - start == 10.0
    assert outbox.try_put(WAKE)

    async def sender() -> None:
        await trio.sleep(3)
        item = await outbox.receive()
        assert replies.next_frame() is not None and replies.next_frame() is None
        outbox.taken(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        assert await outbox.reserve_within(1500, 10.0)
    assert trio.current_time() - start == 13.0
    assert outbox.bytes == metrics.subscriber_queue_bytes_peak == 1500


async def test_the_write_queue_lets_one_frame_in_whatever_its_size(autojump_clock: trio.testing.MockClock) -> None:
    queue = WriteQueue(2, 100)
    await queue.put("big", 500)
    with trio.move_on_after(1) as blocked:
        await queue.put("next", 1)
    assert blocked.cancelled_caught
    frame, size = await queue.__aiter__().__anext__()
    assert (frame, size) == ("big", 500)
    queue.done(size)
    await queue.put("a", 10)
    await queue.put("b", 10)
    assert queue.frames == 2
    with trio.move_on_after(1) as blocked:
        await queue.put("c", 10)
    assert blocked.cancelled_caught
