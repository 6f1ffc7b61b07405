#!/usr/bin/env python3
"""A record's JSON on the hot paths, in-process: CPU µs per record.

    python bench/recordjson_bench.py [--records 500] [--reps 30]

The bench workload's lines (80 bytes) in frames of --records:
- agent: spool records by LineEncoder and the `logs` frame of them, as sent (str);
- hub ingest: that frame read into store rows (hub/ingest.py decode_frame);
- hub live: the hub's `logs` frames of as many stored records (with ids).
Best of --reps, by process CPU time (steadier than wall time on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import timeit
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hub.ingest import RowsFrame, decode_frame  # noqa: E402
from hub.ws.subscriber_frames import encode_chunks  # noqa: E402
from keruta.limits import DEFAULT_LIMITS  # noqa: E402
from keruta.recordjson import LineEncoder, logs_frame  # noqa: E402
from keruta.records import LogRecord  # noqa: E402

TS = "2026-11-28T12:00:00.000000Z"
TASK = "bench-task"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    n = a.records
    messages = [f"{i:09d} " + "x" * 69 for i in range(n)]

    def agent() -> str:
        encoder = LineEncoder(TASK, TS, "stdout", {"processId": 42})
        payloads = [encoder.encode(i + 1, "INFO", m, i + 1, False) for i, m in enumerate(messages)]
        return logs_frame(TASK, payloads, "p-1").decode()

    text = agent()
    assert isinstance(decode_frame(text, DEFAULT_LIMITS), RowsFrame)
    stored = [
        LogRecord(TASK, i + 1, TS, "stdout", "INFO", m, i + 1, {"processId": 42}, False, str(uuid.uuid4()))
        for i, m in enumerate(messages)
    ]
    cases = {
        "agent: spool records + logs frame": agent,
        "hub ingest: logs frame -> store rows": lambda: decode_frame(text, DEFAULT_LIMITS),
        "hub live: logs frames of stored records": lambda: list(encode_chunks(TASK, stored, n)),
    }
    for name, fn in cases.items():
        best = min(timeit.repeat(fn, number=10, repeat=a.reps, timer=time.process_time)) / 10
        print(f"{name}: {best / n * 1e6:.2f} µs/record")


if __name__ == "__main__":
    main()
