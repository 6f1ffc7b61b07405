"""Level detection from a line's text (the seed's determineLogLevel)."""

from __future__ import annotations

import re

LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")

# Word-bounded so that "terror" or "debugger" do not change a line's level;
# the strongest level found wins.
_ERROR = re.compile(r"\b(error|fatal|critical|panic|exception|traceback)\b", re.IGNORECASE)
_WARN = re.compile(r"\b(warn|warning|deprecated)\b", re.IGNORECASE)
_DEBUG = re.compile(r"\b(debug|trace)\b", re.IGNORECASE)
# Terminal escapes (colours, cursor moves) before a word would join it to their
# final letter ("\x1b[31mERROR" reads "mERROR"): each counts as a space.
_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|.)")


def determine_level(message: str) -> str:
    head = message[:512]
    if "\x1b" in head:
        head = _ESCAPE.sub(" ", head)
    if _ERROR.search(head):
        return "ERROR"
    if _WARN.search(head):
        return "WARN"
    if _DEBUG.search(head):
        return "DEBUG"
    return "INFO"
