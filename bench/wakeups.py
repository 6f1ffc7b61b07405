#!/usr/bin/env python3
"""What a wake-up costs on this machine: the floor under the latency figures.

    python bench/wakeups.py [--reps 300]

A line at 100 lines/s finds every process and thread on its way asleep,
10 ms after the last. Prints one JSON object, medians in milliseconds:

- `thread_round_trip_idle_ms`: `trio.to_thread.run_sync` of nothing, 10 ms
  after the last (the hub's commit runs in a worker thread: docs/durability.md),
  and `thread_round_trip_busy_ms` back to back.
- `process_round_trip_idle_ms`: a byte to another process and back over a
  socketpair, 10 ms after the last: two of the crossings a line makes
  (command -> agent -> hub -> viewer are three).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import trio


async def _thread_round_trips(reps: int) -> tuple[float, float]:
    idle, busy = [], []
    for _ in range(reps):
        await trio.sleep(0.01)
        began = time.perf_counter()
        await trio.to_thread.run_sync(lambda: None)
        idle.append(time.perf_counter() - began)
    for _ in range(reps):
        began = time.perf_counter()
        await trio.to_thread.run_sync(lambda: None)
        busy.append(time.perf_counter() - began)
    return statistics.median(idle), statistics.median(busy)


def _process_round_trip(reps: int) -> float:
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        while data := theirs.recv(64):
            theirs.send(data)
        os._exit(0)
    theirs.close()
    trips = []
    try:
        for _ in range(reps):
            time.sleep(0.01)
            began = time.perf_counter()
            ours.send(b"x")
            ours.recv(64)
            trips.append(time.perf_counter() - began)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return statistics.median(trips)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=300)
    a = ap.parse_args()
    idle, busy = trio.run(_thread_round_trips, a.reps)
    process = _process_round_trip(a.reps)
    print(json.dumps({
        "thread_round_trip_idle_ms": round(idle * 1000, 3),
        "thread_round_trip_busy_ms": round(busy * 1000, 3),
        "process_round_trip_idle_ms": round(process * 1000, 3),
    }))


if __name__ == "__main__":
    main()
