"""Section markers at their edges (agent/pipeline/sections.py): nesting past
the limit, CRLF line endings, markers split across pipe reads, ends with
nothing open, and Buildkite headers among GitHub groups."""

from __future__ import annotations

import pytest

from agent.pipeline.linesplit import Block, Line, LineSplitter
from agent.pipeline.sections import MAX_DEPTH, SectionTracker, parse_marker, split_block

T0 = "2026-01-01T00:00:00.000000Z"


def feed(tracker: SectionTracker, texts: list[str]) -> list[tuple[str | None, str | None]]:
    """(kind, the section's name) of each line, (None, None) for a plain one."""
    out: list[tuple[str | None, str | None]] = []
    for text in texts:
        event = tracker.line("stdout", Line(text), T0)
        out.append((None, None) if event is None or event.section is None else (event.kind, event.section["name"]))
    return out


def test_ends_of_groups_past_the_depth_limit_do_not_close_the_groups_around_them() -> None:
    depth = MAX_DEPTH + 2
    tracker = SectionTracker()
    starts = feed(tracker, [f"::group::g{n}" for n in range(depth)])
    assert starts[MAX_DEPTH:] == [(None, None)] * 2
    ends = feed(tracker, ["::endgroup::"] * depth)
    # The two past the limit end as plain lines, then each group ends itself.
    assert ends == [(None, None)] * 2 + [("section_end", f"g{n}") for n in range(MAX_DEPTH - 1, -1, -1)]
    assert tracker.open == []


def test_a_gitlab_section_past_the_limit_with_an_outer_sections_name_does_not_end_it() -> None:
    tracker = SectionTracker()
    feed(tracker, [f"section_start:1:s{n}" for n in range(MAX_DEPTH)])
    assert feed(tracker, ["section_start:2:s3", "section_end:3:s3"]) == [(None, None)] * 2
    assert len(tracker.open) == MAX_DEPTH
    assert feed(tracker, ["section_end:4:s3"]) == [("section_end", "s3")]
    assert len(tracker.open) == 3


def test_buildkite_headers_past_the_limit_are_plain_and_an_endgroup_still_ends_its_group() -> None:
    tracker = SectionTracker()
    feed(tracker, [f"::group::g{n}" for n in range(MAX_DEPTH)])
    assert feed(tracker, ["--- deep 1", "--- deep 2", "::endgroup::"]) == [(None, None)] * 2 + [
        ("section_end", f"g{MAX_DEPTH - 1}")
    ]
    # Room again: a header opens a section.
    assert feed(tracker, ["--- shallow"]) == [("section_start", "shallow")]


@pytest.mark.parametrize(
    ("text", "kind", "name", "title"),
    [
        ("::group::Build\r", "start", "Build", "Build"),
        ("::endgroup::\r", "end", "", ""),
        ("section_start:1700000000:build\r\x1b[0KBuilding\r", "start", "build", "Building"),
        ("section_end:1700000009:build\r\x1b[0K\r", "end", "build", ""),
        ("--- Install\r", "start", "Install", "Install"),
        ("+++ Run tests\r", "start", "Run tests", "Run tests"),
    ],
)
def test_markers_printed_with_crlf_are_markers_with_clean_titles(text: str, kind: str, name: str, title: str) -> None:
    marker = parse_marker(text)
    assert marker is not None and (marker.action, marker.name, marker.title) == (kind, name, title)


def test_a_crlf_block_splits_into_the_same_markers() -> None:
    block = Block.of([b"a\r", b"::group::G\r", b"b\r", b"::endgroup::\r"])
    assert [p for p in split_block(block) if isinstance(p, Line)] == [Line("::group::G\r"), Line("::endgroup::\r")]


@pytest.mark.parametrize("cut", range(1, len("::group::Split\n")))
def test_a_marker_split_across_pipe_reads_is_still_one(cut: int) -> None:
    data = b"::group::Split\n::endgroup::\n"
    splitter = LineSplitter(max_line_bytes=1024)
    lines = splitter.feed(data[:cut]) + splitter.feed(data[cut:])
    tracker = SectionTracker()
    events = [tracker.line("stdout", line, T0) for line in lines]
    assert [e.kind if e else None for e in events] == ["section_start", "section_end"]


def test_an_end_with_nothing_open_is_a_plain_line_and_opens_nothing() -> None:
    tracker = SectionTracker()
    assert feed(tracker, ["::endgroup::", "section_end:1:none", "::endgroup::"]) == [(None, None)] * 3
    assert tracker.open == []
    assert feed(tracker, ["::group::A", "::endgroup::"]) == [("section_start", "A"), ("section_end", "A")]


def test_a_buildkite_header_inside_a_group_does_not_end_the_buildkite_section_around_the_group() -> None:
    """`--- X`, then a GitHub group, then `--- Y` inside the group: Y is a
    section of the group, and each ::endgroup:: ends its own group."""
    tracker = SectionTracker()
    got = feed(tracker, ["::group::A", "--- X", "::group::B", "--- Y", "::endgroup::", "::endgroup::"])
    assert got == [
        ("section_start", "A"), ("section_start", "X"), ("section_start", "B"), ("section_start", "Y"),
        ("section_end", "B"), ("section_end", "A"),
    ]
    assert tracker.open == []


def test_buildkite_headers_side_by_side_inside_a_group_end_each_other_not_the_group() -> None:
    tracker = SectionTracker()
    got = feed(tracker, ["::group::A", "--- X", "--- Y", "::endgroup::"])
    assert got == [("section_start", "A"), ("section_start", "X"), ("section_start", "Y"), ("section_end", "A")]
