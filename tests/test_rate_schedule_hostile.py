"""One WebSocket carrying several tasks' writes, each behind the hub's per-task
--rate-limit (hub/ws/write_schedule.py, hub/ws/connection.py `_ingest_loop`).

A write is handed to the writer once its own task's tokens are there: a
throttled task must not hold up another task's writes on the same socket,
one task's writes and its status keep their order (and so do its SEQ_GAP and
SEQ_CONFLICT replies), a connection closed while frames wait leaves them
unacked and unstored and gives their tokens back, and the write queue's bound
of 8 frames stops the reader (and nothing read behind it overtakes) until a
waiting frame is handed.

Real sockets and real in-process hubs on SQLite (the schedule does not depend
on the store); no mocks. Waits are hang guards; assertions are on order and
counts, each with at least a second of the rate limit's own spacing as margin.
"""

from __future__ import annotations

from typing import Any

import trio

from tests import hubclient
from tests.hubclient import Ws, fetch_all
from tests.inprocess import InProcessHubFactory
from tests.test_store_hostile import PATIENCE, assert_exactly_once, logs, tagged

sqlite_hub_factory = hubclient.sqlite_hub_factory  # a fixture


def status(task_id: str, producer: str, state: str = "succeeded", code: int = 0) -> dict[str, Any]:
    return {"type": "status", "taskId": task_id, "state": state, "exitCode": code, "producer": producer}


async def messages(hub: Any, task_id: str) -> list[str]:
    async with hub.http() as client:
        return [r["message"] for r in await fetch_all(client, task_id)]


async def records(hub: Any, task_id: str) -> list[dict[str, Any]]:
    async with hub.http() as client:
        return await fetch_all(client, task_id)


async def task_info(hub: Any, task_id: str) -> dict[str, Any]:
    async with hub.http() as client:
        resp = await client.get(f"/api/v1/tasks/{task_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]


async def test_many_tasks_interleaved_on_one_connection_each_in_order_none_held_by_the_noisy_one(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    """A noisy task (its second frame waits ~2 s for tokens) interleaved with
    five quiet tasks' frames and statuses on one connection: every quiet
    task is acked in full and its status answered while the noisy task's
    throttled frame still waits; each status comes after its own task's
    acks; the noisy task's status after its last ack; everything stored once
    in order."""
    hub = await sqlite_hub_factory.astart("--rate-limit", "20", "--rate-burst", "20")
    quiet = [f"q{i}" for i in range(5)]
    async with hub.ws() as ws:
        await ws.send(logs("noisy", "n", 1, 20, "noisy"))
        await ws.send(logs("noisy", "n", 21, 60, "noisy"))
        await ws.send(status("noisy", "n"))
        for k in range(3):
            for t in quiet:
                await ws.send(logs(t, "p", 2 * k + 1, 2 * k + 2, t))
        for t in quiet:
            await ws.send(status(t, "p", "failed", 7))
        statuses: dict[str, tuple[int, int]] = {}
        with trio.fail_after(PATIENCE):
            while len(statuses) < len(quiet) + 1:
                frame = await ws.recv()
                assert frame["type"] != "error", frame
                if frame["type"] == "status":
                    t = frame["taskId"]
                    statuses[t] = (ws.acked.get(t, 0), ws.acked.get("noisy", 0))
    for t in quiet:
        own, noisy = statuses[t]
        assert own == 6, f"{t}'s status came before its records were acked: {statuses}"
        assert noisy <= 20, f"{t} waited for the noisy task's tokens: {statuses}"
    assert statuses["noisy"][0] == 60, statuses
    assert_exactly_once(await records(hub, "noisy"), tagged("noisy", 1, 60))
    for t in quiet:
        assert_exactly_once(await records(hub, t), tagged(t, 1, 6))
        info = await task_info(hub, t)
        assert (info["state"], info["exitCode"]) == ("failed", 7), info
    info = await task_info(hub, "noisy")
    assert (info["state"], info["exitCode"]) == ("succeeded", 0), info


async def test_seq_replies_keep_each_tasks_order_behind_its_own_tokens_only(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    """Task A: a frame within its burst, one waiting ~2 s for tokens, then a
    frame with a gap. Task B on the same socket: a frame, the same seqs with
    other messages (SEQ_CONFLICT), then a gap (SEQ_GAP). B's refusals come
    while A's throttled frame still waits; A's SEQ_GAP comes only after
    A's throttled frame was acked, resuming after it."""
    hub = await sqlite_hub_factory.astart("--rate-limit", "20", "--rate-burst", "20")
    errors: list[tuple[str, int | None, int, int]] = []
    async with hub.ws() as ws:
        await ws.send(logs("a", "pa", 1, 20, "a"))
        await ws.send(logs("a", "pa", 21, 60, "a"))
        await ws.send(logs("a", "pa", 100, 101, "a-gap"))
        await ws.send(logs("b", "pb", 1, 3, "b"))
        await ws.send(logs("b", "pb", 1, 3, "b-other"))
        await ws.send(logs("b", "pb", 10, 10, "b-gap"))
        with trio.fail_after(PATIENCE):
            while len(errors) < 3:
                frame = await ws.recv()
                if frame["type"] == "error":
                    errors.append((frame["code"], frame.get("resumeFrom"), ws.acked.get("a", 0),
                                   ws.acked.get("b", 0)))
            await ws.wait_ack("a", 60)
    b_errors = [e for e in errors if e[0] == "SEQ_CONFLICT" or e[1] == 4]
    a_errors = [e for e in errors if e not in b_errors]
    assert [e[0] for e in b_errors] == ["SEQ_CONFLICT", "SEQ_GAP"], errors
    assert all(e[2] <= 20 for e in b_errors), f"B's replies waited for A's tokens: {errors}"
    assert [(e[0], e[1]) for e in a_errors] == [("SEQ_GAP", 61)], errors
    assert a_errors[0][2] == 60, f"A's SEQ_GAP overtook its own throttled frame: {errors}"
    assert_exactly_once(await records(hub, "a"), tagged("a", 1, 60))
    assert_exactly_once(await records(hub, "b"), tagged("b", 1, 3))


async def test_closed_while_frames_wait_for_tokens_they_are_dropped_and_refunded(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    """Five frames of 100 records wait for tokens (50 s of debt at 10/s) when
    the connection closes: none is acked or stored, and their tokens come
    back, so the task is not held for tokens nobody used: a REST POST to it
    is let in within a second or two (Retry-After), not after 50 s; a new
    connection resumes the producer from its last ack, exactly once."""
    hub = await sqlite_hub_factory.astart("--rate-limit", "10", "--rate-burst", "10")
    async with hub.ws() as ws:
        await ws.send(logs("t", "p", 1, 10, "t"))
        await ws.wait_ack("t", 10)
        for k in range(5):
            await ws.send(logs("t", "p", 11 + 100 * k, 110 + 100 * k, "t"))
        # The frames are read and waiting for their tokens: a ping behind them is answered.
        await ws.send({"type": "ping"})
        with trio.fail_after(PATIENCE):
            await ws.recv_type("pong")
        assert ws.acked["t"] == 10
    probe: list[Any] = []
    with trio.fail_after(10):
        async with hub.http() as client:
            while True:
                resp = await client.post("/api/v1/tasks/t/logs", json={"message": "probe"})
                if resp.status_code == 200:
                    probe.append(resp.json()["seq"])
                    break
                assert resp.status_code == 429, resp.text
                if int(resp.headers["Retry-After"]) <= 2:
                    break
                await trio.sleep(0.2)
    assert await messages(hub, "t") == [*tagged("t", 1, 10), *(["probe"] if probe else [])]
    async with hub.ws() as ws:
        await ws.send(logs("t", "p", 11, 15, "t"))
        with trio.fail_after(PATIENCE):
            await ws.wait_ack("t", 15)
    stored_messages = [m for m in await messages(hub, "t") if m != "probe"]
    assert stored_messages == tagged("t", 1, 15)


async def test_eight_throttled_frames_stop_the_reader_until_one_is_handed(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    """The write queue holds 8 frames. Control: 7 throttled frames of task A
    (one every 2 s) and a frame of task B behind them: B is read and acked
    at once, before A's next frame. Then with 8 throttled frames of task C
    waiting, D's frame behind them is not read until C's first waiting frame
    is handed: when D is acked, C's first two frames are stored (a waiting
    write never overtaken by one read after the queue was full). Closed
    then: C's frames still waiting are never stored; what is stored is a
    prefix, in order."""
    hub = await sqlite_hub_factory.astart("--rate-limit", "10", "--rate-burst", "20")

    async def fill(ws: Ws, task: str, frames: int) -> None:
        await ws.send(logs(task, "p", 1, 20, task))
        await ws.wait_ack(task, 20)
        for k in range(1, frames + 1):
            await ws.send(logs(task, "p", 20 * k + 1, 20 * k + 20, task))

    async with hub.ws() as ws:
        await fill(ws, "a", 7)
        await ws.send(logs("b", "q", 1, 1, "b"))
        with trio.fail_after(PATIENCE):
            await ws.wait_ack("b", 1)
        a_when_b = len(await messages(hub, "a"))
    assert a_when_b == 20, f"B waited behind A's throttled frames with room in the queue: {a_when_b}"
    async with hub.ws() as ws:
        await fill(ws, "c", 8)
        await ws.send(logs("d", "q", 1, 1, "d"))
        with trio.fail_after(PATIENCE):
            await ws.wait_ack("d", 1)
        c_when_d = len(await messages(hub, "c"))
    assert c_when_d >= 40, f"D was read past a full write queue: C had {c_when_d} stored at D's ack"
    c = await messages(hub, "c")
    assert len(c) % 20 == 0 and len(c) < 180 and c == tagged("c", 1, len(c)), c
    assert await messages(hub, "d") == ["d 1"]
    a = await messages(hub, "a")
    assert a == tagged("a", 1, len(a)) and len(a) < 160, a
