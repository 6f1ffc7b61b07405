"""argparse types shared by keruta-agent and keruta-hub: numbers within
bounds and sizes, with messages that say what was wrong."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import TypeVar

from keruta.basics import INT64_MAX

N = TypeVar("N", int, float)


def _plain(text: str) -> None:
    """Python's int() and float() also take other scripts' digits (`٣٠٠٠` is
    3000), `_` separators and surrounding blanks: a typo or a pasted value
    would go through as some other number."""
    if not text.isascii() or "_" in text or text != text.strip():
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (ASCII digits)")


def number(
    kind: Callable[[str], N], low: float, *, strict: bool = False, high: float | None = None
) -> Callable[[str], N]:
    """An argparse type: a finite `kind` >= low (> low when `strict`, <= high)."""

    def parse(text: str) -> N:
        _plain(text)
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    return parse


# Bytes, with an optional K/M/G suffix (powers of 1024) and an optional "B"/"iB".
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(text: str) -> int:
    """An argparse type: a size in bytes > 0, e.g. 4096, 500M, 1G."""
    _plain(text)
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 1G)")
    unit = _UNITS[match[2].lower()]
    # Whole numbers exactly: a float is off by more than a byte past 2**53.
    number = int(match[1]) * unit if match[1].isdigit() else float(match[1]) * unit
    if number > INT64_MAX:
        # Sent to the hub as maxBytes, which stores and checks it as a 64-bit integer.
        raise argparse.ArgumentTypeError(f"must be at most {INT64_MAX} bytes (8E), got {text[:40]}")
    value = int(number)
    if value < 1:
        raise argparse.ArgumentTypeError("must be > 0")
    return value
