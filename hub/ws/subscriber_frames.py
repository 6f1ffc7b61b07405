"""The hub's own `logs` and `status` frames for subscribers: sized to stay
well below the frame limit whatever the lines hold."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import orjson

from keruta.frames import StatusFrame
from keruta.recordjson import records_frame
from keruta.records import LogRecord, TaskInfo
from keruta.wire import dumps

# Keep a live or history frame well below the frame limit whatever the lines hold.
FRAME_RECORDS = 500
FRAME_BYTES = 1024 * 1024
# A record's fields but message and metadata, keys included, each at its
# longest (a 128-character taskId, a 64-character producer, a section kind).
RECORD_FIELDS_BYTES = 480


def status_payload(task: TaskInfo) -> str:
    return dumps(StatusFrame(task.task_id, task.state, task.exit_code))


def encoded_size(record: LogRecord) -> int:
    """About the bytes a record takes in a frame, never much less: escaping
    (a control character is six bytes) and metadata are measured, not guessed."""
    size = len(orjson.dumps(record.message)) + RECORD_FIELDS_BYTES
    if record.metadata:
        size += len(orjson.dumps(record.metadata))
    return size


def _size_bound(records: Sequence[LogRecord]) -> int:
    """Never less than their `encoded_size`s: a character is at most six bytes
    escaped. Gathered in list comprehensions (most records have no metadata)."""
    size = 6 * sum([len(r.message) for r in records]) + (2 + RECORD_FIELDS_BYTES) * len(records)
    metadata = [r.metadata for r in records if r.metadata]
    if metadata:
        size += sum([len(orjson.dumps(m)) for m in metadata])
    return size


def encode_chunks(task_id: str, records: Sequence[LogRecord], through: int) -> Iterator[tuple[str, int]]:
    """`logs` frames for records, each with the seq it covers through.

    The last frame covers through `through`, which may lie past its last
    record when filters or a range end leave nothing more to send.
    """
    start = 0
    while start < len(records):
        end = min(len(records), start + FRAME_RECORDS)
        # Measuring every record is only needed when the frame may be too big.
        if _size_bound(records[start:end]) > FRAME_BYTES:
            end = start
            size = 0
            while end < len(records) and end - start < FRAME_RECORDS:
                cost = encoded_size(records[end])
                if end > start and size + cost > FRAME_BYTES:
                    break
                size += cost
                end += 1
        last = records[end - 1].seq if end < len(records) else through
        # Encoded as bytes, made the str a text frame is sent as once: the
        # broadcaster hands this same str to every subscriber it suits.
        yield records_frame(task_id, records[start:end]).decode(), last
        start = end
