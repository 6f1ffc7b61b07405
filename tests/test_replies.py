"""hub/ws/acks.py Replies on its own: the order in which a connection's
answers go out when several commits' outcomes wait for the sender."""

from __future__ import annotations

from hub.messages import WriteOutcome
from hub.ws.acks import Replies
from keruta.frames import AckFrame, StatusFrame
from keruta.records import TaskInfo
from keruta.wire import decode_hub_frame


def drain(replies: Replies) -> list[object]:
    frames = []
    while (payload := replies.next_frame()) is not None:
        frames.append(decode_hub_frame(payload))
    return frames


def test_a_runs_status_goes_after_the_ack_its_records_are_owed() -> None:
    """The records' commit and then the run's status were both answered
    before the sender ran: the ack still comes first, as they were committed."""
    replies = Replies()
    replies.on_written(WriteOutcome(producers={("t", "run"): 6, ("u", "other"): 2}))
    replies.on_written(WriteOutcome(task=TaskInfo("t", "failed", 7), run_state=("run", "failed", 7)))
    frames = drain(replies)
    assert frames.index(AckFrame("t", 6, "run")) < frames.index(StatusFrame("t", "failed", 7, "run"))
    assert AckFrame("u", 2, "other") in frames and len(frames) == 3, frames


def test_a_status_with_no_ack_owed_goes_alone() -> None:
    replies = Replies()
    replies.on_written(WriteOutcome(task=TaskInfo("t", "succeeded", 0), run_state=("run", "succeeded", 0)))
    assert drain(replies) == [StatusFrame("t", "succeeded", 0, "run")]
