"""Sizes as people write them on a command line: 500, 64K, 100MB, 1.5G."""

from __future__ import annotations

import re

# Bytes, with an optional K/M/G suffix (powers of 1024) and an optional "B"/"iB".
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes, > 0; ValueError says why not."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 500M, 1G)")
    value = int(float(match[1]) * _UNITS[match[2].lower()])
    if value < 1:
        raise ValueError("must be > 0")
    return value
