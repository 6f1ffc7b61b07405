"""The one JSON converter for the wire (camelCase): decoding and encoding frames.

The frames themselves are in keruta/frames.py (re-exported here).

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

from keruta.frames import (  # noqa: F401 - re-exported: the wire module is where frames are met
    CLIENT_FRAMES,
    HUB_FRAMES,
    PRODUCER_RE,
    AckFrame,
    ErrorFrame,
    FrameError,
    HubFrame,
    LogFrame,
    LogsFrame,
    PingFrame,
    PongFrame,
    StatusFrame,
    SubscribedFrame,
    SubscribeFrame,
    UnsubscribeFrame,
)
from keruta.levels import LEVELS
from keruta.limits import DEFAULT_LIMITS, MAX_SEQ, Limits
from keruta.records import (
    KINDS,
    SOURCES,
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
_OMIT_IF_DEFAULT = {"partial", "id", "exit_code", "from_seq", "source", "level", "resume_from", "producer", "kind"}


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

    # JSON gives us exact types; refuse "1" for an int and 1 for a string.
    conv.register_structure_hook(str, strict(str))
    conv.register_structure_hook(int, strict(int))
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
    tag = getattr(type(frame), "TYPE", None)
    if tag is not None:
        body = {"type": tag, **body}
    return orjson.dumps(body)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests objects/arrays more than `limit` levels ({} is 1)."""
    level = [value]
    for _ in range(limit):
        below: list[Any] = []
        for v in level:
            children = v.values() if isinstance(v, dict) else v
            below.extend(c for c in children if isinstance(c, dict | list))
        if not below:
            return False
        level = below
    return True


def check_record_limits(record: LogRecord | LogRequest, limits: Limits, where: str) -> None:
    """What a producer's record must meet beyond its types: sizes, and what
    the stores and the hub's own frames can hold."""
    if record.seq is not None and record.seq > MAX_SEQ:
        raise FrameError(
            "INVALID_MESSAGE_FORMAT",
            f"invalid field '{where}.seq': must be an integer between 1 and {MAX_SEQ}",
            f"{where}.seq",
        )
    # A character is 1-4 UTF-8 bytes: encode only when the length alone can't tell.
    chars = len(record.message)
    if chars > limits.max_line_bytes or (
        chars * 4 > limits.max_line_bytes
        and len(record.message.encode("utf-8", "surrogatepass")) > limits.max_line_bytes
    ):
        raise FrameError(
            "TOO_LARGE",
            f"{where}.message is longer than {limits.max_line_bytes} bytes; split it into partial records",
            f"{where}.message",
        )
    if not record.metadata:
        return
    # Checked before encoding: orjson reads deeper JSON than it can write.
    if _deeper_than(record.metadata, limits.max_metadata_depth):
        raise FrameError(
            "INVALID_MESSAGE_FORMAT",
            f"invalid field '{where}.metadata': nested deeper than {limits.max_metadata_depth} levels",
            f"{where}.metadata",
        )
    if len(orjson.dumps(record.metadata)) > limits.max_metadata_bytes:
        raise FrameError(
            "TOO_LARGE",
            f"{where}.metadata is larger than {limits.max_metadata_bytes} bytes",
            f"{where}.metadata",
        )


def _small_metadata(metadata: dict[str, Any], limits: Limits) -> bool:
    """Whether `check_record_limits` would pass this metadata, told from one
    encoding: it nests no deeper than it holds objects and arrays. False
    means "ask check_record_limits"."""
    try:
        encoded = orjson.dumps(metadata)
    except orjson.JSONEncodeError:
        return False
    return (
        len(encoded) <= limits.max_metadata_bytes
        and encoded.count(b"{") + encoded.count(b"[") <= limits.max_metadata_depth
    )


def _fast_logs_frame(data: dict[str, Any], limits: Limits) -> LogsFrame | None:
    """The frame a well-formed `logs` frame structures to, checked and built
    without cattrs (the hub's hot path: an agent sends hundreds of records a
    frame). None for anything this does not accept outright; the general path
    then finds the same frame or names the error, so errors read the same.
    The checks are those of the converter and the attrs validators."""
    task_id = data.get("taskId")
    producer = data.get("producer")
    records = data.get("records")
    if not (
        type(records) is list
        and isinstance(task_id, str)
        and valid_task_id(task_id)
        and (producer is None or (type(producer) is str and PRODUCER_RE.fullmatch(producer)))
    ):
        return None
    out = []
    check = []
    for i, r in enumerate(records):
        if type(r) is not dict:
            return None
        seq = r.get("seq")
        timestamp = r.get("timestamp")
        source = r.get("source")
        level = r.get("level")
        message = r.get("message")
        line_number = r.get("lineNumber")
        metadata = r["metadata"] if "metadata" in r else {}
        partial = r.get("partial", False)
        id_ = r.get("id")
        kind = r.get("kind")
        if not (
            # A record that names a taskId must name the frame's.
            r.get("taskId", task_id) == task_id
            and type(seq) is int
            and 1 <= seq <= MAX_SEQ
            and type(timestamp) is str
            and type(source) is str
            and source in SOURCES
            and type(level) is str
            and level in LEVELS
            and type(message) is str
            and (line_number is None or (type(line_number) is int and 0 <= line_number <= MAX_SEQ))
            and type(metadata) is dict
            and type(partial) is bool
            and (id_ is None or type(id_) is str)
            and (kind is None or (type(kind) is str and kind in KINDS))
        ):
            return None
        if len(message) * 4 > limits.max_line_bytes or (metadata and not _small_metadata(metadata, limits)):
            check.append(i)
        out.append(
            LogRecord(task_id, seq, timestamp, source, level, message, line_number, metadata, partial, id_, kind)
        )
    # As the general path: sizes only once every record is well-formed, in order.
    for i in check:
        check_record_limits(out[i], limits, f"records[{i}]")
    return LogsFrame(task_id, out, producer)


def decode_client_frame(text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Parse and validate one inbound frame."""
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_frame_bytes:
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
    if cls is LogFrame:
        record = structure(data, LogRecord)
        check_record_limits(record, limits, "record")
        return LogFrame(record)
    if cls is LogsFrame:
        records = data.get("records")
        if "records" in data and not isinstance(records, list):
            # cattrs would iterate a string or an object and report a confusing field
            raise FrameError(
                "INVALID_MESSAGE_FORMAT", "invalid field 'records': expected array", "records"
            )
        if isinstance(records, list) and len(records) > limits.max_records_per_batch:
            raise FrameError(
                "TOO_LARGE",
                f"records holds {len(records)} records; at most {limits.max_records_per_batch}",
                "records",
            )
        fast = _fast_logs_frame(data, limits)
        if fast is not None:
            return fast
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
    frame = structure(data, cls)
    if isinstance(frame, LogsFrame):
        for i, rec in enumerate(frame.records):
            if rec.task_id != frame.task_id:
                raise FrameError(
                    "INVALID_MESSAGE_FORMAT",
                    f"invalid field 'records[{i}].taskId': differs from the frame's taskId",
                    f"records[{i}].taskId",
                )
            check_record_limits(rec, limits, f"records[{i}]")
    return frame


def decode_hub_frame(text: str | bytes) -> Any:
    """Parse a frame from the hub (for clients: agent, tail, tests)."""
    data = loads(text)
    if not isinstance(data, dict):
        raise FrameError("INVALID_MESSAGE_FORMAT", "a frame must be a JSON object", "type")
    cls = HUB_FRAMES.get(data.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise FrameError("INVALID_MESSAGE_FORMAT", f"unknown frame type {data.get('type')!r}", "type")
    return structure(data, cls)


def _record_body(r: LogRecord) -> dict[str, Any]:
    # What the converter makes of a LogRecord (partial, id and kind only when set),
    # by hand: the hub does it for every record it sends live or from history.
    body = {
        "taskId": r.task_id,
        "seq": r.seq,
        "timestamp": r.timestamp,
        "source": r.source,
        "level": r.level,
        "message": r.message,
        "lineNumber": r.line_number,
        "metadata": r.metadata,
    }
    if r.partial is not False:
        body["partial"] = r.partial
    if r.id is not None:
        body["id"] = r.id
    if r.kind is not None:
        body["kind"] = r.kind
    return body


def logs_frame_text(task_id: str, records: Sequence[LogRecord]) -> str:
    """`dumps(LogsFrame(task_id, records))`, the hub's own `logs` frame (no producer)."""
    return orjson.dumps(
        {"type": LogsFrame.TYPE, "taskId": task_id, "records": [_record_body(r) for r in records]}
    ).decode()


def record_to_wire(record: LogRecord) -> dict[str, Any]:
    return converter.unstructure(record)


def records_from_wire(data: Any) -> list[LogRecord]:
    return structure(data, list[LogRecord])
