"""A subscriber's queue is bounded in bytes, and a connection's
subscriptions in number, against a real hub on both stores."""

from __future__ import annotations

from typing import Any

import trio
from trio_websocket import ConnectionClosed

from tests import hubclient
from tests.hubclient import (
    PATIENCE,
    HubFactory,
    Ws,
    batch_frames,
    make_record,
    open_stalled_ws,
    parse_metrics,
)

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures
hub_process, hub_process_factory = hubclient.hub_process, hubclient.hub_process_factory  # fixtures

QUEUE_BYTES = 2 * 1024 * 1024
# Control characters are escaped as \u0001: a 4,000-character line is a
# 24 KB record on the wire, six times what its length says.
LINE = "\x01" * 4000
BATCH = 20
TOTAL = 1500  # ~36 MB of frames: far past what the kernel's socket buffers absorb


def escaped(task_id: str, seq: int) -> Any:
    return make_record(task_id, seq, f"{seq} {LINE}")


async def records_until(ws: Ws, task_id: str, last_seq: int, seqs: list[int]) -> None:
    while not seqs or seqs[-1] < last_seq:
        frame = await ws.recv()
        if frame["type"] == "logs":
            assert frame["taskId"] == task_id
            seqs.extend(r["seq"] for r in frame["records"])
        elif frame["type"] == "error":
            raise hubclient.HubError(f"fast subscriber got an error after {len(seqs)} records: {frame}")


async def test_stalled_subscriber_of_big_frames_is_cut_off_at_the_byte_bound(
    hub_process_factory: HubFactory,
) -> None:
    # A process: the stalled client and the hub must not share a thread; in-process,
    # under load, the hub's 1 s wait for the close frame to be taken can run out.
    # The frame bound stays at its default (256 frames, ~130 MB of these frames):
    # only the byte bound can stop this subscriber.
    hub = await hub_process_factory.astart("--subscriber-queue-bytes", str(QUEUE_BYTES))
    task = "escaped"
    async with open_stalled_ws(hub.ws_url) as stalled:
        with trio.fail_after(PATIENCE):
            await stalled.subscribe(task)
        async with hub.ws() as fast, hub.ws() as writer:
            with trio.fail_after(PATIENCE * 2):
                async with trio.open_nursery() as nursery:
                    received: list[int] = []
                    await fast.subscribe(task, from_seq=1)
                    nursery.start_soon(records_until, fast, task, TOTAL, received)
                    for n, frame in enumerate(batch_frames(task, 1, TOTAL, BATCH, make=escaped)):
                        await writer.send(frame)
                        await writer.wait_ack(task, (n + 1) * BATCH)
                        # A fast subscriber keeps up: the test process decoding
                        # big frames must not be what makes it fall behind.
                        while len(received) < n * BATCH:
                            await trio.sleep(0.001)
                    await writer.wait_ack(task, TOTAL)
            assert received == list(range(1, TOTAL + 1)), "the fast subscriber lost or doubled records"

        async with hub.http() as client:
            metrics = parse_metrics((await client.get("/metrics")).text)
        # What it was sent before it was cut off; without a cut it would be
        # fed everything, slowly, and never closed.
        frames: list[dict[str, Any]] = []
        close_code: int | None = None
        with trio.move_on_after(PATIENCE / 2):
            try:
                while True:
                    frames.append(await stalled.recv())
            except ConnectionClosed as closed:
                close_code = closed.reason.code if closed.reason else None

    prefix = [r["seq"] for f in frames if f["type"] == "logs" for r in f["records"]]
    errors = [f for f in frames if f["type"] == "error"]
    assert errors and errors[-1]["code"] == "SLOW_CONSUMER", (
        f"the stalled subscriber was not cut off: {len(prefix)} records, errors {errors}, close {close_code}"
    )
    assert close_code == 1013
    assert prefix == list(range(1, len(prefix) + 1)), "what the stalled subscriber got has a gap"
    assert errors[-1]["resumeFrom"] == len(prefix) + 1
    peak = metrics["keruta_subscriber_queue_bytes_peak"]
    assert 0 < peak <= QUEUE_BYTES, f"a connection held {peak} bytes queued; the bound is {QUEUE_BYTES}"


async def test_subscriptions_per_connection_are_bounded(hub_factory: HubFactory) -> None:
    hub = await hub_factory.astart("--max-subscriptions", "3")
    with trio.fail_after(PATIENCE):
        async with hub.ws() as watcher, hub.ws() as writer:
            for task in ("t1", "t2", "t3"):
                await watcher.subscribe(task)
            # Subscribing again to a task already watched replaces, not adds.
            await watcher.subscribe("t2")

            await watcher.send({"type": "subscribe", "taskId": "t4"})
            error = await watcher.recv_type("error", skip=())
            assert error["code"] == "TOO_MANY_SUBSCRIPTIONS", error
            assert "3" in error["message"], error

            # The connection carries on: it answers a ping and still gets its tasks' records.
            await watcher.send({"type": "ping"})
            assert await watcher.recv() == {"type": "pong"}
            await writer.send(hubclient.logs_frame("t4", [make_record("t4", 1)]))
            await writer.send(hubclient.logs_frame("t3", [make_record("t3", 1, "to t3")]))
            await writer.wait_ack("t3", 1)
            frame = await watcher.recv_type("logs", skip=("status",))
            assert (frame["taskId"], [r["message"] for r in frame["records"]]) == ("t3", ["to t3"])

            # After an unsubscribe there is room again.
            await watcher.send({"type": "unsubscribe", "taskId": "t1"})
            await watcher.subscribe("t4", from_seq=1)
            frame = await watcher.recv_type("logs", skip=("status",))
            assert frame["taskId"] == "t4"
