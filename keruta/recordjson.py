"""A record's JSON, written and read in one place, for agent and hub.

The cattrs converter (keruta/wire.py) says what a record's JSON is; this
module does the same, faster, on the paths every line takes, and the tests
hold the two to the same bytes and the same values (tests/test_recordjson.py):

- writing: `record_body` / `encode_record` for a LogRecord, `LineEncoder` /
  `encode_line` for the agent's lines (which are never LogRecords), and
  `logs_frame` to put records already encoded into a `logs` frame (the
  agent's spool payloads, the hub's live and history frames) as bytes;
- reading: `read_records`, a `logs` frame's records checked and built in one
  pass, into a LogRecord or whatever else a caller stores (the hub's rows);
  `read_requests`, a REST POST's LogRequests.
  It answers None for anything it does not accept outright: the converter's
  general path then finds the same records or names the error, so errors
  read the same whichever path a frame took.

The field names are camelCase; `partial`, `id`, `kind` and `producer` are
left out while they hold their default, every other field is always written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

from keruta.frames import FrameError
from keruta.levels import LEVELS
from keruta.limits import MAX_SEQ, Limits
from keruta.records import (
    HUB_KINDS,
    KINDS,
    PRODUCER_RE,
    SOURCES,
    LogRecord,
    LogRequest,
    valid_record_producer,
)
from keruta.timefmt import canonical_ts

T = TypeVar("T")

_SOURCES = frozenset(SOURCES)
_LEVELS = frozenset(LEVELS)
_KINDS = frozenset(KINDS)

# --- writing ------------------------------------------------------------------


def record_body(r: LogRecord) -> dict[str, Any]:
    """What the converter makes of a LogRecord, built by hand."""
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
    if r.producer is not None:
        body["producer"] = r.producer
    return body


def encode_record(r: LogRecord) -> bytes:
    return orjson.dumps(record_body(r))


def encode_line(
    task_id: str,
    seq: int,
    timestamp: str,
    source: str,
    level: str,
    message: str,
    line_number: int,
    metadata: dict[str, Any],
    partial: bool,
    kind: str | None = None,
) -> bytes:
    """`encode_record(LogRecord(...))` of a producer's record (no `id`)
    without building the LogRecord: every field is valid by construction."""
    body: dict[str, Any] = {
        "taskId": task_id,
        "seq": seq,
        "timestamp": timestamp,
        "source": source,
        "level": level,
        "message": message,
        "lineNumber": line_number,
        "metadata": metadata,
    }
    if partial:
        body["partial"] = True
    if kind is not None:
        body["kind"] = kind
    return orjson.dumps(body)


class LineEncoder:
    """`encode_line` for the lines of one read, which share task, timestamp,
    source and metadata: those parts are encoded once per read, not once per
    line: this runs for every line the agent captures."""

    _LEVELS = {level: level.encode() for level in LEVELS}

    def __init__(self, task_id: str, ts: str, source: str, metadata: dict[str, Any]) -> None:
        self.head = b'{"taskId":' + orjson.dumps(task_id) + b',"seq":'
        self.mid = b',"timestamp":' + orjson.dumps(ts) + b',"source":' + orjson.dumps(source) + b',"level":"'
        meta = orjson.dumps(metadata)
        self.tail = b',"metadata":' + meta + b"}"
        self.tail_partial = b',"metadata":' + meta + b',"partial":true}'

    def encode(self, seq: int, level: str, message: str, line_number: int, partial: bool) -> bytes:
        return b"".join(
            (
                self.head,
                b"%d" % seq,
                self.mid,
                self._LEVELS[level],
                b'","message":',
                orjson.dumps(message),
                b',"lineNumber":%d' % line_number,
                self.tail_partial if partial else self.tail,
            )
        )


def logs_frame(task_id: str, payloads: Sequence[bytes], producer: str | None = None) -> bytes:
    """A `logs` frame of records already encoded (`encode_record`,
    `encode_line`): what the converter gives for `LogsFrame(task_id, records,
    producer)`, without decoding and re-encoding a record."""
    return b"".join(
        (
            b'{"type":"logs","taskId":',
            orjson.dumps(task_id),
            b',"records":[',
            b",".join(payloads),
            b"]",
            b',"producer":' + orjson.dumps(producer) if producer is not None else b"",
            b"}",
        )
    )


def records_frame(task_id: str, records: Sequence[LogRecord]) -> bytes:
    """The hub's own `logs` frame of `records` (no producer), in one encoding."""
    return orjson.dumps({"type": "logs", "taskId": task_id, "records": [record_body(r) for r in records]})


# --- limits a producer's record must meet ------------------------------------------


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


def _hub_made(kind: Any, metadata: Any) -> bool:
    """Whether a record says it is the hub's own: a redaction's audit record,
    or a gap with `accounts` (what the hub dropped, which `verify` credits to
    the producers' summaries). A producer's may be neither, or it could pass
    for an admin's redaction, or make a log short of records verify as
    complete; an agent's own gap (its spool was full) has no accounts."""
    if kind == "redaction":
        return True
    gap = metadata.get("gap") if kind == "gap" and isinstance(metadata, dict) else None
    return isinstance(gap, dict) and "accounts" in gap


def check_record_limits(record: Any, limits: Limits, where: str) -> None:
    """What a producer's record (a LogRecord or LogRequest) must meet beyond
    its types: sizes, what the stores and the hub's own frames can hold, and
    not passing for a record only the hub makes."""
    if _hub_made(record.kind, record.metadata):
        raise FrameError(
            "INVALID_MESSAGE_FORMAT",
            f"invalid field '{where}.kind': a redaction record, or a gap record with accounts, "
            "is the hub's own; a producer's gap record has no accounts",
            f"{where}.kind",
        )
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


# --- reading ------------------------------------------------------------------

# `read_records(..., tenth=OWN_ID)`: the tenth field given to `make` is the
# record's own `id` (a LogRecord's), not a value the caller names.
OWN_ID: Any = object()


def read_records(
    task_id: str,
    records: list[Any],
    limits: Limits,
    make: Callable[..., T] = LogRecord,  # type: ignore[assignment]
    *,
    tenth: Any = OWN_ID,
    canonical: bool = False,
) -> list[T] | None:
    """The records of a `logs` frame for `task_id` (JSON as orjson read it),
    each checked as the converter and LogRecord's validators check it and
    built by `make(taskId, seq, timestamp, source, level, message,
    lineNumber, metadata, partial, tenth, kind)`; `tenth` is the record's
    `id` unless the caller gives one value for all (the hub: the producer).
    A record's own `producer` (what the hub answers) is checked either way,
    and given to `make` after `kind` only with the record's own `id`: a
    producer's frame names its producer on the frame.

    With `canonical`, timestamps are given to `make` in keruta.timefmt's
    canonical form (each distinct one converted once).

    None: not every record is accepted outright (a wrong type, a missing
    field, a timestamp that does not parse when `canonical`); the general
    path names the error. A size limit broken by a well-formed frame raises
    FrameError here, for the first such record, as the general path would.
    """
    out: list[T] = []
    append = out.append
    check: list[int] = []
    own_id = tenth is OWN_ID
    max_chars = limits.max_line_bytes // 4
    max_meta = limits.max_metadata_bytes
    max_depth = limits.max_metadata_depth
    last_ts: Any = None
    stamp = ""
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
        kind = r.get("kind")
        id_ = r.get("id")
        if id_ is not None and type(id_) is not str:
            return None
        producer = r.get("producer")
        if producer is not None and not valid_record_producer(producer):
            return None
        if own_id:
            tenth = id_
        if not (
            # A record that names a taskId must name the frame's.
            r.get("taskId", task_id) == task_id
            and type(seq) is int
            and 1 <= seq <= MAX_SEQ
            and type(timestamp) is str
            and type(source) is str
            and source in _SOURCES
            and type(level) is str
            and level in _LEVELS
            and type(message) is str
            and (line_number is None or (type(line_number) is int and 0 <= line_number <= MAX_SEQ))
            and type(metadata) is dict
            and type(partial) is bool
            and (kind is None or (type(kind) is str and kind in _KINDS))
        ):
            return None
        if canonical:
            # Records read in one go share their timestamp.
            if timestamp != last_ts:
                try:
                    stamp = canonical_ts(timestamp)
                except (ValueError, TypeError):
                    return None
                last_ts = timestamp
            timestamp = stamp
        if len(message) > max_chars or kind in HUB_KINDS:
            check.append(i)
        elif metadata:
            # Within both limits, told from one encoding: it nests no deeper
            # than it holds objects and arrays. Otherwise ask check_record_limits.
            try:
                encoded = orjson.dumps(metadata)
            except orjson.JSONEncodeError:
                check.append(i)
            else:
                size = len(encoded)
                if size > max_meta or (size > max_depth and encoded.count(b"{") + encoded.count(b"[") > max_depth):
                    check.append(i)
        if own_id and producer is not None:
            append(make(task_id, seq, timestamp, source, level, message, line_number, metadata, partial, tenth, kind, producer))
        else:
            append(make(task_id, seq, timestamp, source, level, message, line_number, metadata, partial, tenth, kind))
    # As the general path: sizes only once every record is well-formed, in order.
    for i in check:
        check_record_limits(_Fields(records[i]), limits, f"records[{i}]")
    return out


class _Fields:
    """A record's JSON as check_record_limits reads it (already type-checked)."""

    __slots__ = ("kind", "message", "metadata", "seq")

    def __init__(self, r: dict[str, Any]) -> None:
        self.kind = r.get("kind")
        self.seq = r["seq"]
        self.message = r["message"]
        self.metadata = r["metadata"] if "metadata" in r else {}


def byte_length(text: str | bytes) -> int:
    """A frame's size in UTF-8 bytes, encoding only when it is not ASCII
    (the hub receives text frames as str)."""
    if isinstance(text, bytes) or text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))



def read_requests(items: list[Any], limits: Limits, where: Callable[[int], str]) -> list[LogRequest] | None:
    """REST POST items (LogRequest JSON objects as orjson read them), checked
    as the converter and LogRequest's validators check them; `where(i)` names
    item i in a size error. None as `read_records` answers it."""
    out: list[LogRequest] = []
    append = out.append
    check: list[int] = []
    max_chars = limits.max_line_bytes // 4
    for i, r in enumerate(items):
        if type(r) is not dict or "message" not in r:
            return None
        message = r["message"]
        source = r.get("source", "stdout")
        level = r.get("level")
        line_number = r.get("lineNumber")
        metadata = r["metadata"] if "metadata" in r else {}
        seq = r.get("seq")
        timestamp = r.get("timestamp")
        partial = r.get("partial", False)
        producer = r.get("producer")
        kind = r.get("kind")
        if not (
            type(message) is str
            and type(source) is str
            and source in _SOURCES
            and (level is None or (type(level) is str and level in _LEVELS))
            and (line_number is None or (type(line_number) is int and 0 <= line_number <= MAX_SEQ))
            and type(metadata) is dict
            and (seq is None or (type(seq) is int and 1 <= seq <= MAX_SEQ))
            and (timestamp is None or type(timestamp) is str)
            and type(partial) is bool
            and (producer is None or (type(producer) is str and PRODUCER_RE.fullmatch(producer) is not None))
            and (kind is None or (type(kind) is str and kind in _KINDS))
        ):
            return None
        if len(message) > max_chars or metadata or kind in HUB_KINDS:
            check.append(i)
        append(LogRequest(message, source, level, line_number, metadata, seq, timestamp, partial, producer, kind))
    # As the general path: sizes only once every item is well-formed, in order.
    for i in check:
        check_record_limits(out[i], limits, where(i))
    return out
