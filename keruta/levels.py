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

# This runs once per captured line, so a line with no level word must cost
# next to nothing. On ASCII text a level's pattern runs, without
# IGNORECASE, on the lowered text and only if one of its words is in it as a
# substring (`in` is far cheaper than a regex failing). Lowering ASCII cannot
# change what the patterns match (case does not change which characters are
# word characters); other text takes the case-insensitive regexes.
_LOWERED = tuple(
    (hints, re.compile(pattern.pattern), level)
    for hints, pattern, level in (
        (("error", "fatal", "critical", "panic", "exception", "traceback"), _ERROR, "ERROR"),
        (("warn", "deprecated"), _WARN, "WARN"),
        (("debug", "trace"), _DEBUG, "DEBUG"),
    )
)


def determine_level(message: str) -> str:
    head = message[:512]
    if "\x1b" in head:
        head = _ESCAPE.sub(" ", head)
    if not head.isascii():
        return _by_regexes(head)
    low = head.lower()
    for hints, pattern, level in _LOWERED:
        for hint in hints:
            if hint in low:
                if pattern.search(low):
                    return level
                break
    return "INFO"


def _by_regexes(head: str) -> str:
    if _ERROR.search(head):
        return "ERROR"
    if _WARN.search(head):
        return "WARN"
    if _DEBUG.search(head):
        return "DEBUG"
    return "INFO"
