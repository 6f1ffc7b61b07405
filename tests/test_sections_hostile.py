"""Sections attacked end to end (README "Sections", CONTRACT "record").

Agent side: a real `python -m agent run` whose command prints markers at
their edges (ends with nothing open, 10,000-deep nesting, a 1 MB title,
control characters, NUL, invalid UTF-8, ANSI escapes, markers split across
writes and across stdout/stderr, a marker on an overlong line and on an
unterminated last line, near misses). Hub side: `logs` frames and POSTs
carrying section records directly, with hostile metadata, ends naming
nothing or out of order, ends from another producer, replayed and
conflicting seqs, more sections than an answer lists, DELETE `before`, a
cap and retention cutting a section's start, the paging parameters at their
edges, and `durationMs` from timestamps that go backwards or span years
0001-9999.

Every case checks what is stored (every line, exactly once, in seq order,
as printed), what GET .../sections answers (status, the OpenAPI schema,
structure and bounded size) and that another task is unaffected. Real
sockets and processes, both stores where the fixtures run them.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

from hub.openapi import openapi_document
from hub.store import sections
from hub.store.sections import MAX_DEPTH as LISTED_DEPTH
from keruta.limits import DEFAULT_LIMITS
from keruta.records import LogRecord
from tests import hubclient
from tests.agentclient import agent, joined_lines, lines_of, run_args
from tests.hubclient import (
    InProcessHub,
    InProcessHubFactory,
    Ws,
    assert_error,
    fetch_all,
    logs_path,
)
from tests.test_openapi import problems

hub, hub_factory, sqlite_hub_factory = hubclient.hub, hubclient.hub_factory, hubclient.sqlite_hub_factory

MAX_NAME, MAX_TITLE = 64, 256
AGENT_DEPTH = 16
TS = "2026-03-04T05:06:07.000000Z"
BYSTANDER = "bystander"
INT64_MAX = 2**63 - 1


# --- records ------------------------------------------------------------------------


def line(message: str, level: str = "INFO", **extra: Any) -> dict[str, Any]:
    return {"source": "stdout", "level": level, "message": message, "timestamp": TS, **extra}


def start(name: Any, *, message: str | None = None, **meta: Any) -> dict[str, Any]:
    section = {"style": "github", "name": name, "title": name, "collapsed": True, **meta}
    return line(f"::group::{name}" if message is None else message, kind="section_start",
                metadata={"section": section})


def end(name: Any = None, **extra: Any) -> dict[str, Any]:
    metadata = {} if name is None else {"section": {"style": "github", "name": name}}
    return line("::endgroup::", kind="section_end", metadata=metadata, **extra)


def sections_path(task: str) -> str:
    return f"/api/v1/tasks/{task}/sections"


# --- answers ------------------------------------------------------------------------


def flat(sections: list[dict[str, Any]], depth: int = 1) -> list[tuple[dict[str, Any], int]]:
    """Every section of an answer with its depth (1: top), in listing order."""
    out: list[tuple[dict[str, Any], int]] = []
    for s in sections:
        out.append((s, depth))
        out += flat(s["sections"], depth + 1)
    return out


def check_answer(answer: dict[str, Any], task: str, max_seq: int, *, size: int = 10_000) -> list[dict[str, Any]]:
    """What every /sections answer must be, whatever was sent: the schema,
    start order, bounded names/titles/depth/count, line counts that are seq
    arithmetic, durations only for closed sections. Returns the sections, flat."""
    assert answer["taskId"] == task
    assert problems(openapi_document(), "TaskSections", answer) == []
    listed = flat(answer["sections"])
    assert len(listed) <= size
    starts = [s["startSeq"] for s, _ in listed]
    assert starts == sorted(set(starts)), "listed once each, in startSeq order"
    for s, depth in listed:
        assert depth <= LISTED_DEPTH
        assert isinstance(s["name"], str) and len(s["name"]) <= MAX_NAME
        assert isinstance(s["title"], str) and len(s["title"]) <= MAX_TITLE
        assert "\x00" not in s["name"] + s["title"] + (s["style"] or "")
        assert 1 <= s["startSeq"] <= max_seq
        closed = s["endSeq"] is not None
        assert closed == (s["endedAt"] is not None) == (s["durationMs"] is not None)
        if closed:
            assert s["startSeq"] < s["endSeq"] <= max_seq and s["durationMs"] >= 0
        assert s["lines"] == (s["endSeq"] if closed else max_seq + 1) - s["startSeq"] - 1
        assert s["hasError"] == (s["errors"] > 0) and s["errors"] >= 0
        for child in s["sections"]:
            assert child["startSeq"] > s["startSeq"]
    next_after = answer["nextAfterSeq"]
    assert next_after is None or (listed and next_after == starts[-1])
    return [s for s, _ in listed]


async def get_sections(client: httpx.AsyncClient, task: str, **params: Any) -> dict[str, Any]:
    resp = await client.get(sections_path(task), params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


async def all_sections(client: httpx.AsyncClient, task: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the stored records, the listed sections flat), checked against each
    other: the sections listed are exactly the stored section_start records."""
    records = await fetch_all(client, task)
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(set(seqs))
    max_seq = (await client.get(f"/api/v1/tasks/{task}")).json().get("maxSeq") or (seqs[-1] if seqs else 0)
    max_seq = max([max_seq, *seqs])
    answer = await get_sections(client, task)
    listed = check_answer(answer, task, max_seq)
    assert answer["nextAfterSeq"] is None
    assert [s["startSeq"] for s in listed] == [r["seq"] for r in records if r.get("kind") == "section_start"]
    return records, listed


async def bystander_ok(client: httpx.AsyncClient) -> None:
    """Another task is served as ever: a write is stored, its sections listed."""
    resp = await client.post(logs_path(BYSTANDER), json=[start("b"), line("b line"), end("b")])
    assert resp.status_code == 200, resp.text
    answer = await get_sections(client, BYSTANDER)
    assert [(s["name"], s["endSeq"] is not None) for s in answer["sections"]][-1] == ("b", True)


# --- hub side: hostile section records ------------------------------------------------

HOSTILE_STARTS: list[dict[str, Any]] = [
    line("no section metadata", kind="section_start"),
    line("section is a string", kind="section_start", metadata={"section": "open"}),
    line("section is a list", kind="section_start", metadata={"section": ["name", "x"]}),
    line("section is null", kind="section_start", metadata={"section": None}),
    line("section is a number", kind="section_start", metadata={"section": 5}),
    line("metadata has no dict", kind="section_start", metadata={"other": [1, 2, {"section": {}}]}),
    start(7, message="name is a number"),
    start(["a", "b"], message="name is a list"),
    start({"name": "x"}, message="name is an object"),
    start("title-int", title=12345),
    start("style-long", style="s" * 1000),
    start("collapsed-string", collapsed="false"),
    start("collapsed-zero", collapsed=0),
    start("collapsed-false", collapsed=False),
    start("n" * 3000, title="t" * 700),
    line("t" * 60_000, kind="section_start", metadata={"section": {"name": ""}}),
    start("ctl\x01\x07\x1b[31mred\x1b[0m\r\n\t\x7f"),
    start("nul\x00inside", title="title\x00nul"),
    line("message\x00nul", kind="section_start", metadata={}),
    start("ends-not-a-list", ends="everything"),
    start("ends-junk", ends=[1, None, "x", {"name": 5}, {"title": "no name"}, [], {"name": None}]),
    start("ends-many", ends=[{"name": "e"}] * 150),
    start("\u202e\ufeff\U0001f600 unicode"),
]


async def test_hostile_section_metadata_is_stored_and_listed_within_bounds(hub: InProcessHub) -> None:
    """Every shape a producer can give `metadata.section` (README: "a
    producer's metadata is not trusted"): each record stored as sent, each
    start listed once with a bounded name and title, never a 500."""
    task = "hostile-meta"
    body = [r for s in HOSTILE_STARTS for r in (s, line(f"inside {s['message'][:20]!r}"))]
    body += [end(), end([1]), line("::endgroup::", kind="section_end", metadata={"section": "x"}),
             end("nul\x00inside"), line("after", level="ERROR")]
    with trio.fail_after(60):
        async with hub.http() as client:
            resp = await client.post(logs_path(task), json=body)
            assert resp.status_code == 200, resp.text
            assert resp.json()["seqs"] == list(range(1, len(body) + 1))
            records, listed = await all_sections(client, task)
            assert [(r["message"], r.get("kind")) for r in records] == [(b["message"], b.get("kind")) for b in body]
            assert len(listed) == len(HOSTILE_STARTS)
            by_seq = {s["startSeq"]: s for s in listed}
            for k, sent in enumerate(HOSTILE_STARTS):
                s = by_seq[2 * k + 1]
                meta = sent.get("metadata", {}).get("section")
                if isinstance(meta, dict) and isinstance(meta.get("title"), str):
                    assert s["title"] == meta["title"][:MAX_TITLE].replace("\x00", "\ufffd")
                elif not isinstance(meta, dict) or meta.get("title") is None or not isinstance(meta.get("title"), str):
                    assert s["title"] == sent["message"][:MAX_TITLE].replace("\x00", "\ufffd")
                assert s["name"], "a section always has a name"
                assert s["collapsed"] is (not (isinstance(meta, dict) and meta.get("collapsed") is False))
            # The end that names "nul\0inside" closed that section (its name kept
            # the same way as the start's).
            nul = by_seq[2 * 17 + 1]
            assert HOSTILE_STARTS[17]["message"] == "::group::nul\x00inside"
            assert nul["endSeq"] is not None and nul["name"].startswith("nul")
            # The ERROR line at the end counts in every section still open.
            still_open = [s for s in listed if s["endSeq"] is None]
            assert still_open and all(s["errors"] == 1 for s in still_open)
            await bystander_ok(client)


async def test_metadata_past_its_limit_is_refused_and_changes_no_section(hub: InProcessHub) -> None:
    task = "meta-limit"
    async with hub.http() as client:
        assert (await client.post(logs_path(task), json=[start("kept")])).status_code == 200
        big = start("too big", ends=[{"name": "kept", "title": "x" * 100}] * 60)
        assert len(orjson.dumps(big["metadata"])) > DEFAULT_LIMITS.max_metadata_bytes
        resp = await client.post(logs_path(task), json=[line("in the same batch"), big])
        assert resp.status_code in (400, 413), resp.text
        records, listed = await all_sections(client, task)
        assert [r["message"] for r in records] == ["::group::kept"]
        assert [(s["name"], s["endSeq"]) for s in listed] == [("kept", None)]


# --- hub side: ends that pair badly, several producers, replays ---------------------


def wrec(seq: int, message: str, kind: str | None = None, section: Any = None, level: str = "INFO",
         timestamp: str = TS) -> dict[str, Any]:
    r: dict[str, Any] = {"seq": seq, "timestamp": timestamp, "source": "stdout", "level": level,
                         "message": message, "lineNumber": seq, "metadata": {}}
    if kind is not None:
        r["kind"] = kind
    if section is not None:
        r["metadata"] = {"section": section}
    return r


def wlogs(task: str, producer: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "logs", "taskId": task, "producer": producer, "records": records}


async def send_acked(ws: Ws, task: str, producer: str, records: list[dict[str, Any]]) -> None:
    await ws.send(wlogs(task, producer, records))
    with trio.fail_after(30):
        while True:
            frame = await ws.recv()
            assert frame["type"] != "error", frame
            if frame["type"] == "ack" and frame.get("producer") == producer and frame["seq"] >= records[-1]["seq"]:
                return


async def test_ends_naming_nothing_out_of_order_and_from_another_producer(hub: InProcessHub) -> None:
    """An end pairs with the innermost open section of its name on the task,
    whoever opened it (README "Sections": one row per section per task); an
    end naming nothing open changes nothing; an end out of order closes
    only the section it names."""
    task = "pairing"
    g = {"style": "github"}
    async with hub.ws() as ws:
        await send_acked(ws, task, "A", [
            wrec(1, "::group::outer", "section_start", {**g, "name": "outer", "title": "outer"}),
            wrec(2, "::group::inner", "section_start", {**g, "name": "inner", "title": "inner"}),
            wrec(3, "a line"),
        ])
        await send_acked(ws, task, "B", [
            wrec(1, "::endgroup::", "section_end", {**g, "name": "never-opened"}),
            wrec(2, "::endgroup::", "section_end", {**g, "name": "outer"}),  # task seq 5, out of order
        ])
        await send_acked(ws, task, "A", [
            wrec(4, "boom", level="ERROR"),  # task seq 6: inner still open, outer closed
            wrec(5, "::endgroup::", "section_end", {**g, "name": "inner"}),  # 7
        ])
        await send_acked(ws, task, "B", [
            wrec(3, "::endgroup::", "section_end", {}),  # 8: nothing open: nothing
            wrec(4, "::endgroup::", "section_end", {**g, "name": "outer"}),  # 9: outer already closed
        ])
        # A replay of an identity already stored is stored once and opens nothing new.
        await send_acked(ws, task, "A", [
            wrec(1, "::group::outer", "section_start", {**g, "name": "outer", "title": "outer"}),
        ])
        # The same identity holding another record: SEQ_CONFLICT, no section change.
        await ws.send(wlogs(task, "A", [wrec(2, "::endgroup::", "section_end", {**g, "name": "outer"})]))
        with trio.fail_after(30):
            frame = await ws.recv_type("error")
        assert frame["code"] == "SEQ_CONFLICT", frame
    async with hub.http() as client:
        records, listed = await all_sections(client, task)
        assert [r["seq"] for r in records] == list(range(1, 10))
        got = [(s["name"], s["startSeq"], s["endSeq"], s["errors"]) for s in listed]
        assert got == [("outer", 1, 5, 0), ("inner", 2, 7, 1)]
        await bystander_ok(client)


async def test_replayed_batches_of_sections_after_a_reconnect_make_no_second_row(hub: InProcessHub) -> None:
    """An agent resends what was not acknowledged: the sections of a batch
    stored twice are listed once, and their errors counted once."""
    task = "replay"
    g = {"style": "github"}
    batch = [
        wrec(1, "::group::x", "section_start", {**g, "name": "x", "title": "x"}),
        wrec(2, "bad", level="ERROR"),
        wrec(3, "::endgroup::", "section_end", {**g, "name": "x"}),
        wrec(4, "::group::y", "section_start", {**g, "name": "y", "title": "y"}),
    ]
    for _ in range(3):
        async with hub.ws() as ws:
            await send_acked(ws, task, "agent-1", batch)
    async with hub.http() as client:
        records, listed = await all_sections(client, task)
        assert len(records) == 4
        assert [(s["name"], s["endSeq"], s["errors"]) for s in listed] == [("x", 3, 1), ("y", None, 0)]


# --- hub side: many sections, bounded answers ---------------------------------------


async def test_more_sections_than_one_answer_lists_come_in_bounded_pages(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    """12,000 sections, none closed, from one producer: an answer lists
    10,000 (nested at most 64 deep) and says where the rest start; the next
    page lists the 2,000 left; the body stays bounded."""
    hub = await sqlite_hub_factory.astart()
    task = "many"
    total = 12_000
    with trio.fail_after(60):
        async with hub.http(timeout=60) as client:
            for first in range(0, total, 1000):
                body = [start(f"s{k}") for k in range(first, first + 1000)]
                assert (await client.post(logs_path(task), json=body)).status_code == 200
            resp = await client.get(sections_path(task))
            assert resp.status_code == 200
            assert len(resp.content) < 10_000 * 400, "bounded: about 300 bytes a section"
            answer = resp.json()
            listed = check_answer(answer, task, total)
            assert len(listed) == 10_000 and answer["nextAfterSeq"] == 10_000
            assert max(d for _, d in flat(answer["sections"])) == LISTED_DEPTH
            rest = await get_sections(client, task, afterSeq=answer["nextAfterSeq"])
            listed_rest = check_answer(rest, task, total)
            assert [s["startSeq"] for s in listed_rest] == list(range(10_001, total + 1))
            assert rest["nextAfterSeq"] is None
            # size=1 from the very last: nothing more.
            last = await get_sections(client, task, afterSeq=total - 1, size=1)
            assert [s["startSeq"] for s in flat(last["sections"])[0][:1]] == [total] and last["nextAfterSeq"] is None
            # Every one is open: each line count runs to the task's end.
            assert listed[0]["lines"] == total - 1
            await bystander_ok(client)


async def test_errors_among_many_open_sections_do_not_stall_the_writer(hub: InProcessHub) -> None:
    """A batch within every limit (800 records) that opens a section before
    each of 400 ERROR lines is counted right, and is one update of the open
    sections, not one per run of errors (hub/store/sections.py `plan`, tested
    below without a store): on PostgreSQL the old way took ~12 s of the
    writer's time, every other task's writes waiting behind it. The bound
    here only keeps a hang from lasting."""
    task = "err-storm"
    body = [r for k in range(400) for r in (start(f"s{k}"), line("boom", level="ERROR"))]
    async with hub.http(timeout=120) as client:
        assert (await client.post(logs_path(BYSTANDER), json=[line("warm")])).status_code == 200
        took: dict[str, float] = {}

        async def hostile() -> None:
            t0 = time.monotonic()
            assert (await client.post(logs_path(task), json=body)).status_code == 200
            took["hostile"] = time.monotonic() - t0

        async def bystander() -> None:
            await trio.sleep(0.05)
            t0 = time.monotonic()
            assert (await client.post(logs_path(BYSTANDER), json=[line("quick")])).status_code == 200
            took["bystander"] = time.monotonic() - t0

        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hostile)
                nursery.start_soon(bystander)
        _, listed = await all_sections(client, task)
        assert [s["errors"] for s in listed] == list(range(400, 0, -1))
        assert set(took) == {"hostile", "bystander"}


def test_runs_of_errors_between_closes_are_one_count() -> None:
    """`plan` gives one error count for all the runs between two closes,
    whatever the opens among them: one statement, each open section once."""
    records = [
        LogRecord("t", seq, "2026-01-01T00:00:00.000000Z", "stdout", level, "m", kind=kind,
                  metadata={"section": {"name": f"s{seq}"}} if kind else {})
        for seq, (kind, level) in enumerate(
            [("section_start", "INFO"), (None, "ERROR")] * 400 + [("section_end", "INFO"), (None, "ERROR")], 1
        )
    ]
    steps = sections.plan(records)
    counts = [s for s in steps if isinstance(s, sections.CountErrors)]
    assert len([s for s in steps if isinstance(s, sections.Open)]) == 400
    assert [len(c.runs) for c in counts] == [400, 1]
    assert counts[0].runs[:2] == ((2, 1), (4, 1)) and counts[1].runs == ((802, 1),)
    # The close comes after the first count and before the second.
    kinds = [type(s).__name__ for s in steps if not isinstance(s, sections.Open)]
    assert kinds == ["CountErrors", "Close", "CountErrors"]


# --- hub side: paging parameters at their edges -----------------------------------------


async def test_paging_parameters_at_their_edges(hub: InProcessHub) -> None:
    task = "paging-edges"
    # 1 outer(2 a(3..4) b(5..6)) 7 ... : nested, so a page can start inside one.
    body = [start("outer"), start("a"), end("a"), start("b"), end("b"), end("outer"), start("tail")]
    async with hub.http() as client:
        assert (await client.post(logs_path(task), json=body)).status_code == 200
        whole = await get_sections(client, task)
        check_answer(whole, task, 7)
        assert [(s["name"], [c["name"] for c in s["sections"]]) for s in whole["sections"]] == [
            ("outer", ["a", "b"]), ("tail", [])]
        # A page starting inside `outer`: its children are at the top of the page.
        inside = await get_sections(client, task, afterSeq=1)
        assert [s["name"] for s in inside["sections"]] == ["a", "b", "tail"]
        # size=1 walks every section once, in start order.
        walked: list[int] = []
        after: int | None = 0
        for _ in range(10):
            page = await get_sections(client, task, afterSeq=after, size=1)
            check_answer(page, task, 7, size=1)
            walked += [s["startSeq"] for s, _ in flat(page["sections"])]
            after = page["nextAfterSeq"]
            if after is None:
                break
        assert walked == [1, 2, 4, 7]
        for params in ({"afterSeq": INT64_MAX}, {"afterSeq": 7}, {"afterSeq": 10**6, "size": 10_000},
                       {"afterSeq": "", "size": ""}, {"afterSeq": "0007", "size": "01"}):
            page = await get_sections(client, task, **params)
            check_answer(page, task, 7)
        assert (await get_sections(client, task, afterSeq=INT64_MAX))["sections"] == []
        assert (await get_sections(client, task, afterSeq="0007", size="01"))["sections"] == []
        assert [s["name"] for s in (await get_sections(client, task, afterSeq="", size=""))["sections"]] == [
            "outer", "tail"]
        for params in ({"afterSeq": 2**63}, {"afterSeq": "9" * 400}, {"afterSeq": "-1"}, {"afterSeq": "+1"},
                       {"afterSeq": " 1"}, {"afterSeq": "1.0"}, {"afterSeq": "0x1"}, {"afterSeq": "1_0"},
                       {"afterSeq": "\uff11"}, {"afterSeq": "1e3"}, {"size": 0}, {"size": -1},
                       {"size": 10_001}, {"size": 2**64}, {"size": "1 "}, {"afterSeq": "\x00"}):
            assert_error(await client.get(sections_path(task), params=params), 400, "INVALID_PARAMETER")
        # Repeated parameters: one answer, never a 500.
        resp = await client.get(sections_path(task) + "?afterSeq=1&afterSeq=x&size=1&size=2")
        assert resp.status_code in (200, 400), resp.text
        for bad in ("..", ".", "a%20b", "x" * 129, "%00", "a%2Fb"):
            resp = await client.get(sections_path(bad))
            assert resp.status_code in (400, 404), (bad, resp.status_code, resp.text)
            assert resp.json()["error"] in ("INVALID_PARAMETER", "INVALID_TASK_ID", "NOT_FOUND", "BAD_REQUEST")
        assert_error(await client.get(sections_path("nobody")), 404, "NOT_FOUND")
        await bystander_ok(client)


# --- hub side: durations from hostile timestamps ------------------------------------------

YEAR_1 = "0001-01-01T00:00:00.000000Z"
YEAR_9999 = "9999-12-31T23:59:59.999999Z"


def _ms(a: str, b: str) -> int:
    """Milliseconds from a to b, rounded half up, in integers (a float of
    microseconds across 9,999 years is not exact)."""
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    delta = datetime.strptime(b, fmt).replace(tzinfo=UTC) - datetime.strptime(a, fmt).replace(tzinfo=UTC)
    return (delta // timedelta(microseconds=1) + 500) // 1000


async def test_durations_from_timestamps_backwards_and_at_the_ends_of_time(hub: InProcessHub) -> None:
    task = "durations"
    body = [
        start("span", timestamp=YEAR_1) | {"timestamp": YEAR_1},
        line("inside", timestamp=YEAR_9999),
        end("span") | {"timestamp": YEAR_9999},
        start("backwards") | {"timestamp": "2026-01-01T00:00:10.000000Z"},
        end("backwards") | {"timestamp": "2026-01-01T00:00:00.000000Z"},
        start("offset") | {"timestamp": "2026-01-01T23:30:00+14:00"},
        end("offset") | {"timestamp": "2026-01-01T09:30:00.5-00:00"},
        start("never-ends") | {"timestamp": YEAR_9999},
    ]
    async with hub.http() as client:
        resp = await client.post(logs_path(task), json=body)
        assert resp.status_code == 200, resp.text
        _, listed = await all_sections(client, task)
        got = {s["name"]: s for s in listed}
        assert got["span"]["durationMs"] == _ms(YEAR_1, YEAR_9999) == 315_537_897_600_000
        assert got["span"]["startedAt"] == YEAR_1 and got["span"]["endedAt"] == YEAR_9999
        assert got["backwards"]["durationMs"] == 0
        assert got["offset"]["startedAt"] == "2026-01-01T09:30:00.000000Z"
        assert got["offset"]["durationMs"] == 500
        assert got["never-ends"]["durationMs"] is None
        # A timestamp whose UTC leaves years 1-9999 is refused, and opens nothing.
        for ts in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "10000-01-01T00:00:00Z",
                   "0000-12-31T23:59:59Z"):
            resp = await client.post(logs_path(task), json=[start("refused") | {"timestamp": ts}])
            assert resp.status_code == 400, (ts, resp.text)
        _, again = await all_sections(client, task)
        assert [s["name"] for s in again] == [s["name"] for s in listed]


# --- hub side: removal of a section's start ---------------------------------------------

OLD = "2020-01-01T00:00:00.000000Z"
BEFORE = "2021-01-01T00:00:00.000000Z"


async def test_a_delete_before_that_takes_a_sections_start_drops_the_section(hub: InProcessHub) -> None:
    task = "delete-start"
    body = [
        start("outer") | {"timestamp": OLD},
        line("old line") | {"timestamp": OLD},
        start("inner"),
        line("new line", level="ERROR"),
        end("inner"),
        start("later"),
    ]
    async with hub.http() as client:
        assert (await client.post(logs_path(task), json=body)).status_code == 200
        resp = await client.delete(logs_path(task), params={"before": BEFORE})
        assert resp.status_code == 200 and resp.json()["deletedCount"] == 2, resp.text
        records, listed = await all_sections(client, task)
        assert [s["name"] for s in listed] == ["inner", "later"]
        inner = listed[0]
        assert (inner["startSeq"], inner["endSeq"], inner["lines"], inner["errors"]) == (3, 5, 1, 1)
        # The end of the section whose start went closes nothing else.
        assert (await client.post(logs_path(task), json=[end("outer"), line("x", level="ERROR")])).status_code == 200
        records, listed = await all_sections(client, task)
        assert [(s["name"], s["endSeq"], s["errors"]) for s in listed] == [("inner", 5, 1), ("later", None, 1)]
        assert [r["message"] for r in records if r.get("kind") != "gap"] == [
            "::group::inner", "new line", "::endgroup::", "::group::later", "::endgroup::", "x"]
        # All of it: no section left.
        assert (await client.delete(logs_path(task))).status_code == 200
        resp = await client.get(sections_path(task))
        assert resp.status_code in (200, 404), resp.text
        if resp.status_code == 200:
            assert resp.json()["sections"] == []
        await bystander_ok(client)


async def test_a_cap_that_cuts_sections_starts_lists_only_what_is_kept(hub_factory: InProcessHubFactory) -> None:
    hub = await hub_factory.astart("--max-task-bytes", "16K")
    task = "capped"
    pad = "p" * 200
    async with hub.http() as client:
        assert (await client.post(logs_path(task), json=[start("whole run"), line(pad)])).status_code == 200
        for k in range(30):
            body = [start(f"step {k}"), *[line(f"{k} {pad}") for _ in range(5)], end(f"step {k}")]
            assert (await client.post(logs_path(task), json=body)).status_code == 200
        assert (await client.post(logs_path(task), json=[line("boom", level="ERROR"), end("whole run")])
                ).status_code == 200
        # The cap cuts in steps of its own after the appends: wait until it is done.
        with trio.fail_after(30):
            before: list[dict[str, Any]] = []
            while (now := await fetch_all(client, task)) != before:
                before = now
                await trio.sleep(0.2)
        records, listed = await all_sections(client, task)
        assert any(r.get("kind") == "gap" for r in records), "the cap cut the middle"
        names = [s["name"] for s in listed]
        assert names[0] == "whole run" and len(names) < 31
        whole = listed[0]
        assert whole["endSeq"] == records[-1]["seq"] and whole["errors"] == 1
        await bystander_ok(client)


RETENTION = ("--retention-days", "0.00003", "--retention-interval", "0.1")


async def test_retention_that_takes_sections_starts_drops_them(hub_factory: InProcessHubFactory) -> None:
    hub = await hub_factory.astart(*RETENTION)
    task = "retained"
    async with hub.http() as client:
        old = [start("old") | {"timestamp": OLD}, line("old") | {"timestamp": OLD}]
        assert (await client.post(logs_path(task), json=old)).status_code == 200
        with trio.fail_after(30):
            while True:
                records = await fetch_all(client, task)
                if not any(r["message"] == "::group::old" for r in records):
                    break
                await trio.sleep(0.05)
        resp = await client.get(sections_path(task))
        assert resp.status_code in (200, 404), resp.text
        if resp.status_code == 200:
            assert resp.json()["sections"] == []
        # Written now (before the next pass may take it): an end of the dropped one closes nothing.
        resp = await client.post(logs_path(task), json=[{**end("old"), "timestamp": datetime.now(UTC).isoformat()}])
        assert resp.status_code == 200, resp.text
        resp = await client.get(sections_path(task))
        assert resp.status_code == 200 and resp.json()["sections"] == [], resp.text


# --- agent side ------------------------------------------------------------------------------

LIMIT = DEFAULT_LIMITS.max_line_bytes
DEEP = 10_000
# What the command writes, in order: (fd, bytes, pause after). Each group is
# checked below by the marker lines it must (or must not) make.
AGENT_COMMAND = r"""
import os, sys, time
W = [
    # First, once the agent reads the pipes itself and keeps up: the two
    # pipes are read independently, and a line is numbered when its pipe's
    # capture hands it over (seen: with the stdout capture still busy with
    # the 20,000 marker lines below, or while the agent was starting, a
    # stdout ::group:: written 50-100 ms before a stderr ::endgroup:: got
    # the later seq, so the end closed nothing and every section after it
    # nested in that group).
    (1, b"warming up\n", "wait"),
    (1, b"::group::opened on stdout\n", 0.2),                    # across the two sources
    (2, b"::endgroup::\n", 0.05),
    (1, b"::gro", 0.05),                                         # one line's halves on two sources
    (2, b"up::halves\n", 0.05),
    (1, b"\n", 0.05),
    (1, b"::endgroup::\n", 0),                                   # an end with nothing open
    (1, b"section_end:1700000000:nothing\n", 0),
    (1, b"".join(b"::group::g%d\n" % i for i in range(DEEP)), 0),  # 10,000 deep
    (1, b"in the deepest\n", 0),
    (1, b"::endgroup::\n" * DEEP, 0),
    (1, b"::endgroup::\n", 0),                                   # unbalanced: one end too many
    (1, b"::group::" + b"T" * (1024 * 1024) + b"\n", 0),         # a 1 MB title: pieces, no marker
    (1, b"::group::" + b"y" * (LIMIT - 9) + b"\n", 0),           # exactly at the limit: a marker
    (1, b"::endgroup::\n", 0),
    (1, b"x" * (LIMIT + 10) + b"::group::tail of a long line\n", 0),
    (1, b"::group::ctl \x01\x07\x1b[31mred\x1b[0m \x7f\n", 0),  # control characters and ANSI
    (1, b"::endgroup::\n", 0),
    (1, b"::group::nul\x00here\n", 0),                           # NUL
    (1, b"::endgroup::\n", 0),
    (1, b"::group::bad \xff\xfe utf8\n", 0),                     # invalid UTF-8
    (1, b"::endgroup::\n", 0),
    (1, b"::gro", 0.05),                                         # split across writes
    (1, b"up::split", 0.05),
    (1, b"\n::endgroup::\n", 0),
    (1, b":: group::a\n::group:a\n::groupx::a\n::GROUP::a\n ::group::a\n--- \n---a\n", 0),  # near misses
    (1, b"section_start:abc:a\nsection_start:1:a trailing\nsection_end:1:\n::endgroup\n", 0),
    (1, b"\x1b[0Ksection_start:1700000000:gl[collapsed=false]\r\x1b[0KGitLab \x1b[1mbold\n", 0),
    (1, b"section_end:1700000001:gl\r\x1b[0K\n", 0),
    (1, b"::group::left open\n", 0),
    (1, b"::group::last line, no newline", 0),                   # an unterminated last line
]
for fd, data, pause in W:
    os.write(fd, data)
    while pause == "wait" and not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    if pause != "wait" and pause:
        time.sleep(pause)
""".replace("DEEP", str(DEEP)).replace("LIMIT", str(LIMIT))


def _written() -> dict[str, bytes]:
    namespace: dict[str, Any] = {}
    exec(AGENT_COMMAND.split("for fd, data")[0], namespace)
    out = {"stdout": b"", "stderr": b""}
    for fd, data, _ in namespace["W"]:
        out["stdout" if fd == 1 else "stderr"] += data
    return out


async def test_agent_markers_at_their_edges(hub: InProcessHub, tmp_path: Path) -> None:
    task = "agent-edges"
    args = run_args(hub.url, task, tmp_path / "spool")
    with trio.fail_after(90):
        go = tmp_path / "go"
        async with agent([*args, sys.executable, "-c", AGENT_COMMAND, str(go)]) as a:
            await a.wait_for_output(b"warming up\n")
            await trio.sleep(0.1)
            go.touch()
            assert await a.wait() == 0, a.stderr_text
    written = _written()
    assert bytes(a.stdout) == written["stdout"], "the mirror is what the command printed"
    async with hub.http(timeout=60) as client:
        records, listed = await all_sections(client, task)
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        # Every line stored, as printed (undecodable bytes as U+FFFD), none lost to a marker.
        for source in ("stdout", "stderr"):
            assert joined_lines(records, source) == lines_of(written[source]), source
        kinds = [(r["message"], r.get("kind")) for r in records if r["source"] != "agent"]
        markers = [(m[:40], k) for m, k in kinds if k is not None]
        # 16 of the 10,000 groups open sections, and their 16 ends close them.
        deep = [m for m in markers if m[0].startswith("::group::g")]
        assert deep == [(f"::group::g{i}", "section_start") for i in range(AGENT_DEPTH)]
        plain = {m for m, k in kinds if k is None}
        for near in (":: group::a", "::group:a", "::groupx::a", "::GROUP::a", " ::group::a", "--- ", "---a",
                     "section_start:abc:a", "section_start:1:a trailing", "section_end:1:", "::endgroup",
                     "::gro", "up::halves", "x" * 40):
            assert any(m.startswith(near) for m in plain), near
        assert not any(m.startswith(("::group::T", "TTTT", "x" * 40)) and k for m, k in kinds)
        by_title = {s["title"][:20]: s for s in listed}
        top = (await get_sections(client, task))["sections"]
        want = ["opened on stdout", "g0", "y" * (MAX_NAME - 1) + "\u2026", "ctl \x01\x07\x1b[31mred\x1b[0m \x7f",
                "nul\ufffdhere", "bad \ufffd\ufffd utf8", "split", "gl", "left open"]
        assert [s["name"] for s in top] == want
        assert len(listed) == AGENT_DEPTH + 9
        assert all(s["endSeq"] is not None for s in listed[: AGENT_DEPTH + 1])
        assert len(by_title["y" * 20]["title"]) == MAX_TITLE and len(by_title["y" * 20]["name"]) == MAX_NAME
        gl = by_title["GitLab \x1b[1mbold"]
        assert gl["collapsed"] is False and gl["style"] == "gitlab" and gl["endSeq"] is not None
        cross = by_title["opened on stdout"]
        assert cross["endSeq"] is not None and records[cross["endSeq"] - 1]["source"] == "stderr"
        assert [s["endSeq"] for s in listed[-2:]] == [None, None], "left open; the last line opens one"
        assert [c["name"] for c in top[-1]["sections"]] == ["last line, no newline"]
        nul_record = next(r for r in records if r["message"].startswith("::group::nul"))
        assert nul_record["message"] == "::group::nul\x00here", "stored as printed"
        await bystander_ok(client)
