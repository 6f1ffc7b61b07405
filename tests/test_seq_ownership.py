"""Who owns a task's seq space (docs/identity.md).

The hub does: an agent run is a producer with its own counter, and the hub
gives each of its records the next task seq. Every acked line is a stored line,
whoever else writes to the task, however often the task id is used, whatever
was deleted, and whichever hub commits last.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio

from agent.spool.spool import Spool
from hub.store.base import CONFLICT, DUPLICATE, GAP, INSERTED, Incoming, LogQuery
from keruta.frames import LogsFrame
from keruta.wire import encode_bytes
from tests import hubclient
from tests.agentclient import PATIENCE, agent, run_args
from tests.hubclient import TestHub, assert_error, fetch_all, logs_path, make_record

hub, hub_factory = hubclient.hub, hubclient.hub_factory

TS = "2026-01-02T03:04:05.000000Z"


def inc(seq: int, message: str | None = None, *, producer: str = "", task: str = "t1") -> Incoming:
    return Incoming(
        task_id=task,
        seq=seq,
        timestamp=TS,
        source="stdout",
        level="INFO",
        message=message if message is not None else f"line {seq}",
        producer=producer,
    )


async def messages(store, task: str = "t1") -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    page = await store.query(LogQuery(task_id=task, size=10_000))
    return [(r.seq, r.message) for r in page.content]


# --- the store --------------------------------------------------------------


async def test_two_producers_of_one_task_are_both_stored_in_order(store):
    first = await store.append([inc(1, "a1", producer="run-a"), inc(2, "a2", producer="run-a")])
    assert first.status == [INSERTED, INSERTED]
    assert first.producers == {("t1", "run-a"): 2}
    # A second run of the same task id counts from 1 again: new lines, stored after.
    second = await store.append([inc(1, "b1", producer="run-b"), inc(2, "b2", producer="run-b")])
    assert second.status == [INSERTED, INSERTED]
    assert [r.seq for r in second.inserted] == [3, 4]
    assert second.durable == {"t1": 4}
    # Its resend is recognised by (task, producer, seq), not by task seq.
    again = await store.append([inc(2, "b2", producer="run-b"), inc(3, "b3", producer="run-b")])
    assert again.status == [DUPLICATE, INSERTED]
    assert again.records[0] is not None and again.records[0].seq == 4
    assert await messages(store) == [(1, "a1"), (2, "a2"), (3, "b1"), (4, "b2"), (5, "b3")]


async def test_one_producers_seqs_never_take_anothers_records(store):
    await store.append([inc(1, "agent 1", producer="run"), inc(1, "posted 1")])
    await store.append([inc(2, "posted 2"), inc(2, "agent 2", producer="run")])
    await store.append([inc(3, "agent 3", producer="run")])
    assert await messages(store) == [
        (1, "agent 1"),
        (2, "posted 1"),
        (3, "posted 2"),
        (4, "agent 2"),
        (5, "agent 3"),
    ]


async def test_a_different_record_under_a_stored_identity_is_a_conflict(store):
    await store.append([inc(1, "one"), inc(1, "one", producer="run")])
    result = await store.append(
        [inc(1, "one"), inc(1, "not one"), inc(1, "one", producer="run"), inc(1, "other", producer="run")]
    )
    assert result.status == [DUPLICATE, CONFLICT, DUPLICATE, CONFLICT]
    assert result.inserted == []
    # Inside one batch too: the second, different record under seq 2 is refused.
    result = await store.append([inc(2, "two"), inc(2, "TWO")])
    assert result.status == [INSERTED, CONFLICT]
    assert await messages(store) == [(1, "one"), (2, "one"), (3, "two")]


async def test_a_producer_record_past_a_gap_is_not_stored(store):
    await store.append([inc(1, producer="run")])
    result = await store.append([inc(3, producer="run"), inc(2, producer="run")])
    assert result.status == [GAP, INSERTED]
    assert result.producers == {("t1", "run"): 2}


async def test_a_record_resent_after_delete_is_not_stored_again(store):
    await store.append([inc(s) for s in (1, 2, 3)] + [inc(s, f"p{s}", producer="run") for s in (1, 2)])
    assert await store.delete("t1", None) == 5
    again = await store.append([inc(s) for s in (1, 2, 3)] + [inc(s, f"p{s}", producer="run") for s in (1, 2)])
    # Stored once, deleted by the user: a resend is a duplicate (acked), not a new line.
    assert again.status == [DUPLICATE] * 5
    assert await messages(store) == []
    # The next record of a producer is new, and takes the next task seq (never a deleted one).
    after = await store.append([inc(4, "four")])
    assert after.status == [INSERTED]
    assert after.records[0] is not None and after.records[0].seq == 6


async def test_states_only_move_forward(store):
    await store.set_state("t1", "running", None, "run-a")
    await store.set_state("t1", "failed", 2, "run-a")
    # A stale `running` of the same run, committed late (another hub, a resend).
    info = await store.set_state("t1", "running", None, "run-a")
    assert (info.state, info.exit_code) == ("failed", 2)
    assert await store.run_state("t1", "run-a") == ("failed", 2)
    # Without a producer too.
    await store.set_state("t2", "succeeded", 0)
    info = await store.set_state("t2", "running", None)
    assert (info.state, info.exit_code) == ("succeeded", 0)
    info = await store.set_state("t2", "pending", None)
    assert info.state == "succeeded"
    # A new run of the task (a CI retry) runs again; the old run's late words change only itself.
    info = await store.set_state("t1", "running", None, "run-b")
    assert info.state == "running"
    info = await store.set_state("t1", "succeeded", 0, "run-a")
    assert info.state == "running"
    info = await store.set_state("t1", "succeeded", 0, "run-b")
    assert (info.state, info.exit_code) == ("succeeded", 0)


@pytest.mark.pg
async def test_two_hubs_a_stale_running_never_overwrites_a_final_state(pg_url):
    from hub.store.postgres import PostgresStore

    hub_a, hub_b = PostgresStore(pg_url), PostgresStore(pg_url)
    await hub_a.open()
    await hub_b.open()
    try:
        await hub_b.set_state("t1", "failed", 1, "run")
        info = await hub_a.set_state("t1", "running", None, "run")
        assert (info.state, info.exit_code) == ("failed", 1)
        info = await hub_a.set_state("t2", "succeeded", 0)
        info = await hub_b.set_state("t2", "running", None)
        assert info.state == "succeeded"
    finally:
        await hub_a.close()
        await hub_b.close()


# --- the spool --------------------------------------------------------------


async def test_the_spool_keeps_its_highest_seq_when_its_segments_go(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "t1", max_bytes=64 * 1024)
    producer = spool.producer
    payload = b"x" * 200
    # 8 full segments of 37 frames (8 KiB segments for a 64 KiB spool): all of them go at the ack.
    for seq in range(1, 297):
        spool.append([(seq, payload)])
    spool.release(296)
    await spool.sync()
    assert not list(spool.dir.glob("*.seg")), "acknowledged segments are deleted"
    # Killed here: no save_watermark, no orderly close (close() only releases fds).
    spool.close()
    reopened = Spool.open(tmp_path, "t1", max_bytes=64 * 1024)
    try:
        assert reopened.last_seq == 296, "a reused seq would be taken for a line already stored"
        assert reopened.producer == producer
    finally:
        reopened.close()


# --- through a real hub -----------------------------------------------------


def producer_frame(task: str, producer: str, seqs: range, text: str = "line") -> str:
    records = [attrs.evolve(make_record(task, s, f"{text} {s}"), line_number=s) for s in seqs]
    return encode_bytes(LogsFrame(task, records, producer)).decode()


async def test_hub_answers_seq_conflict_and_never_acks_it(hub: TestHub) -> None:
    task = "conflict"
    async with hub.ws() as ws:
        await ws.send(hubclient.logs_frame(task, [make_record(task, 1, "one")]))
        with trio.fail_after(PATIENCE):
            await ws.wait_ack(task, 1)
        await ws.send(hubclient.logs_frame(task, [make_record(task, 2, "two"), make_record(task, 1, "uno")]))
        with trio.fail_after(PATIENCE):
            error = await ws.recv_type("error")
        assert error["code"] == "SEQ_CONFLICT"
        await ws.send(producer_frame(task, "run", range(1, 3)))
        with trio.fail_after(PATIENCE):
            while True:
                frame = await ws.recv()
                if frame["type"] == "ack" and frame.get("producer") == "run":
                    assert frame["seq"] == 2
                    break
                assert frame["type"] == "ack" and frame["seq"] <= 0, frame
        await ws.send(producer_frame(task, "run", range(2, 4), text="changed"))
        with trio.fail_after(PATIENCE):
            error = await ws.recv_type("error")
        assert error["code"] == "SEQ_CONFLICT"
        # The connection goes on: and no ack of that producer covers seq 2 again.
        await ws.send({"type": "ping"})
        with trio.fail_after(PATIENCE):
            while (frame := await ws.recv())["type"] != "pong":
                assert not (frame["type"] == "ack" and frame.get("producer") == "run" and frame["seq"] >= 2)
    async with hub.http() as client:
        resp = await client.post(logs_path(task), json={"message": "not one", "seq": 1})
        assert_error(resp, 409, "SEQ_CONFLICT")
        resp = await client.post(logs_path(task), json={"message": "one", "seq": 1, "lineNumber": 1})
        assert resp.status_code == 200, resp.text
        stored = await fetch_all(client, task)
    assert [(r["seq"], r["message"]) for r in stored] == [
        (1, "one"),
        (2, "two"),
        (3, "line 1"),
        (4, "line 2"),
        (5, "changed 3"),  # follows on; stored, but never acked past the conflict
    ]


async def test_a_task_id_used_again_keeps_both_runs(hub: TestHub, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    script = "for i in 1 2 3; do echo {run}-$i; done; exit {code}"
    async with agent(run_args(hub.url, "retry-1", spool) + ["sh", "-c", script.format(run="first", code=1)]) as a:
        assert await a.wait() == 1
    async with agent(run_args(hub.url, "retry-1", spool) + ["sh", "-c", script.format(run="second", code=0)]) as a:
        assert await a.wait() == 0
    async with hub.http() as client:
        stored = await fetch_all(client, "retry-1")
        task = (await client.get("/api/v1/tasks/retry-1")).json()
    assert [(r["seq"], r["message"]) for r in stored] == [
        (i + 1, m)
        for i, m in enumerate(["first-1", "first-2", "first-3", "second-1", "second-2", "second-3"])
    ]
    assert (task["state"], task["exitCode"]) == ("succeeded", 0)


async def test_rest_posts_during_an_agent_run_are_all_stored(hub: TestHub, tmp_path: Path) -> None:
    n = 3000
    code = f"import time\nfor i in range({n}):\n    print(f'agent line {{i}}', flush=True)\n    i % 100 == 0 and time.sleep(0.01)\n"
    async with agent(run_args(hub.url, "mixed-1", tmp_path / "spool") + ["python3", "-c", code]) as a:
        async with hub.http() as client:
            for k in range(50):
                resp = await client.post(logs_path("mixed-1"), json={"message": f"posted {k}"})
                assert resp.status_code == 200, resp.text
                await trio.sleep(0.005)
        assert await a.wait() == 0
    async with hub.http() as client:
        stored = await fetch_all(client, "mixed-1")
    assert [r["seq"] for r in stored] == list(range(1, n + 50 + 1))
    agent_lines = [r["message"] for r in stored if r["message"].startswith("agent")]
    posted = [r["message"] for r in stored if r["message"].startswith("posted")]
    assert agent_lines == [f"agent line {i}" for i in range(n)]
    assert posted == [f"posted {k}" for k in range(50)]


async def test_an_agent_resending_after_delete_stores_nothing_again(hub: TestHub) -> None:
    task = "deleted"
    async with hub.ws() as ws:
        await ws.send(producer_frame(task, "run", range(1, 4)))
        with trio.fail_after(PATIENCE):
            while not ((f := await ws.recv())["type"] == "ack" and f.get("producer") == "run" and f["seq"] == 3):
                pass
    async with hub.http() as client:
        resp = await client.delete(logs_path(task))
        assert resp.status_code == 200, resp.text
    async with hub.ws() as ws:
        await ws.send(producer_frame(task, "run", range(1, 4)))
        with trio.fail_after(PATIENCE):
            while not ((f := await ws.recv())["type"] == "ack" and f.get("producer") == "run" and f["seq"] == 3):
                assert f["type"] != "error", f
    async with hub.http() as client:
        assert await fetch_all(client, task) == []


async def test_a_producers_count_starts_at_one(store):
    result = await store.append([inc(3, producer="late")])
    assert result.status == [GAP]
    assert result.producers == {("t1", "late"): 0}
    assert await messages(store) == []


def test_settle_caps_acks_below_a_conflict_and_refuses_once_per_identity() -> None:
    from hub.actors.writer import settle
    from hub.store.base import AppendResult

    items = [inc(s, producer="run") for s in range(1, 6)] + [inc(7), inc(8)]
    records = [attrs.evolve(make_record("t1", s), id="x") for s in range(1, 8)]
    result = AppendResult(
        records=list(records),
        inserted=[],
        durable={"t1": 9},
        status=[DUPLICATE, CONFLICT, CONFLICT, CONFLICT, INSERTED, CONFLICT, INSERTED],
        producers={("t1", "run"): 5, ("t1", ""): 8},
    )
    outcome = settle(items, result, 0)
    # Each producer's acks stop below its first conflicting seq (the anonymous one's too).
    assert outcome.producers == {("t1", "run"): 1, ("t1", ""): 6}
    assert [(r.code, r.key, r.cap) for r in outcome.refusals] == [
        ("SEQ_CONFLICT", ("t1", "run"), 1),
        ("SEQ_CONFLICT", ("t1", ""), 6),
    ]
    assert "2 more records" in outcome.refusals[0].message
