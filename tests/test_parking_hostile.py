"""Parked tasks under attack (PostgreSQL): rows held by other sessions while
the hub's writer keeps every other task flowing.

The writer's group commit locks task rows with FOR UPDATE SKIP LOCKED; a task
whose row another session holds is parked and its writes are committed, in
order, by a lane of its own (hub/actors/writer.py). These tests hold rows from
child processes (tests/test_store_hostile.py's PG_HOLDER), more of them than
there are lanes, drop the holder instead of releasing it, put three hubs on
one task, time POSTs out against a held row, SIGTERM a hub with a parked task,
and check each time: every acknowledged record stored exactly once and in
order, nothing stored that was answered 503, other tasks served meanwhile.

Real sockets, real hubs, real PostgreSQL; no mocks.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.hubclient import HubFactory, Ws, assert_error, parse_metrics
from tests.inprocess import InProcessHub, InProcessHubFactory
from tests.test_store_hostile import (
    BOUND,
    PATIENCE,
    PG_HOLDER,
    assert_exactly_once,
    holding,
    logs,
    pg_hubs,
    post,
    stored,
    tagged,
    until_a_hub_backend_waits_on_a_lock,
)

__all__ = ["pg_hubs"]  # a fixture, used by name

pytestmark = pytest.mark.pg


def lock_rows(*task_ids: str) -> str:
    names = ", ".join(f"'{t}'" for t in task_ids)
    return f"SELECT 1 FROM keruta_tasks WHERE task_id IN ({names}) FOR UPDATE"


async def create(hub: Any, *task_ids: str) -> None:
    """Each task made (its row exists) with one record `T first`."""
    for t in task_ids:
        resp = await post(hub, t, {"message": f"{t} first"})
        assert resp.status_code == 200, resp.text


async def parked_total(hub: Any) -> float:
    async with hub.http() as client:
        return parse_metrics((await client.get("/metrics")).text).get("keruta_parked_tasks_total", 0.0)


async def flows(hub: Any, ws: Ws, task_id: str, producer: str, first: int, last: int) -> None:
    """A write for an unlocked task is acked within BOUND (not held hostage)."""
    with trio.fail_after(BOUND):
        await ws.send(logs(task_id, producer, first, last, task_id))
        await ws.wait_ack(task_id, last)


# --- more rows held than there are lanes ------------------------------------------


async def test_pg_more_locked_tasks_than_lanes_each_stored_once_in_order_others_flow(
    pg_hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """Six task rows held at once (PARKED_LANES is 4): two parked tasks' lanes
    queue on the semaphore while four wait on their rows (past
    PARKED_PATIENCE each holds a pool connection waiting). Other tasks'
    writes are acked meanwhile, also after the lanes have turned patient;
    each locked task gets a status after its records. After release every
    locked task's writes are stored exactly once, in order, statuses after."""
    hub = await pg_hubs.astart("--store-retry-max", "0.5")
    locked = [f"lk{i}" for i in range(6)]
    await create(hub, *locked)
    async with hub.ws() as ws:
        async with holding(PG_HOLDER, fresh_pg_url, lock_rows(*locked)) as holder:
            try:
                for t in locked:
                    await ws.send(logs(t, "p", 1, 5, t))
                await flows(hub, ws, "free", "f", 1, 5)
                for t in locked:
                    await ws.send(logs(t, "p", 6, 10, t))
                    await ws.send({"type": "status", "taskId": t, "state": "succeeded", "exitCode": 0,
                                   "producer": "p"})
                # Past PARKED_PATIENCE: the four lanes now wait for their rows in the database.
                await until_a_hub_backend_waits_on_a_lock(fresh_pg_url)
                await trio.sleep(1.0)
                await flows(hub, ws, "free", "f", 6, 10)
                await flows(hub, ws, "free2", "g", 1, 3)
                for t in locked:
                    await ws.send(logs(t, "p", 11, 12, t))
                await flows(hub, ws, "free", "f", 11, 12)
                with trio.fail_after(BOUND):
                    async with hub.http() as client:
                        assert (await client.get("/healthz")).status_code == 200
                        for t in locked:
                            assert len((await client.get(f"/api/v1/tasks/{t}/logs")).json()["content"]) == 1
                assert all(ws.acked.get(t, 0) == 0 for t in locked), f"acked while held: {ws.acked}"
                assert await parked_total(hub) >= len(locked)
            finally:
                await holder.release()
        statuses: dict[str, int] = {}
        with trio.fail_after(PATIENCE):
            while len(statuses) < len(locked) or any(ws.acked.get(t, 0) < 12 for t in locked):
                frame = await ws.recv()
                assert frame["type"] != "error", frame
                if frame["type"] == "status":
                    statuses[frame["taskId"]] = ws.acked.get(frame["taskId"], 0)
    # Each status was answered after the records sent before it (1..10) were acked.
    assert all(statuses[t] >= 10 for t in locked), statuses
    for t in locked:
        assert_exactly_once(await stored(hub, t), [f"{t} first"], tagged(t, 1, 12))
        async with hub.http() as client:
            task = (await client.get(f"/api/v1/tasks/{t}")).json()
        assert task["state"] == "succeeded" and task["totalLogs"] == 13, task
    assert_exactly_once(await stored(hub, "free"), tagged("free", 1, 12))
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


# --- a status for a held row that is not parked yet ----------------------------------


async def test_pg_status_for_a_held_row_does_not_hold_other_tasks_hostage(
    pg_hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """A run's status for a task whose row another session holds, the task
    not parked yet (no records of it were committed first): other tasks'
    writes flow meanwhile; the status is applied and answered after release."""
    hub = await pg_hubs.astart("--store-retry-max", "0.5")
    await create(hub, "locked")
    async with hub.ws() as ws:
        async with holding(PG_HOLDER, fresh_pg_url, lock_rows("locked")) as holder:
            try:
                await ws.send({"type": "status", "taskId": "locked", "state": "failed", "exitCode": 3,
                               "producer": "p"})
                await until_a_hub_backend_waits_on_a_lock(fresh_pg_url)
                await flows(hub, ws, "free", "f", 1, 3)
            finally:
                await holder.release()
        with trio.fail_after(PATIENCE):
            status = await ws.recv_type("status")
            await ws.wait_ack("free", 3)
    assert (status["taskId"], status["state"], status["exitCode"]) == ("locked", "failed", 3), status
    async with hub.http() as client:
        task = (await client.get("/api/v1/tasks/locked")).json()
    assert (task["state"], task["exitCode"]) == ("failed", 3), task


# --- REST POSTs against a held row -------------------------------------------------


async def test_pg_post_to_a_parked_task_times_out_503_and_is_never_stored(
    pg_hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """A POST (with and without seq) to a task whose row is held, with a
    --post-timeout inside PARKED_PATIENCE: 503 STORE_UNAVAILABLE, and after
    the row is freed the records are not stored (withdrawn). A WS frame for
    the same task, parked before and after the POSTs, waits and is acked
    after release, its records in order around nothing of the POSTs."""
    hub = await pg_hubs.astart("--post-timeout", "0.2", "--store-retry-max", "0.5")
    await create(hub, "locked")
    async with hub.ws() as ws:
        async with holding(PG_HOLDER, fresh_pg_url, lock_rows("locked")) as holder:
            try:
                await ws.send(logs("locked", "p", 1, 5, "ws"))
                with trio.fail_after(BOUND + 2):
                    resp = await post(hub, "locked", {"message": "withdrawn one"})
                    assert_error(resp, 503, "STORE_UNAVAILABLE")
                    resp = await post(hub, "locked", [{"message": "withdrawn two"},
                                                      {"message": "withdrawn three"}])
                    assert_error(resp, 503, "STORE_UNAVAILABLE")
                await ws.send(logs("locked", "p", 6, 10, "ws"))
                with trio.fail_after(BOUND + 2):
                    resp = await post(hub, "free", {"message": "free one"})
                    assert resp.status_code == 200, resp.text
                assert ws.acked.get("locked", 0) == 0
            finally:
                await holder.release()
        with trio.fail_after(PATIENCE):
            await ws.wait_ack("locked", 10)
    records = await stored(hub, "locked")
    assert_exactly_once(records, ["locked first"], tagged("ws", 1, 10))
    assert [r["message"] for r in records] == ["locked first", *tagged("ws", 1, 10)]
    # Later writes go through at once: the task is not left parked.
    resp = await post(hub, "locked", {"message": "after"})
    assert resp.status_code == 200 and resp.json()["seq"] == 12, resp.text


async def test_pg_post_to_a_parked_task_past_patience_is_answered_within_its_timeout(
    pg_hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """--post-timeout (1.5 s) past PARKED_PATIENCE, while the lane waits for
    the row in the database (at most PARKED_LOCK_WAIT an attempt): the POST
    is still withdrawn and answered 503 while the row is held, and its
    record is not stored after the row is freed."""
    hub = await pg_hubs.astart("--post-timeout", "1.5", "--store-retry-max", "0.5")
    await create(hub, "locked")
    answers: list[int] = []
    released = trio.Event()
    async with holding(PG_HOLDER, fresh_pg_url, lock_rows("locked")) as holder:
        async with trio.open_nursery() as nursery:

            async def poster() -> None:
                resp = await post(hub, "locked", {"message": "late"})
                answers.append(resp.status_code if not released.is_set() else -resp.status_code)

            nursery.start_soon(poster)
            # Well past --post-timeout (1.5 s) plus a loaded machine's slack.
            with trio.move_on_after(1.5 + BOUND + 2):
                while not answers:
                    await trio.sleep(0.05)
            released.set()
            await holder.release()
    messages = [r["message"] for r in await stored(hub, "locked")]
    assert answers == [503], f"the POST was answered {answers} (negative: only after the row was freed)"
    assert messages == ["locked first"], messages


async def test_pg_hub_numbered_post_parked_then_committed_once(
    pg_hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """REST POSTs without seq (hub-numbered) to a held task with a long
    --post-timeout: they wait parked, interleaved with a WS producer's
    frames; after release each POST answers 200 with its task seqs, each
    record is stored once, and the task seqs follow the order the writes
    were sent in."""
    hub = await pg_hubs.astart("--post-timeout", "30", "--store-retry-max", "0.5")
    await create(hub, "locked")
    answers: dict[str, Any] = {}
    async with hub.ws() as ws:
        async with holding(PG_HOLDER, fresh_pg_url, lock_rows("locked")) as holder:
            async with trio.open_nursery() as nursery:
                try:
                    await ws.send(logs("locked", "p", 1, 3, "ws"))
                    await until_a_hub_backend_waits_on_a_lock(fresh_pg_url)

                    async def poster(name: str, body: Any, sent: trio.Event) -> None:
                        async with hub.http() as client:
                            sent.set()
                            resp = await client.post("/api/v1/tasks/locked/logs", json=body)
                        answers[name] = resp

                    for name, body in (("a", {"message": "rest a"}),
                                       ("b", [{"message": "rest b1"}, {"message": "rest b2"}])):
                        sent = trio.Event()
                        nursery.start_soon(poster, name, body, sent)
                        await sent.wait()
                        await trio.sleep(0.3)  # the POST reaches the writer before the next write
                        await ws.send(logs("locked", "p", 4 if name == "a" else 6,
                                           5 if name == "a" else 7, "ws"))
                    await flows(hub, ws, "free", "f", 1, 2)
                    await trio.sleep(0.3)
                    assert answers == {} and ws.acked.get("locked", 0) == 0
                finally:
                    await holder.release()
        with trio.fail_after(PATIENCE):
            await ws.wait_ack("locked", 7)
    assert answers["a"].status_code == 200, answers["a"].text
    assert answers["b"].status_code == 200, answers["b"].text
    records = await stored(hub, "locked")
    assert_exactly_once(records, ["locked first"], tagged("ws", 1, 7), ["rest a", "rest b1", "rest b2"])
    by_message = {r["message"]: r["seq"] for r in records}
    assert answers["a"].json()["seq"] == by_message["rest a"]
    assert answers["b"].json()["seqs"] == [by_message["rest b1"], by_message["rest b2"]]
    # One POST's records are one commit's: consecutive task seqs.
    assert by_message["rest b2"] == by_message["rest b1"] + 1
    # The first WS frame was parked before any POST was sent.
    assert max(by_message[m] for m in tagged("ws", 1, 3)) < by_message["rest a"]


# --- the holder goes away ------------------------------------------------------------


async def test_pg_lock_holder_killed_instead_of_released(
    pg_hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """The holding session's process is SIGKILLed (its connection dropped,
    the server rolls back): the parked task's writes, waiting past
    PARKED_PATIENCE, are then stored exactly once and acked, in order."""
    hub = await pg_hubs.astart("--store-retry-max", "0.5")
    await create(hub, "locked", "locked2")
    async with hub.ws() as ws:
        async with holding(PG_HOLDER, fresh_pg_url, lock_rows("locked", "locked2")) as holder:
            for k in range(4):
                await ws.send(logs("locked", "p", 10 * k + 1, 10 * k + 10, "x"))
                await ws.send(logs("locked2", "q", 10 * k + 1, 10 * k + 10, "y"))
            await until_a_hub_backend_waits_on_a_lock(fresh_pg_url)
            await flows(hub, ws, "free", "f", 1, 2)
            assert ws.acked.get("locked", 0) == 0
            holder.kill()
        with trio.fail_after(PATIENCE):
            await ws.wait_ack("locked", 40)
            await ws.wait_ack("locked2", 40)
        await flows(hub, ws, "locked", "p", 41, 42)
    assert_exactly_once(await stored(hub, "locked"), ["locked first"], tagged("x", 1, 40), tagged("locked", 41, 42))
    assert_exactly_once(await stored(hub, "locked2"), ["locked2 first"], tagged("y", 1, 40))


# --- hubs contending for one task -------------------------------------------------


async def test_pg_three_hubs_one_task_every_record_once_without_holes(
    pg_hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """Three hubs on one database write the same task at once (each a WS
    producer of its own and hub-numbered POSTs), so their commits hold the
    row from one another and park it often. Every acknowledged record is
    stored once, task seqs 1..n without a hole, each producer's in order, and
    no ack ever covers a record that is not stored."""
    hubs = [await pg_hubs.astart("--store-retry-max", "0.5", db=fresh_pg_url) for _ in range(3)]
    frames, per = 30, 5
    posted: list[str] = []

    async def produce(hub: InProcessHub, name: str) -> None:
        async with hub.ws() as ws:
            for k in range(frames):
                await ws.send(logs("shared", name, per * k + 1, per * k + per, name))
                if k % 5 == 4:
                    # An ack must never cover a record not yet readable from the store.
                    acked = ws.acked.get("shared", 0)
                    if acked:
                        messages = {r["message"] for r in await stored(hub, "shared")}
                        assert set(tagged(name, 1, acked)) <= messages, f"{name} acked {acked} unstored"
            with trio.fail_after(PATIENCE):
                await ws.wait_ack("shared", frames * per)

    async def rest(hub: InProcessHub, name: str) -> None:
        async with hub.http() as client:
            for k in range(15):
                message = f"{name}-rest {k}"
                resp = await client.post("/api/v1/tasks/shared/logs", json={"message": message})
                assert resp.status_code == 200, resp.text
                posted.append(message)

    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            for i, hub in enumerate(hubs):
                nursery.start_soon(produce, hub, f"h{i}")
                nursery.start_soon(rest, hub, f"h{i}")
    records = await stored(hubs[0], "shared")
    streams = [tagged(f"h{i}", 1, frames * per) for i in range(3)]
    rest_streams = [[m for m in posted if m.startswith(f"h{i}-rest")] for i in range(3)]
    assert_exactly_once(records, *streams, *rest_streams)
    for hub in hubs:
        assert "Traceback" not in hub.stderr_text, hub.stderr_text


# --- a task row being created by another session ---------------------------------


async def test_pg_a_task_row_being_created_elsewhere_does_not_hold_other_tasks(
    pg_hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """Another session inserted the task's row and has not committed (another
    hub's or an admin's open transaction): the hub's INSERT of it would wait
    for that session; it waits CREATE_WAIT at most, the task is parked, and
    other tasks' writes flow."""
    hub = await pg_hubs.astart("--store-retry-max", "0.5")
    await create(hub, "warm")
    insert = ("INSERT INTO keruta_tasks (task_id, state, updated_at) "
              "VALUES ('ghost', 'running', '2026-01-01T00:00:00.000000Z')")
    async with hub.ws() as ws:
        async with holding(PG_HOLDER, fresh_pg_url, insert) as holder:
            try:
                await ws.send(logs("ghost", "p", 1, 3, "ghost"))
                await until_a_hub_backend_waits_on_a_lock(fresh_pg_url)
                await flows(hub, ws, "free", "f", 1, 3)
            finally:
                await holder.release()
        with trio.fail_after(PATIENCE):
            await ws.wait_ack("ghost", 3)
    assert_exactly_once(await stored(hub, "ghost"), tagged("ghost", 1, 3))


# --- SIGTERM while a task is parked -------------------------------------------------


async def test_pg_sigterm_while_a_task_is_parked_then_restart(fresh_pg_url: str) -> None:
    """A hub process with a parked task (its row held) gets SIGTERM: the
    shutdown ends (exit 0) within its bounds even though the row is never
    freed; what was acked is stored; the parked writes were never acked and
    not stored. The row freed, a restarted hub takes the producer's resend
    from its last ack: everything exactly once."""
    pytest.importorskip("asyncpg")
    factory = HubFactory(lambda: fresh_pg_url)
    try:
        hub = await factory.astart("--store-retry-max", "0.5", "--db-timeout", "3")
        await create(hub, "locked")
        async with holding(PG_HOLDER, fresh_pg_url, lock_rows("locked")) as holder:
            async with hub.ws() as ws:
                await ws.send(logs("locked", "p", 1, 5, "x"))
                await flows(hub, ws, "free", "f", 1, 5)
                await until_a_hub_backend_waits_on_a_lock(fresh_pg_url)
                code = await hub.aterminate(timeout=45)
                acked = dict(ws.acked)
            assert code == 0, hub.stderr_text
            assert acked.get("locked", 0) == 0
            # While still held: nothing of the parked frame got in.
            await holder.release()
        hub = await hub.arestart()
        async with hub.ws() as ws:
            await ws.send(logs("locked", "p", 1, 8, "x"))
            with trio.fail_after(PATIENCE):
                await ws.wait_ack("locked", 8)
        assert_exactly_once(await stored(hub, "locked"), ["locked first"], tagged("x", 1, 8))
        assert_exactly_once(await stored(hub, "free"), tagged("free", 1, 5))
    finally:
        await trio.to_thread.run_sync(factory.close)


async def test_pg_sigterm_while_parked_then_the_row_freed_acks_and_stores_once(fresh_pg_url: str) -> None:
    """SIGTERM to a hub process with a parked task, and the row freed during
    the graceful shutdown: the parked frame is committed and acked before
    the socket closes (or not acked at all), the hub exits 0, and a
    restarted hub takes the resend of whatever was not acked exactly once."""
    factory = HubFactory(lambda: fresh_pg_url)
    try:
        hub = await factory.astart("--store-retry-max", "0.5")
        await create(hub, "locked")
        from trio_websocket import ConnectionClosed

        async with holding(PG_HOLDER, fresh_pg_url, lock_rows("locked")) as holder:
            async with hub.ws() as ws:
                await ws.send(logs("locked", "p", 1, 5, "x"))
                await until_a_hub_backend_waits_on_a_lock(fresh_pg_url)
                await flows(hub, ws, "free", "f", 1, 5)
                assert hub.proc is not None
                hub.proc.terminate()
                await trio.sleep(0.5)
                await holder.release()
                with trio.fail_after(PATIENCE):
                    try:
                        while True:
                            frame = await ws.recv()
                            assert frame["type"] != "error", frame
                    except ConnectionClosed:
                        pass
                acked = ws.acked.get("locked", 0)
        with trio.fail_after(PATIENCE):
            code = await trio.to_thread.run_sync(hub.proc.wait)
        assert code == 0, hub.stderr_text
        assert acked in (0, 5), acked
        hub = await hub.arestart()
        records = await stored(hub, "locked")
        if acked:
            assert [r["message"] for r in records] == ["locked first", *tagged("x", 1, 5)]
        async with hub.ws() as ws:
            await ws.send(logs("locked", "p", acked + 1, 8, "x"))
            with trio.fail_after(PATIENCE):
                await ws.wait_ack("locked", 8)
        assert_exactly_once(await stored(hub, "locked"), ["locked first"], tagged("x", 1, 8))
    finally:
        await trio.to_thread.run_sync(factory.close)
