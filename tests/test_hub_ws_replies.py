"""Replies to a client's writes count against its connection's byte bound: a
client that writes frames the hub refuses and never reads the answers stops
being read and is cut off as a slow consumer, on a real socket to an
in-process hub. (What it is sent on the way out is tests/test_unit_connection.py's.)"""

from __future__ import annotations

from typing import Any

import trio

from tests import hubclient
from tests.hubclient import (
    PATIENCE,
    InProcessHubFactory,
    Ws,
    encode_record,
    make_record,
    open_stalled_ws,
    parse_metrics,
)

sqlite_hub_factory = hubclient.sqlite_hub_factory  # fixture

QUEUE_BYTES = 64 * 1024
# ~2.5 MB of frames, each answered with a ~0.25 KiB SEQ_GAP: far past the bound
# and what the kernel's socket buffers absorb.
FRAMES = 10_000


def gapped(n: int) -> dict[str, Any]:
    """A record of run-1 whose seq 1 never came: refused with SEQ_GAP."""
    return {"type": "logs", "taskId": "t", "producer": "run-1", "records": [encode_record(make_record("t", 2 + n))]}


async def test_a_writer_that_never_reads_its_answers_stops_being_read_and_is_cut_off(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart("--subscriber-queue-bytes", str(QUEUE_BYTES))
    sent = 0

    async def send_all(ws: Ws) -> None:
        nonlocal sent
        for n in range(FRAMES):
            await ws.send(gapped(n))
            sent += 1

    # It never reads: once the hub stops reading it too, its sends block for good.
    async with open_stalled_ws(hub.ws_url) as stalled, hub.http() as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, stalled)
            metrics: dict[str, float] = {}
            # Past slow_consumer_after (10 s) without room for its answers, it is cut off.
            with trio.move_on_after(PATIENCE / 2):
                while not metrics.get("keruta_slow_consumers_total") and sent < FRAMES:
                    await trio.sleep(0.2)
                    metrics = parse_metrics((await client.get("/metrics")).text)
            nursery.cancel_scope.cancel()

    assert sent < FRAMES, "the hub read every frame and queued an answer to each"
    assert metrics.get("keruta_slow_consumers_total") == 1, f"not cut off after {sent} frames"
    peak = metrics["keruta_subscriber_queue_bytes_peak"]
    assert 0 < peak <= QUEUE_BYTES, f"a connection held {peak} bytes for its client; the bound is {QUEUE_BYTES}"
