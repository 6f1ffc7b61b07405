"""Turning what producers send (WS records, REST LogRequests) into store rows."""

from __future__ import annotations

from collections.abc import Sequence

from hub.store.base import Incoming
from keruta.levels import determine_level
from keruta.records import LogRecord, LogRequest
from keruta.timefmt import canonical_ts, now_ts
from keruta.wire import FrameError


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
    return [
        Incoming(
            task_id=r.task_id,
            seq=r.seq,
            timestamp=_timestamp(r.timestamp, f"{where}[{i}].timestamp", "INVALID_MESSAGE_FORMAT"),
            source=r.source,
            level=r.level,
            message=r.message,
            line_number=r.line_number,
            metadata=r.metadata,
            partial=r.partial,
            producer=producer,
        )
        for i, r in enumerate(records)
    ]


def from_requests(task_id: str, requests: Sequence[LogRequest], array: bool) -> list[Incoming]:
    out = []
    for i, r in enumerate(requests):
        where = f"[{i}].timestamp" if array else "timestamp"
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
            )
        )
    return out
