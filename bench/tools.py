"""The benchmark suite's helpers: sizes, what runs, websocketd, git, psql."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    check_delivery,
    rate,
)

PY = sys.executable
PRODUCER = str(HERE / "producer.py")
VIEWER = str(HERE / "viewer.py")
INGEST = str(HERE / "ingest.py")
FLEET = str(HERE / "fleet.py")
IDLE_FLOOR = str(HERE / "idle_floor.py")
WAKEUPS = str(HERE / "wakeups.py")
LATENCY_FLOOR = str(HERE / "latency_floor.py")
STORE_BENCH = str(HERE / "store_bench.py")
FLOOR = str(HERE / "floor.py")
STORE_QUERY = str(HERE / "store_query.py")
CI_STEP = HERE / "ci_step.py"  # written separately; the "ci" scenario runs it when present

SIZES = {
    # name: (quick, full)
    "e2e_lines": (200_000, 1_000_000),
    "fan10_lines": (50_000, 200_000),
    "fan100_lines": (5_000, 20_000),
    "lat_lines": (300, 500),
    "agent_mem_lines": (500_000, 2_000_000),
    "stall_lines": (100_000, 200_000),
    "ingest_lines": (50_000, 100_000),
    # the store scenario's tasks: issue 17's 1,000,000 and 10,000,000 lines (0: none)
    "query_rows": (1_000_000, 1_000_000),
    "big_rows": (0, 10_000_000),
    "ci_lines": (1_000_000, 1_000_000),  # passed to ci_step.py when it takes --lines
    # the fleet scenario: seconds of load per run
    "fleet_seconds": (10, 20),
}
SCENARIOS = ["e2e", "fanout", "latency", "memory", "ingest", "store", "ci", "features", "fleet", "floor"]


class Missing(Exception):
    """A figure cannot be measured here (not a failure of the thing measured)."""


def summarize(results: list[dict[str, Any]], lines: int) -> dict[str, Any]:
    counting = [r for r in results if not r.get("stalled")]
    counts = [r["count"] for r in counting]
    firsts = [r["t_first"] for r in counting if r.get("t_first")]
    lasts = [r["t_last"] for r in counting if r.get("t_last")]
    total = sum(counts)
    first = min(firsts) / 1e9 if firsts else None
    last = max(lasts) / 1e9 if lasts else None
    dups = sum(r.get("dups", 0) for r in counting)
    gaps = sum(r.get("gaps", 0) for r in counting)
    problem = check_delivery(counts, lines, dups, gaps)
    errors = {r["error"] for r in counting if r.get("error")}
    if errors:
        problem = ((problem + "; ") if problem else "") + "; ".join(sorted(errors))[:300]
    lat = [x for r in counting for x in r.get("lat_us", [])]
    return {
        "rate": rate(total, first, last),
        "problem": problem,
        "lat_us": lat,
        "received": total,
        "last": last,
    }


def query_paths(rows: int) -> list[tuple[str, str]]:
    """The REST requests of targets.QUERIES (the same ids), on a task of `rows` lines."""
    return [
        ("after_seq", f"/logs?afterSeq={rows // 2}&size=100"),
        ("level", "/logs?level=ERROR&size=100"),
        ("source", "/logs?source=stderr&size=100"),
        ("stats", "/logs/stats"),
        ("q", "/logs?q=needle&size=100"),
    ]


def delivery(res: dict[str, Any]) -> dict[str, str]:
    """The delivery check of the reps that ran (none when no rep ran)."""
    return {"delivery": res.get("problem") or "ok"} if res.get("reps") else {}


def missing_reason(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    return a.get("error") or b.get("error") or None


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300] if not isinstance(e, Missing) else str(e)


def tail(path: Path, n: int = 300) -> str:
    try:
        return path.read_text(errors="replace")[-n:].replace("\n", " | ")
    except OSError:
        return "(no log)"


def which_bin(name: str, bindir: Path) -> str:
    cand = bindir / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found next to {PY} nor on PATH: install the project first")
    return found


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or "?"
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def ensure_websocketd() -> str | None:
    """Install Debian's websocketd when missing; None when it is there, else why not."""
    apt = shutil.which("apt-get")
    if not apt:
        return "no websocketd and no apt-get to install it"
    try:
        r = subprocess.run(
            [apt, "install", "-y", "websocketd"], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get install websocketd failed: {e}"
    if r.returncode != 0 or not shutil.which("websocketd"):
        return f"apt-get install websocketd failed (rc {r.returncode}): {r.stderr.strip()[-200:]}"
    return None


def websocketd_version(path: str | None) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "websocketd"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{path} (Debian {out})" if out else str(path)
    except (OSError, subprocess.TimeoutExpired):
        return str(path)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def psql(dsn: str, sql: str) -> None:
    r = subprocess.run(
        ["psql", dsn, "-v", "ON_ERROR_STOP=1", "-qc", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise RuntimeError(f"psql: {r.stderr.strip()[:200]}")
