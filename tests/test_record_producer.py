"""A record answers who wrote it (`producer`, CONTRACT.md Words): the agent
run's id, the producer a client named, or "" for the anonymous producer; the
hub's own gap and redaction records name none. Kept in each chunk, so it
survives every rewrite, a restart, and reads from either store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import orjson
import trio
import zstandard

from hub.openapi import component_schemas
from hub.redaction import redact
from hub.store import chunk
from hub.store.base import LogQuery
from hub.ws import subscriber_frames
from keruta.recordjson import encode_record, record_body
from keruta.records import LogRecord
from tests import hubclient
from tests.agentclient import agent, run_args
from tests.hubclient import PATIENCE, fetch_all, logs_path
from tests.inprocess import InProcessHub, InProcessHubFactory
from tests.storedata import rec, ts

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures

ADMIN = "admin-secret-3"


async def everything(store: Any, task: str = "t1") -> list[LogRecord]:
    return (await store.query(LogQuery(task_id=task, size=100_000))).content


# --- the chunk ------------------------------------------------------------------


def test_a_chunk_keeps_one_producer_once_and_mixed_ones_each() -> None:
    def record(seq: int, producer: str | None) -> LogRecord:
        return LogRecord("t1", seq, ts(seq), "stdout", "INFO", f"line {seq}", seq, producer=producer)

    one = [record(s, "run-1") for s in range(1, 4)]
    row = chunk.encode(one)
    assert orjson.loads(chunk.body_json(row.body))["w"] == "run-1"
    assert [r.producer for r in chunk.decode("t1", 1, row.lines, row.body)] == ["run-1"] * 3

    mixed = [record(1, "run-1"), record(2, ""), record(3, None)]
    row = chunk.encode(mixed)
    assert orjson.loads(chunk.body_json(row.body))["w"] == ["run-1", "", None]
    assert [r.producer for r in chunk.decode("t1", 1, row.lines, row.body)] == ["run-1", "", None]

    # The hub's own records alone: no column at all.
    row = chunk.encode([record(1, None)])
    assert "w" not in orjson.loads(chunk.body_json(row.body))


def test_a_chunk_written_before_producers_were_kept_answers_none() -> None:
    """A chunk of an older hub has no "w" column: its records answer
    without `producer` (absent, never a wrong one)."""
    row = chunk.encode([LogRecord("t1", s, ts(s), "stdout", "INFO", f"line {s}", s, producer="run-1") for s in (1, 2)])
    body = orjson.loads(chunk.body_json(row.body))
    del body["w"]
    old_body = zstandard.ZstdCompressor().compress(orjson.dumps(body))
    records = chunk.decode("t1", 1, row.lines, old_body)
    assert [r.producer for r in records] == [None, None]
    assert all("producer" not in record_body(r) for r in records)


def test_a_subscribers_frame_budget_counts_a_records_producer() -> None:
    """The hub sizes its `logs` frames by `encoded_size`, which must never
    fall short of a record's JSON, whatever its fields hold."""
    longest = LogRecord(
        "t" * 128, 2**63 - 1, ts(1), "stderr", "ERROR", "", 2**53 - 1, {}, True,
        "d737bb3f-a633-5efd-b3ba-0a52436bde24", "section_start", "p" * 64,
    )
    assert subscriber_frames.encoded_size(longest) >= len(encode_record(longest))


def test_the_openapi_document_names_a_records_producer_as_optional() -> None:
    schema = component_schemas()["LogRecord"]
    assert "producer" in schema["properties"] and "producer" not in schema["required"]
    check = jsonschema.Draft202012Validator(schema["properties"]["producer"])
    assert [check.is_valid(v) for v in ("run-1", "", None, "~writer", "x" * 65)] == [True, True, True, False, False]


# --- the store, both kinds ------------------------------------------------------------


async def test_each_record_answers_its_producer_from_every_read(store: Any) -> None:
    await store.append(
        [
            rec(1, producer="run-a", at=1),
            rec(2, producer="run-a", at=2),
            rec(1, producer="", at=3),
            # A record the writer numbered (its client sent no seq): the hub's
            # own producer id stands for the anonymous producer.
            rec(1, producer="~writer-1", at=4),
            rec(1, producer="run-b", at=5),
        ]
    )
    want = ["run-a", "run-a", "", "", "run-b"]
    assert [r.producer for r in await everything(store)] == want
    assert [r.producer for r in await store.read_range("t1", 0, 10, 10)] == want
    assert [r.producer for r in (await store.query(LogQuery("t1", after_seq=4))).content] == ["run-b"]
    # A duplicate answers the record stored, with its producer.
    again = await store.append([rec(2, producer="run-a", at=2)])
    assert again.records[0] is not None and again.records[0].producer == "run-a"


async def test_records_kept_across_a_delete_cut_keep_their_producer(store: Any) -> None:
    # One chunk holding records on both sides of `before`: it is rewritten.
    await store.append([rec(s, producer="run-a", at=s) for s in range(1, 11)] + [rec(1, producer="", at=11)])
    assert await store.delete("t1", ts(6)) == 5
    kept = await everything(store)
    assert [(r.seq, r.producer) for r in kept] == [(6, "run-a"), (7, "run-a"), (8, "run-a"), (9, "run-a"),
                                                   (10, "run-a"), (11, "")]


async def test_a_redaction_keeps_the_producer_and_its_audit_record_names_none(store: Any) -> None:
    await store.append([rec(s, "token hunter2" if s == 3 else None, producer="run-a", at=s) for s in range(1, 6)])
    done = await redact(store, "t1", ["hunter2"])
    assert done.records == 1
    # The audit record is numbered under the hub's own producer.
    stored = done.record
    assert stored is not None and stored.kind == "redaction" and stored.producer is None
    records = await everything(store)
    assert records[2].message == "token ***"
    assert [r.producer for r in records] == ["run-a"] * 5 + [None]


async def test_a_cap_or_retention_gap_names_no_producer_and_the_rest_keep_theirs(store: Any) -> None:
    await store.append([rec(s, "x" * 100, producer="run-a", at=s) for s in range(1, 201)])
    while (step := await store.cap_step("t1", 10_000)) is not None and step.more:
        pass
    records = await everything(store)
    gaps = [r for r in records if r.kind == "gap"]
    assert len(gaps) == 1 and gaps[0].producer is None
    assert {r.producer for r in records if r.kind is None} == {"run-a"}

    # Retention of a running task's head leaves a gap of its own.
    await store.set_state("t2", "running", None)
    await store.append([rec(s, producer="run-b", at=s, task="t2") for s in range(1, 21)])
    await store.delete("t2", ts(11), gap="retention")
    records = await everything(store, "t2")
    assert records[0].kind == "gap" and records[0].producer is None
    assert [r.producer for r in records[1:]] == ["run-b"] * 10


# --- the hub: REST, live and catch-up frames ------------------------------------------


async def _logs_records(ws: Any, task: str, last_seq: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while not got or got[-1]["seq"] < last_seq:
        frame = await ws.recv_type("logs", skip=("ack", "status"))
        assert frame["taskId"] == task
        got += frame["records"]
    return got


async def test_the_hub_answers_the_producer_in_pages_live_and_after_a_restart(hub: InProcessHub) -> None:
    task = "who-1"
    async with hub.ws() as viewer, hub.http() as client:
        await viewer.subscribe(task)
        async with hub.ws() as writer:
            frame = {
                "type": "logs", "taskId": task, "producer": "ws-run-1",
                "records": [orjson.loads(hubclient.logs_frame(task, [hubclient.make_record(task, 1)]))["records"][0]],
            }
            await writer.send(frame)
            with trio.fail_after(PATIENCE):
                await writer.wait_ack(task, 1)
        resp = await client.post(logs_path(task), json={"message": "named", "producer": "rest-1", "seq": 1})
        assert resp.status_code == 200, resp.text
        resp = await client.post(logs_path(task), json=[{"message": "anonymous"}, {"message": "also", "seq": 1}])
        assert resp.status_code == 200, resp.text
        want = [(1, "ws-run-1"), (2, "rest-1"), (3, ""), (4, "")]

        with trio.fail_after(PATIENCE):
            live = await _logs_records(viewer, task, 4)
        assert [(r["seq"], r["producer"]) for r in live] == want
        page = await fetch_all(client, task)
        assert [(r["seq"], r["producer"]) for r in page] == want

    await hub.arestart()
    async with hub.ws() as viewer, hub.http() as client:
        # Catch-up reads the store's chunks, not what the hub kept in memory.
        await viewer.subscribe(task, from_seq=1)
        with trio.fail_after(PATIENCE):
            history = await _logs_records(viewer, task, 4)
        assert [(r["seq"], r["producer"]) for r in history] == want
        assert [(r["seq"], r["producer"]) for r in await fetch_all(client, task)] == want


async def test_a_redaction_over_rest_keeps_producers_and_its_record_names_none(
    hub_factory: InProcessHubFactory,
) -> None:
    hub = await hub_factory.astart("--admin-token", ADMIN)
    task = "who-2"
    async with hub.http(ADMIN) as admin:
        body = [
            {"message": f"line {s}" + (" hunter2" if s == 3 else ""), "producer": "p1", "seq": s, "timestamp": ts(s)}
            for s in range(1, 5)
        ]
        assert (await admin.post(logs_path(task), json=body)).status_code == 200
        # Cuts inside the one chunk: it is rewritten with the newer records.
        resp = await admin.delete(logs_path(task), params={"before": ts(2)})
        assert resp.json() == {"deletedCount": 1}
        resp = await admin.post(f"/api/v1/tasks/{task}/redact", json={"values": ["hunter2"]})
        assert resp.status_code == 200, resp.text
        records = await fetch_all(admin, task)
    # The deleted record's gap, the three kept, the redaction's record.
    assert [r["message"] for r in records[1:4]] == ["line 2", "line 3 ***", "line 4"]
    assert [r.get("producer") for r in records] == [None, "p1", "p1", "p1", None]
    assert records[0]["kind"] == "gap" and records[4]["kind"] == "redaction" and "producer" not in records[4]


# --- an agent run --------------------------------------------------------------------


async def test_an_agent_runs_records_answer_the_runs_producer(hub: InProcessHub, tmp_path: Path) -> None:
    args = run_args(hub.url, "who-run", tmp_path / "spool")
    async with agent(args + ["sh", "-c", "echo one; echo two >&2"]) as a:
        assert await a.wait() == 0
    async with agent(args + ["sh", "-c", "echo three"]) as a:
        assert await a.wait() == 0
    async with hub.http() as client:
        records = await fetch_all(client, "who-run")
        verify = (await client.get("/api/v1/tasks/who-run/verify")).json()
    runs = [p["producer"] for p in verify["producers"]]
    assert len(set(runs)) == 2 and all(run and not run.startswith("~") for run in runs)
    by_message = {r["message"]: r["producer"] for r in records}
    # Each run's lines carry that run's id; two runs are two producers.
    assert by_message["one"] == by_message["two"] != by_message["three"]
    assert {by_message["one"], by_message["three"]} == set(runs)
