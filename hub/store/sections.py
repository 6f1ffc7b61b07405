"""A task's sections as the store keeps them: one row per section, beside the chunks.

Records of kind `section_start` / `section_end` (agent/pipeline/sections.py
says what their `metadata.section` holds) open and close sections. The rows
are written in the transaction that stores the records, so listing a task's
sections reads no chunk, however big the task:

- a `section_start` inserts a row (its seq, name, title, style, collapsed);
- a `section_end`, and a start's or end's `ends`, close the innermost open
  section of that name (an end without a name: the innermost open one);
- ERROR records add to the `errors` of every section open around them, so
  the viewer opens those without reading their lines.

A section's line count is not kept: task seqs have no holes, so it is the
distance between its markers (`endSeq - startSeq - 1`; up to the task's
last seq while open). Nothing here does I/O: hub/store/core.py runs the
steps planned here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from keruta.records import LogRecord
from keruta.timefmt import parse_ts

# What one record may say about the sections it closes, and how long a
# name or title the table keeps: a producer's metadata is not trusted.
MAX_ENDS = 16
MAX_NAME = 64
MAX_TITLE = 256
# Sections are listed nested at most this deep (the agent nests up to 16).
MAX_DEPTH = 64


@attrs.frozen(slots=True)
class Open:
    seq: int
    name: str
    title: str
    style: str | None
    collapsed: bool
    ts: str


@attrs.frozen(slots=True)
class Close:
    # None: the innermost open section, whatever its name.
    name: str | None
    seq: int
    ts: str


@attrs.frozen(slots=True)
class CountErrors:
    """Runs of ERROR records, each `(its first seq, how many)`: every open
    section started before a run's first seq gets that run's errors. One
    step, one statement, for all the runs between two closes (no section
    closes in between): a batch alternating opens and errors costs one
    update of the open sections, not one per run."""

    runs: tuple[tuple[int, int], ...]


Step = Open | Close | CountErrors


def _clean(text: str) -> str:
    """`text` as a text column of both stores can hold it: PostgreSQL's
    refuses NUL (the whole append would fail, and with it the producer's
    lines), so a NUL becomes U+FFFD, as an undecodable byte does."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _text(value: Any, most: int) -> str | None:
    return _clean(value[:most]) if isinstance(value, str) else None


def _section_meta(r: LogRecord) -> dict[str, Any]:
    meta = r.metadata.get("section") if isinstance(r.metadata, dict) else None
    return meta if isinstance(meta, dict) else {}


def _ends(meta: dict[str, Any], r: LogRecord) -> list[Close]:
    ends = meta.get("ends")
    if not isinstance(ends, list):
        return []
    return [
        Close(_text(e.get("name"), MAX_NAME), r.seq, r.timestamp)
        for e in ends[:MAX_ENDS]
        if isinstance(e, dict) and isinstance(e.get("name"), str)
    ]


def plan(records: Sequence[LogRecord]) -> list[Step]:
    """What storing `records` (one task's, in seq order) does to its sections."""
    steps: list[Step] = []
    runs: list[tuple[int, int]] = []
    errors_from, errors = 0, 0

    def count() -> None:
        # The errors so far, before a section closes (which changes who counts them).
        nonlocal errors
        if errors:
            runs.append((errors_from, errors))
            errors = 0
        if runs:
            steps.append(CountErrors(tuple(runs)))
            runs.clear()

    for r in records:
        kind = r.kind
        if kind != "section_start" and kind != "section_end":
            if r.level == "ERROR":
                if not errors:
                    errors_from = r.seq
                errors += 1
            continue
        if errors:
            runs.append((errors_from, errors))
            errors = 0
        meta = _section_meta(r)
        ends = _ends(meta, r)
        name = _text(meta.get("name"), MAX_NAME)
        if ends or kind == "section_end":
            count()
        steps += ends
        if kind == "section_end":
            steps.append(Close(name, r.seq, r.timestamp))
            continue
        title = _text(meta.get("title"), MAX_TITLE)
        if title is None:
            title = _clean(r.message[:MAX_TITLE])
        style = _text(meta.get("style"), 32)
        collapsed = meta.get("collapsed")
        steps.append(Open(r.seq, name or title[:MAX_NAME], title, style, collapsed is not False, r.timestamp))
    count()
    return steps


def marked(records: Sequence[LogRecord]) -> list[LogRecord]:
    """The records `plan` looks at: sections' and ERROR ones (most batches: none)."""
    return [r for r in records if r.kind is not None or r.level == "ERROR"]


# -- the answer ------------------------------------------------------------------

# A row of the table, as the SECTIONS statement answers it.
ROW = "start_seq, end_seq, name, title, style, collapsed, started_at, ended_at, errors"


def _duration_ms(start: str, end: str | None) -> int | None:
    if end is None:
        return None
    return max(0, round((parse_ts(end) - parse_ts(start)).total_seconds() * 1000))


def tree(rows: Sequence[Sequence[Any]], last_seq: int) -> list[dict[str, Any]]:
    """The sections of `rows` (by start seq) nested by their seq ranges, at
    most MAX_DEPTH deep, as the /sections answer lists them; `last_seq` is
    the task's highest seq."""
    top: list[dict[str, Any]] = []
    stack: list[dict[str, Any]] = []
    for start_seq, end_seq, name, title, style, collapsed, started_at, ended_at, errors in rows:
        while stack and stack[-1]["endSeq"] is not None and stack[-1]["endSeq"] <= start_seq:
            stack.pop()
        end = end_seq if end_seq is not None else last_seq + 1
        section = {
            "name": name,
            "title": title,
            "style": style,
            "collapsed": bool(collapsed),
            "startSeq": start_seq,
            "endSeq": end_seq,
            "startedAt": started_at,
            "endedAt": ended_at,
            "durationMs": _duration_ms(started_at, ended_at),
            "lines": max(0, end - start_seq - 1),
            "errors": errors,
            "hasError": errors > 0,
            "sections": [],
        }
        (stack[-1]["sections"] if stack else top).append(section)
        # At MAX_DEPTH (a REST producer may open sections without end), what
        # would nest inside a section goes beside it: the answer's JSON stays
        # within what an encoder nests (orjson: 255 levels, two per section).
        if len(stack) + 1 < MAX_DEPTH:
            stack.append(section)
    return top
