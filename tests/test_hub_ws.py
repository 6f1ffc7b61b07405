"""The hub's WebSocket: ingest, acks, subscriptions, replay + live, slow consumers."""

from __future__ import annotations

from typing import Any

import trio
from trio_websocket import ConnectionClosed

from tests import hubclient
from tests.hubclient import (
    CANONICAL_TS,
    PATIENCE,
    HubFactory,
    TestHub,
    Ws,
    batch_frames,
    drain_until_closed,
    fetch_all,
    logs_frame,
    make_record,
    open_stalled_ws,
    stored_seqs,
)

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures
hub_process, hub_process_factory = hubclient.hub_process, hubclient.hub_process_factory  # fixtures


async def test_log_frame_ping_and_ack(hub: TestHub) -> None:
    task = "single"
    async with hub.ws() as ws, hub.http() as client:
        await ws.send({"type": "ping"})
        assert await ws.recv() == {"type": "pong"}
        record = make_record(task, 1, "hello", metadata={"processId": 7})
        await ws.send({"type": "log", **hubclient.encode_record(record)})
        ack = await ws.recv_type("ack", skip=())
        assert ack == {"type": "ack", "taskId": task, "seq": 1}
        [stored] = await fetch_all(client, task)
        assert (stored["seq"], stored["message"], stored["metadata"]) == (1, "hello", {"processId": 7})
        assert stored["timestamp"] == record.timestamp


async def test_acks_stop_before_a_gap_and_resume_from_it(hub: TestHub) -> None:
    task = "watermark"
    async with hub.ws() as ws:
        # seq 1..5 then 8..10: a producer's records are taken in order, so 8..10
        # are refused (SEQ_GAP, resume from 6) and the ack stops at 5.
        await ws.send(logs_frame(task, [make_record(task, s) for s in (1, 2, 3, 4, 5, 8, 9, 10)]))
        with trio.fail_after(PATIENCE):
            error = await ws.recv_type("error")
            assert (error["code"], error["resumeFrom"]) == ("SEQ_GAP", 6)
            await ws.send({"type": "ping"})
            await ws.recv_type("pong")
        assert ws.acked[task] == 5
        await ws.send(logs_frame(task, [make_record(task, s) for s in range(6, 11)]))
        with trio.fail_after(PATIENCE):
            await ws.wait_ack(task, 10)
        assert ws.acked[task] == 10


async def test_frame_sent_twice_is_stored_once(hub: TestHub) -> None:
    task = "dup-ws"
    frame = logs_frame(task, [make_record(task, s) for s in range(1, 101)])
    async with hub.ws() as ws, hub.http() as client:
        await ws.send(frame)
        await ws.send(frame)
        # A retry that overlaps what is stored, and a `log` frame repeating a stored seq.
        await ws.send(logs_frame(task, [make_record(task, s) for s in range(50, 151)]))
        await ws.send({"type": "log", **hubclient.encode_record(make_record(task, 7))})
        with trio.fail_after(PATIENCE):
            await ws.wait_ack(task, 150)
            # A duplicate after everything is stored is acked again, not stored again.
            await ws.send(frame)
            await ws.send({"type": "ping"})
            await ws.recv_type("pong")
        records = await fetch_all(client, task)
    assert [r["seq"] for r in records] == list(range(1, 151))
    assert await stored_seqs(hub, task) == list(range(1, 151))


async def test_live_subscriber_gets_only_new_records(hub: TestHub) -> None:
    task = "live"
    async with hub.http() as client:
        resp = await client.post(
            f"/api/v1/tasks/{task}/logs", json=[{"message": f"old {s}", "seq": s} for s in range(1, 11)]
        )
        assert resp.status_code == 200, resp.text
    async with hub.ws() as watcher, hub.ws() as errors_only, hub.ws() as writer:
        subscribed = await watcher.subscribe(task)
        assert subscribed["taskId"] == task and CANONICAL_TS.fullmatch(subscribed["timestamp"])
        await errors_only.subscribe(task, from_seq=1, source="stderr")
        with trio.fail_after(PATIENCE):
            for frame in batch_frames(task, 11, 1000, 100, make=every_fifth_on_stderr):
                await writer.send(frame)
            seqs = await collect_records(watcher, task, 1000)
            stderr = await collect_records(errors_only, task, 1000)
    assert [r["seq"] for r in seqs] == list(range(11, 1001))
    for r in seqs:
        assert r["taskId"] == task and isinstance(r["id"], str) and CANONICAL_TS.fullmatch(r["timestamp"])
    assert [r["seq"] for r in stderr] == [s for s in range(1, 1001) if s % 5 == 0 and s > 10]


def every_fifth_on_stderr(task_id: str, seq: int) -> Any:
    return make_record(task_id, seq, source="stderr" if seq % 5 == 0 else "stdout")


def padded(task_id: str, seq: int) -> Any:
    return make_record(task_id, seq, f"line {seq} " + "x" * 120)


async def collect_records(ws: Ws, task_id: str, last_seq: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    while not records or records[-1]["seq"] < last_seq:
        frame = await ws.recv()
        if frame["type"] == "logs":
            assert frame["taskId"] == task_id
            records.extend(frame["records"])
        elif frame["type"] == "error":
            raise hubclient.HubError(f"error frame after {len(records)} records: {frame}")
    return records


async def test_status_on_subscribe_and_broadcast(hub: TestHub) -> None:
    task = "stateful"
    async with hub.ws() as agent, hub.ws() as early:
        await early.subscribe(task)
        await agent.send({"type": "status", "taskId": task, "state": "running"})
        assert await early.recv_type("status", skip=()) == {"type": "status", "taskId": task, "state": "running"}

        # A subscriber arriving later is told the current state right after `subscribed`.
        async with hub.ws() as late:
            await late.send({"type": "subscribe", "taskId": task})
            assert (await late.recv())["type"] == "subscribed"
            status = await late.recv()
            assert (status["type"], status["state"]) == ("status", "running")

            await agent.send({"type": "status", "taskId": task, "state": "failed", "exitCode": 2})
            for ws in (early, late):
                frame = await ws.recv_type("status", skip=())
                assert frame == {"type": "status", "taskId": task, "state": "failed", "exitCode": 2}


async def test_unsubscribe_stops_delivery(hub: TestHub) -> None:
    task = "unsub"
    async with hub.ws() as watcher, hub.ws() as writer:
        await watcher.subscribe(task)
        await writer.send(logs_frame(task, [make_record(task, 1)]))
        with trio.fail_after(PATIENCE):
            assert [r["seq"] for r in await collect_records(watcher, task, 1)] == [1]
            await watcher.send({"type": "unsubscribe", "taskId": task})
            await watcher.send({"type": "ping"})
            # The task's status may follow its first record, if the subscription
            # read the task after that record's commit made it: before the unsubscribe.
            await watcher.recv_type("pong", skip=("status",))
            await writer.send(logs_frame(task, [make_record(task, s) for s in range(2, 50)]))
            await writer.wait_ack(task, 49)
            await watcher.send({"type": "ping"})
            # Nothing of the task arrives any more: the next frame is the pong.
            assert await watcher.recv() == {"type": "pong"}


async def write_windowed(
    ws: Ws,
    task: str,
    last: int,
    batch: int,
    window: int,
    milestones: dict[int, trio.Event],
    make: Any = make_record,
) -> None:
    """Send seq 1..last in batches, keeping at most `window` records unacknowledged.

    The window keeps the writer busy for the whole test, so whatever happens
    "partway through" really happens while writes are in flight.
    """
    for frame_no, frame in enumerate(batch_frames(task, 1, last, batch, make=make)):
        end = min((frame_no + 1) * batch, last)
        await ws.send(frame)
        await ws.wait_ack(task, end - window)
        for at, event in milestones.items():
            if ws.acked.get(task, 0) >= at:
                event.set()
    await ws.wait_ack(task, last)
    for event in milestones.values():
        event.set()


async def test_from_seq_replay_then_live_has_no_gap_or_duplicate(hub_process: TestHub) -> None:
    # A process: in-process, five subscribers catching up on 20 000 records share
    # one thread with the hub, and on a loaded machine a catch-up slower than
    # slow_consumer_after is (rightly) evicted.
    hub = hub_process
    task = "replay"
    total = 20_000
    milestones = {at: trio.Event() for at in (2_000, 5_000, 10_000, 15_000)}
    results: dict[str, tuple[int, list[int]]] = {}

    async def subscriber(name: str, start_after: int, from_seq: Any) -> None:
        await milestones[start_after].wait()
        first = from_seq(writer_ws.acked.get(task, 0)) if callable(from_seq) else from_seq
        seqs: list[int] = []
        # A catch-up slower than slow_consumer_after is evicted (SLOW_CONSUMER),
        # rightly, on a loaded machine; the subscriber then resubscribes after
        # the last record it saw, as the viewer does, and the union of what it
        # saw must still have no gap and no duplicate.
        while not seqs or seqs[-1] < total:
            resume = seqs[-1] + 1 if seqs else first
            async with hub.ws() as ws:
                await ws.subscribe(task, from_seq=resume)
                print(f"{name}: subscribed fromSeq={resume} while writer acked {writer_ws.acked.get(task, 0)}")
                try:
                    while not seqs or seqs[-1] < total:
                        frame = await ws.recv()
                        if frame["type"] == "logs":
                            seqs.extend(r["seq"] for r in frame["records"])
                        elif frame["type"] == "error":
                            assert frame["code"] == "SLOW_CONSUMER", frame
                            print(f"{name}: evicted after {len(seqs)} records")
                            break
                except ConnectionClosed:
                    print(f"{name}: closed after {len(seqs)} records")
        results[name] = (first, seqs)

    with trio.fail_after(PATIENCE * 2):
        async with hub.ws() as writer_ws, trio.open_nursery() as nursery:
            nursery.start_soon(subscriber, "from 1 early", 2_000, 1)
            nursery.start_soon(subscriber, "from 1", 5_000, 1)
            nursery.start_soon(subscriber, "from 3000", 10_000, 3_000)
            nursery.start_soon(subscriber, "at the live edge", 15_000, lambda acked: acked + 1)
            nursery.start_soon(subscriber, "from a future seq", 5_000, 18_000)
            await write_windowed(writer_ws, task, total, 500, 2_000, milestones)

    assert set(results) == {"from 1 early", "from 1", "from 3000", "at the live edge", "from a future seq"}
    for name, (first, seqs) in results.items():
        expected = list(range(first, total + 1))
        if seqs != expected:
            dups = len(seqs) - len(set(seqs))
            missing = sorted(set(expected) - set(seqs))[:10]
            raise AssertionError(
                f"subscriber {name!r} (fromSeq={first}): {len(seqs)} records, {dups} duplicates, "
                f"first missing {missing}, out of order: {seqs != sorted(seqs)}"
            )


async def test_stalled_subscriber_gets_slow_consumer_and_others_get_everything(
    hub_process_factory: HubFactory,
) -> None:
    # A process: the stalled client and the hub must not share a thread; in-process,
    # under load, the hub's 1 s wait for the close frame to be taken can run out.
    hub = await hub_process_factory.astart("--subscriber-queue", "4")
    task = "crowded"
    total = 20_000
    async with open_stalled_ws(hub.ws_url) as stalled:
        with trio.fail_after(PATIENCE):
            await stalled.subscribe(task)
        # From here on `stalled` reads nothing until the writer is done.
        async with hub.ws() as fast, hub.ws() as writer:
            with trio.fail_after(PATIENCE * 2):
                async with trio.open_nursery() as nursery:
                    received: list[int] = []

                    async def read_fast() -> None:
                        received.extend(r["seq"] for r in await collect_records(fast, task, total))

                    await fast.subscribe(task, from_seq=1)
                    nursery.start_soon(read_fast)
                    await write_windowed(writer, task, total, 100, 2_000, {}, make=padded)
            assert received == list(range(1, total + 1)), "the fast subscriber lost or doubled records"
            assert writer.acked[task] == total

        # Now drain what the stalled client was sent before it was cut off.
        with trio.fail_after(PATIENCE):
            frames, close_code = await drain_until_closed(stalled)
    prefix = [r["seq"] for f in frames if f["type"] == "logs" for r in f["records"]]
    errors = [f for f in frames if f["type"] == "error"]
    print(f"stalled: {len(prefix)} records, then {errors}, close code {close_code}")
    assert errors, f"no error frame before close (code {close_code}); got {len(prefix)} records"
    assert errors[-1]["code"] == "SLOW_CONSUMER", errors
    resume_from = errors[-1].get("resumeFrom")
    assert isinstance(resume_from, int) and 1 <= resume_from <= total, errors[-1]
    assert len(prefix) < total, "the stalled subscriber was sent everything: the test did not stall it"
    assert prefix == list(range(1, len(prefix) + 1)), "what the stalled subscriber got has a gap"
    # resumeFrom is where delivery stopped: lower would repeat records on resubscribing,
    # higher would skip some.
    assert resume_from == len(prefix) + 1, (
        f"the stalled subscriber received seq 1..{len(prefix)} but was told resumeFrom={resume_from}"
    )

    async with hub.ws() as again:
        with trio.fail_after(PATIENCE):
            await again.subscribe(task, from_seq=resume_from)
            rest = [r["seq"] for r in await collect_records(again, task, total)]
    assert rest == list(range(resume_from, total + 1))
