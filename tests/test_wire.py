import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keruta.frames import (
    AckFrame,
    ErrorFrame,
    FrameError,
    LogFrame,
    LogsFrame,
    PingFrame,
    PongFrame,
    StatusFrame,
    SubscribedFrame,
    SubscribeFrame,
    UnsubscribeFrame,
)
from keruta.limits import MAX_SEQ, Limits
from keruta.records import LogRecord
from keruta.wire import decode_client_frame, decode_hub_frame, dumps, encode_bytes

SMALL = Limits(
    max_line_bytes=100,
    max_records_per_batch=5,
    max_frame_bytes=2000,
    max_metadata_bytes=64,
)

TS = "2026-11-28T14:09:55.123456Z"
RECORD_KEYS = {"taskId", "seq", "timestamp", "source", "level", "message", "lineNumber", "metadata"}


def record(seq: int = 1, task_id: str = "task-1", **kw: object) -> LogRecord:
    fields = {
        "task_id": task_id,
        "seq": seq,
        "timestamp": TS,
        "source": "stdout",
        "level": "INFO",
        "message": f"line {seq}",
        "line_number": seq,
        "metadata": {"processId": 42},
    }
    fields.update(kw)
    return LogRecord(**fields)  # type: ignore[arg-type]


def wire_record(**overrides: object) -> dict:
    body = orjson.loads(encode_bytes(LogFrame(record())))
    del body["type"]
    body.update(overrides)
    return body


def reject(data: object, limits: Limits = SMALL) -> FrameError:
    text = data if isinstance(data, str | bytes) else orjson.dumps(data)
    with pytest.raises(FrameError) as info:
        decode_client_frame(text, limits)
    return info.value


# --- round trips -------------------------------------------------------------

CLIENT_CASES = [
    (LogFrame(record()), {"type"} | RECORD_KEYS),
    (
        LogFrame(record(partial=True, line_number=None, metadata={})),
        {"type", "partial"} | RECORD_KEYS,
    ),
    (
        LogsFrame("task-1", [record(1), record(2, source="stderr", level="ERROR")]),
        {"type", "taskId", "records"},
    ),
    (LogsFrame("task-1", []), {"type", "taskId", "records"}),
    (StatusFrame("task-1", "running"), {"type", "taskId", "state"}),
    (StatusFrame("task-1", "failed", exit_code=3), {"type", "taskId", "state", "exitCode"}),
    (SubscribeFrame("task-1"), {"type", "taskId"}),
    (
        SubscribeFrame("task-1", from_seq=7, source="stderr", level="WARN"),
        {"type", "taskId", "fromSeq", "source", "level"},
    ),
    (UnsubscribeFrame("task-1"), {"type", "taskId"}),
    (PingFrame(), {"type"}),
]

HUB_CASES = [
    (SubscribedFrame("task-1", TS), {"type", "taskId", "timestamp"}),
    (
        LogsFrame("task-1", [record(1, id="r-1"), record(2, id="r-2")]),
        {"type", "taskId", "records"},
    ),
    (AckFrame("task-1", 99), {"type", "taskId", "seq"}),
    (StatusFrame("task-1", "succeeded", exit_code=0), {"type", "taskId", "state", "exitCode"}),
    (PongFrame(), {"type"}),
    (ErrorFrame("INVALID_MESSAGE_FORMAT", "bad"), {"type", "code", "message"}),
    (
        ErrorFrame("SLOW_CONSUMER", "too slow", resume_from=12),
        {"type", "code", "message", "resumeFrom"},
    ),
]


@pytest.mark.parametrize("frame,keys", CLIENT_CASES, ids=lambda c: type(c).__name__)
def test_client_frames_round_trip_in_camel_case(frame: object, keys: set[str]) -> None:
    data = encode_bytes(frame)
    body = orjson.loads(data)
    assert set(body) == keys
    assert body["type"] == type(frame).TYPE  # type: ignore[attr-defined]
    assert decode_client_frame(data) == frame
    assert decode_client_frame(dumps(frame)) == frame


@pytest.mark.parametrize("frame,keys", HUB_CASES, ids=lambda c: type(c).__name__)
def test_hub_frames_round_trip_in_camel_case(frame: object, keys: set[str]) -> None:
    data = encode_bytes(frame)
    assert set(orjson.loads(data)) == keys
    assert decode_hub_frame(data) == frame
    assert decode_hub_frame(dumps(frame)) == frame


def test_records_inside_a_batch_are_camel_case_and_carry_their_id() -> None:
    body = orjson.loads(encode_bytes(LogsFrame("task-1", [record(1, id="r-1", partial=True)])))
    assert set(body["records"][0]) == RECORD_KEYS | {"id", "partial"}
    assert body["records"][0]["lineNumber"] == 1
    assert body["records"][0]["taskId"] == "task-1"


def test_the_seed_log_message_is_accepted() -> None:
    text = (
        '{"type":"log","taskId":"t","seq":1,"timestamp":"TS","source":"stdout",'
        '"level":"INFO","message":"hi","lineNumber":1,"metadata":{"processId":1}}'
    ).replace("TS", TS)
    frame = decode_client_frame(text)
    assert frame == LogFrame(record(task_id="t", message="hi", metadata={"processId": 1}))


def test_unknown_extra_keys_are_ignored() -> None:
    assert decode_client_frame('{"type":"ping","extra":1}') == PingFrame()


def test_hub_frame_decoder_rejects_client_only_and_bad_frames() -> None:
    with pytest.raises(FrameError):
        decode_hub_frame('{"type":"subscribe","taskId":"t"}')
    with pytest.raises(FrameError):
        decode_hub_frame("[]")
    with pytest.raises(FrameError):
        decode_hub_frame("{")
    with pytest.raises(FrameError) as info:
        decode_hub_frame('{"type":"ack","taskId":"t","seq":"1"}')
    assert info.value.field == "seq"


# --- rejections ----------------------------------------------------------------


def test_not_json() -> None:
    err = reject("not json {")
    assert err.code == "INVALID_MESSAGE_FORMAT" and "JSON" in err.message


@pytest.mark.parametrize("text", ["[1,2]", '"log"', "42", "null"])
def test_not_an_object(text: str) -> None:
    err = reject(text)
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == "type"


@pytest.mark.parametrize(
    "body",
    [{"type": "nope"}, {"type": 1}, {"taskId": "t"}, {"type": "ack", "taskId": "t", "seq": 1}],
)
def test_unknown_or_missing_type(body: dict) -> None:
    err = reject(body)
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == "type"
    assert "subscribe" in err.message  # lists what is expected


@pytest.mark.parametrize("task_id", ["", "a b", "a/b", "ä", "x" * 129, 7, None])
def test_bad_task_id(task_id: object) -> None:
    assert reject({"type": "subscribe", "taskId": task_id}).field == "taskId"
    assert reject({"type": "log", **wire_record(taskId=task_id)}).field == "taskId"
    err = reject({"type": "logs", "taskId": task_id, "records": []})
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == "taskId"


def test_task_id_of_128_allowed_characters_is_fine() -> None:
    tid = ("Az09._:-" * 16)[:128]
    assert decode_client_frame(encode_bytes(UnsubscribeFrame(tid))) == UnsubscribeFrame(tid)


@pytest.mark.parametrize("seq", ["1", 0, -1, 1.5, True, None])
def test_bad_seq(seq: object) -> None:
    err = reject({"type": "log", **wire_record(seq=seq)})
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == "seq"
    assert "'seq'" in err.message
    err = reject(
        {"type": "logs", "taskId": "task-1", "records": [wire_record(), wire_record(seq=seq)]}
    )
    assert err.field == "records[1].seq"


@pytest.mark.parametrize("seq", ["1", 0, -1])
def test_bad_from_seq(seq: object) -> None:
    assert reject({"type": "subscribe", "taskId": "t", "fromSeq": seq}).field == "fromSeq"


@pytest.mark.parametrize(
    "field,value", [("source", "stdin"), ("source", 1), ("level", "TRACE"), ("level", "info")]
)
def test_bad_source_or_level(field: str, value: object) -> None:
    err = reject({"type": "log", **wire_record(**{field: value})})
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == field


@pytest.mark.parametrize("metadata", [[], "x", 1, None])
def test_metadata_must_be_an_object(metadata: object) -> None:
    err = reject({"type": "log", **wire_record(metadata=metadata)})
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == "metadata"


def test_metadata_too_large() -> None:
    err = reject({"type": "log", **wire_record(metadata={"k": "v" * 64})})
    assert err.code == "TOO_LARGE" and err.field == "record.metadata"
    err = reject(
        {"type": "logs", "taskId": "task-1", "records": [wire_record(metadata={"k": "v" * 64})]}
    )
    assert err.code == "TOO_LARGE" and err.field == "records[0].metadata"
    # the default limit is 4 KiB
    big = {"type": "log", **wire_record(metadata={"k": "v" * 4100})}
    assert reject(big, Limits()).code == "TOO_LARGE"
    ok = {"type": "log", **wire_record(metadata={"k": "v" * 4000})}
    assert decode_client_frame(orjson.dumps(ok)).record.metadata == {"k": "v" * 4000}


def test_message_longer_than_a_line() -> None:
    err = reject({"type": "log", **wire_record(message="x" * 101)})
    assert err.code == "TOO_LARGE" and err.field == "record.message"
    # the limit is in UTF-8 bytes: 34 three-byte characters are 102 bytes
    err = reject({"type": "logs", "taskId": "task-1", "records": [wire_record(message="€" * 34)]})
    assert err.code == "TOO_LARGE" and err.field == "records[0].message"
    assert decode_client_frame(
        orjson.dumps({"type": "log", **wire_record(message="x" * 100)}), SMALL
    )


def test_too_many_records() -> None:
    records = [wire_record(seq=i) for i in range(1, 7)]
    err = reject({"type": "logs", "taskId": "task-1", "records": records})
    assert err.code == "TOO_LARGE" and err.field == "records"
    frame = decode_client_frame(
        orjson.dumps({"type": "logs", "taskId": "task-1", "records": records[:5]}), SMALL
    )
    assert [r.seq for r in frame.records] == [1, 2, 3, 4, 5]


def test_frame_too_large() -> None:
    err = reject(b'{"type":"ping","pad":"' + b"x" * 2000 + b'"}')
    assert err.code == "TOO_LARGE"


def test_record_task_id_must_match_the_frame() -> None:
    err = reject(
        {
            "type": "logs",
            "taskId": "task-1",
            "records": [wire_record(), wire_record(taskId="task-2")],
        }
    )
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == "records[1].taskId"


@pytest.mark.parametrize("missing", sorted(RECORD_KEYS - {"lineNumber", "metadata", "seq"}))
def test_missing_required_record_field(missing: str) -> None:
    body = wire_record()
    del body[missing]
    err = reject({"type": "log", **body})
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == missing
    assert "required" in err.message


def test_a_log_frame_may_leave_out_its_seq_but_a_logs_record_may_not() -> None:
    body = wire_record()
    del body["seq"]
    frame = decode_client_frame(orjson.dumps({"type": "log", **body}))
    assert isinstance(frame, LogFrame) and not frame.numbered
    # Encoded as it came: without seq.
    assert "seq" not in orjson.loads(encode_bytes(frame))
    err = reject({"type": "log", **body, "seq": None})
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == "seq"
    err = reject({"type": "log", **body, "producer": "p"})
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == "seq"
    del body["taskId"]
    err = reject({"type": "logs", "taskId": "t", "records": [body]})
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == "records[0].seq"
    assert "required" in err.message


@pytest.mark.parametrize(
    "body,field",
    [
        ({"type": "logs", "taskId": "t"}, "records"),
        ({"type": "logs", "records": []}, "taskId"),
        ({"type": "status", "taskId": "t"}, "state"),
        ({"type": "subscribe"}, "taskId"),
        ({"type": "unsubscribe"}, "taskId"),
    ],
)
def test_missing_required_frame_field(body: dict, field: str) -> None:
    err = reject(body)
    assert err.field == field and "required" in err.message


@pytest.mark.parametrize("records", ["abc", {"a": 1}, None, 3])
def test_records_must_be_an_array(records: object) -> None:
    err = reject({"type": "logs", "taskId": "t", "records": records})
    assert err.field == "records"


@pytest.mark.parametrize(
    "body,field",
    [
        ({"type": "status", "taskId": "t", "state": "done"}, "state"),
        ({"type": "status", "taskId": "t", "state": "failed", "exitCode": "1"}, "exitCode"),
        ({"type": "log", **wire_record(message=5)}, "message"),
        ({"type": "log", **wire_record(lineNumber=-1)}, "lineNumber"),
        ({"type": "log", **wire_record(partial="yes")}, "partial"),
    ],
)
def test_other_bad_fields(body: dict, field: str) -> None:
    err = reject(body)
    assert err.code == "INVALID_MESSAGE_FORMAT" and err.field == field
    assert f"'{field}'" in err.message


# --- property: any valid record survives the wire --------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10)
text_no_surrogates = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)

records_strategy = st.builds(
    LogRecord,
    task_id=st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True).filter(lambda t: t not in (".", "..")),
    seq=st.integers(1, MAX_SEQ),
    timestamp=st.just(TS),
    source=st.sampled_from(["stdout", "stderr", "agent"]),
    level=st.sampled_from(["DEBUG", "INFO", "WARN", "ERROR"]),
    message=text_no_surrogates,
    line_number=st.none() | st.integers(0, 2**40),
    metadata=st.dictionaries(st.text(max_size=8), json_scalars, max_size=4),
    partial=st.booleans(),
    id=st.none() | st.text(min_size=1, max_size=20),
)


@given(rec=records_strategy)
def test_any_record_round_trips(rec: LogRecord) -> None:
    assert decode_client_frame(encode_bytes(LogFrame(rec))) == LogFrame(rec)
    batch = LogsFrame(rec.task_id, [rec])
    assert decode_client_frame(encode_bytes(batch)) == batch
    assert decode_hub_frame(encode_bytes(batch)) == batch
    body = orjson.loads(encode_bytes(batch))["records"][0]
    assert {"taskId", "lineNumber"} <= set(body) and "task_id" not in body
