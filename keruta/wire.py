"""The one JSON converter for the wire (camelCase): decoding and encoding frames.

The frames themselves are attrs classes in keruta/frames.py.

Every inbound frame goes through `decode_client_frame`, which either returns a
typed frame or raises `FrameError` whose message names the offending field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import attrs
import cattrs
import orjson
from cattrs.errors import AttributeValidationNote, IterableValidationNote
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from keruta.frames import (
    CLIENT_FRAMES,
    HUB_FRAMES,
    FrameError,
    LogFrame,
    LogsFrame,
)
from keruta.limits import DEFAULT_LIMITS, Limits
from keruta.recordjson import (
    byte_length,
    check_record_limits,
    read_records,
    read_requests,
    record_body,
    records_frame,
)
from keruta.records import (
    PRODUCER_RE,
    InvalidField,
    LogRecord,
    LogRequest,
    TaskInfo,
    valid_task_id,
)

# --- the converter ----------------------------------------------------------

_CAMEL = re.compile(r"_([a-z])")


def camel(name: str) -> str:
    return _CAMEL.sub(lambda m: m.group(1).upper(), name)


# Optional fields left out of the JSON while they hold their default (a task
# always names them all).
_OMIT_IF_DEFAULT = {
    "partial", "id", "exit_code", "from_seq", "source", "level", "resume_from", "producer", "kind", "summary",
    "max_bytes", "backlog",
}


def omitted_if_default(cls: type, name: str) -> bool:
    return name in _OMIT_IF_DEFAULT and cls is not TaskInfo


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False, omit_if_default=False)

    def strict(kind: type) -> Any:
        def check(value: Any, _t: Any) -> Any:
            if type(value) is not kind:
                raise TypeError(f"expected {kind.__name__}")
            return value

        return check

    def integer(value: Any, _t: Any) -> int:
        # JSON has one number type: 25537661.0 is an integer to JSON Schema
        # (and to the OpenAPI document), so it is taken as one; 1.5 is not.
        if type(value) is int:
            return value
        if type(value) is float and value.is_integer():
            return int(value)
        raise TypeError("expected int")

    # JSON gives us exact types; refuse "1" for an int and 1 for a string.
    conv.register_structure_hook(str, strict(str))
    conv.register_structure_hook(int, integer)
    conv.register_structure_hook(bool, strict(bool))

    def struct_dict(value: Any, _t: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise TypeError("expected object")
        return value

    conv.register_structure_hook_func(
        lambda t: t == dict[str, Any], struct_dict
    )

    for cls in (LogRecord, LogRequest, TaskInfo, *CLIENT_FRAMES.values(), *HUB_FRAMES.values()):
        if cls is LogFrame:
            continue
        overrides = {}
        for a in attrs.fields(cls):
            overrides[a.name] = override(
                rename=camel(a.name),
                omit_if_default=omitted_if_default(cls, a.name),
            )
        conv.register_unstructure_hook(
            cls, make_dict_unstructure_fn(cls, conv, **overrides)  # type: ignore[arg-type]
        )
        conv.register_structure_hook(
            cls, make_dict_structure_fn(cls, conv, _cattrs_detailed_validation=True, **overrides)  # type: ignore[arg-type]
        )
    return conv


converter = _make_converter()


def _field_of(exc: BaseException) -> tuple[str | None, str]:
    """Find the first wire field path and reason inside a cattrs error tree."""
    if isinstance(exc, InvalidField):
        return exc.field, exc.reason
    if isinstance(exc, KeyError):
        return None, "is required"
    if isinstance(exc, BaseExceptionGroup):
        sub = exc.exceptions[0]
        field, reason = _field_of(sub)
        for note in getattr(sub, "__notes__", ()):
            if isinstance(note, IterableValidationNote):
                step = f"[{note.index}]"
            elif isinstance(note, AttributeValidationNote):
                step = camel(str(note.name))
            else:
                continue
            if field is None:
                return step, reason
            return (f"{step}{field}" if field.startswith("[") else f"{step}.{field}"), reason
        return field, reason
    if isinstance(exc, TypeError) and exc.args and str(exc.args[0]).startswith("expected"):
        return None, str(exc.args[0])
    return None, str(exc)


def structure(data: Any, cls: type, what: str | None = None) -> Any:
    """Structure `data` as `cls` or raise FrameError naming the field."""
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # cattrs raises a tree of many kinds
        field, reason = _field_of(exc)
        where = f"{what}.{field}" if what and field else (field or what or "frame")
        raise FrameError("INVALID_MESSAGE_FORMAT", f"invalid field '{where}': {reason}", where) from None


def loads(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise FrameError("INVALID_MESSAGE_FORMAT", f"not valid JSON: {exc}") from None


def dumps(frame: Any) -> str:
    return encode_bytes(frame).decode()


def encode_bytes(frame: Any) -> bytes:
    body = converter.unstructure(frame)
    if isinstance(frame, LogFrame):
        body = converter.unstructure(frame.record)
        if not frame.numbered:
            del body["seq"]
    tag = getattr(type(frame), "TYPE", None)
    if tag is not None:
        body = {"type": tag, **body}
    return orjson.dumps(body)


def logs_head(data: dict[str, Any], limits: Limits) -> tuple[str, list[Any], str | None] | None:
    """A `logs` frame's taskId, records and producer when they are
    well-formed, for `read_records`; None when the general path must look.
    Raises what a records array refuses whatever it holds."""
    records = data.get("records")
    if "records" in data and not isinstance(records, list):
        # cattrs would iterate a string or an object and report a confusing field
        raise FrameError("INVALID_MESSAGE_FORMAT", "invalid field 'records': expected array", "records")
    if isinstance(records, list) and len(records) > limits.max_records_per_batch:
        raise FrameError(
            "TOO_LARGE",
            f"records holds {len(records)} records; at most {limits.max_records_per_batch}",
            "records",
        )
    task_id = data.get("taskId")
    producer = data.get("producer")
    if (
        type(records) is list
        and isinstance(task_id, str)
        and valid_task_id(task_id)
        and (producer is None or (type(producer) is str and PRODUCER_RE.fullmatch(producer)))
    ):
        return task_id, records, producer
    return None


def client_frame_data(text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[type, dict[str, Any]]:
    """An inbound frame's class and JSON object: what every frame is checked for first."""
    if byte_length(text) > limits.max_frame_bytes:
        raise FrameError("TOO_LARGE", f"frame is larger than {limits.max_frame_bytes} bytes")
    data = loads(text)
    if not isinstance(data, dict):
        raise FrameError("INVALID_MESSAGE_FORMAT", "a frame must be a JSON object", "type")
    kind = data.get("type")
    cls = CLIENT_FRAMES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise FrameError(
            "INVALID_MESSAGE_FORMAT",
            f"invalid field 'type': unknown frame type {kind!r}; expected one of "
            + ", ".join(CLIENT_FRAMES),
            "type",
        )
    return cls, data


def decode_client_frame(text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Parse and validate one inbound frame."""
    cls, data = client_frame_data(text, limits)
    return client_frame(cls, data, limits)


def client_frame(cls: type, data: dict[str, Any], limits: Limits) -> Any:
    """The frame `client_frame_data` found, checked and built: a `logs`
    frame by `read_records` when it can, by the converter otherwise."""
    if cls is LogFrame:
        # Only a missing seq: `null` is refused, as in a `logs` frame's records.
        numbered = "seq" in data
        if not numbered:
            if data.get("producer") is not None:
                raise FrameError(
                    "INVALID_MESSAGE_FORMAT",
                    "invalid field 'seq': a record that names its producer needs its seq (the producer's own, from 1)",
                    "seq",
                )
            # A placeholder, never stored: the hub numbers the record (hub/actors/writer.py HubNumbering).
            data = {**data, "seq": 1}
        record = structure(data, LogRecord)
        check_record_limits(record, limits, "record")
        return LogFrame(record, numbered)
    if cls is LogsFrame:
        head = logs_head(data, limits)
        if head is not None:
            records: list[LogRecord] | None = read_records(head[0], head[1], limits)
            if records is not None:
                return LogsFrame(head[0], records, head[2])
        return logs_frame_by_converter(data, limits)
    return structure(data, cls)


def logs_frame_by_converter(data: dict[str, Any], limits: Limits) -> LogsFrame:
    """A `logs` frame (JSON as orjson read it) by the converter alone: what
    `read_records` is held to, and the errors it leaves to this path."""
    logs_head(data, limits)
    records = data.get("records")
    if isinstance(records, list):
        # A record takes the frame's taskId; one that names it anyway must agree.
        task_id = data.get("taskId")
        data = {
            **data,
            "records": [
                {"taskId": task_id, **r} if isinstance(r, dict) and "taskId" not in r else r
                for r in records
            ],
        }
    frame = structure(data, LogsFrame)
    for i, rec in enumerate(frame.records):
        if rec.task_id != frame.task_id:
            raise FrameError(
                "INVALID_MESSAGE_FORMAT",
                f"invalid field 'records[{i}].taskId': differs from the frame's taskId",
                f"records[{i}].taskId",
            )
        check_record_limits(rec, limits, f"records[{i}]")
    return frame  # type: ignore[no-any-return]


def decode_requests(data: Any, array: bool, limits: Limits) -> list[LogRequest]:
    """A REST POST body's LogRequests (one object, or an array of objects),
    checked for types, then sizes: by `read_requests` when it can, by the
    converter otherwise, so refusals read the same."""
    items = data if array else [data]

    def where(i: int) -> str:
        return f"[{i}]" if array else "body"

    fast = read_requests(items, limits, where)
    if fast is not None:
        return fast
    return requests_by_converter(data, array, limits)


def requests_by_converter(data: Any, array: bool, limits: Limits) -> list[LogRequest]:
    """`decode_requests` by the converter alone."""
    reqs = structure(data, list[LogRequest]) if array else [structure(data, LogRequest)]
    for i, r in enumerate(reqs):
        check_record_limits(r, limits, f"[{i}]" if array else "body")
    return reqs


def decode_hub_frame(text: str | bytes) -> Any:
    """Parse a frame from the hub (for clients: agent, tail, tests)."""
    data = loads(text)
    if not isinstance(data, dict):
        raise FrameError("INVALID_MESSAGE_FORMAT", "a frame must be a JSON object", "type")
    cls = HUB_FRAMES.get(data.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise FrameError("INVALID_MESSAGE_FORMAT", f"unknown frame type {data.get('type')!r}", "type")
    return structure(data, cls)


def logs_frame_text(task_id: str, records: Sequence[LogRecord]) -> str:
    """`dumps(LogsFrame(task_id, records))`, the hub's own `logs` frame (no producer)."""
    return records_frame(task_id, records).decode()


def record_to_wire(record: LogRecord) -> dict[str, Any]:
    return record_body(record)


def records_from_wire(data: Any) -> list[LogRecord]:
    return structure(data, list[LogRecord])
