"""Lines past the spool's disk budget (--spool-max-bytes): the budget and the
"SPOOL FULL" warning measure the spool's bytes on disk, and what was dropped
reaches the hub as one `gap` record (CONTRACT.md, Words: `kind`)."""

from __future__ import annotations

import re
import sqlite3
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.pipeline.capture import LineNumbering
from agent.pipeline.linesplit import Line
from agent.pipeline.recorder import Recorder
from agent.spool.spool import Spool
from hub.store import sqlite_schema
from hub.store.base import Incoming, LogQuery
from hub.store.sqlite import SQLiteStore
from keruta.frames import LogsFrame
from keruta.limits import DEFAULT_LIMITS
from keruta.recordjson import encode_line, logs_frame
from keruta.records import KINDS, LogRecord
from keruta.wire import decode_client_frame, encode_bytes, logs_frame_text, record_to_wire
from tests import hubclient
from tests.agentclient import agent, free_port, run_args

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures

TS = "2026-01-01T00:00:00.000001Z"
# Comfortably more than fits in the budget below.
LINES = 3000
BUDGET = 64 * 1024


def printed_lines() -> list[str]:
    return [f"line {i} " + "x" * 60 for i in range(LINES)]


COMMAND = [sys.executable, "-c", f"for i in range({LINES}): print(f'line {{i}} ' + 'x' * 60)"]


def on_disk(directory: Path) -> int:
    """What a spool directory holds: the sizes of its files."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def said_bytes(stderr: str) -> list[int]:
    return [int(n.replace(",", "")) for n in re.findall(r"SPOOL FULL: ([\d,]+) bytes", stderr)]


async def test_lines_past_the_budget_reach_the_hub_as_one_gap_record(
    hub_factory: hubclient.InProcessHubFactory, tmp_path: Path
) -> None:
    """The hub is down while the command writes more than the spool may hold;
    it comes up and `flush` delivers: the lines that fitted, then one gap
    record counting exactly the lines (and their bytes) that did not."""
    spool = tmp_path / "spool"
    port = free_port()
    args = run_args(
        f"http://127.0.0.1:{port}", "gap-1", spool,
        "--spool-max-bytes", str(BUDGET), "--drain-timeout", "0.3", "--quiet",
    )
    async with agent(args + COMMAND) as a:
        assert await a.wait() == 0
    assert "DROPPING" in a.stderr_text
    hub = hub_factory.make()
    hub.port = port
    await hub.astart()
    async with agent(["flush", "--spool-dir", str(spool)]) as f:
        assert await f.wait() == 0
    async with hub.http() as client:
        records = await hubclient.fetch_all(client, "gap-1")
    printed = printed_lines()
    kept = [r for r in records if r["source"] == "stdout"]
    assert [r["message"] for r in kept] == printed[: len(kept)]
    assert 0 < len(kept) < LINES
    assert all("kind" not in r for r in kept)
    gaps = [r for r in records if r.get("kind") == "gap"]
    assert len(gaps) == 1, [r for r in records if r["source"] == "agent"]
    (gap,) = gaps
    dropped = printed[len(kept):]
    want_bytes = sum(len(line.encode()) for line in dropped)
    assert gap["metadata"]["gap"]["reason"] == "spool_full"
    assert gap["metadata"]["gap"]["lines"] == len(dropped)
    assert gap["metadata"]["gap"]["bytes"] == want_bytes
    stdout = gap["metadata"]["gap"]["sources"]["stdout"]
    assert (stdout["lines"], stdout["bytes"]) == (len(dropped), want_bytes)
    assert (stdout["firstLine"], stdout["lastLine"]) == (len(kept) + 1, LINES)
    assert (gap["source"], gap["level"]) == ("agent", "WARN")
    assert f"{len(dropped):,} lines ({want_bytes:,} bytes) not kept" in gap["message"]
    # Where the gap is: after the last line kept; nothing else was written.
    assert [r["seq"] for r in records] == list(range(1, len(kept) + 2))
    assert records[-1] == gap
    # Shown as any record: the raw log holds its text.
    async with hub.http() as client:
        raw = (await client.get("/api/v1/tasks/gap-1/logs/raw")).text
    assert raw.endswith(gap["message"] + "\n")


async def test_the_budget_and_the_warning_measure_the_spool_on_disk(tmp_path: Path) -> None:
    """The warning's byte count is what the spool holds on disk, and the spool
    never holds more than its budget (the gap record included)."""
    spool = tmp_path / "spool"
    args = run_args(
        f"http://127.0.0.1:{free_port()}", "gap-2", spool,
        "--spool-max-bytes", str(BUDGET), "--drain-timeout", "0.3", "--quiet",
    )
    async with agent(args + COMMAND) as a:
        assert await a.wait() == 0
    said = said_bytes(a.stderr_text)
    assert said, a.stderr_text
    disk = on_disk(spool / "gap-2")
    assert disk <= BUDGET
    # Since the warning: only the gap record and the final state were written.
    assert disk - 1024 <= said[0] <= disk, (said, disk)
    assert f"--spool-max-bytes {BUDGET:,}" in a.stderr_text or f"--spool-max-bytes {BUDGET}" in a.stderr_text


async def test_a_reopened_spool_counts_everything_in_its_directory(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "t", hub_url="http://hub:1", max_bytes=1 << 20, segment_bytes=4096)
    for seq in range(1, 301):
        spool.append([(seq, b'{"message":"%d"}' % seq)])
    await spool.set_final("succeeded", 0)
    spool.release(150)
    await spool.sync()
    assert spool.used_bytes == on_disk(tmp_path / "t")
    spool.close()
    again = Spool.open(tmp_path, "t", max_bytes=1 << 20, segment_bytes=4096)
    assert again.used_bytes == on_disk(tmp_path / "t")
    again.close()


async def test_each_run_of_drops_is_one_gap_record_where_it_happened(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "t", max_bytes=8192)
    rec = Recorder(spool, "t", clock=lambda: 0.0)
    numbering = LineNumbering()

    def fill(first: int) -> int:
        for i in range(first, first + 200):
            rec.write("stdout", numbering.number([Line(f"{i} " + "y" * 50)]), TS)
        return first + 200

    def read(after: int) -> list[dict]:
        return [orjson.loads(p) for _, p in spool.read(after + 1, 10_000, 1 << 30)]

    n = fill(0)
    records = read(0)
    spool.release(spool.last_seq)  # the hub caught up: room again, once the watermark is durable
    await spool.sync()
    n = fill(n)
    rec.finish()
    records += read(records[-1]["seq"])
    gaps = [r for r in records if r.get("kind") == "gap"]
    assert len(gaps) == 2
    assert sum(g["metadata"]["gap"]["lines"] for g in gaps) == rec.dropped_total == 400 - sum(
        1 for r in records if r["source"] == "stdout"
    )
    # Each sits where its lines were, and names them.
    for gap in gaps:
        stdout = gap["metadata"]["gap"]["sources"]["stdout"]
        before = [r for r in records if r["seq"] < gap["seq"] and r["source"] == "stdout"]
        after = [r for r in records if r["seq"] > gap["seq"] and r["source"] == "stdout"]
        assert before[-1]["lineNumber"] == stdout["firstLine"] - 1
        assert not after or after[0]["lineNumber"] == stdout["lastLine"] + 1
    assert [g["lineNumber"] for g in gaps] == [1, 2]
    spool.close()


async def test_a_database_from_before_kind_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for step in (1, 2):
        for statement in sqlite_schema._MIGRATIONS[step]:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute(
        "INSERT INTO logs (task_id, seq, id, ts, source, level, message) VALUES ('t1', 1, 'a', ?, 'stdout', 'INFO', 'old')",
        (TS,),
    )
    conn.execute(
        "INSERT INTO tasks (task_id, state, durable_seq, max_seq, total_logs) VALUES ('t1', 'running', 1, 1, 1)"
    )
    conn.commit()
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.append([Incoming("t1", 1, TS, "agent", "WARN", "gap", kind="gap")])
        page = await store.query(LogQuery(task_id="t1"))
    finally:
        await store.close()
    assert [(r.message, r.kind) for r in page.content] == [("old", None), ("gap", "gap")]


@pytest.mark.pg
async def test_postgres_stores_kind(pg_url: str) -> None:
    from hub.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.open()
    try:
        await store.append([
            Incoming("t1", 1, TS, "stdout", "INFO", "line"),
            Incoming("t1", 2, TS, "agent", "WARN", "gap", kind="gap"),
        ])
        page = await store.query(LogQuery(task_id="t1"))
    finally:
        await store.close()
    assert [(r.message, r.kind) for r in page.content] == [("line", None), ("gap", "gap")]


# --- `kind` on the wire -----------------------------------------------------------


def gap_record(kind: str | None = "gap", partial: bool = False) -> LogRecord:
    return LogRecord(
        "t-1", 7, TS, "agent", "WARN", "3 lines (30 bytes) not kept", 2,
        {"gap": {"reason": "spool_full", "lines": 3, "bytes": 30}}, partial, kind=kind,
    )


# Every kind a producer may send (a `redaction` record is the hub's own).
@given(kind=st.sampled_from([None, *(k for k in KINDS if k != "redaction")]), partial=st.booleans())
def test_kind_encodes_the_same_by_hand_and_by_the_converter(kind: str | None, partial: bool) -> None:
    record = gap_record(kind, partial)
    wire = record_to_wire(record)
    assert wire.get("kind") == kind and ("kind" in wire) == (kind is not None)
    by_hand = encode_line(
        record.task_id, record.seq, record.timestamp, record.source, record.level,
        record.message, record.line_number or 0, record.metadata, record.partial, kind,
    )
    assert by_hand == orjson.dumps(wire)
    frame = logs_frame("t-1", [by_hand], "run-1")
    assert frame == encode_bytes(LogsFrame("t-1", [record], "run-1"))
    # The hub's fast path and its general one read it back the same.
    assert decode_client_frame(frame, DEFAULT_LIMITS) == LogsFrame("t-1", [record], "run-1")
    assert decode_client_frame(frame.replace(b'"seq":7', b'"seq":7,"extra":1'), DEFAULT_LIMITS).records == [record]
    # The hub's own frames to subscribers.
    with_id = gap_record(kind, partial)
    assert logs_frame_text("t-1", [with_id]) == encode_bytes(LogsFrame("t-1", [with_id])).decode()


@pytest.mark.parametrize("kind", ["bogus", "", "GAP", 5, True, {}])
def test_an_unknown_kind_is_refused_in_a_frame(kind: object) -> None:
    record = orjson.loads(encode_line("t-1", 1, TS, "stdout", "INFO", "m", 1, {}, False))
    frame = orjson.dumps({"type": "logs", "taskId": "t-1", "records": [{**record, "kind": kind}]})
    with pytest.raises(Exception) as caught:
        decode_client_frame(frame, DEFAULT_LIMITS)
    assert getattr(caught.value, "code", None) == "INVALID_MESSAGE_FORMAT"
    assert "records[0].kind" in str(caught.value)


async def test_kind_is_stored_and_answered_and_a_bad_one_refused(hub: hubclient.TestHub) -> None:
    async with hub.http() as client:
        resp = await client.post(
            "/api/v1/tasks/k-1/logs",
            json=[
                {"message": "plain"},
                {"message": "build", "kind": "section_start", "metadata": {"name": "build"}},
                {"message": "2 lines not kept", "source": "agent", "kind": "gap"},
            ],
        )
        assert resp.status_code == 200, resp.text
        for bad in ("bogus", 5, ["gap"]):
            hubclient.assert_error(
                await client.post("/api/v1/tasks/k-1/logs", json={"message": "x", "kind": bad}),
                400, "INVALID_REQUEST", "kind",
            )
        records = await hubclient.fetch_all(client, "k-1")
    assert [(r["message"], r.get("kind")) for r in records] == [
        ("plain", None), ("build", "section_start"), ("2 lines not kept", "gap"),
    ]
    assert "kind" not in records[0]
    # Frames to subscribers carry it too (and are held to the contract's hub frames).
    async with hub.ws() as ws:
        await ws.subscribe("k-1", from_seq=1)
        got: list[dict] = []
        while len(got) < 3:
            frame = await ws.recv()
            if frame["type"] == "logs":
                got += frame["records"]
        await ws.send({
            "type": "logs", "taskId": "k-1",
            "records": [{"seq": 1, "timestamp": TS, "source": "stdout", "level": "INFO",
                         "message": "m", "kind": "nope"}],
        })
        error = await ws.recv_type("error", skip=("ack", "logs", "status"))
    assert [r.get("kind") for r in got] == [None, "section_start", "gap"]
    assert error["code"] == "INVALID_MESSAGE_FORMAT" and "records[0].kind" in error["message"]
