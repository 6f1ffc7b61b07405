#!/usr/bin/env python3
"""The least CPU any CPython hub spends per record of the end-to-end workload.

    floor.py [--records 500] [--reps 200] --out F

What every design must do with a record it takes from an agent, persists and
passes to a viewer, each step done the cheapest way we know in CPython, with
no framework around it: read the agent's `logs` frame off the WebSocket
(wsproto), decode its JSON (orjson), check each record's fields into one
tuple, give it its id (the contract's uuid5, keruta's own `record_id`),
compress its columns into a chunk (zstd level 1, as hub/store/chunk.py),
insert that chunk in its own SQLite transaction (WAL, no sync: the hub
fsyncs off the path), and encode and frame the live `logs` frame for one
viewer. The sum is a floor for the hub's CPU per record
(`end to end, ...: hub CPU per line` in the e2e scenario): what the hub
spends above it is the cost of being a server (sockets, tasks, channels,
hypercorn, bookkeeping), and the gap between the two says how much any
redesign could still win.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import zstandard
from wsproto.frame_protocol import FrameProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import write_json  # noqa: E402

from hub.store.base import record_ids  # noqa: E402

TASK = "bench-floor"
TS = "2026-11-28T12:00:00.000Z"


def agent_frame(n: int) -> bytes:
    """A `logs` frame of n 80-byte lines, as the agent sends them."""
    records = [
        {"seq": i, "timestamp": TS, "source": "stdout", "level": "INFO",
         "message": f"{i:09d} " + "x" * 69, "lineNumber": i, "metadata": {}}
        for i in range(1, n + 1)
    ]
    return orjson.dumps({"type": "logs", "taskId": TASK, "records": records, "producer": "run-1"})


def per_record(fn: Callable[[], Any], n: int, reps: int) -> float:
    """µs per record of `fn`, which handles n records a call."""
    fn()
    began = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - began) / reps / n * 1e6


def measure(n: int, reps: int, db_path: str) -> dict[str, float]:
    frame = agent_frame(n)
    wire = FrameProtocol(client=True, extensions=[]).send_data(frame.decode(), fin=True)
    data = orjson.loads(frame)
    cctx = zstandard.ZstdCompressor(level=1)
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("CREATE TABLE chunks (task_id TEXT, seq_first INT, seq_last INT, lines BLOB, body BLOB)")

    def receive() -> list[Any]:
        server = FrameProtocol(client=False, extensions=[])
        server.receive_bytes(wire)
        return list(server.received_frames())

    def check() -> list[tuple[Any, ...]]:
        rows = []
        for r in data["records"]:
            seq, message, source, level = r.get("seq"), r.get("message"), r.get("source"), r.get("level")
            if type(seq) is not int or type(message) is not str or source not in ("stdout", "stderr") \
                    or level not in ("INFO", "WARN", "ERROR"):
                raise ValueError(r)
            rows.append((seq, r["timestamp"], source, level, message, r.get("lineNumber"), r.get("metadata")))
        return rows

    rows = check()

    def chunk() -> tuple[bytes, bytes]:
        lines = cctx.compress(orjson.dumps({"m": [r[4] for r in rows]}))
        body = cctx.compress(orjson.dumps({"t": [r[1] for r in rows], "s": "stdout", "l": "INFO", "n": None}))
        return lines, body

    lines, body = chunk()

    def insert() -> None:
        db.execute("BEGIN")
        db.execute("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)", (TASK, 1, n, lines, body))
        db.execute("COMMIT")

    ids = record_ids(TASK, 1, n)

    def live() -> bytes:
        return orjson.dumps({"type": "logs", "taskId": TASK, "records": [
            {"taskId": TASK, "seq": r[0], "timestamp": r[1], "source": r[2], "level": r[3], "message": r[4],
             "lineNumber": r[5], "metadata": r[6], "id": ids[k], "producer": "run-1"}
            for k, r in enumerate(rows)
        ]})

    text = live().decode()
    server = FrameProtocol(client=False, extensions=[])
    steps = {
        "receive the agent's frame (wsproto, unmask)": (receive, max(10, reps // 4)),
        "decode its JSON (orjson)": (lambda: orjson.loads(frame), reps),
        "check each record into a tuple": (check, reps),
        "its id (uuid5: keruta's record_ids)": (lambda: record_ids(TASK, 1, n), reps),
        "chunk columns, orjson + zstd-1": (chunk, reps),
        "insert the chunk (SQLite, own transaction)": (insert, reps),
        "encode the live frame (orjson)": (live, reps),
        "frame it for a viewer (wsproto)": (lambda: server.send_data(text, fin=True), reps),
    }
    out = {name: per_record(fn, n, r) for name, (fn, r) in steps.items()}
    db.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="keruta-floor-") as d:
        steps = measure(a.records, a.reps, str(Path(d) / "floor.db"))
    write_json(a.out, {"records_per_frame": a.records, "steps_us": steps, "sum_us": sum(steps.values())})


if __name__ == "__main__":
    main()
