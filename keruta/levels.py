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

# The fast path runs once per captured line (it was a quarter of the agent's
# CPU): most lines hold none of these substrings, and `in` on a lowered ASCII
# string is far cheaper than three case-insensitive regexes failing. On ASCII
# text, lowering first cannot change what the patterns match (case does not
# change which characters are word characters); other text takes the regexes.
_HINTS = ("err", "fatal", "crit", "panic", "exception", "trace", "warn", "deprecated", "debug")
_LOWER = tuple(
    (re.compile(pattern.pattern), level) for pattern, level in ((_ERROR, "ERROR"), (_WARN, "WARN"), (_DEBUG, "DEBUG"))
)


def determine_level(message: str) -> str:
    head = message[:512]
    if "\x1b" in head:
        head = _ESCAPE.sub(" ", head)
    if not head.isascii():
        return _by_regexes(head)
    low = head.lower()
    for hint in _HINTS:
        if hint in low:
            break
    else:
        return "INFO"
    for pattern, level in _LOWER:
        if pattern.search(low):
            return level
    return "INFO"


def _by_regexes(head: str) -> str:
    if _ERROR.search(head):
        return "ERROR"
    if _WARN.search(head):
        return "WARN"
    if _DEBUG.search(head):
        return "DEBUG"
    return "INFO"
