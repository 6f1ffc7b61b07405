"""Size limits shared by agent and hub, as named settings with defaults."""

from __future__ import annotations

import attrs


@attrs.frozen
class Limits:
    # A line longer than this (UTF-8 bytes) travels as `partial` pieces.
    max_line_bytes: int = 64 * 1024
    max_records_per_batch: int = 1000
    # One WebSocket frame or REST body.
    max_frame_bytes: int = 4 * 1024 * 1024
    max_metadata_bytes: int = 4 * 1024
    max_task_id_chars: int = 128


DEFAULT_LIMITS = Limits()
