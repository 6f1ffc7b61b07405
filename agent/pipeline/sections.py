"""Sections and annotations as CI tools print them, recognised in lines of text.

The markers (each at the start of a line):

- GitHub Actions: `::group::TITLE` opens a section, `::endgroup::` closes
  the innermost one; `::error::TEXT` and `::warning::TEXT` (also with
  parameters, `::error file=a.py,line=3::TEXT`) are lines of level ERROR
  and WARN.
- GitLab: `section_start:UNIX_TS:NAME[collapsed=true]` then `\\r\\e[0K` and
  the title opens (closed by default here, as every section, unless
  `[collapsed=false]`); `section_end:UNIX_TS:NAME` closes NAME (and
  whatever was left open inside it). The `\\e[0K` GitLab puts first is
  allowed.
- Buildkite: `--- TITLE` (collapsed), `+++ TITLE` (open), `~~~ TITLE`
  (collapsed): a new header closes the Buildkite section open before it;
  they do not nest in each other.

A marker line is stored as printed (what the raw download shows is what the
command wrote); the record gets a `kind` (`section_start` / `section_end`)
and `metadata.section` says what the line means:

    {"style": "github"|"gitlab"|"buildkite", "name", "title",
     "collapsed": bool, "depth": n}             for a start
    {"style", "name", "title", "startedAt", "durationMs"}   for an end
    + "ends": [{"name", "title", "durationMs"}, ...]

`ends` lists the other sections this line closes, innermost first: those a
Buildkite header ends before opening its own, those left open inside a
section an end marker closes. The hub pairs an end with the innermost open
section of the same name (hub/store/sections.py).

A line is a marker only when it is a whole line as the command printed it
(after masking): the pieces of a line split for length are not, nor the
last piece of such a line, since it does not start a line.

Nothing here does I/O: the recorder (agent/pipeline/recorder.py) asks
`may_hold_marker` once per Block, splits the few that may hold one with
`split_block`, and hands each candidate line to `SectionTracker.line`.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from agent.pipeline.linesplit import Block, Line
from keruta.timefmt import parse_ts

GITHUB = "github"
GITLAB = "gitlab"
BUILDKITE = "buildkite"
# Deeper sections are plain lines: what one record says about the sections
# it closes stays far below the 4 KiB a record's metadata may take.
MAX_DEPTH = 16
MAX_TITLE = 256
MAX_NAME = 64

_ERASE = "\x1b[0K"
_GITLAB_START = re.compile(r"section_start:(\d{1,20}):([^\s\[\r]+)(?:\[([^\]\r]*)\])?")
_GITLAB_END = re.compile(r"section_end:(\d{1,20}):([^\s\[\r]+)")
_GITHUB_COMMAND = re.compile(r"::(group|endgroup|error|warning)(?:\s[^:]*)?::(.*)", re.S)
_BUILDKITE = {"--- ": True, "~~~ ": True, "+++ ": False}  # prefix -> collapsed
# What GitHub's and Buildkite's marker lines start with (GitLab's may follow
# an erase code, so "section_" is looked for anywhere).
_FIRST_LINE = (b"::", b"--- ", b"+++ ", b"~~~ ")
# A line that starts as GitHub's or Buildkite's markers do.
_MAY_START = re.compile(rb"\n[-:+~]")


@attrs.frozen(slots=True)
class Marker:
    """What one marker line says."""

    style: str
    # "start", "end" or, for ::error:: / ::warning::, "level".
    action: str
    name: str = ""
    title: str = ""
    collapsed: bool = True
    level: str | None = None


def parse_marker(text: str) -> Marker | None:
    """The marker `text` (one whole line) is, or None for a plain line."""
    if text.startswith(_ERASE):
        text = text[len(_ERASE) :]
    if text.startswith("::"):
        m = _GITHUB_COMMAND.fullmatch(text)
        if m is None:
            return None
        command, rest = m.groups()
        if command == "group":
            title = rest.strip()
            return Marker(GITHUB, "start", _clip(title, MAX_NAME) or "group", _clip(title, MAX_TITLE))
        if command == "endgroup":
            return Marker(GITHUB, "end")
        return Marker(GITHUB, "level", level="ERROR" if command == "error" else "WARN")
    if text.startswith("section_"):
        m = _GITLAB_START.match(text)
        if m is not None:
            options = m.group(3) or ""
            rest = text[m.end() :]
            if rest and not rest.startswith("\r"):
                return None
            title = rest.replace("\r", "").replace(_ERASE, "").strip() or m.group(2)
            # Closed by default like every section here; `[collapsed=false]` opens it.
            collapsed = "collapsed=false" not in options.replace(" ", "")
            return Marker(GITLAB, "start", _clip(m.group(2), MAX_NAME), _clip(title, MAX_TITLE), collapsed)
        m = _GITLAB_END.match(text)
        if m is not None:
            rest = text[m.end() :]
            if rest.replace("\r", "").replace(_ERASE, "").strip():
                return None
            return Marker(GITLAB, "end", _clip(m.group(2), MAX_NAME))
        return None
    closed = _BUILDKITE.get(text[:4])
    if closed is not None:
        title = text[4:].strip()
        if not title:
            return None
        return Marker(BUILDKITE, "start", _clip(title, MAX_NAME), _clip(title, MAX_TITLE), closed)
    return None


def _clip(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


def may_hold_marker(data: bytes) -> bool:
    """Whether a Block's bytes may hold a marker line: scans in C (a regex
    with one literal byte first, and a substring search), false for nearly
    every Block of ordinary output. Each scan goes only where a byte it needs
    is there at all, which memchr finds (or rules out) several times faster
    than either scan: output without `-:+~` or `_` costs next to nothing."""
    return (
        (b"-" in data or b":" in data or b"+" in data or b"~" in data)
        and (_MAY_START.search(data) is not None or (data[:1] != b"" and data[:1] in b":-+~"))
    ) or (b"_" in data and b"section_" in data)


def _candidates(data: bytes) -> list[int]:
    """Where the lines that may be markers start, in order (bytes.find: no
    Python per line, nor a regex tried at every byte)."""
    starts = {0} if data.startswith(_FIRST_LINE) else set()
    for m in _MAY_START.finditer(data):
        if data.startswith(_FIRST_LINE, m.start() + 1):
            starts.add(m.start() + 1)
    at = data.find(b"section_")
    while at != -1:
        starts.add(data.rfind(b"\n", 0, at) + 1)
        at = data.find(b"section_", at + 1)
    return sorted(starts)


def split_block(block: Block) -> list[Line | Block]:
    """`block` as Blocks of plain lines around Lines that are markers (in order)."""
    data = block.data
    out: list[Line | Block] = []
    done = 0  # data[:done] is in `out`
    for start in _candidates(data):
        if start < done:
            continue
        end = data.find(b"\n", start)
        end = len(data) if end == -1 else end
        text = data[start:end].decode("utf-8")
        if parse_marker(text) is None:
            continue
        if start > done:
            before = data[done : start - 1]
            out.append(Block(before, before.count(b"\n") + 1))
        out.append(Line(text))
        done = end + 1
    if done == 0:
        return [block]
    if done <= len(data):
        after = data[done:]
        out.append(Block(after, after.count(b"\n") + 1))
    return out


@attrs.frozen(slots=True)
class Event:
    """How to record one marker line: its kind (None: a line with a level
    only), its level (None: as the text says), and `metadata.section`."""

    kind: str | None
    level: str | None
    section: dict[str, Any] | None


@attrs.define(slots=True)
class _Open:
    style: str
    name: str
    title: str
    started_at: str
    start_time: float


class SectionTracker:
    """The sections open in one run, fed the lines as they are recorded (both
    sources: a command's sections span its stdout and stderr)."""

    def __init__(self) -> None:
        self.open: list[_Open] = []
        # The (style, name) of sections opened past MAX_DEPTH, recorded as
        # plain lines, innermost last: their ends are plain lines too, and do
        # not close a section open around them.
        self._beyond: list[tuple[str, str]] = []
        # Per source: the last line recorded was a piece of a longer line, so
        # the next one does not start a line.
        self._continued: dict[str, bool] = {}

    def continues(self, source: str, partial: bool) -> bool:
        """Note a line of `source` (a piece when `partial`); whether it is the
        rest of a line split before it (then not a marker)."""
        continued = self._continued.get(source, False)
        self._continued[source] = partial
        return continued

    def line(self, source: str, line: Line, ts: str) -> Event | None:
        """The event of a line of `source` read at `ts`, None for a plain line."""
        if self.continues(source, line.partial) or line.partial:
            return None
        marker = parse_marker(line.text)
        if marker is None:
            return None
        if marker.action == "level":
            return Event(None, marker.level, None)
        if marker.action == "start":
            return self._start(marker, ts)
        return self._end(marker, ts)

    def block(self, source: str) -> None:
        """Note a Block of plain lines of `source` (whole lines, none partial)."""
        self._continued[source] = False

    def _last_beyond(self, style: str, name: str | None = None) -> int | None:
        return next(
            (i for i in range(len(self._beyond) - 1, -1, -1)
             if self._beyond[i][0] == style and (name is None or self._beyond[i][1] == name)),
            None,
        )

    def _start(self, marker: Marker, ts: str) -> Event | None:
        ends: list[_Open] = []
        if marker.style == BUILDKITE and (beyond := self._last_beyond(BUILDKITE)) is not None:
            # The Buildkite section this header ends is one past the limit.
            del self._beyond[beyond:]
        elif marker.style == BUILDKITE:
            # A header ends the Buildkite section before it, and the Buildkite
            # sections inside it, but not a group opened inside it and still
            # open: then it starts a section inside that group, whose own end
            # marker comes later.
            at = next((i for i in range(len(self.open) - 1, -1, -1) if self.open[i].style == BUILDKITE), None)
            if at is not None and all(s.style == BUILDKITE for s in self.open[at:]):
                ends = self.open[at:][::-1]
                del self.open[at:]
                self._beyond.clear()
        if len(self.open) >= MAX_DEPTH:
            if not ends:
                self._beyond.append((marker.style, marker.name))
                return None
            return Event("section_end", None, self._closing(ends, ts))
        section: dict[str, Any] = {
            "style": marker.style,
            "name": marker.name,
            "title": marker.title,
            "collapsed": marker.collapsed,
            "depth": len(self.open),
        }
        if ends:
            section["ends"] = [_ended(s, ts) for s in ends]
        self.open.append(_Open(marker.style, marker.name, marker.title, ts, _seconds(ts)))
        return Event("section_start", None, section)

    def _end(self, marker: Marker, ts: str) -> Event | None:
        beyond = self._last_beyond(marker.style, None if marker.style == GITHUB else marker.name)
        if beyond is not None:
            # It ends a section past the limit (and what that holds): a plain line.
            del self._beyond[beyond:]
            return None
        if marker.style == GITHUB:
            at = next((i for i in range(len(self.open) - 1, -1, -1) if self.open[i].style == GITHUB), None)
        else:
            at = next(
                (i for i in range(len(self.open) - 1, -1, -1)
                 if self.open[i].style == GITLAB and self.open[i].name == marker.name),
                None,
            )
        if at is None:
            # Nothing of that name is open: a plain line.
            return None
        closed = self.open[at:][::-1]
        del self.open[at:]
        self._beyond.clear()
        return Event("section_end", None, self._closing(closed, ts))

    @staticmethod
    def _closing(closed: list[_Open], ts: str) -> dict[str, Any]:
        """`metadata.section` of an end: the outermost of `closed` is the one
        it ends, the others (innermost first) are its `ends`."""
        main = closed[-1]
        section: dict[str, Any] = {
            "style": main.style,
            "name": main.name,
            "title": main.title,
            "startedAt": main.started_at,
            "durationMs": _duration_ms(main, ts),
        }
        if len(closed) > 1:
            section["ends"] = [_ended(s, ts) for s in closed[:-1]]
        return section


def _seconds(ts: str) -> float:
    return parse_ts(ts).timestamp()


def _duration_ms(section: _Open, ts: str) -> int:
    return max(0, round((_seconds(ts) - section.start_time) * 1000))


def _ended(section: _Open, ts: str) -> dict[str, Any]:
    return {"name": section.name, "title": section.title, "durationMs": _duration_ms(section, ts)}
