#!/usr/bin/env python3
"""A client writing records straight to the hub's WebSocket, without the agent.

    ingest.py --url ws://127.0.0.1:P/api/v1/ws --task T --lines N --mode seed|batched --out F

seed:    the seed's design: one `log` frame per line (client-chosen task seqs),
         sent back to back, waiting for nothing.
batched: keruta's frames: `logs` frames of --batch records with a producer id
         (docs/identity.md), also sent back to back.
Lines/s = N / (first send -> the ack that covers line N), i.e. committed.
Uses the `websockets` asyncio client (a client keruta does not use itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from common import write_json
from websockets.asyncio.client import connect

TS = "2026-11-28T12:00:00.000Z"
PAD = "x" * 69


def record(task: str, seq: int) -> dict[str, object]:
    return {
        "taskId": task,
        "seq": seq,
        "timestamp": TS,
        "source": "stdout",
        "level": "INFO",
        "message": f"{seq - 1:09d} {PAD}",
        "lineNumber": seq,
        "metadata": {},
    }


def frames(task: str, n: int, mode: str, batch: int, producer: str) -> list[str]:
    if mode == "seed":
        return [json.dumps({"type": "log", **record(task, s)}) for s in range(1, n + 1)]
    return [
        json.dumps(
            {
                "type": "logs",
                "taskId": task,
                "producer": producer,
                "records": [record(task, s) for s in range(b, min(b + batch, n + 1))],
            }
        )
        for b in range(1, n + 1, batch)
    ]


async def run(a: argparse.Namespace) -> dict[str, object]:
    producer = "bench-" + uuid.uuid4().hex[:12]
    out = frames(a.task, a.lines, a.mode, a.batch, producer)
    acked = 0
    error = None
    async with connect(a.url, max_size=None, compression=None, open_timeout=15) as ws:
        began = time.perf_counter()

        async def reader() -> None:
            nonlocal acked, error
            async for msg in ws:
                m = json.loads(msg)
                if m.get("type") == "ack" and m.get("taskId") == a.task:
                    acked = max(acked, int(m.get("seq", 0)))
                    if acked >= a.lines:
                        return
                elif m.get("type") == "error":
                    error = f"{m.get('code')}: {m.get('message')}"[:200]
                    return

        rd = asyncio.create_task(reader())
        for f in out:
            await ws.send(f)
            if rd.done():
                break
        try:
            await asyncio.wait_for(rd, a.timeout)
        except TimeoutError:
            error = f"timeout: {acked} of {a.lines} acknowledged"
        elapsed = time.perf_counter() - began
    return {
        "lines": a.lines,
        "acked": acked,
        "frames": len(out),
        "seconds": elapsed,
        "lines_per_s": acked / elapsed if acked >= a.lines else None,
        "error": error,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--lines", type=int, required=True)
    ap.add_argument("--mode", choices=["seed", "batched"], required=True)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    res = asyncio.run(run(a))
    write_json(a.out, res)


if __name__ == "__main__":
    main()
