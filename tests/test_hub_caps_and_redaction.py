"""A hub with --max-task-bytes and the redact route, on both stores: what
REST pages, raw downloads, stats and live subscribers see of a cap's gap and
of a redaction, and who may redact."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import trio

from tests import hubclient
from tests.agentclient import agent, agent_env, run_args
from tests.hubclient import (
    PATIENCE,
    InProcessHubFactory,
    Ws,
    assert_error,
    logs_frame,
    logs_path,
    make_record,
)
from tests.support import python_m
from tests.test_body_before_token import (
    BODY,
    BODY_TIMEOUT,
    CHUNK,
    connect,
    read_answer,
    request_head,
    send_ignoring_close,
)

hub_factory, sqlite_hub_factory = hubclient.hub_factory, hubclient.sqlite_hub_factory  # fixtures

AGENT, VIEWER, ADMIN = "agent-secret-1", "viewer-secret-2", "admin-secret-3"
TOKENS = ("--agent-token", AGENT, "--viewer-token", VIEWER, "--admin-token", ADMIN)


def line(seq: int) -> str:
    return f"line {seq:06d} " + "y" * 88  # 100 bytes


async def send_lines(ws: Ws, task: str, first: int, last: int) -> None:
    for start in range(first, last + 1, 100):
        stop = min(start + 99, last)
        await ws.send(logs_frame(task, [make_record(task, s, line(s)) for s in range(start, stop + 1)]))
    await ws.wait_ack(task, last)


async def next_gap(ws: Ws) -> dict[str, Any]:
    """Read a subscriber's frames until a `logs` frame holds a gap record."""
    while True:
        frame = await ws.recv()
        if frame["type"] == "logs":
            for r in frame["records"]:
                if r.get("kind") == "gap":
                    return r  # type: ignore[no-any-return]


async def test_a_capped_task_keeps_head_and_tail_and_everyone_sees_the_gap(hub_factory: InProcessHubFactory) -> None:
    hub = await hub_factory.astart("--max-task-bytes", "40K")
    task = "capped"
    async with hub.ws() as writer, hub.ws() as viewer, hub.http() as client:
        await viewer.subscribe(task)
        await send_lines(writer, task, 1, 600)
        with trio.fail_after(PATIENCE):
            gap = await next_gap(viewer)
        assert gap["source"] == "agent" and gap["level"] == "WARN"
        first = gap["metadata"]["gap"]
        assert first["reason"] == "cap" and first["fromSeq"] == gap["seq"]
        # More arrives: the same gap record, grown, sent again.
        await send_lines(writer, task, 601, 1200)
        with trio.fail_after(PATIENCE):
            while True:
                again = await next_gap(viewer)
                info = again["metadata"]["gap"]
                if info["toSeq"] > 1000:
                    break
        assert again["seq"] == gap["seq"] and info["lines"] > first["lines"]
        with trio.fail_after(PATIENCE):
            # The capper works after the commit: wait until it has caught up.
            while True:
                page = (await client.get(logs_path(task), params={"size": 1000})).json()
                records = page["content"]
                if sum(len(r["message"]) for r in records) <= 40 * 1024:
                    break
                await trio.sleep(0.05)
        gaps = [r for r in records if r.get("kind") == "gap"]
        assert len(gaps) == 1
        info = gaps[0]["metadata"]["gap"]
        kept = [r for r in records if r.get("kind") is None]
        assert len(kept) + info["lines"] == 1200
        assert info["bytes"] == 100 * info["lines"]
        assert kept[0]["seq"] == 1 and kept[-1]["seq"] == 1200
        assert info["toSeq"] - info["fromSeq"] + 1 == info["lines"]
        assert page["totalElements"] == len(records)
        stats = (await client.get(logs_path(task) + "/stats")).json()
        assert stats["totalLogs"] == len(records)
        raw = (await client.get(logs_path(task) + "/raw")).text.splitlines()
        assert f"… {info['lines']:,} lines (" in raw[len([r for r in kept if r['seq'] < gaps[0]['seq']])]
        assert raw[-1] == line(1200)
        assert any(text.endswith("not kept: task over its 40 KB cap") for text in raw)
        # A record dropped by the cap sent again is a duplicate: acked, not stored.
        dropped = info["toSeq"] - 5
        await writer.send(logs_frame(task, [make_record(task, dropped, line(dropped))]))
        await send_lines(writer, task, 1201, 1201)
        after = (await client.get(logs_path(task), params={"size": 1000})).json()["content"]
        assert dropped not in [r["seq"] for r in after]


async def test_an_agents_max_bytes_caps_its_task(hub_factory: InProcessHubFactory) -> None:
    hub = await hub_factory.astart()
    task = "asked"
    async with hub.ws() as writer, hub.http() as client:
        await writer.send({"type": "status", "taskId": task, "state": "running", "maxBytes": 20_000})
        await send_lines(writer, task, 1, 500)
        with trio.fail_after(PATIENCE):
            while True:
                records = (await client.get(logs_path(task), params={"size": 1000})).json()["content"]
                if any(r.get("kind") == "gap" for r in records) and sum(len(r["message"]) for r in records) <= 20_000:
                    break
                await trio.sleep(0.05)


async def test_redaction_takes_a_secret_out_and_tells_live_viewers(hub_factory: InProcessHubFactory) -> None:
    hub = await hub_factory.astart(*TOKENS)
    task = "leaky"
    path = f"/api/v1/tasks/{task}/redact"
    async with hub.ws(AGENT) as writer, hub.ws(VIEWER) as viewer, hub.http(ADMIN) as admin:
        records = [make_record(task, s) for s in range(1, 1201)]
        records[41] = make_record(task, 42, "export TOKEN=hunter2")
        records[1100] = make_record(task, 1101, "again hunter2, and pa55", metadata={"env": "pa55"})
        for start in range(0, 1200, 200):
            await writer.send(logs_frame(task, records[start : start + 200]))
        await writer.wait_ack(task, 1200)
        await viewer.subscribe(task, from_seq=1)
        with trio.fail_after(PATIENCE):
            await viewer.collect(task, 1200)
        # Read once: the chunks are cached before they change.
        assert (await admin.get(logs_path(task), params={"q": "hunter2"})).json()["totalElements"] == 2
        resp = await admin.post(path, json={"values": ["hunter2", "pa55"]})
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert answer["redactedRecords"] == 2 and answer["seq"] == 1201
        with trio.fail_after(PATIENCE):
            told = await viewer.recv_type("redacted", skip=("ack", "status"))
            audit = await viewer.recv_type("logs", skip=("ack", "status"))
        assert told == {"type": "redacted", "taskId": task, "seqs": [42, 1101]}
        record = audit["records"][0]
        assert (record["seq"], record["kind"]) == (1201, "redaction")
        assert record["metadata"]["redaction"]["records"] == 2 and record["metadata"]["redaction"]["by"] == "admin"
        assert "hunter2" not in str(record) and "pa55" not in str(record)
        page = (await admin.get(logs_path(task), params={"afterSeq": 41, "size": 1})).json()["content"]
        assert page[0]["message"] == "export TOKEN=***"
        assert (await admin.get(logs_path(task), params={"q": "hunter2"})).json()["totalElements"] == 0
        assert (await admin.get(logs_path(task), params={"q": "***"})).json()["totalElements"] == 2
        one = (await admin.get(logs_path(task), params={"afterSeq": 1100, "size": 1})).json()["content"][0]
        assert (one["message"], one["metadata"]) == ("again ***, and ***", {"env": "***"})
        raw = (await admin.get(logs_path(task) + "/raw")).text
        assert "hunter2" not in raw and "pa55" not in raw
        # A second time, nothing is left to redact.
        again = (await admin.post(path, json={"values": ["hunter2"]})).json()
        assert again["redactedRecords"] == 0


async def test_only_the_admin_redacts_and_bad_requests_are_told_why(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart(*TOKENS)
    task = "guarded"
    path = f"/api/v1/tasks/{task}/redact"
    async with hub.http(AGENT) as agent:
        assert (await agent.post(logs_path(task), json={"message": "x"})).status_code == 200
        assert_error(await agent.post(path, json={"values": ["x"]}), 403, "FORBIDDEN", mentions="admin token")
    async with hub.http(VIEWER) as viewer:
        assert_error(await viewer.post(path, json={"values": ["x"]}), 403, "FORBIDDEN")
    async with hub.http() as nobody:
        assert_error(await nobody.post(path, json={"values": ["x"]}), 401, "UNAUTHORIZED")
    async with hub.http(ADMIN) as admin:
        for body in ({}, {"values": []}, {"values": [""]}, {"values": [1]}, {"values": "x"},
                     {"values": ["x"], "more": 1}, {"values": ["x"] * 101}, {"values": ["x" * 4097]}, [1]):
            assert_error(await admin.post(path, json=body), 400, "INVALID_REQUEST")
        assert_error(await admin.post(path, content=b"{nope"), 400, "INVALID_REQUEST")
        assert_error(await admin.post("/api/v1/tasks/nobody/redact", json={"values": ["x"]}), 404, "NOT_FOUND")


async def test_a_redaction_body_is_not_read_before_the_admin_token_is_proven(
    sqlite_hub_factory: InProcessHubFactory, autojump_clock: trio.abc.Clock
) -> None:
    hub = await sqlite_hub_factory.astart(*TOKENS)
    for token, status in ((None, 401), (AGENT, 403), (VIEWER, 403)):
        async with await connect(hub) as stream:
            started = trio.current_time()
            head = request_head("POST", "/api/v1/tasks/t/redact", BODY, token)
            await send_ignoring_close(stream, head + b"x" * CHUNK)
            answer = await read_answer(stream)
            assert answer.status == status and answer.closed
            assert trio.current_time() - started < BODY_TIMEOUT


async def test_an_agent_run_with_max_bytes_keeps_its_head_and_tail(hub_factory: InProcessHubFactory, tmp_path: Path) -> None:
    hub = await hub_factory.astart()
    code = "for i in range(1, 3001): print(f'output line {i:05d} ' + 'w' * 80)"
    async with agent(run_args(hub.url, "agent-capped", tmp_path / "spool", "--max-bytes", "32K") + [sys.executable, "-c", code]) as a:
        assert await a.wait() == 0
    with trio.fail_after(PATIENCE):
        while True:
            records = await hubclient.stored(hub, "agent-capped")
            if sum(len(r["message"]) for r in records) <= 32 * 1024:
                break
            await trio.sleep(0.05)
    gaps = [r for r in records if r.get("kind") == "gap"]
    assert len(gaps) == 1 and gaps[0]["metadata"]["gap"]["reason"] == "cap"
    lines = [r["message"] for r in records if r.get("kind") is None]
    # The head from its first line, the tail through its last: the failure is at the end.
    assert lines[0].startswith("output line 00001 ") and lines[-1].startswith("output line 03000 ")
    accounts = gaps[0]["metadata"]["gap"]["accounts"]
    (producer,) = accounts
    assert accounts[producer]["records"] + len(lines) == 3000
    # `tail` prints the gap as a line of its own, where the cut is.
    done = await trio.run_process(
        python_m("agent", "tail", "--hub", hub.url, "--no-follow", "agent-capped"), capture_stdout=True, env=agent_env()
    )
    printed = done.stdout.decode().splitlines()
    head = [r for r in records if r["seq"] < gaps[0]["seq"]]
    assert printed[len(head)] == f"--- {gaps[0]['message']} ---"
    assert printed[len(head)].endswith("not kept: task over its 32 KB cap ---")
    assert printed[0] == lines[0] and printed[-1] == lines[-1] and len(printed) == len(records)
    # An honest gap keeps the log verifiable: what the cap dropped is in the
    # gap's accounts, so the run's summary still checks out (Guarantee 7).
    async with hub.http() as client:
        answer = (await client.get("/api/v1/tasks/agent-capped/verify")).json()
    assert answer["verdict"] == "complete", answer
    # And so does a redaction: its record accounts for the leaves it changed.
    async with hub.http() as client:
        redacted = await client.post("/api/v1/tasks/agent-capped/redact", json={"values": ["output line 03000"]})
        assert redacted.status_code == 200 and redacted.json()["redactedRecords"] == 1, redacted.text
        answer = (await client.get("/api/v1/tasks/agent-capped/verify")).json()
    assert answer["verdict"] == "complete", answer
