#!/usr/bin/env python3
"""The benchmark's workload (stdlib only; run by keruta-agent and by websocketd).

Throughput mode: --lines N lines of exactly 80 bytes, newline included,
    "000000042 xxxx...\n"  (9-digit line number from 0, space, padding)
written in 2,000-line chunks as fast as the pipe takes them.

With --section-every N (throughput mode), every Nth line opens a GitHub
Actions group and the line before the next one closes it, as a CI job's
steps do: "::group::Step 000000042 xxx...\n" ... "::endgroup::\n".

Latency mode (--interval-ms > 0): one line per interval, flushed at once,
carrying its write time:  "LAT 000042 1732790000123456789 xxx...\n".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

WIDTH = 80


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, required=True)
    ap.add_argument("--interval-ms", type=float, default=0.0)
    ap.add_argument("--start-delay", type=float, default=0.0)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--section-every", type=int, default=0)
    a = ap.parse_args()
    if not 0 <= a.lines <= 50_000_000:
        ap.error("--lines out of range")
    out = sys.stdout.buffer
    if a.start_delay > 0:
        time.sleep(min(a.start_delay, 10.0))
    try:
        if a.interval_ms <= 0:
            pad = b"x" * (WIDTH - 11)
            every = a.section_every
            for base in range(0, a.lines, 2000):
                end = min(base + 2000, a.lines)
                chunk = [b"%09d %s\n" % (i, pad) for i in range(base, end)]
                if every > 1:
                    for i in range(base, end):
                        if i % every == 0:
                            chunk[i - base] = b"::group::Step %09d %s\n" % (i, b"x" * (WIDTH - 25))
                        elif i % every == every - 1:
                            chunk[i - base] = b"::endgroup::\n"
                out.write(b"".join(chunk))
            out.flush()
        else:
            step = a.interval_ms / 1000.0
            t0 = time.monotonic()
            for i in range(a.lines):
                now = time.monotonic()
                if now - t0 > a.max_seconds:
                    break
                target = t0 + i * step
                if target > now:
                    time.sleep(target - now)
                head = b"LAT %06d %d " % (i, time.time_ns())
                out.write(head + b"x" * max(1, WIDTH - len(head) - 1) + b"\n")
                out.flush()
    except BrokenPipeError:
        sys.stdout = None  # type: ignore[assignment]  # no second error at exit
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
