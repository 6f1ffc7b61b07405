"""Records/s a hub stores from one WebSocket connection sending batches.

    python bench/ws_ingest.py [--records 200000] [--batch 500] [--db sqlite:///PATH]

Starts a hub on a free port (SQLite file in a temp dir unless --db), streams
records with a window of frames in flight, and reports the rate at which
records are acknowledged (ack = committed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import trio
from trio_websocket import open_websocket_url

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from keruta.frames import AckFrame, LogsFrame
from keruta.records import LogRecord  # noqa: E402
from keruta.timefmt import now_ts  # noqa: E402
from keruta.wire import decode_hub_frame, dumps
from tests.support import HubProcess  # noqa: E402


async def stream(ws_url: str, task_id: str, total: int, batch: int, window: int) -> float:
    ts = now_ts()
    frames = []
    for start in range(1, total + 1, batch):
        recs = [
            LogRecord(
                task_id,
                s,
                ts,
                "stdout",
                "INFO",
                f"line {s} of the benchmark output, some text here",
                s,
                {"processId": 1},
            )
            for s in range(start, min(total, start + batch - 1) + 1)
        ]
        frames.append(dumps(LogsFrame(task_id, recs)))
    acked = 0
    async with open_websocket_url(ws_url, max_message_size=64 * 1024 * 1024) as ws:
        began = time.perf_counter()
        sent = 0
        next_frame = 0

        async def reader() -> None:
            nonlocal acked
            while acked < total:
                frame = decode_hub_frame(await ws.get_message())
                if isinstance(frame, AckFrame):
                    acked = frame.seq

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            while next_frame < len(frames):
                if sent - acked >= window * batch:
                    await trio.sleep(0.0005)
                    continue
                await ws.send_message(frames[next_frame])
                sent = min(total, (next_frame + 1) * batch)
                next_frame += 1
        return total / (time.perf_counter() - began)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--db")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or f"sqlite:///{tmp}/bench.db"
        hub = HubProcess(db).start()
        try:
            rate = trio.run(
                stream, hub.ws_url, f"bench-{os.getpid()}", args.records, args.batch, args.window
            )
        finally:
            hub.stop()
    print(
        f"ws_ingest: {args.records} records in batches of {args.batch}: {rate:,.0f} records/s stored ({db.split(':')[0]})"
    )


if __name__ == "__main__":
    main()
