"""Turning what producers send (WS records, REST LogRequests) into store rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from hub.store.base import ANONYMOUS, Incoming
from keruta.frames import FrameError, LogsFrame
from keruta.levels import determine_level
from keruta.limits import Limits
from keruta.recordjson import read_records
from keruta.records import LogRecord, LogRequest
from keruta.timefmt import canonical_ts, now_ts
from keruta.wire import client_frame, client_frame_data, logs_head


@attrs.frozen
class RowsFrame:
    """A `logs` frame read straight into the rows the store takes (no
    LogRecord in between): timestamps canonical, the producer on each row."""

    items: list[Incoming]


def decode_frame(text: str | bytes, limits: Limits) -> Any:
    """`decode_client_frame`, with a well-formed `logs` frame read into a
    RowsFrame. Any other frame, and a `logs` frame that is refused or whose
    timestamps need a closer look, comes as `decode_client_frame` gives it:
    `from_records` then finds the same rows or names the error."""
    cls, data = client_frame_data(text, limits)
    if cls is LogsFrame:
        head = logs_head(data, limits)
        if head is not None:
            task_id, records, producer = head
            rows = read_records(
                task_id, records, limits, Incoming, tenth=ANONYMOUS if producer is None else producer, canonical=True
            )
            if rows is not None:
                return RowsFrame(rows)
    return client_frame(cls, data, limits)


def _timestamp(value: str | None, where: str, code: str) -> str:
    if value is None:
        return now_ts()
    try:
        return canonical_ts(value)
    except (ValueError, TypeError):
        raise FrameError(code, f"invalid field '{where}': not an RFC 3339 timestamp", where) from None


def from_records(
    records: Sequence[LogRecord], where: str = "records", producer: str | None = None
) -> list[Incoming]:
    """A WebSocket frame's records: their `seq` is their producer's own (the
    anonymous producer's when the frame names none)."""
    producer = ANONYMOUS if producer is None else producer
    out = []
    # Records read in one go share their timestamp: check each distinct one once.
    last: str | None = None
    stamp = ""
    for i, r in enumerate(records):
        if r.timestamp is None or r.timestamp != last:
            try:
                stamp = now_ts() if r.timestamp is None else canonical_ts(r.timestamp)
            except (ValueError, TypeError):
                field = f"{where}[{i}].timestamp"
                raise FrameError(
                    "INVALID_MESSAGE_FORMAT", f"invalid field '{field}': not an RFC 3339 timestamp", field
                ) from None
            last = r.timestamp
        out.append(
            Incoming(
                r.task_id,
                r.seq,
                stamp,
                r.source,
                r.level,
                r.message,
                r.line_number,
                r.metadata,
                r.partial,
                producer,
                r.kind,
            )
        )
    return out


def from_requests(task_id: str, requests: Sequence[LogRequest], array: bool) -> list[Incoming]:
    """A POST's records. With `seq`, the identity is (producer or the
    anonymous one, seq); without, the writer gives each one of its own
    (hub/actors/writer.py HubNumbering), so only its own retries are safe."""
    out = []
    for i, r in enumerate(requests):
        where = f"[{i}].timestamp" if array else "timestamp"
        if r.seq is None and r.producer is not None:
            field = f"[{i}].seq" if array else "seq"
            raise FrameError(
                "INVALID_REQUEST",
                f"invalid field '{field}': a record that names its producer needs its seq (the producer's own, from 1)",
                field,
            )
        out.append(
            Incoming(
                task_id=task_id,
                seq=r.seq,
                timestamp=_timestamp(r.timestamp, where, "INVALID_REQUEST"),
                source=r.source,
                level=r.level or determine_level(r.message),
                message=r.message,
                line_number=r.line_number,
                metadata=r.metadata,
                partial=r.partial,
                producer=r.producer or ANONYMOUS,
                kind=r.kind,
            )
        )
    return out
