"""Schema v4: the one-row-per-line `logs` table of v1-v3 becomes chunks.

Both stores' migrations read the old rows in (task_id, seq) order and write
what `chunks_from_rows` makes of them (hub/store/chunk.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from hub.store import chunk
from keruta.records import LogRecord

# The v3 `logs` columns, in the order the migrations select them.
OLD_COLUMNS = "task_id, seq, id, ts, source, level, message, line_number, metadata, partial, kind"


def _record(row: Sequence[Any]) -> LogRecord:
    task_id, seq, id_, ts, source, level, message, line_number, metadata, partial, kind = row
    return LogRecord(
        task_id, seq, ts, source, level, message, line_number,
        orjson.loads(metadata) if metadata else {}, bool(partial), id_, kind,
    )


def chunks_from_rows(rows: Iterable[Sequence[Any]]) -> Iterator[chunk.ChunkRow]:
    """Chunks of the old rows, given in (task_id, seq) order. A chunk holds
    consecutive seqs of one task where it can; a hole (a delete) starts none,
    the chunk's `q` column says which seqs it holds."""
    pending: list[LogRecord] = []
    for row in rows:
        record = _record(row)
        if pending and record.task_id != pending[0].task_id:
            yield from (chunk.encode(part) for part in chunk.split(pending))
            pending = []
        pending.append(record)
        if len(pending) >= 8 * chunk.CHUNK_RECORDS:
            parts = list(chunk.split(pending))
            yield from (chunk.encode(part) for part in parts[:-1])
            pending = list(parts[-1])
    if pending:
        yield from (chunk.encode(part) for part in chunk.split(pending))
