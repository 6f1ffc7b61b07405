#!/usr/bin/env python3
"""The hub's CPU per record on the ingest and live path, by hand.

    python bench/hub_cpu.py [--lines 100000] [--viewers 1] [--reps 3] [--pyspy OUT.svg]

Starts a hub on SQLite in a temp dir, K viewers (bench/viewer.py) subscribed
to the task, and bench/ingest.py writing `logs` frames of 500 records with a
producer id. Reports the hub process's CPU seconds (utime + stime from /proc)
spent between the first frame and the last viewer's last line, per record:
on a shared machine that is steadier than wall-clock rates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.support import HubProcess  # noqa: E402

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def one(a: argparse.Namespace, tmp: Path, rep: int) -> dict[str, object]:
    hub = HubProcess(f"sqlite:///{tmp / f'keruta{rep}.db'}").start()
    try:
        assert hub.proc is not None
        pid = hub.proc.pid
        task = f"cpu-{rep}"
        viewer = None
        if a.viewers:
            ready = tmp / f"ready{rep}"
            viewer = subprocess.Popen(
                [sys.executable, str(HERE / "viewer.py"), "--url", hub.ws_url, "--proto", "keruta",
                 "--task", task, "--viewers", str(a.viewers), "--expect", str(a.lines),
                 "--ready", str(ready), "--out", str(tmp / f"viewer{rep}.json")]
            )
            wait_file(ready, 30)
        spy = None
        if a.pyspy:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "-o", a.pyspy, "--pid", str(pid),
                 "-r", "200", "-f", a.pyspy_format, *(["--gil"] if a.pyspy_gil else [])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(1.0)
        before = cpu_seconds(pid)
        began = time.perf_counter()
        subprocess.run(
            [sys.executable, str(HERE / "ingest.py"), "--url", hub.ws_url, "--task", task,
             "--lines", str(a.lines), "--mode", "batched", "--out", str(tmp / f"ingest{rep}.json")],
            check=True,
        )
        if viewer is not None:
            viewer.wait(120)
        after = cpu_seconds(pid)
        wall = time.perf_counter() - began
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        ingest = json.loads((tmp / f"ingest{rep}.json").read_text())
        seen = json.loads((tmp / f"viewer{rep}.json").read_text()) if viewer is not None else None
        return {
            "us_per_record": (after - before) / a.lines * 1e6,
            "cpu_s": after - before,
            "wall_s": wall,
            "ingest_error": ingest.get("error"),
            "viewers": None if seen is None else [
                {k: v.get(k) for k in ("count", "dups", "gaps", "error")} for v in seen["viewers"]
            ],
        }
    finally:
        hub.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--viewers", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pyspy")
    ap.add_argument("--pyspy-format", default="flamegraph")
    ap.add_argument("--pyspy-gil", action="store_true", help="sample only the thread holding the GIL")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        runs = [one(a, Path(d), rep) for rep in range(a.reps)]
    for r in runs:
        print(json.dumps(r))
    print(f"hub CPU µs/record, median of {a.reps}: {statistics.median(r['us_per_record'] for r in runs):.1f}"
          f"  (lines={a.lines} viewers={a.viewers}; load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
