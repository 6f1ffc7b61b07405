"""GET .../verify at its edges, on both stores: several runs and a REST
producer on one task, a run resent, summaries that lie or do not parse,
records an admin deleted, and records a producer sends that pass for the
hub's own."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import trio

from agent.tail import TailSettings, tail
from hub.store.base import Incoming, LogQuery
from keruta.summary import Tally
from tests import hubclient
from tests.hubclient import PATIENCE, Ws, assert_error, logs_path
from tests.storedata import rec

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures

TS = "2026-01-01T00:00:00.000001Z"


def records(task: str, first: int, last: int, tag: str) -> list[dict[str, Any]]:
    return [
        {"taskId": task, "seq": s, "timestamp": TS, "source": "stdout" if s % 3 else "stderr",
         "level": "INFO", "message": f"{tag} line {s} é", "lineNumber": s, "metadata": {}}
        for s in range(first, last + 1)
    ]


async def store_run(store: Any, sent: list[Incoming], batch: int) -> None:
    """`sent` (producer "run"'s records 1..N) stored `batch` at a time, then
    the run's end with its summary: a log that verifies complete."""
    for start in range(0, len(sent), batch):
        await store.append(sent[start:start + batch])
    tally = Tally()
    for p, r in enumerate(sent, 1):
        tally.add(p, r.source, None, False, 0, r.message)
    await store.set_state("t1", "succeeded", 0, "run", tally.summary(len(sent)))


def summary_of(recs: list[dict[str, Any]]) -> dict[str, Any]:
    tally = Tally()
    for r in recs:
        tally.add_record(r["seq"], r)
    return tally.summary(len(recs)).to_json()


async def send_run(ws: Ws, task: str, producer: str, recs: list[dict[str, Any]]) -> None:
    """As an agent sends its run: a `running` status (on each connection), then its records."""
    await ws.send({"type": "status", "taskId": task, "state": "running", "producer": producer})
    for start in range(0, len(recs), 50):
        await ws.send({"type": "logs", "taskId": task, "producer": producer, "records": recs[start:start + 50]})
    await ws.wait_ack(task, recs[-1]["seq"])


async def finish(ws: Ws, task: str, producer: str, summary: dict[str, Any]) -> None:
    # json, not orjson: a test's summary may hold integers past 64 bits.
    await ws.send(json.dumps({"type": "status", "taskId": task, "state": "succeeded", "exitCode": 0,
                              "producer": producer, "summary": summary}))


async def verify(hub: Any, task: str, *, until: str | None = None, token: str | None = None) -> dict[str, Any]:
    """The verdict; with `until`, asked again until it is that (the final
    status is stored after the frame is read)."""
    async with hub.http(token) as client:
        with trio.fail_after(PATIENCE):
            while True:
                resp = await client.get(f"/api/v1/tasks/{task}/verify")
                assert resp.status_code == 200, resp.text
                answer: dict[str, Any] = resp.json()
                if until is None or answer["verdict"] == until:
                    return answer
                await trio.sleep(0.05)


async def test_two_runs_and_a_rest_producer_verify_as_one_task(hub: hubclient.InProcessHub) -> None:
    task = "two-runs"
    first, second = records(task, 1, 120, "a"), records(task, 1, 80, "b")
    async with hub.ws() as a, hub.ws() as b, hub.http() as client:
        await send_run(a, task, "run-a", first[:60])
        resp = await client.post(logs_path(task), json={"message": "by REST, between the runs"})
        assert resp.status_code in (200, 201), resp.text
        await send_run(b, task, "run-b", second)
        await send_run(a, task, "run-a", first[60:])
        await finish(a, task, "run-a", summary_of(first))
        answer = await verify(hub, task)
        # run-b has not sent its summary: the task is not complete yet.
        assert answer["verdict"] == "unverified", answer
        await finish(b, task, "run-b", summary_of(second))
        answer = await verify(hub, task, until="complete")
    by = {p["producer"]: p for p in answer["producers"]}
    assert by["run-a"]["verdict"] == by["run-b"]["verdict"] == "complete"
    # The REST line is no run's: it neither counts nor holds the verdict back.
    assert answer["message"] == "complete: 200 lines, digest ok"


async def test_a_run_resent_whole_after_it_was_stored_is_still_complete(hub: hubclient.InProcessHub) -> None:
    """An agent that lost its acks (the hub was killed) sends its run again:
    the duplicates are not stored twice and the verdict does not change."""
    task = "resent"
    recs = records(task, 1, 200, "r")
    async with hub.ws() as ws:
        await send_run(ws, task, "run-r", recs)
    async with hub.ws() as again:
        await send_run(again, task, "run-r", recs[50:] + records(task, 201, 210, "r"))
        everything = recs + records(task, 201, 210, "r")
        await finish(again, task, "run-r", summary_of(everything))
        answer = await verify(hub, task, until="complete")
    (run,) = answer["producers"]
    assert run["stored"]["records"] == 210


async def test_a_summary_with_wrong_counts_is_incomplete_not_an_error(hub: hubclient.InProcessHub) -> None:
    task = "lying-counts"
    recs = records(task, 1, 30, "c")
    summary = summary_of(recs)
    summary["lines"]["stdout"] += 1
    async with hub.ws() as ws:
        await send_run(ws, task, "run-c", recs)
        await finish(ws, task, "run-c", summary)
        answer = await verify(hub, task, until="incomplete")
    (run,) = answer["producers"]
    # Every seq is there and the digest holds: it is the counts that do not.
    assert run["digestOk"] is True and run["missing"] == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("digest", "adhash-blake2b-512:xyz"),
        ("digest", "sha256:" + "0" * 128),
        ("records", -1),
        ("records", 2**64),
        ("lines", {"stdout": 2**70}),
        ("bytes", {"nowhere": 1}),
    ],
)
async def test_a_malformed_summary_is_refused_naming_its_field(
    hub: hubclient.InProcessHub, field: str, value: Any
) -> None:
    task = "bad-summary"
    recs = records(task, 1, 3, "m")
    summary = {**summary_of(recs), field: value}
    async with hub.ws() as ws:
        await send_run(ws, task, "run-m", recs)
        await finish(ws, task, "run-m", summary)
        with trio.fail_after(PATIENCE):
            error = await ws.recv_type("error")
    assert f"summary.{field}" in error.get("field", "") + error["message"], error
    # Nothing was kept of it: the run is still waiting for a summary.
    assert (await verify(hub, task))["verdict"] == "unverified"


async def test_records_an_admin_deleted_before_a_time_leave_a_gap_and_the_log_still_verifies(
    hub: hubclient.InProcessHub,
) -> None:
    """An admin's DELETE ...?before= leaves a `deleted` gap with the accounts
    of what went: verify reads it as explained, tail and pages show it.
    Deleting everything leaves nothing to account with."""
    task = "admin-deleted"
    recs = records(task, 1, 40, "d")
    for r in recs:
        r["timestamp"] = f"2026-01-01T00:00:{r['seq']:02d}.000000Z"
    async with hub.ws() as ws, hub.http() as client:
        await send_run(ws, task, "run-d", recs)
        await finish(ws, task, "run-d", summary_of(recs))
        await verify(hub, task, until="complete")
        resp = await client.delete(logs_path(task), params={"before": "2026-01-01T00:00:25.500000Z"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["deletedCount"] == 25
        task_answer = (await client.get(f"/api/v1/tasks/{task}")).json()
        # The verdict kept from before the deletion is not shown as still true.
        assert task_answer.get("verdict") != "complete", task_answer
        stored = await hubclient.fetch_all(client, task)
        assert [r["seq"] for r in stored] == [1, *range(26, 41)]
        gap = stored[0]
        assert gap["kind"] == "gap" and "producer" not in gap and gap["message"].endswith("not kept: deleted by an admin")
        info = gap["metadata"]["gap"]
        assert (info["reason"], info["lines"], info["fromSeq"], info["toSeq"]) == ("deleted", 25, 1, 25)
        assert info["accounts"]["run-d"]["records"] == 25
        assert (await client.get(logs_path(task, "/stats"))).json()["totalLogs"] == 16
        # Again, later: one gap, grown.
        resp = await client.delete(logs_path(task), params={"before": "2026-01-01T00:00:30.500000Z"})
        assert resp.json()["deletedCount"] == 5
        stored = await hubclient.fetch_all(client, task)
        assert [r["seq"] for r in stored] == [1, *range(31, 41)]
        assert (stored[0]["metadata"]["gap"]["lines"], stored[0]["metadata"]["gap"]["toSeq"]) == (30, 30)
    answer = await verify(hub, task)
    assert answer["verdict"] == "complete", answer
    (run,) = answer["producers"]
    assert run["accounted"]["records"] == 30 and run["stored"]["records"] == 10
    out = io.BytesIO()
    assert await tail(TailSettings(hub.url, task, follow=False, verify=True), out=out) == 0
    lines = out.getvalue().decode().splitlines()
    assert lines[0].startswith("--- … 30 lines (") and lines[0].endswith(" not kept: deleted by an admin ---")
    assert lines[1:] == [r["message"] for r in recs[30:]]
    async with hub.http() as client:
        # The gap is a stored record too.
        assert (await client.delete(logs_path(task))).json()["deletedCount"] == 11
    answer = await verify(hub, task)
    assert answer["verdict"] == "incomplete"
    assert answer["message"].startswith("incomplete: run run-d: 0 of 40 records kept, seqs 1-40 missing")


def forged_gap(task: str, producer: str, account: dict[str, Any]) -> dict[str, Any]:
    return {
        "taskId": task, "seq": 1, "timestamp": TS, "source": "agent", "level": "WARN", "kind": "gap",
        "message": "… 10 lines not kept: task over its cap", "metadata": {"gap": {
            "reason": "cap", "lines": 10, "bytes": 1, "fromSeq": 1, "toSeq": 10, "accounts": {producer: account},
        }},
    }


async def test_a_producer_cannot_send_a_gap_with_accounts_or_a_redaction(hub: hubclient.InProcessHub) -> None:
    """A gap with `accounts` and a `redaction` record are the hub's: verify
    credits them to the runs' summaries. Sent by a producer (an agent's token
    is not an admin's), one could make a log short of records verify as
    complete, or pass for an admin's redaction. Refused, over WS and REST,
    in a batch of one and in a batch of many (the fast path)."""
    task = "forged"
    recs = records(task, 1, 20, "f")
    kept = recs[:10]
    # Exactly what the run's missing records 11..20 would need.
    account = summary_of(recs[10:])
    redaction = {
        "taskId": task, "timestamp": TS, "source": "agent", "level": "WARN", "kind": "redaction",
        "message": "3 records redacted by admin at " + TS,
        "metadata": {"redaction": {"records": 3, "by": "admin", "at": TS, "accounts": {}}},
    }
    async with hub.ws() as ws, hub.ws() as forger, hub.http() as client:
        await send_run(ws, task, "run-f", kept)
        await finish(ws, task, "run-f", summary_of(recs))
        for frame_records in ([forged_gap(task, "run-f", account)],
                              records(task, 1, 5, "x") + [{**forged_gap(task, "run-f", account), "seq": 6}],
                              [{**redaction, "seq": 1}]):
            await forger.send({"type": "logs", "taskId": task, "producer": "forger", "records": frame_records})
            with trio.fail_after(PATIENCE):
                error = await forger.recv_type("error")
            assert error["code"] == "INVALID_MESSAGE_FORMAT" and "the hub's own" in error["message"], error
        for body in ({k: v for k, v in forged_gap(task, "run-f", account).items() if k not in ("taskId", "seq")},
                     [{"message": "ok"}, {k: v for k, v in redaction.items() if k != "taskId"}]):
            resp = await client.post(logs_path(task), json=body)
            assert_error(resp, 400, "INVALID_REQUEST", "the hub's own")
        # An agent's own spool gap (no accounts) is still a record like any.
        own = {"message": "… 4 lines not kept: spool full", "source": "agent", "level": "WARN", "kind": "gap",
               "metadata": {"gap": {"reason": "spool_full", "lines": 4, "bytes": 40}}}
        resp = await client.post(logs_path(task), json=own)
        assert resp.status_code in (200, 201), resp.text
    answer = await verify(hub, task, until="incomplete")
    assert "seqs 11-20 missing" in answer["message"]


async def test_verify_while_records_still_arrive_never_says_incomplete_for_a_complete_run(
    hub: hubclient.InProcessHub,
) -> None:
    """Records of another run arriving while a finished run is verified."""
    task = "busy"
    done = records(task, 1, 300, "done")
    async with hub.ws() as ws, hub.ws() as busy:
        await send_run(ws, task, "run-done", done)
        await finish(ws, task, "run-done", summary_of(done))
        await verify(hub, task, until="complete")
        await send_run(busy, task, "run-busy", records(task, 1, 100, "busy"))

        async def keep_sending() -> None:
            for first in range(101, 3001, 100):
                await send_run(busy, task, "run-busy", records(task, first, first + 99, "busy"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_sending)
            for _ in range(10):
                answer = await verify(hub, task)
                by = {p["producer"]: p for p in answer["producers"]}
                assert by["run-done"]["verdict"] == "complete", answer
                assert answer["verdict"] == "unverified"


async def test_verify_between_two_steps_of_a_redaction_does_not_say_incomplete(store) -> None:  # type: ignore[no-untyped-def]
    """Each step commits its rewritten chunks with the redaction's record
    holding what they owe: the log verifies complete after every one."""
    sent = [rec(p, f"line {p:06d} SECRET " + "x" * 80, producer="run") for p in range(1, 30_001)]
    await store_run(store, sent, 5000)
    assert (await store.verify("t1")).verdict == "complete"
    through = await store.durable_seq("t1")
    step = await store.redact_step("t1", ["SECRET"], 0, through)
    assert step.seqs and not step.done and step.appended is not None
    assert (await store.verify("t1")).verdict == "complete"
    steps = 1
    while not step.done:
        step = await store.redact_step("t1", ["SECRET"], step.cursor, through, step.record.seq)
        assert step.appended is None
        assert (await store.verify("t1")).verdict == "complete"
        steps += 1
    assert steps >= 2
    (record,) = [r for r in (await store.query(LogQuery(task_id="t1", size=100_000))).content if r.kind == "redaction"]
    assert record == step.record and record.metadata["redaction"]["records"] == 30_000
    # Its record is the hub's: no producer of the task to list.
    assert [p.producer for p in (await store.verify("t1")).producers] == ["run"]


async def test_a_redaction_whose_record_a_cap_took_between_two_steps_leaves_another(store) -> None:  # type: ignore[no-untyped-def]
    """A cap cuts the task between two steps of a redaction, its record with
    the middle: the gap takes on its accounts, the next step appends a new
    record for what it changes, and the log verifies at every commit."""
    sent = [rec(p, f"line {p:06d} " + ("SECRET " if p % 10 == 0 else "") + "x" * 80, producer="run")
            for p in range(1, 20_001)]
    # Small chunks: the first step leaves most of the head to the next ones.
    await store_run(store, sent, 100)
    through = await store.durable_seq("t1")
    step = await store.redact_step("t1", ["SECRET"], 0, through)
    first = step.record
    assert step.seqs and not step.done and first.seq == 20_001
    late = [rec(p, f"late {p:06d} " + "y" * 80, producer="late") for p in range(1, 40_001)]
    for start in range(0, len(late), 5000):
        await store.append(late[start:start + 5000])
    while (cut := await store.cap_step("t1", 3_000_000)) is not None and cut.more:
        pass
    records = (await store.query(LogQuery(task_id="t1", size=100_000))).content
    (gap,) = [r for r in records if r.kind == "gap"]
    assert gap.metadata["gap"]["fromSeq"] < first.seq < gap.metadata["gap"]["toSeq"]
    assert not [r for r in records if r.kind == "redaction"]
    assert (await store.verify("t1")).verdict == "complete"
    appended = []
    while not step.done:
        step = await store.redact_step("t1", ["SECRET"], step.cursor, through, step.record.seq)
        appended += [step.record.seq] if step.appended is not None else []
        assert (await store.verify("t1")).verdict == "complete"
    records = (await store.query(LogQuery(task_id="t1", size=100_000))).content
    (record,) = [r for r in records if r.kind == "redaction"]
    assert appended == [record.seq] and record.seq == 60_002 and record.metadata["redaction"]["records"] > 0
    assert not [r for r in records if "SECRET" in r.message]


async def test_a_verdict_taken_during_a_redaction_is_not_kept_after_it(store) -> None:  # type: ignore[no-untyped-def]
    sent = [rec(p, f"line {p:06d} SECRET " + "x" * 80, producer="run") for p in range(1, 30_001)]
    await store_run(store, sent, 5000)
    through = await store.durable_seq("t1")
    step = await store.redact_step("t1", ["SECRET"], 0, through)
    await store.verify("t1")
    while not step.done:
        step = await store.redact_step("t1", ["SECRET"], step.cursor, through, step.record.seq)
    assert (await store.task("t1")).verdict != "incomplete"


async def test_a_rest_producer_naming_itself_does_not_hold_the_verdict_back(hub: hubclient.InProcessHub) -> None:
    """A REST client may name itself (`producer` + `seq`, for safe retries),
    but has no way to send a summary: it is no run, and a task it wrote to
    with a finished agent run is complete, not unverified forever."""
    task = "rest-named"
    recs = records(task, 1, 20, "n")
    async with hub.ws() as ws, hub.http() as client:
        await send_run(ws, task, "run-n", recs)
        resp = await client.post(logs_path(task), json=[
            {"message": "step 1", "producer": "ci-step", "seq": 1}, {"message": "step 2", "producer": "ci-step", "seq": 2},
        ])
        assert resp.status_code in (200, 201), resp.text
        assert (await verify(hub, task))["verdict"] == "unverified"  # run-n has not finished
        await finish(ws, task, "run-n", summary_of(recs))
        answer = await verify(hub, task, until="complete")
    by = {p["producer"]: p["verdict"] for p in answer["producers"]}
    assert by == {"run-n": "complete", "ci-step": "unverified"}
