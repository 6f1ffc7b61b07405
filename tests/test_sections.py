"""CI section markers (agent/pipeline/sections.py) and how the recorder records them."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.pipeline.linesplit import Block, Line, LineSplitter
from agent.pipeline.recorder import Recorder
from agent.pipeline.sections import (
    MAX_DEPTH,
    Marker,
    SectionTracker,
    may_hold_marker,
    parse_marker,
    split_block,
)
from agent.spool.spool import Spool
from keruta.masking import Masker, StreamMasker

T0 = "2026-01-01T00:00:00.000000Z"
T1 = "2026-01-01T00:00:01.500000Z"
T2 = "2026-01-01T00:00:03.000000Z"


@pytest.mark.parametrize(
    ("text", "marker"),
    [
        ("::group::Build the thing", Marker("github", "start", "Build the thing", "Build the thing")),
        ("::group::", Marker("github", "start", "group", "")),
        ("::endgroup::", Marker("github", "end")),
        ("::error::it broke", Marker("github", "level", level="ERROR")),
        ("::error file=a.py,line=3::it broke", Marker("github", "level", level="ERROR")),
        ("::warning::an error, but only a warning", Marker("github", "level", level="WARN")),
        (
            "section_start:1700000000:build[collapsed=true]\r\x1b[0KBuilding it",
            Marker("gitlab", "start", "build", "Building it", True),
        ),
        (
            "\x1b[0Ksection_start:1700000000:build\r\x1b[0KBuilding it",
            Marker("gitlab", "start", "build", "Building it", True),
        ),
        (
            "section_start:1700000000:build[collapsed=false]\r\x1b[0KBuilding it",
            Marker("gitlab", "start", "build", "Building it", False),
        ),
        ("section_start:1700000000:tests", Marker("gitlab", "start", "tests", "tests", True)),
        ("section_end:1700000009:build\r\x1b[0K", Marker("gitlab", "end", "build")),
        ("\x1b[0Ksection_end:1700000009:build", Marker("gitlab", "end", "build")),
        ("--- Install", Marker("buildkite", "start", "Install", "Install", True)),
        ("+++ Run tests", Marker("buildkite", "start", "Run tests", "Run tests", False)),
        ("~~~ Setup", Marker("buildkite", "start", "Setup", "Setup", True)),
    ],
)
def test_every_marker_form_is_recognised(text: str, marker: Marker) -> None:
    assert parse_marker(text) == marker


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        " ::group::indented",
        "std::error::Error",
        "::set-output name=x::1",
        "::groupie::x",
        "--- ",
        "---",
        "--- a" [:3],
        "x --- y",
        "section_start:notanumber:x",
        "section_end:1:build trailing words",
        "see section_start:1:x in the docs",
        "***",
    ],
)
def test_plain_lines_are_not_markers(text: str) -> None:
    assert parse_marker(text) is None


def test_titles_and_names_are_clipped() -> None:
    marker = parse_marker("::group::" + "x" * 1000)
    assert marker is not None and len(marker.title) == 256 and len(marker.name) == 64


def test_may_hold_marker_is_true_wherever_a_marker_line_starts() -> None:
    for data in (b"::group::a", b"a\n::endgroup::", b"x\n--- b", b"+++ c", b"a\n~~~ d", b"a\nsection_end:1:x"):
        assert may_hold_marker(data)
    for data in (b"plain\nlines", b"std::vector<int>", b"a --- b\nc +++ d"):
        assert not may_hold_marker(data)


# The bytes a marker check looks for, and a few it does not.
_MARKER_BYTES = b"ab\n-:+~_section"


@given(st.binary(max_size=60).map(lambda b: bytes(_MARKER_BYTES[x % len(_MARKER_BYTES)] for x in b)))
def test_may_hold_marker_skips_only_scans_that_cannot_match(data: bytes) -> None:
    """Its shortcuts (no byte a scan needs, no scan) change no answer."""
    both_scans = (
        re.search(rb"\n[-:+~]", data) is not None or (data[:1] != b"" and data[:1] in b":-+~") or b"section_" in data
    )
    assert may_hold_marker(data) == both_scans


def test_split_block_keeps_plain_lines_as_blocks_and_marker_lines_as_lines() -> None:
    block = Block.of([b"a", b"::group::G", b"b", b"c", b"std::x", b"::endgroup::", b"--- ", b"d"])
    assert split_block(block) == [
        Block(b"a", 1),
        Line("::group::G"),
        Block(b"b\nc\nstd::x", 3),
        Line("::endgroup::"),
        Block(b"--- \nd", 2),
    ]
    assert split_block(Block.of([b"::group::G"])) == [Line("::group::G")]
    gitlab = Block.of([b"see section_start:1:x", b"\x1b[0Ksection_start:1:build", b"section_end:2:build"])
    assert split_block(gitlab) == [
        Block(b"see section_start:1:x", 1), Line("\x1b[0Ksection_start:1:build"), Line("section_end:2:build"),
    ]
    plain = Block.of([b"::set-output::x", b"y"])
    assert split_block(plain) == [plain]


def _events(lines: list[tuple[str, str]], source: str = "stdout") -> list[tuple[str | None, dict | None]]:
    tracker = SectionTracker()
    out = []
    for text, ts in lines:
        event = tracker.line(source, Line(text), ts)
        out.append(None if event is None else (event.kind, event.section))
    return out


def test_github_groups_nest_and_an_end_knows_its_start_and_duration() -> None:
    got = _events([("::group::Outer", T0), ("::group::Inner", T1), ("x", T1), ("::endgroup::", T2), ("::endgroup::", T2)])
    assert got[0] == ("section_start", {"style": "github", "name": "Outer", "title": "Outer", "collapsed": True, "depth": 0})
    assert got[1] == ("section_start", {"style": "github", "name": "Inner", "title": "Inner", "collapsed": True, "depth": 1})
    assert got[2] is None
    assert got[3] == (
        "section_end",
        {"style": "github", "name": "Inner", "title": "Inner", "startedAt": T1, "durationMs": 1500},
    )
    assert got[4] == (
        "section_end",
        {"style": "github", "name": "Outer", "title": "Outer", "startedAt": T0, "durationMs": 3000},
    )


def test_an_endgroup_with_nothing_open_is_a_plain_line() -> None:
    assert _events([("::endgroup::", T0), ("section_end:1:x", T0)]) == [None, None]


def test_gitlab_end_closes_its_section_and_what_was_left_open_inside() -> None:
    got = _events([
        ("section_start:1:outer[collapsed=true]\r\x1b[0KOuter", T0),
        ("::group::left open", T1),
        ("section_end:3:outer\r\x1b[0K", T2),
    ])
    kind, section = got[2]  # type: ignore[misc]
    assert kind == "section_end"
    assert section["name"] == "outer" and section["title"] == "Outer" and section["durationMs"] == 3000
    assert section["ends"] == [{"name": "left open", "title": "left open", "durationMs": 1500}]


def test_a_buildkite_header_closes_the_buildkite_section_before_it() -> None:
    got = _events([("--- One", T0), ("+++ Two", T1), ("~~~ Three", T2)])
    assert got[0] == ("section_start", {"style": "buildkite", "name": "One", "title": "One", "collapsed": True, "depth": 0})
    assert got[1] == (
        "section_start",
        {"style": "buildkite", "name": "Two", "title": "Two", "collapsed": False, "depth": 0,
         "ends": [{"name": "One", "title": "One", "durationMs": 1500}]},
    )
    assert got[2][1]["ends"] == [{"name": "Two", "title": "Two", "durationMs": 1500}]  # type: ignore[index]


def test_buildkite_sections_nest_inside_a_group_and_end_with_it() -> None:
    got = _events([("::group::G", T0), ("--- B", T1), ("::endgroup::", T2)])
    assert got[1][1]["depth"] == 1  # type: ignore[index]
    kind, section = got[2]  # type: ignore[misc]
    assert kind == "section_end" and section["name"] == "G"
    assert section["ends"] == [{"name": "B", "title": "B", "durationMs": 1500}]


def test_error_and_warning_lines_are_levels_not_sections() -> None:
    tracker = SectionTracker()
    error = tracker.line("stdout", Line("::error::x"), T0)
    warning = tracker.line("stdout", Line("::warning::an error"), T0)
    assert error is not None and (error.kind, error.level, error.section) == (None, "ERROR", None)
    assert warning is not None and warning.level == "WARN"


def test_pieces_of_a_split_line_are_not_markers() -> None:
    """The last piece of a long line has partial false but does not start a line."""
    splitter = LineSplitter(max_line_bytes=16)
    pieces = splitter.feed(b"x" * 16 + b"::group::Nope\n::group::Yes\n")
    assert [p.partial for p in pieces] == [True, False, False]
    assert pieces[1].text == "::group::Nope"
    tracker = SectionTracker()
    events = [tracker.line("stdout", piece, T0) for piece in pieces]
    assert events[0] is None and events[1] is None
    assert events[2] is not None and events[2].kind == "section_start"
    # A partial piece that starts like a marker is not one either.
    assert tracker.line("stdout", Line("::group::" + "y" * 20, partial=True), T0) is None


def test_a_marker_inside_a_masked_secret_is_gone_before_the_parser_sees_it() -> None:
    masker = StreamMasker(Masker(["::group::Deploy to prod"]))
    data = masker.feed(b"::group::Deploy to prod\n") + masker.flush()
    line = data.decode().rstrip("\n")
    assert line == "***"
    assert SectionTracker().line("stdout", Line(line), T0) is None


def test_nesting_is_bounded() -> None:
    tracker = SectionTracker()
    events = [tracker.line("stdout", Line(f"::group::{n}"), T0) for n in range(MAX_DEPTH + 2)]
    assert all(e is not None for e in events[:MAX_DEPTH])
    assert events[MAX_DEPTH] is None and len(tracker.open) == MAX_DEPTH


# -- the recorder ------------------------------------------------------------------


def _spooled(spool: Spool) -> list[dict]:
    """What the spool holds, as the records sent from it."""
    return [orjson.loads(payload) for _, payload in spool.read(1, 10_000, 1 << 24)]


def test_recorder_records_markers_in_a_block_as_printed_with_kind_and_metadata(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "t", hub_url="http://h")
    recorder = Recorder(spool, "t", metadata={"processId": 7})
    block = Block.of([b"a", b"::group::Build", b"b", b"::error::bad", b"::endgroup::", b"c"])
    recorder.write("stdout", [(block, 1)], T0)
    records = _spooled(spool)
    assert [(r["seq"], r["message"], r["lineNumber"], r.get("kind"), r["level"]) for r in records] == [
        (1, "a", 1, None, "INFO"),
        (2, "::group::Build", 2, "section_start", "INFO"),
        (3, "b", 3, None, "INFO"),
        (4, "::error::bad", 4, None, "ERROR"),
        (5, "::endgroup::", 5, "section_end", "INFO"),
        (6, "c", 6, None, "INFO"),
    ]
    assert records[1]["metadata"] == {
        "processId": 7,
        "section": {"style": "github", "name": "Build", "title": "Build", "collapsed": True, "depth": 0},
    }
    assert records[4]["metadata"]["section"]["startedAt"] == T0
    assert records[0]["metadata"] == {"processId": 7}
    spool.close()


def test_recorder_records_a_split_block_s_plain_lines_as_lines(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "t", hub_url="http://h")
    recorder = Recorder(spool, "t")
    recorder.write("stdout", [(Block.of([b"std::vector", b"a --- b", b"::set-output::x", b"--- T"]), 5)], T0)
    records = _spooled(spool)
    assert [(r["message"], r["lineNumber"], r.get("kind")) for r in records] == [
        ("std::vector", 5, None), ("a --- b", 6, None), ("::set-output::x", 7, None), ("--- T", 8, "section_start"),
    ]
    spool.close()
