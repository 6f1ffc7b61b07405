"""Size limits shared by agent and hub, as named settings with defaults."""

from __future__ import annotations

import attrs

# Integers as the stores hold them (BIGINT / SQLite INTEGER are int64).
INT64_MAX = 2**63 - 1
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
# The largest `seq`, `fromSeq` or `lineNumber` a producer may give: browsers
# read JSON numbers as doubles, exact up to 2**53 - 1, and the hub's own
# max+1 assignment stays far inside int64.
MAX_SEQ = 2**53 - 1


@attrs.frozen
class Limits:
    # A line longer than this (UTF-8 bytes) travels as `partial` pieces.
    max_line_bytes: int = 64 * 1024
    max_records_per_batch: int = 1000
    # One WebSocket frame or REST body.
    max_frame_bytes: int = 4 * 1024 * 1024
    max_metadata_bytes: int = 4 * 1024
    # orjson writes at most 254 levels and the hub wraps metadata in a frame:
    # deeper metadata could be read but never sent back.
    max_metadata_depth: int = 32


DEFAULT_LIMITS = Limits()
