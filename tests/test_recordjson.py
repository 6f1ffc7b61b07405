"""keruta/recordjson.py against the cattrs converter (keruta/wire.py).

The record's JSON has one encoder and one decoder for agent and hub; the
converter says what that JSON is. Any valid record written by ours is read
back by the converter as the same value and vice versa, the frames are the
same bytes, and any input, valid or not, is decoded to the same frame or
refused with the same error whichever path takes it (the hub's rows too).
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.ingest import RowsFrame, decode_frame, from_records
from hub.store.base import Incoming
from keruta import recordjson
from keruta.frames import FrameError, LogFrame, LogsFrame
from keruta.limits import DEFAULT_LIMITS, MAX_SEQ, Limits
from keruta.records import KINDS, LogRecord, LogRequest
from keruta.wire import (
    client_frame_data,
    converter,
    decode_client_frame,
    decode_requests,
    encode_bytes,
    logs_frame_by_converter,
    requests_by_converter,
    structure,
)

# The kinds a producer may send: a `redaction` record is the hub's own.
SENT_KINDS = [k for k in KINDS if k != "redaction"]

TS = "2026-11-28T14:09:55.123456Z"
# Canonical, another form of a time, and no time at all.
TIMESTAMPS = [TS, "2026-03-04T06:06:07.5+01:00", "2026-03-04T05:06:07Z", "yesterday", "2026-02-30T00:00:00.000000Z"]

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
task_ids = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True).filter(lambda t: t not in (".", ".."))


def records(task_id: st.SearchStrategy[str] = task_ids, timestamps: list[str] = [TS]) -> st.SearchStrategy[LogRecord]:  # noqa: B006
    return st.builds(
        LogRecord,
        task_id=task_id,
        seq=st.integers(1, MAX_SEQ),
        timestamp=st.sampled_from(timestamps),
        source=st.sampled_from(["stdout", "stderr", "agent"]),
        level=st.sampled_from(["DEBUG", "INFO", "WARN", "ERROR"]),
        message=text,
        line_number=st.none() | st.integers(0, MAX_SEQ),
        metadata=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        partial=st.booleans(),
        id=st.none() | st.text(min_size=1, max_size=20),
        kind=st.none() | st.sampled_from(SENT_KINDS),
        producer=st.none() | st.just("") | st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True),
    )


@given(rec=records())
def test_a_record_written_by_either_is_read_by_the_other_as_the_same_value(rec: LogRecord) -> None:
    ours = recordjson.encode_record(rec)
    assert ours == orjson.dumps(converter.unstructure(rec))
    assert structure(orjson.loads(ours), LogRecord) == rec
    assert recordjson.read_records(rec.task_id, [converter.unstructure(rec)], DEFAULT_LIMITS) == [rec]


@given(rec=records(), producer=st.none() | st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True))
def test_the_agents_line_encoders_write_the_converters_bytes(rec: LogRecord, producer: str | None) -> None:
    # A producer's own lines: the frame names the producer, the records none.
    rec = attrs.evolve(rec, id=None, line_number=rec.line_number or 0, producer=None)
    assert rec.line_number is not None
    fields = (rec.task_id, rec.seq, rec.timestamp, rec.source, rec.level, rec.message, rec.line_number, rec.metadata)
    expected = orjson.dumps(converter.unstructure(rec))
    assert recordjson.encode_line(*fields, rec.partial, rec.kind) == expected
    if rec.kind is None:
        encoder = recordjson.LineEncoder(rec.task_id, rec.timestamp, rec.source, rec.metadata)
        assert encoder.encode(rec.seq, rec.level, rec.message, rec.line_number, rec.partial) == expected
    frame = LogsFrame(rec.task_id, [rec, rec], producer)
    assert recordjson.logs_frame(rec.task_id, [expected, expected], producer) == encode_bytes(frame)


@given(task_id=task_ids, data=st.data())
def test_frames_written_by_either_are_read_by_the_other_as_the_same_frame(task_id: str, data: st.DataObject) -> None:
    batch = data.draw(st.lists(records(st.just(task_id), TIMESTAMPS), max_size=6))
    producer = data.draw(st.none() | st.just("p-1"))
    frame = LogsFrame(task_id, batch, producer)
    by_converter = encode_bytes(frame)
    ours = recordjson.logs_frame(task_id, [recordjson.encode_record(r) for r in batch], producer)
    assert ours == by_converter
    if producer is None:
        assert recordjson.records_frame(task_id, batch) == by_converter
    assert decode_client_frame(ours) == frame
    assert general_decode(ours.decode(), DEFAULT_LIMITS) == frame
    # The hub's rows, straight from the JSON or by way of the LogRecords.
    assert outcome(hub_rows, ours.decode(), DEFAULT_LIMITS) == outcome(hub_rows_by_converter, ours.decode(), DEFAULT_LIMITS)


# --- any input: the same frame, rows or error ------------------------------------------

# For each field of a record, values around what it accepts; any JSON besides.
ODD: dict[str, list[Any]] = {
    "taskId": ["t1", "t2", "..", "", 1, None],
    "seq": [0, -1, 1, MAX_SEQ, MAX_SEQ + 1, 2**63, "1", 1.5, True, None],
    "timestamp": [*TIMESTAMPS, 1, None],
    "source": ["stdout", "agent", "stdin", "STDOUT", 1, None],
    "level": ["INFO", "ERROR", "info", "TRACE", 1, None],
    "message": ["", "x" * 25, "x" * 26, "x" * 101, "é" * 25, "é" * 26, "\U0001f600" * 26, "\u0000" * 30, 1, None],
    "lineNumber": [0, -1, MAX_SEQ, MAX_SEQ + 1, "1", False, 1.0, None],
    "metadata": [{}, {"k": "x"}, {"k": "x" * 20}, {"": [[[]]]}, {"": [[]]}, {"a": {"b": {"c": {}}}}, [], "x", None],
    "partial": [True, False, 0, 1, "true", None],
    "id": ["id-1", "", 1, None],
    "kind": [*KINDS, "line", "", 1, None],
    # What the hub answers; a producer's frame names its own on the frame.
    "producer": ["p1", "", "~hub", "x" * 65, 1, None],
    "extra": [1, None],
}
FRAME_ODD: dict[str, list[Any]] = {
    "taskId": ["t1", "t2", "..", "", 1, None],
    "producer": ["p1", "p:1", "", "x" * 65, 1, None],
    "records": [[], {}, "x", None, [1]],
    "type": ["logs", "log", "status", 1],
}


LIMITS = [
    DEFAULT_LIMITS,
    attrs.evolve(DEFAULT_LIMITS, max_line_bytes=100, max_metadata_bytes=12, max_metadata_depth=3, max_records_per_batch=5),
    attrs.evolve(DEFAULT_LIMITS, max_metadata_depth=3),
    attrs.evolve(DEFAULT_LIMITS, max_line_bytes=100),
]


def record_json(seq: int) -> dict[str, Any]:
    return {
        "taskId": "t1", "seq": seq, "timestamp": TS, "source": "stdout", "level": "INFO",
        "message": f"m{seq}", "lineNumber": seq, "metadata": {"processId": 7},
    }


@st.composite
def odd_frames(draw: st.DrawFn) -> str:
    """A well-formed `logs` frame with a few fields changed, removed or added."""
    recs: list[Any] = [record_json(i + 1) for i in range(draw(st.integers(0, 4)))]
    frame: dict[str, Any] = {"type": "logs", "taskId": "t1", "producer": "p1", "records": recs}
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["record"] * 6 + ["frame", "whole record"]))
        odd = FRAME_ODD if where == "frame" else ODD
        key = draw(st.sampled_from(sorted(odd)))
        value = copy.deepcopy(draw(st.sampled_from(odd[key]) if draw(st.integers(0, 4)) else json_values))
        if where == "frame":
            target: Any = frame
        elif not recs:
            continue
        else:
            target = recs[draw(st.integers(0, len(recs) - 1))]
            if where == "whole record":
                recs[recs.index(target)] = value
                continue
        if not isinstance(target, dict):
            continue
        if draw(st.integers(0, 5)) == 0:
            target.pop(key, None)
        else:
            target[key] = value
    return orjson.dumps(frame).decode()


def general_decode(text: str, limits: Limits) -> Any:
    """decode_client_frame without recordjson's reader."""
    cls, data = client_frame_data(text, limits)
    return logs_frame_by_converter(data, limits) if cls is LogsFrame else decode_client_frame(text, limits)


def hub_rows(text: str, limits: Limits) -> Any:
    """What the hub's connection makes of a frame: rows, or another frame."""
    frame = decode_frame(text, limits)
    if isinstance(frame, RowsFrame):
        return frame.items
    return rows_of(frame)


def hub_rows_by_converter(text: str, limits: Limits) -> Any:
    return rows_of(general_decode(text, limits))


def rows_of(frame: Any) -> Any:
    if isinstance(frame, LogsFrame):
        return from_records(frame.records, "records", frame.producer)
    if isinstance(frame, LogFrame):
        return from_records([frame.record], "record")
    return frame


def outcome(decode: Any, text: str, limits: Limits) -> tuple[Any, ...]:
    try:
        return ("ok", decode(text, limits))
    except FrameError as exc:
        return ("error", exc.code, exc.message, exc.field)


@pytest.mark.parametrize("limits", LIMITS)
@settings(max_examples=300)
@given(text=odd_frames())
def test_any_logs_frame_is_read_the_same_by_either_path(limits: Limits, text: str) -> None:
    assert outcome(decode_client_frame, text, limits) == outcome(general_decode, text, limits)
    rows = outcome(hub_rows, text, limits)
    assert rows == outcome(hub_rows_by_converter, text, limits)
    if rows[0] == "ok" and isinstance(rows[1], list):
        assert all(type(r) is Incoming for r in rows[1])


def test_every_single_odd_field_is_read_the_same_by_either_path() -> None:
    """Each field of a record (of its second record) and of the frame set to
    each of its odd values, or left out, under each of the limits."""
    cases: list[str] = []
    for odd, in_record in ((ODD, True), (FRAME_ODD, False)):
        for key, values in odd.items():
            for value in [*values, KeyError]:
                frame: dict[str, Any] = {"type": "logs", "taskId": "t1", "producer": "p1", "records": [record_json(1), record_json(2)]}
                target = frame["records"][1] if in_record else frame
                if value is KeyError:
                    target.pop(key, None)
                else:
                    target[key] = copy.deepcopy(value)
                cases.append(orjson.dumps(frame).decode())
    for limits in LIMITS:
        for text in cases:
            assert outcome(decode_client_frame, text, limits) == outcome(general_decode, text, limits), text
            assert outcome(hub_rows, text, limits) == outcome(hub_rows_by_converter, text, limits), text


# --- REST POST items (LogRequest) ---------------------------------------------------

requests = st.builds(
    LogRequest,
    message=text,
    source=st.sampled_from(["stdout", "stderr", "agent"]),
    level=st.none() | st.sampled_from(["DEBUG", "INFO", "WARN", "ERROR"]),
    line_number=st.none() | st.integers(0, MAX_SEQ),
    metadata=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    seq=st.none() | st.integers(1, MAX_SEQ),
    timestamp=st.none() | st.sampled_from(TIMESTAMPS),
    partial=st.booleans(),
    producer=st.none() | st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True),
    kind=st.none() | st.sampled_from(SENT_KINDS),
)


@given(batch=st.lists(requests, min_size=1, max_size=4))
def test_a_request_written_by_the_converter_is_read_as_the_same_value(batch: list[LogRequest]) -> None:
    bodies = [converter.unstructure(r) for r in batch]
    assert decode_requests(bodies, True, DEFAULT_LIMITS) == batch
    assert decode_requests(bodies[0], False, DEFAULT_LIMITS) == batch[:1]
    # Left out, a field takes its default.
    assert decode_requests({"message": "x"}, False, DEFAULT_LIMITS) == [LogRequest("x")]


REQUEST_ODD: dict[str, list[Any]] = {
    **{k: v for k, v in ODD.items() if k not in ("taskId", "id")},
    "seq": [*ODD["seq"], KeyError],
    "producer": ["p1", "p:1", "", "x" * 65, 1, None],
}


def request_json(seq: int) -> dict[str, Any]:
    # Metadata on odd seqs only: a record without any has its message measured alone.
    body = {"message": f"m{seq}", "seq": seq, "producer": "p1", "timestamp": TS}
    return {**body, "metadata": {"processId": 7}} if seq % 2 else body


def posted(decode: Any, data: Any, array: bool, limits: Limits) -> tuple[Any, ...]:
    try:
        return ("ok", decode(data, array, limits))
    except FrameError as exc:
        return ("error", exc.code, exc.message, exc.field)


def test_every_single_odd_request_field_is_read_the_same_by_either_path() -> None:
    for key, values in REQUEST_ODD.items():
        for value in [*values, KeyError]:
            for array in (True, False):
                items: list[Any] = [request_json(1), request_json(2)]
                if value is KeyError:
                    items[1].pop(key, None)
                else:
                    items[1][key] = copy.deepcopy(value)
                data = items if array else items[1]
                for limits in LIMITS:
                    fast = posted(decode_requests, data, array, limits)
                    assert fast == posted(requests_by_converter, data, array, limits), (key, value, array, limits)


@st.composite
def odd_posts(draw: st.DrawFn) -> list[Any]:
    items: list[Any] = [request_json(i + 1) for i in range(draw(st.integers(1, 4)))]
    for _ in range(draw(st.integers(1, 3))):
        item = items[draw(st.integers(0, len(items) - 1))]
        key = draw(st.sampled_from(sorted(REQUEST_ODD)))
        value = copy.deepcopy(draw(st.sampled_from(REQUEST_ODD[key]) if draw(st.integers(0, 4)) else json_values))
        if value is KeyError or draw(st.integers(0, 5)) == 0:
            item.pop(key, None)
        else:
            item[key] = value
    return items


@pytest.mark.parametrize("limits", LIMITS)
@settings(max_examples=200)
@given(items=odd_posts())
def test_any_post_is_read_the_same_by_either_path(limits: Limits, items: list[Any]) -> None:
    for data, array in ((items, True), (items[0], False)):
        assert posted(decode_requests, data, array, limits) == posted(requests_by_converter, data, array, limits)
