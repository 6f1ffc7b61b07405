"""The uplink's sans-IO protocol core (agent/link/protocol.py), driven by plain calls: no sockets."""

from __future__ import annotations

import attrs
import orjson
import pytest

from agent.link.framing import fill_gaps
from agent.link.protocol import (
    Delivered,
    HubRefused,
    ReadRecords,
    ReadSummary,
    SendFrame,
    UplinkProtocol,
    Wait,
)
from keruta import digest
from keruta.frames import AckFrame, ErrorFrame, StatusFrame
from keruta.limits import DEFAULT_LIMITS
from keruta.recordjson import encode_line
from keruta.summary import Summary

TS = "2026-01-01T00:00:00.000000Z"
PRODUCER = "0b5f6a9e-0000-4000-8000-000000000001"


def payload(seq: int) -> bytes:
    return encode_line("t", seq, TS, "stdout", "INFO", f"line {seq}", seq, {}, False)


def proto(**kw: object) -> UplinkProtocol:
    kw.setdefault("batch_size", 10)
    kw.setdefault("flush_interval", 0.2)
    kw.setdefault("max_in_flight_bytes", 4 << 20)
    return UplinkProtocol("t", PRODUCER, **kw)  # type: ignore[arg-type]


def step(p: UplinkProtocol, now: float = 0.0) -> object:
    """One action, with ReadRecords answered from an ideal spool: what the shell does."""
    action = p.next_frame(now)
    if isinstance(action, ReadRecords):
        records = [(s, payload(s)) for s in range(action.start, action.start + action.count)]
        frame = p.logs_frame(fill_gaps("t", action.start, records, action.count, p.available), now)
        assert frame is not None
        return orjson.loads(frame)
    if isinstance(action, ReadSummary):
        return orjson.loads(p.status_frame(None))
    if isinstance(action, SendFrame):
        return orjson.loads(action.data)
    return action


def seqs(frame: object) -> list[int]:
    assert isinstance(frame, dict) and frame["type"] == "logs"
    return [r["seq"] for r in frame["records"]]


def ack(seq: int) -> AckFrame:
    return AckFrame("t", seq, producer=PRODUCER)


def test_protocol_connect_says_running_then_sends_records_at_once() -> None:
    p = proto()
    p.records_available(3, 0.0)
    [running] = p.on_connected(0.0)
    assert orjson.loads(running) == {"type": "status", "taskId": "t", "state": "running", "producer": PRODUCER}
    frame = step(p)
    assert seqs(frame) == [1, 2, 3] and frame["producer"] == PRODUCER  # type: ignore[index]
    assert step(p) == Wait(None)


def test_protocol_nothing_goes_out_while_disconnected() -> None:
    p = proto()
    p.records_available(5, 0.0)
    assert p.next_frame(0.0) == Wait(None)


def test_protocol_window_holds_at_most_max_in_flight_bytes() -> None:
    size = len(payload(1))  # every record here is as long (seqs 1-9)
    p = proto(batch_size=2, max_in_flight_bytes=4 * size)
    p.on_connected(0.0)
    p.records_available(9, 0.0)
    assert seqs(step(p)) == [1, 2]
    assert seqs(step(p)) == [3, 4]
    assert step(p) == Wait(None), "the window is full"
    assert p.on_frame(ack(2), 0.0) == 2, "the spool may release up to 2"
    assert seqs(step(p)) == [5, 6]


def test_protocol_reads_no_more_than_the_byte_bound_has_room_for() -> None:
    size = len(payload(1))
    p = proto(batch_size=4, max_in_flight_bytes=5 * size)
    p.on_connected(0.0)
    p.records_available(9, 0.0)
    assert seqs(step(p)) == [1, 2, 3, 4]
    action = p.next_frame(0.0)
    assert isinstance(action, ReadRecords) and action.max_bytes == size, "room for one record"


def test_protocol_a_fast_producer_is_not_held_to_a_few_frames_per_round_trip() -> None:
    """Issue 17: 20,000 spooled records go out in 40 full frames before the
    first ack (the frame bound held them to 8 frames, 4,000 records)."""
    p = proto(batch_size=500, eager_frames=2)
    p.on_connected(0.0)
    p.records_available(20_000, 0.0)
    sent = []
    while isinstance(frame := step(p), dict):
        sent += seqs(frame)
    assert sent == list(range(1, 20_001))


def test_protocol_flush_interval_gathers_records_while_frames_are_in_flight() -> None:
    p = proto(batch_size=100, flush_interval=0.2)
    p.on_connected(0.0)
    p.records_available(1, 0.0)
    assert seqs(step(p, 0.0)) == [1], "nothing in flight: at once"
    p.records_available(3, 0.05)
    assert step(p, 0.1) == Wait(0.25), "in flight: wait for more, up to the interval"
    assert seqs(step(p, 0.25)) == [2, 3]


def test_protocol_reconnect_resends_from_the_ack_watermark() -> None:
    p = proto(batch_size=3)
    p.on_connected(0.0)
    p.records_available(9, 0.0)
    assert [seqs(step(p)) for _ in range(3)] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    p.on_frame(ack(3), 0.0)
    p.on_disconnected()
    assert p.next_frame(1.0) == Wait(None)
    p.on_connected(2.0)
    assert [seqs(step(p, 2.0)) for _ in range(2)] == [[4, 5, 6], [7, 8, 9]]


def test_protocol_ack_beyond_what_this_session_sent_moves_the_cursor() -> None:
    p = proto(batch_size=5)
    p.records_available(5, 0.0)
    p.on_connected(0.0)
    assert seqs(step(p)) == [1, 2, 3, 4, 5]
    p.on_disconnected()
    p.on_connected(0.0)
    # A previous session's frames, acked late: nothing left to send.
    assert p.on_frame(ack(5), 0.0) == 5
    assert p.next_frame(0.0) == Wait(None)


def test_protocol_an_ack_past_what_was_ever_sent_releases_only_what_was() -> None:
    """A confused hub (or proxy) acking records never sent: they are not
    released, and still go out."""
    p = proto(batch_size=2)
    p.records_available(5, 0.0)
    p.on_connected(0.0)
    assert seqs(step(p)) == [1, 2]
    assert p.on_frame(ack(1_000_000), 0.0) == 2
    assert p.acked == 2
    assert seqs(step(p)) == [3, 4]


def test_protocol_acks_for_another_producer_or_task_are_ignored() -> None:
    p = proto()
    p.records_available(3, 0.0)
    p.on_connected(0.0)
    step(p)
    assert p.on_frame(AckFrame("t", 3, producer="someone-else"), 0.0) is None
    assert p.on_frame(AckFrame("other", 3, producer=PRODUCER), 0.0) is None
    assert p.acked == 0


def test_protocol_final_status_handshake() -> None:
    p = proto()
    p.records_available(2, 0.0)
    p.on_connected(0.0)
    step(p)
    p.finish("succeeded", 0)
    assert step(p) == Wait(None), "not before every record is acknowledged"
    p.on_frame(ack(2), 0.0)
    status = step(p)
    assert status == {"type": "status", "taskId": "t", "state": "succeeded", "exitCode": 0, "producer": PRODUCER}
    assert step(p) == Wait(None), "sent once; wait for the hub's answer"
    # Someone else's status, or another state, does not confirm it.
    p.on_frame(StatusFrame("t", "succeeded", 0, producer="someone-else"), 0.0)
    p.on_frame(StatusFrame("t", "failed", 1, producer=PRODUCER), 0.0)
    assert step(p) == Wait(None)
    p.on_frame(StatusFrame("t", "succeeded", 0, producer=PRODUCER), 0.0)
    assert step(p) == Delivered()
    assert p.delivered


def test_protocol_asks_for_the_summary_once_every_record_is_acknowledged() -> None:
    """The spool tallies records as they are read to be sent: the summary is
    taken when the status goes, not when the command finishes."""
    p = proto()
    p.records_available(2, 0.0)
    p.on_connected(0.0)
    step(p)
    p.finish("succeeded", 0)
    assert p.next_frame(0.0) == Wait(None)
    p.on_frame(ack(2), 0.0)
    assert p.next_frame(0.0) == ReadSummary()
    summary = Summary(2, {"stdout": 2}, {"stdout": 12}, digest.to_text(12345))
    assert orjson.loads(p.status_frame(summary))["summary"] == summary.to_json()
    assert p.next_frame(0.0) == Wait(None), "sent once; wait for the hub's answer"


def test_protocol_final_status_is_sent_again_on_a_new_connection() -> None:
    p = proto()
    p.finish("failed", 2)
    assert p.on_connected(0.0) == [], "no `running` once the command has finished"
    assert step(p)["state"] == "failed"  # type: ignore[index]
    p.on_disconnected()
    p.on_connected(1.0)
    assert step(p)["state"] == "failed"  # type: ignore[index]


def test_protocol_seq_gap_resends_from_resume_from() -> None:
    p = proto(batch_size=3)
    p.on_connected(0.0)
    p.records_available(9, 0.0)
    for _ in range(3):
        step(p)
    p.on_frame(ack(2), 0.0)
    p.on_frame(ErrorFrame("SEQ_GAP", "resend from 4", resume_from=4), 0.0)
    assert [seqs(step(p)) for _ in range(2)] == [[4, 5, 6], [7, 8, 9]]
    # Never behind the ack watermark.
    p.on_frame(ErrorFrame("SEQ_GAP", "resend from 1", resume_from=1), 0.0)
    assert seqs(step(p)) == [3, 4, 5]


@pytest.mark.parametrize("code", ["SEQ_CONFLICT", "UNAUTHORIZED", "TOO_LARGE"])
def test_protocol_permanent_refusal_raises(code: str) -> None:
    p = proto()
    p.on_connected(0.0)
    with pytest.raises(HubRefused) as refused:
        p.on_frame(ErrorFrame(code, "no"), 0.0)
    assert refused.value.permanent


@pytest.mark.parametrize("code", ["STORE_UNAVAILABLE", "RATE_LIMITED", "SEQ_GAP", "SOMETHING_NEW"])
def test_protocol_transient_refusal_raises_for_a_retry(code: str) -> None:
    p = proto()
    with pytest.raises(HubRefused) as refused:
        p.on_frame(ErrorFrame(code, "later"), 0.0)
    assert not refused.value.permanent


def test_protocol_frames_fit_the_hub_limit() -> None:
    limits = attrs.evolve(DEFAULT_LIMITS, max_frame_bytes=2000)
    p = proto(batch_size=100, limits=limits)
    p.on_connected(0.0)
    p.records_available(100, 0.0)
    sizes = []
    while p.cursor <= 100:
        action = p.next_frame(0.0)
        assert isinstance(action, ReadRecords)
        records = [(s, payload(s)) for s in range(action.start, action.start + action.count)]
        frame = p.logs_frame(records, 0.0)
        assert frame is not None
        sizes.append(len(frame))
        p.on_frame(ack(p.cursor - 1), 0.0)
    assert max(sizes) <= 2000 and len(sizes) > 1


def test_protocol_only_what_is_available_is_read() -> None:
    p = proto(batch_size=100, acked_seq=10, available_seq=12)
    p.on_connected(0.0)
    assert p.next_frame(0.0) == ReadRecords(11, 2, p.max_payload)
