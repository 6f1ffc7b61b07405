import pytest
from hypothesis import given
from hypothesis import strategies as st

from keruta.levels import LEVELS, determine_level


@pytest.mark.parametrize(
    "line,level",
    [
        ("ERROR: disk full", "ERROR"),
        ("something failed with error code 3", "ERROR"),
        ("FATAL crash", "ERROR"),
        ("Traceback (most recent call last):", "ERROR"),
        ("panic: runtime error", "ERROR"),
        ("java.lang.NullPointerException", "INFO"),  # no word boundary before "Exception"
        ("Unhandled exception in worker", "ERROR"),
        ("critical section entered", "ERROR"),
        ("WARNING: low memory", "WARN"),
        ("warn: retrying", "WARN"),
        ("this API is deprecated", "WARN"),
        ("[DEBUG] value=3", "DEBUG"),
        ("trace id 42", "DEBUG"),
        ("hello world", "INFO"),
        ("", "INFO"),
        ("terror and debugger and warnings", "INFO"),  # word-bounded
        ("error-prone", "ERROR"),
    ],
)
def test_examples(line: str, level: str) -> None:
    assert determine_level(line) == level


def test_strongest_level_wins() -> None:
    assert determine_level("debug: warning: error") == "ERROR"
    assert determine_level("DEBUG then WARN") == "WARN"


def test_case_insensitive() -> None:
    assert determine_level("Error") == determine_level("eRrOr") == "ERROR"


def test_only_the_head_of_a_long_line_counts() -> None:
    assert determine_level("x " * 300 + "error") == "INFO"
    assert determine_level("error " + "x " * 10_000) == "ERROR"


@given(st.text())
def test_always_a_known_level(line: str) -> None:
    assert determine_level(line) in LEVELS


def test_coloured_level_words_are_detected() -> None:
    # A coloured word is glued to its escape's final letter ("\x1b[31mERROR").
    assert determine_level("\x1b[31;1mERROR\x1b[0m tests failed") == "ERROR"
    assert determine_level("\x1b[33mwarning:\x1b[0m slow") == "WARN"
    assert determine_level("\x1b]0;title\x07\x1b[2mdebug\x1b[0m x") == "DEBUG"
    assert determine_level("\x1b[32mterror\x1b[0m") == "INFO"


def _three_regexes(message: str) -> str:
    """The detection as it was before the per-line fast path: the oracle."""
    from keruta.levels import _ESCAPE, _by_regexes

    head = message[:512]
    if "\x1b" in head:
        head = _ESCAPE.sub(" ", head)
    return _by_regexes(head)


_WORDS = st.sampled_from(
    ["error", "ERROR", "Fatal", "critical", "panic", "exception", "traceback", "warn", "WARNING",
     "deprecated", "debug", "Trace", "terror", "debugger", "errors", "xerror", "tracer", "ı", "K",
     "İ", "ſ", "\x1b[31m", " ", ":", "-", "_", "é", "x", "\n"]
)


@given(st.lists(_WORDS, max_size=30).map("".join) | st.text())
def test_agent_level_fast_path_agrees_with_three_regexes(line: str) -> None:
    assert determine_level(line) == _three_regexes(line)
