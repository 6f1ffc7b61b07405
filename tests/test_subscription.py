"""The subscription state machine and the connection's replies, without sockets.

A test plays the connection: it answers each `next_read` from a list of
records standing in for the store, and publishes commits to a real
Broadcaster in between, as the writer would.
"""

from __future__ import annotations

import orjson
import pytest

from hub.actors.broadcaster import Broadcaster
from hub.messages import Refusal, WriteOutcome
from hub.ws.acks import Replies
from hub.ws.subscriber_frames import FRAME_RECORDS
from hub.ws.subscription import (
    READ_DURABLE,
    Outgoing,
    ReadDurable,
    ReadRange,
    Subscription,
    check_subscribe,
    slow_consumer_frames,
)
from keruta.frames import FrameError, SubscribeFrame
from keruta.records import LogRecord, TaskInfo
from keruta.wire import decode_client_frame


def _records(seqs: range, task: str = "t1") -> list[LogRecord]:
    return [
        LogRecord(task, s, "2026-11-28T12:00:00.000000Z", "stderr" if s % 2 else "stdout", "INFO", f"m{s}")
        for s in seqs
    ]


class Client:
    """What one subscription's frames would put on the socket, in order."""

    def __init__(self) -> None:
        self.queued: list[Outgoing] = []
        self.accept = True

    def offer(self, item: Outgoing) -> bool:
        if self.accept:
            self.queued.append(item)
        return self.accept

    def seqs(self) -> list[int]:
        return [r["seq"] for o in self.queued if o.sub is not None for r in orjson.loads(o.payload)["records"]]


def _catch_up(sub: Subscription, store: list[LogRecord], durable: int, broadcaster: Broadcaster, client: Client) -> int:
    """Runs the reads `sub` asks for until it is live; returns how many reads it took."""
    reads = 0
    while (step := sub.next_read(broadcaster.known_seq(sub.task_id))) is not None:
        reads += 1
        if isinstance(step, ReadRange):
            page = [r for r in store if step.after < r.seq <= step.through and sub.wants(r)][: step.limit]
            client.queued.extend(sub.on_history_page(page))
        else:
            sub.on_durable(durable)
    return reads


def test_a_new_subscription_reads_the_watermark_then_history_then_goes_live() -> None:
    client = Client()
    sub = Subscription("t1", None, None, cursor=0, offer=client.offer)
    assert not sub.live
    assert sub.next_read(0) is READ_DURABLE
    sub.on_durable(3)
    step = sub.next_read(0)
    assert step == ReadRange("t1", 0, 3, FRAME_RECORDS, None, None)
    frames = sub.on_history_page(_records(range(1, 4)))
    assert [(f.sub, f.through) for f in frames] == [(sub, 3)]
    assert sub.cursor == 3
    assert sub.next_read(3) is None
    assert sub.live and sub.target is None
    # Once live, nothing more to read until the broadcaster sends it back.
    assert sub.next_read(99) is None


def test_a_commit_during_catch_up_is_read_from_the_store_with_no_gap_and_no_duplicate() -> None:
    broadcaster, client = Broadcaster(), Client()
    store = _records(range(1, 6))
    sub = Subscription("t1", None, None, cursor=0, offer=client.offer)
    broadcaster.add(sub)
    assert sub.next_read(broadcaster.known_seq("t1")) is READ_DURABLE
    sub.on_durable(5)
    step = sub.next_read(broadcaster.known_seq("t1"))
    assert isinstance(step, ReadRange)
    # While the connection awaits the store, the writer commits 6..7.
    store += _records(range(6, 8))
    broadcaster.publish_records(_records(range(6, 8)), {"t1": 7})
    assert client.queued == [] and sub.cursor == 0  # not live: the broadcaster leaves it alone
    client.queued.extend(sub.on_history_page([r for r in store if step.after < r.seq <= step.through]))
    # The broadcaster has seen 7, the subscription only 5: it reads the watermark again.
    assert sub.next_read(broadcaster.known_seq("t1")) is READ_DURABLE
    assert not sub.live
    _catch_up(sub, store, 7, broadcaster, client)
    assert sub.live and sub.cursor == 7
    broadcaster.publish_records(_records(range(8, 10)), {"t1": 9})
    assert client.seqs() == list(range(1, 10))


def test_history_read_ahead_of_the_broadcaster_is_not_sent_twice() -> None:
    broadcaster, client = Broadcaster(), Client()
    store = _records(range(1, 8))
    sub = Subscription("t1", None, None, cursor=0, offer=client.offer)
    broadcaster.add(sub)
    broadcaster.publish_records(store[:5], {"t1": 5})
    # 6..7 are committed (the store says 7) but not yet published here.
    _catch_up(sub, store, 7, broadcaster, client)
    assert sub.live and sub.cursor == 7
    broadcaster.publish_records(store[5:], {"t1": 7})
    broadcaster.publish_records(_records(range(8, 9)), {"t1": 8})
    assert client.seqs() == list(range(1, 9))


def test_a_filter_that_matches_nothing_still_moves_the_cursor_and_goes_live() -> None:
    broadcaster, client = Broadcaster(), Client()
    store = _records(range(1, 11))  # all INFO
    sub = Subscription("t1", None, "ERROR", cursor=0, offer=client.offer)
    broadcaster.add(sub)
    _catch_up(sub, store, 10, broadcaster, client)
    assert sub.live and sub.cursor == 10 and client.queued == []
    broadcaster.publish_records(_records(range(11, 13)), {"t1": 12})
    broadcaster.publish_records(_records(range(13, 15)), {"t1": 14})
    # Live too: each commit completes its range and sends nothing.
    assert client.queued == [] and sub.cursor == 14 and sub.live


def test_a_full_page_covers_only_through_its_last_record() -> None:
    client = Client()
    store = _records(range(1, FRAME_RECORDS + 21))
    sub = Subscription("t1", None, None, cursor=0, offer=client.offer)
    sub.next_read(0)
    sub.on_durable(len(store))
    step = sub.next_read(0)
    assert isinstance(step, ReadRange)
    sub.on_history_page(store[: step.limit])
    assert sub.cursor == FRAME_RECORDS
    assert sub.next_read(0) == ReadRange("t1", FRAME_RECORDS, len(store), FRAME_RECORDS, None, None)
    sub.on_history_page(store[FRAME_RECORDS:])
    assert sub.next_read(0) is None and sub.cursor == len(store)


def test_a_range_filled_by_another_hub_sends_a_live_subscription_back_to_the_store() -> None:
    broadcaster, client = Broadcaster(), Client()
    woken: list[bool] = []
    sub = Subscription("t1", None, None, cursor=0, offer=client.offer, wake=lambda: woken.append(True))
    broadcaster.add(sub)
    store = _records(range(1, 4))
    _catch_up(sub, store, 3, broadcaster, client)
    broadcaster.publish_records(store[2:], {"t1": 3})  # known = 3
    assert sub.live
    store += _records(range(4, 7))
    broadcaster.notify_durable("t1", 6)
    assert woken == [True] and not sub.live and sub.cursor == 3
    _catch_up(sub, store, 6, broadcaster, client)
    assert sub.live and client.seqs() == list(range(1, 7))


def test_a_status_that_arrives_while_catching_up_is_sent_once_live() -> None:
    broadcaster, client = Broadcaster(), Client()
    sub = Subscription("t1", None, None, cursor=0, offer=client.offer)
    broadcaster.add(sub)
    broadcaster.publish_status(TaskInfo("t1", "succeeded", 0))
    # The task as read when subscribing is older than what was published meanwhile.
    sub.on_task(TaskInfo("t1", "running"))
    assert client.queued == []
    payload = sub.take_status()
    assert payload is not None and orjson.loads(payload)["state"] == "succeeded"
    assert sub.take_status() is None


def test_the_status_read_when_subscribing_is_kept_for_after_the_history() -> None:
    sub = Subscription("t1", None, None, cursor=0, offer=Client().offer)
    sub.on_task(None)
    assert sub.pending_status is None
    sub.on_task(TaskInfo("t1", "running"))
    payload = sub.take_status()
    assert payload is not None and orjson.loads(payload) == {"type": "status", "taskId": "t1", "state": "running"}


def test_a_live_subscription_gets_status_at_once() -> None:
    client = Client()
    sub = Subscription("t1", None, None, cursor=0, offer=client.offer, live=True)
    sub.on_status("s")
    assert client.queued == [Outgoing("s")] and sub.pending_status is None


def test_delivered_follows_the_sender_and_never_goes_back() -> None:
    sub = Subscription("t1", None, None, cursor=4, offer=Client().offer, delivered=4)
    assert sub.resume_from == 5
    sub.on_sent(9)
    sub.on_sent(7)  # a status frame or an older history frame sent late
    assert sub.delivered == 9 and sub.resume_from == 10


def test_resume_point_after_slow_consumer_is_the_first_seq_not_written() -> None:
    broadcaster, client = Broadcaster(), Client()
    sub = Subscription("t1", None, None, cursor=0, offer=client.offer, live=True)
    other = Subscription("t2", None, None, cursor=0, offer=client.offer, live=True)
    broadcaster.add(sub)
    broadcaster.add(other)
    many = _records(range(1, 2 * FRAME_RECORDS + 1))
    broadcaster.publish_records(many, {"t1": len(many)})
    assert [f.through for f in client.queued] == [FRAME_RECORDS, 2 * FRAME_RECORDS]
    # The sender wrote the first frame only; the cursor is past both.
    sub.on_sent(client.queued[0].through)
    assert sub.cursor == 2 * FRAME_RECORDS
    frames = [orjson.loads(f) for f in slow_consumer_frames([sub, other])]
    assert frames == [
        {
            "type": "error",
            "code": "SLOW_CONSUMER",
            "message": f"subscriber of t1 fell behind; resubscribe with fromSeq={FRAME_RECORDS + 1}",
            "resumeFrom": FRAME_RECORDS + 1,
        },
        {
            "type": "error",
            "code": "SLOW_CONSUMER",
            "message": "subscriber of t2 fell behind; resubscribe with fromSeq=1",
            "resumeFrom": 1,
        },
    ]


def test_a_refused_offer_stops_the_rest_of_that_commit() -> None:
    client = Client()
    client.accept = False
    calls: list[Outgoing] = []

    def offer(item: Outgoing) -> bool:
        calls.append(item)
        return False

    sub = Subscription("t1", None, None, cursor=0, offer=offer, live=True)
    sub.take_live([("a", 1), ("b", 2)], 2)
    assert [c.payload for c in calls] == ["a"] and sub.cursor == 2


def test_check_subscribe() -> None:
    held = {f"t{i}": Subscription(f"t{i}", None, None, cursor=0, offer=Client().offer) for i in range(3)}
    check_subscribe(SubscribeFrame("new", source="stdout", level="ERROR"), {}, 3)
    # Replacing a subscription one holds is not one more.
    check_subscribe(SubscribeFrame("t1"), held, 3)
    with pytest.raises(FrameError) as too_many:
        check_subscribe(SubscribeFrame("t9"), held, 3)
    assert too_many.value.code == "TOO_MANY_SUBSCRIPTIONS" and "3 subscriptions" in too_many.value.message
    # Filters are checked where the frame is made (keruta/frames.py), so a
    # subscription never holds an unknown source or level.
    for kwargs, field in [({"source": "stdin"}, "source"), ({"level": "LOUD"}, "level")]:
        with pytest.raises(FrameError) as bad:
            decode_client_frame(orjson.dumps({"type": "subscribe", "taskId": "t1", **kwargs}))
        assert bad.value.code == "INVALID_MESSAGE_FORMAT" and f"'{field}'" in bad.value.message


def test_read_durable_is_one_value() -> None:
    assert ReadDurable() == READ_DURABLE


# --- replies to a producer's writes ---------------------------------------


def _drain(replies: Replies) -> list[dict[str, object]]:
    frames = []
    while (payload := replies.next_frame()) is not None:
        frames.append(orjson.loads(payload))
    return frames


def test_acks_are_coalesced_per_task_and_producer() -> None:
    replies = Replies()
    assert replies.on_written(WriteOutcome(producers={("t1", ""): 3, ("t1", "p"): 7}))
    assert replies.on_written(WriteOutcome(producers={("t1", ""): 5, ("t1", "p"): 6}))
    assert replies.on_written(WriteOutcome(producers={("t2", ""): 1}))
    frames = _drain(replies)
    assert sorted(frames, key=str) == sorted(
        [
            {"type": "ack", "taskId": "t1", "seq": 5},
            {"type": "ack", "taskId": "t1", "seq": 7, "producer": "p"},
            {"type": "ack", "taskId": "t2", "seq": 1},
        ],
        key=str,
    )
    assert replies.next_frame() is None
    assert not replies.on_written(WriteOutcome())


def test_a_conflict_caps_that_identity_for_good_and_comes_before_the_ack() -> None:
    replies = Replies()
    conflict = Refusal("SEQ_CONFLICT", "record [0] conflicts", key=("t1", "p"), cap=4)
    replies.on_written(WriteOutcome(producers={("t1", "p"): 4}, refusals=[conflict]))
    # A later write of the same producer committed further: the ack still stops at the cap.
    replies.on_written(WriteOutcome(producers={("t1", "p"): 9, ("t1", "q"): 9}))
    # A second conflict lower down lowers the cap; a higher one does not raise it.
    replies.on_written(WriteOutcome(refusals=[Refusal("SEQ_CONFLICT", "again", key=("t1", "p"), cap=2)]))
    replies.on_written(WriteOutcome(refusals=[Refusal("SEQ_CONFLICT", "later", key=("t1", "p"), cap=8)]))
    frames = _drain(replies)
    assert [f["message"] for f in frames if f["type"] == "error"] == ["record [0] conflicts", "again", "later"]
    assert [f["type"] for f in frames] == ["error"] * 3 + ["ack"] * 2
    assert sorted((f["producer"], f["seq"]) for f in frames[3:]) == [("p", 4), ("q", 9)]
    replies.on_written(WriteOutcome(producers={("t1", "p"): 12}))
    assert _drain(replies) == [{"type": "ack", "taskId": "t1", "seq": 2, "producer": "p"}]
    # The lowest cap holds.
    assert replies.caps == {("t1", "p"): 2}


def test_store_errors_are_coalesced_and_sent_first() -> None:
    replies = Replies()
    replies.on_written(WriteOutcome(producers={("t1", ""): 1}))
    replies.on_written(WriteOutcome(refusals=[Refusal("SEQ_GAP", "gap", 3)], producers={("t1", "p"): 2}))
    for _ in range(3):
        assert replies.on_written(WriteOutcome(error=RuntimeError("disk")))
    frames = _drain(replies)
    assert [f["type"] for f in frames] == ["error", "error", "ack", "ack"]
    assert frames[0]["code"] == "STORE_ERROR"
    assert frames[1] == {"type": "error", "code": "SEQ_GAP", "message": "gap", "resumeFrom": 3}


def test_a_runs_stored_status_goes_back_to_that_run() -> None:
    replies = Replies()
    outcome = WriteOutcome(task=TaskInfo("t1", "succeeded", 0), run_state=("run-1", "succeeded", 0))
    assert replies.on_written(outcome)
    assert _drain(replies) == [
        {"type": "status", "taskId": "t1", "state": "succeeded", "exitCode": 0, "producer": "run-1"}
    ]
