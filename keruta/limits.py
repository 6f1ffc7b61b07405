"""Size limits shared by agent and hub, as named settings with defaults."""

from __future__ import annotations

import attrs

from keruta.basics import INT32_MAX, INT32_MIN, INT64_MAX, MAX_SEQ

__all__ = ["DEFAULT_LIMITS", "INT32_MAX", "INT32_MIN", "INT64_MAX", "MAX_SEQ", "Limits"]


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
