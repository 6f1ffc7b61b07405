"""Sections end to end: a real `python -m agent run` whose command prints CI
markers, an in-process hub on each store, GET .../sections, the raw download
and `keruta-agent tail`."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from agent.tail import TailSettings, tail
from hub.openapi import openapi_document
from keruta.limits import DEFAULT_LIMITS
from keruta.timefmt import parse_ts
from tests import hubclient
from tests.agentclient import agent, run_args
from tests.test_openapi import problems

hub, hub_factory = hubclient.hub, hubclient.hub_factory
pytestmark = pytest.mark.slow

SECRET = "::group::Deploy to prod"
# Longer than a line may be (64 KiB): split, its last piece starts with a
# marker but does not start a line.
LONG = "x" * DEFAULT_LIMITS.max_line_bytes + "::group::not a section"
COMMAND = r"""
import os, sys, time
def out(s): os.write(1, s.encode() + b"\n")
out("before")
out("::group::Build")
out("compiling")
out("::group::Inner")
time.sleep(0.25)
out("::endgroup::")
out("::warning::an error, only a warning")
out("::endgroup::")
os.write(1, b"section_start:1700000000:tests[collapsed=true]\r\x1b[0KRun the tests\n")
out("::error file=t.py,line=3::test_x failed")
os.write(1, b"section_end:1700000009:tests\r\x1b[0K\n")
out(SECRET)
out(LONG)
out("--- Upload")
out("uploading")
out("+++ Summary")
out("all done")
""".replace("SECRET", repr(SECRET)).replace("LONG", repr(LONG))


def _shape(sections: list[dict]) -> list[tuple]:
    return [(s["name"], s["title"], s["collapsed"], s["errors"], s["endSeq"] is None, _shape(s["sections"])) for s in sections]


async def test_markers_become_sections_on_the_hub_and_in_tail(hub: hubclient.TestHub, tmp_path: Path) -> None:
    args = run_args(hub.url, "sect-1", tmp_path / "spool", "--mask", SECRET)
    async with agent(args + [sys.executable, "-c", COMMAND]) as a:
        assert await a.wait() == 0
    # The mirror is what the command printed (masked).
    assert b"::group::Build\n" in a.stdout and SECRET.encode() not in a.stdout
    records = await hubclient.stored(hub, "sect-1")
    kinds = [(r["message"].replace("\r", "\\r").replace("\x1b", "\\e"), r.get("kind"), r["level"]) for r in records]
    assert kinds[:10] == [
        ("before", None, "INFO"),
        ("::group::Build", "section_start", "INFO"),
        ("compiling", None, "INFO"),
        ("::group::Inner", "section_start", "INFO"),
        ("::endgroup::", "section_end", "INFO"),
        ("::warning::an error, only a warning", None, "WARN"),
        ("::endgroup::", "section_end", "INFO"),
        ("section_start:1700000000:tests[collapsed=true]\\r\\e[0KRun the tests", "section_start", "INFO"),
        ("::error file=t.py,line=3::test_x failed", None, "ERROR"),
        ("section_end:1700000009:tests\\r\\e[0K", "section_end", "INFO"),
    ]
    rest = records[10:]
    assert rest[0]["message"] == "***" and rest[0].get("kind") is None, "a masked marker is no marker"
    pieces = [r for r in rest if r["lineNumber"] == 12]
    assert pieces[-1]["message"].startswith("::group::") and len(pieces) == 2
    assert all(r.get("kind") is None for r in pieces), "nor a piece of a split line"
    assert "".join(r["message"] for r in rest if r["lineNumber"] == 12) == LONG
    inner_end = records[4]["metadata"]["section"]
    # From the records' timestamps (when the agent read the lines; a loaded
    # machine may read both in one go, so no lower bound on the sleep).
    took = parse_ts(records[4]["timestamp"]) - parse_ts(records[3]["timestamp"])
    assert inner_end["name"] == "Inner" and inner_end["durationMs"] == round(took.total_seconds() * 1000)
    assert inner_end["startedAt"] == records[3]["timestamp"]

    async with hub.http() as client:
        answer = (await client.get("/api/v1/tasks/sect-1/sections")).json()
        assert (await client.get("/api/v1/tasks/bad%20id/sections")).status_code == 400
        missing = await client.get("/api/v1/tasks/nobody/sections")
        raw = (await client.get("/api/v1/tasks/sect-1/logs/raw")).text
    assert missing.status_code == 404 and missing.json()["error"] == "NOT_FOUND"
    assert answer["taskId"] == "sect-1"
    assert problems(openapi_document(), "TaskSections", answer) == []
    assert _shape(answer["sections"]) == [
        ("Build", "Build", True, 0, False, [("Inner", "Inner", True, 0, False, [])]),
        ("tests", "Run the tests", True, 1, False, []),
        ("Upload", "Upload", True, 0, False, []),
        # The last Buildkite section: nothing ends it, so it is listed open.
        ("Summary", "Summary", False, 0, True, []),
    ]
    build = answer["sections"][0]
    assert (build["startSeq"], build["endSeq"], build["lines"]) == (2, 7, 4)
    assert build["sections"][0]["durationMs"] == inner_end["durationMs"]
    assert build["durationMs"] >= inner_end["durationMs"]
    # The raw download shows what the command printed.
    assert "::group::Build\ncompiling\n::group::Inner\n::endgroup::\n" in raw

    out = io.BytesIO()
    assert await tail(TailSettings(hub.url, "sect-1", follow=False), out=out) == 0
    text = out.getvalue().decode()
    lines = text.splitlines()
    assert lines[:8] == ["before", "▾ Build", "compiling", "▾ Inner", lines[4], "::warning::an error, only a warning", lines[6], "▾ Run the tests"]
    assert lines[4].startswith("▸ Inner (") and lines[4].endswith(" s)")
    assert lines[6].startswith("▸ Build (")
    assert "▾ Upload\nuploading\n▸ Upload (" in text and "▾ Summary\nall done\n" in text
