"""hub/ingest.py: what producers send (WebSocket records, REST LogRequests)
turned into store rows, and the timestamps it refuses by field name."""

from __future__ import annotations

import pytest

from hub.ingest import from_records, from_requests
from hub.store.base import Incoming
from keruta.frames import FrameError
from keruta.records import LogRecord, LogRequest
from keruta.timefmt import parse_ts

CANONICAL = "2026-03-04T05:06:07.123456Z"


def record(seq: int, timestamp: str | None = CANONICAL, **kwargs: object) -> LogRecord:
    return LogRecord(
        task_id="t", seq=seq, timestamp=timestamp, source="stderr", level="WARN",  # type: ignore[arg-type]
        message=f"line {seq}", **kwargs,  # type: ignore[arg-type]
    )


def test_records_keep_everything_and_carry_the_producer() -> None:
    [row] = from_records([record(3, line_number=7, metadata={"k": 1}, partial=True)], producer="p-1")
    assert row == Incoming(
        "t", 3, CANONICAL, "stderr", "WARN", "line 3", 7, {"k": 1}, True, "p-1"
    )


def test_record_timestamps_become_canonical_utc() -> None:
    rows = from_records([record(1, "2026-03-04T06:06:07.5+01:00"), record(2, "2026-03-04T05:06:07Z")])
    assert [r.timestamp for r in rows] == ["2026-03-04T05:06:07.500000Z", "2026-03-04T05:06:07.000000Z"]


def test_a_record_without_timestamp_gets_the_hubs_clock() -> None:
    [row] = from_records([record(1, None)])
    assert parse_ts(row.timestamp).tzinfo is not None


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01T00:00:00Z", "2026-02-30T00:00:00.000000Z"])
def test_a_bad_record_timestamp_is_refused_by_its_index(bad: str) -> None:
    with pytest.raises(FrameError) as refused:
        from_records([record(1), record(2), record(3, bad)], where="records")
    assert refused.value.code == "INVALID_MESSAGE_FORMAT"
    assert refused.value.field == "records[2].timestamp"
    assert "records[2].timestamp" in refused.value.message


def test_records_sharing_a_timestamp_are_each_stored_with_it() -> None:
    rows = from_records([record(i, "2026-03-04T06:06:07+01:00") for i in range(1, 4)])
    assert {r.timestamp for r in rows} == {"2026-03-04T05:06:07.000000Z"}
    assert [r.seq for r in rows] == [1, 2, 3]


def test_requests_get_the_task_and_a_level_from_the_message() -> None:
    rows = from_requests(
        "task-9",
        [LogRequest(message="ERROR: disk full"), LogRequest(message="fine", level="DEBUG", seq=4)],
        array=True,
    )
    assert [(r.task_id, r.level, r.seq, r.producer) for r in rows] == [
        ("task-9", "ERROR", None, ""), ("task-9", "DEBUG", 4, "")
    ]
    assert rows[0].source == "stdout"


@pytest.mark.parametrize(("array", "field"), [(True, "[1].timestamp"), (False, "timestamp")])
def test_a_bad_request_timestamp_is_invalid_request(array: bool, field: str) -> None:
    requests = [LogRequest(message="ok"), LogRequest(message="x", timestamp="not a time")]
    with pytest.raises(FrameError) as refused:
        from_requests("t", requests if array else requests[1:], array=array)
    assert refused.value.code == "INVALID_REQUEST"
    assert refused.value.field == field
