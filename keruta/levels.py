"""Level detection from a line's text (the seed's determineLogLevel)."""

from __future__ import annotations

import re

LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")

# Word-bounded so that "terror" or "debugger" do not change a line's level;
# the strongest level found wins.
_ERROR = re.compile(r"\b(error|fatal|critical|panic|exception|traceback)\b", re.IGNORECASE)
_WARN = re.compile(r"\b(warn|warning|deprecated)\b", re.IGNORECASE)
_DEBUG = re.compile(r"\b(debug|trace)\b", re.IGNORECASE)


def determine_level(message: str) -> str:
    head = message[:512]
    if _ERROR.search(head):
        return "ERROR"
    if _WARN.search(head):
        return "WARN"
    if _DEBUG.search(head):
        return "DEBUG"
    return "INFO"
