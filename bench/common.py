"""Pure helpers of the benchmark suite (statistics, figures, the table) and the
process plumbing every scenario shares (start in its own process group, kill
the group, peak RSS from /proc).

The pure half is what tests/test_bench_helpers.py runs, without processes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

# --- statistics --------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be in 0..100")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None (the mean of the middle two when even)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def rate(count: int, first: float | None, last: float | None) -> float | None:
    """Lines per second between the first and the last receive: (count - 1) / span,
    because the first line's arrival starts the clock."""
    if count < 2 or first is None or last is None or last <= first:
        return None
    return (count - 1) / (last - first)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# --- figures -----------------------------------------------------------------


def figure(
    name: str,
    value: float | None,
    unit: str,
    parameters: dict[str, Any] | None = None,
    *,
    missing: str | None = None,
    date: str = "",
    commit: str = "",
    extra: dict[str, Any] | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """One measured figure; value None means missing, and `missing` says why.
    `key` names it for the targets table (bench/targets.py)."""
    fig: dict[str, Any] = {
        "name": name,
        "value": value,
        "unit": unit,
        "parameters": dict(parameters or {}),
        "date": date,
        "commit": commit,
    }
    if value is None:
        fig["missing"] = missing or "not measured"
    if extra:
        fig["extra"] = extra
    if key:
        fig["key"] = key
    return fig


def json_line(fig: dict[str, Any]) -> str:
    return json.dumps(fig, sort_keys=False, separators=(",", ":"))


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "missing"
    if unit in ("lines/s", "records/s", "rows/s"):
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}x"
    if unit in ("MiB", "MB/s", "bytes/line"):
        return f"{value:.1f}"
    if unit == "s":
        return f"{value:.2f}"
    if unit == "ms":
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    return f"{value:g}"


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def format_table(figs: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of figures: name | value | unit | parameters / why missing."""
    rows = [("figure", "value", "unit", "parameters / notes")]
    for f in figs:
        note = _params_text(f.get("parameters") or {})
        if f.get("value") is None:
            note = f"MISSING: {f.get('missing', '?')}" + (f"; {note}" if note else "")
        rows.append((f["name"], format_value(f.get("value"), f["unit"]), f["unit"], note))
    out = [
        "| " + " | ".join(rows[0]) + " |",
        "|---|---:|---|---|",
    ]
    out.extend("| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows[1:])
    return "\n".join(out)


def check_delivery(counts: Sequence[int], expect: int, dups: int = 0, gaps: int = 0) -> str | None:
    """None when every viewer got `expect` lines with no duplicate or gap;
    otherwise what went wrong, for the figure's notes."""
    problems = []
    short = [c for c in counts if c < expect]
    if short:
        problems.append(
            f"{len(short)}/{len(counts)} viewers short, lost {sum(expect - c for c in short)} lines"
        )
    if dups:
        problems.append(f"{dups} duplicate records")
    if gaps:
        problems.append(f"{gaps} seqs missing (gaps)")
    return "; ".join(problems) or None


# --- processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], log_path: str, **kw: Any) -> subprocess.Popen[bytes]:
    """Start cmd in its own session (process group), output to log_path."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw
        )
    finally:
        log.close()


def stop(
    proc: subprocess.Popen[bytes] | None, grace: float = 5.0, sig: int = signal.SIGTERM
) -> None:
    """Stop a process we started and its whole group: sig, then SIGKILL after grace."""
    if proc is None:
        return
    for s in (sig, signal.SIGKILL):
        try:
            os.killpg(proc.pid, s)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # the group may outlive its leader (e.g. the agent's child): make sure
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of a live process, MiB (None once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def write_json(path: str, value: Any) -> None:
    """A result file, replaced whole: a reader never sees half of one."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a live process so far, seconds (None once it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime: fields 14 and 15 of proc(5), 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_with_rusage(proc: subprocess.Popen[bytes], timeout: float) -> float | None:
    """Wait for `proc` (up to `timeout`) and return its CPU seconds, its
    children it waited for included (wait4's rusage); None if it did not end."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_healthz(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            if http_get(port, "/healthz", 1.0)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def wait_file(path: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path):
            return True
        if proc is not None and proc.poll() is not None:
            return os.path.exists(path)
        time.sleep(0.02)
    return False


def clean_env() -> dict[str, str]:
    """Environment for hub and agent: no KERUTA_* fallbacks (a stray token would
    lock viewers out) and no *TOKEN*/*SECRET*/*PASSWORD*/*KEY* variables (the
    agent would mask their values in every line, a cost that depends on who runs it)."""
    bad = ("TOKEN", "SECRET", "PASSWORD", "KEY")
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KERUTA_") and not any(b in k.upper() for b in bad)
    }
