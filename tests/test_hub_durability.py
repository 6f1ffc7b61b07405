"""What survives the hub dying: SIGKILL mid-write, SIGTERM, and retention deleting on purpose."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import trio

from keruta.timefmt import format_ts
from tests import hubclient
from tests.hubclient import (
    GONE,
    PATIENCE,
    HubFactory,
    TestHub,
    Ws,
    batch_frames,
    drain_until_closed,
    fetch_all,
    logs_path,
    send_until_gone,
    stored_seqs,
)

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures
hub_process, hub_process_factory = hubclient.hub_process, hubclient.hub_process_factory  # fixtures

# What a connection to a process that just died may raise.


def missing(expected: range, stored: list[int]) -> list[int]:
    return sorted(set(expected) - set(stored))


async def test_sigkill_mid_stream_loses_no_acked_record_and_serves_on(hub_process: TestHub) -> None:
    hub = hub_process  # SIGKILL: a process
    ws_task, rest_task = "killed-ws", "killed-rest"
    total, batch, kill_at = 24_000, 500, 8_000
    frames = list(batch_frames(ws_task, 1, total, batch))
    rest_answered = 0  # highest seq of rest_task the hub answered 200 for
    killed = trio.Event()

    async def watch_acks(ws: Ws) -> None:
        try:
            while True:
                frame = await ws.recv()
                # Kill the moment an ack crosses the mark, while later batches are in flight:
                # an ack sent before its commit would be caught with its records missing.
                if frame["type"] == "ack" and frame["seq"] >= kill_at and not killed.is_set():
                    hub.kill()
                    killed.set()
        except GONE:
            pass

    async def post_arrays() -> None:
        nonlocal rest_answered
        async with hub.http() as client:
            seq = 0
            try:
                while not killed.is_set():
                    body = [{"seq": s, "message": f"rest {s}"} for s in range(seq + 1, seq + 101)]
                    resp = await client.post(logs_path(rest_task), json=body)
                    assert resp.status_code == 200, resp.text
                    seq += 100
                    rest_answered = seq
            except GONE + (httpx.TransportError,):
                pass

    with trio.fail_after(PATIENCE):
        async with hub.ws() as ws:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_until_gone, ws, frames)
                nursery.start_soon(watch_acks, ws)
                nursery.start_soon(post_arrays)
    assert killed.is_set(), "the hub was never killed: no ack reached the mark"
    acked = ws.acked[ws_task]
    assert acked >= kill_at

    # Straight from the database, with the hub dead: every acknowledged record is there, once.
    stored = await stored_seqs(hub, ws_task)
    print(f"acked {acked}, stored {len(stored)} of {total} sent; REST answered through {rest_answered}")
    assert stored == sorted(set(stored)), "a seq is stored twice"
    assert not missing(range(1, acked + 1), stored), (
        f"acked through {acked} but missing {missing(range(1, acked + 1), stored)[:10]}"
    )
    rest_stored = await stored_seqs(hub, rest_task)
    assert not missing(range(1, rest_answered + 1), rest_stored)

    # Restarted on the same database it serves what it stored, and takes the rest exactly once.
    await hub.arestart()
    async with hub.http() as client:
        assert [r["seq"] for r in await fetch_all(client, ws_task)] == stored
        async with hub.ws() as ws:
            with trio.fail_after(PATIENCE):
                for frame in frames:  # the agent resends everything unacknowledged, and more
                    await ws.send(frame)
                await ws.wait_ack(ws_task, total)
        assert [r["seq"] for r in await fetch_all(client, ws_task)] == list(range(1, total + 1))
        resp = await client.get(logs_path(ws_task, "/stats"))
        assert resp.json()["totalLogs"] == total
    assert await stored_seqs(hub, ws_task) == list(range(1, total + 1))


async def test_sigterm_commits_acks_closes_1001_and_exits_0(hub_process_factory: HubFactory) -> None:
    # SIGTERM and the exit code: a process. At the default 5 s ping interval:
    # the shutdown no longer waits for closed WebSockets' ping tasks to wake
    # (hub/hypercorn_patches.py).
    hub = await hub_process_factory.astart()
    task = "terminated"
    total = 20_000
    frames = list(batch_frames(task, 1, total, 500))
    close_codes: dict[str, int | None] = {}
    writer_frames: list[dict[str, Any]] = []

    async def until_closed(name: str, ws: Ws) -> None:
        got, close_codes[name] = await drain_until_closed(ws)
        if name == "writer":
            writer_frames.extend(got)

    with trio.fail_after(PATIENCE):
        async with hub.ws() as writer, hub.ws() as watcher, hub.ws() as idle:
            await watcher.subscribe(task, from_seq=1)
            for frame in frames[:10]:
                await writer.send(frame)
            await writer.wait_ack(task, 5_000)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_closed, "writer", writer)
                nursery.start_soon(until_closed, "watcher", watcher)
                nursery.start_soon(until_closed, "idle", idle)
                # More is in flight when the signal comes.
                for frame in frames[10:]:
                    await writer.send(frame)
                t0 = trio.current_time()
                exit_code = await hub.aterminate()
                print(f"terminate took {trio.current_time() - t0:.2f}s")
    assert exit_code == 0, hub.stderr_text
    assert close_codes == {"writer": 1001, "watcher": 1001, "idle": 1001}
    assert [f for f in writer_frames if f["type"] == "error"] == []
    acked = writer.acked[task]
    stored = await stored_seqs(hub, task)
    print(f"acked {acked} of {total}, stored {len(stored)}")
    assert not missing(range(1, acked + 1), stored), f"acked through {acked}, some are not stored"
    assert stored == sorted(set(stored))
    # The writer was still connected: whatever got committed was also acknowledged to it.
    assert stored == list(range(1, acked + 1)), f"stored {len(stored)} records but acked only {acked}"
    assert "Traceback" not in hub.stderr_text, hub.stderr_text
    # One signal, one message.
    assert hub.stderr_text.count("shutting down") == 1, hub.stderr_text

    # And it starts again on the same database with everything it acknowledged.
    await hub.arestart()
    async with hub.http() as client:
        assert [r["seq"] for r in await fetch_all(client, task)] == stored


async def test_retention_deletes_old_records(hub_factory: HubFactory) -> None:
    hub = await hub_factory.astart("--retention-days", "1", "--retention-interval", "0.2")
    now = dt.datetime.now(dt.UTC)
    old = format_ts(now - dt.timedelta(days=3))
    recent = format_ts(now - dt.timedelta(hours=1))
    async with hub.http() as client:
        body = [
            {"seq": s, "message": f"line {s}", "timestamp": old if s <= 5 else recent} for s in range(1, 11)
        ]
        resp = await client.post(logs_path("kept-short"), json=body)
        assert resp.status_code == 200, resp.text
        resp = await client.post(logs_path("other"), json={"seq": 1, "message": "old", "timestamp": old})
        assert resp.status_code == 200, resp.text
        with trio.fail_after(PATIENCE):
            while True:
                records = await fetch_all(client, "kept-short")
                left = [r["seq"] for r in records if r.get("kind") != "gap"]
                other = await fetch_all(client, "other")
                if left == list(range(6, 11)) and all(r.get("kind") == "gap" for r in other):
                    break
                assert set(range(6, 11)) <= set(left), f"retention deleted recent records: {left}"
                await trio.sleep(0.1)
    # Neither task has finished: where each head was, one gap says why.
    for gaps, lines in (([r for r in records if r.get("kind") == "gap"], 5), (other, 1)):
        assert len(gaps) == 1 and gaps[0]["metadata"]["gap"]["reason"] == "retention", gaps
        assert gaps[0]["metadata"]["gap"]["lines"] == lines, gaps
    # And it stays that way: recent records are not touched by later passes,
    # nor are the gaps folded again.
    await trio.sleep(0.5)
    async with hub.http() as client:
        assert await fetch_all(client, "kept-short") == records
        assert await fetch_all(client, "other") == other
