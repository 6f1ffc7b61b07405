"""Frames built from spooled records, without decoding them: `logs_frame`
(keruta/recordjson.py), `fit_frame` (the longest prefix that fits the hub's
frame limit) and `fill_gaps` (an explicit "lost" record where the spool lost one)."""

from __future__ import annotations

from collections.abc import Callable

from keruta.recordjson import encode_line
from keruta.timefmt import now_ts


def fit_frame(build: Callable[[list[bytes]], bytes], payloads: list[bytes], max_bytes: int) -> tuple[bytes, int]:
    """The frame `build` makes of the longest prefix of `payloads` that fits in
    `max_bytes`, measured, and how many payloads it holds (at least one: a
    record too large on its own is sent and refused, not dropped here)."""
    count = len(payloads)
    frame = build(payloads)
    while len(frame) > max_bytes and count > 1:
        excess = len(frame) - max_bytes
        # Each payload beyond the first costs its bytes and a comma.
        while excess > 0 and count > 1:
            count -= 1
            excess -= len(payloads[count]) + 1
        frame = build(payloads[:count])
    return frame, count


LOST_RECORD = "keruta-agent: this record was lost (its spool entry was corrupt)"


def fill_gaps(
    task_id: str,
    start: int,
    records: list[tuple[int, bytes]],
    limit: int,
    last_seq: int,
) -> list[tuple[int, bytes]]:
    """`records` from `start` on, with a placeholder for every seq missing
    (skipped as corrupt when the spool was read back). The hub acknowledges a
    task only up to its first missing seq, so a hole would stall delivery
    forever; an explicit "lost" record says what happened instead."""
    if records and records[0][0] == start and records[-1][0] == start + len(records) - 1 <= start + limit - 1:
        return records  # no hole: the common case, without a look at each record
    out: list[tuple[int, bytes]] = []
    expected = start
    end = records[-1][0] if records else min(last_seq, start + limit - 1)
    pending = iter(records)
    current = next(pending, None)
    while expected <= end and len(out) < limit:
        if current is not None and current[0] == expected:
            out.append(current)
            current = next(pending, None)
        elif current is not None and current[0] < expected:
            current = next(pending, None)
            continue
        else:
            placeholder = encode_line(
                task_id, expected, now_ts(), "agent", "ERROR", LOST_RECORD, 0, {}, False
            )
            out.append((expected, placeholder))
        expected += 1
    return out
