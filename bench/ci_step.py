"""A CI step under `keruta-agent run`: a command printing LINES lines of 80 bytes,
bare, under the agent with the hub down, and with a hub up (SQLite).

    python bench/ci_step.py [--lines 1000000] [--reps 3]

Prints one JSON object: {"bare_s", "hub_down_s", "hub_up_s", "hub_up_no_wait_s",
"reader_floor_s", "lines", ...}: median wall seconds from starting the process
to its exit, with stdout to /dev/null. `reader_floor_s`: the command as the
agent runs it (unbuffered), read by a bare Python loop with the agent's pause
after a short read (READER_FLOOR): the least any CPython reader of that pipe
holds it back. `hub_up_no_wait_s` is `run --no-wait` (exits when the
command has, leaving delivery to a background deliverer) followed at the job's
end by `flush --wait`, counted to the flush's exit: `hub_up_no_wait_run_s` is
the step alone. `*_cpu_s` are the agent's (and the command's) CPU seconds, which a
loaded machine inflates less than the wall time. `hub_up_stored` is what the
hub says it stored of the last hub-up run (`totalLogs`). No figure is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import clean_env, free_port, http_get, median, start, stop, wait_healthz  # noqa: E402
from tools import PY, which_bin  # noqa: E402


def command(lines: int) -> list[str]:
    return [PY, "-c", f'import sys; [sys.stdout.write("x"*79+"\\n") for _ in range({lines})]']


def timed(cmd: list[str], env: dict[str, str], timeout: float = 600.0) -> tuple[float, float, int]:
    """Wall and CPU seconds (children: the agent and the command) of `cmd`, and its exit code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    with open(os.devnull, "wb") as null, tempfile.TemporaryFile() as err:
        proc = subprocess.run(cmd, stdout=null, stderr=err, env=env, timeout=timeout, check=False)
        wall = time.monotonic() - began
        if proc.returncode != 0:
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace")[-2000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


# The floor under "hub down": the command as the agent runs it (unbuffered:
# agent/process.py sets PYTHONUNBUFFERED, so a Python command writes each
# line as it prints it), its output read by a bare Python loop that pauses as
# the agent's readers do after a short read (agent/earlyread.py PAUSE), on a
# pipe as large as the agent's, and keeps nothing. What any reader of this pipe in CPython costs the command.
READER_FLOOR = """
import fcntl, os, subprocess, sys, time
from agent.earlyread import PAUSE, READ_BYTES
from agent.process import PIPE_BYTES
r, w = os.pipe()
fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
child = subprocess.Popen(sys.argv[1:], stdout=w)
os.close(w)
little = min(PIPE_BYTES, READ_BYTES) // 2
while True:
    data = os.read(r, READ_BYTES)
    if not data:
        break
    if len(data) < little:
        time.sleep(PAUSE)
sys.exit(child.wait())
"""


def stored(port: int, task: str) -> int | None:
    status, body = http_get(port, f"/api/v1/tasks/{task}")
    if status != 200:
        return None
    return int(json.loads(body)["totalLogs"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--agent", help="the keruta-agent to measure (default: this checkout's)")
    parser.add_argument("--skip-no-wait", action="store_true", help="an agent without run --no-wait")
    args = parser.parse_args(argv)
    bindir = Path(PY).parent
    agent = args.agent or which_bin("keruta-agent", bindir)
    hub_bin = which_bin("keruta-hub", bindir)
    env = clean_env()
    root = Path(tempfile.mkdtemp(prefix="keruta-ci-step-"))
    cmd = command(args.lines)
    out: dict[str, Any] = {"lines": args.lines, "reps": args.reps, "load": os.getloadavg()[0]}
    walls: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}

    def record(name: str, wall: float, cpu: float) -> None:
        walls.setdefault(name, []).append(wall)
        cpus.setdefault(name, []).append(cpu)

    hub = None
    try:
        for rep in range(args.reps):
            record("bare", *timed(cmd, env)[:2])
            record("reader_floor", *timed([PY, "-c", READER_FLOOR, *cmd], {**env, "PYTHONUNBUFFERED": "1"})[:2])
            # Nothing listens on a port just freed: the hub is down.
            spool = root / f"down-{rep}"
            run = [agent, "run", "--task-id", f"down-{rep}", "--hub", f"http://127.0.0.1:{free_port()}",
                   "--spool-dir", str(spool), "--drain-timeout", "0", "--", *cmd]
            record("hub_down", *timed(run, env)[:2])
            shutil.rmtree(spool, ignore_errors=True)

        port = free_port()
        hub = start([hub_bin, "--host", "127.0.0.1", "--port", str(port), "--db", f"sqlite:///{root}/hub.db"],
                    str(root / "hub.log"), env=env, cwd=root)
        if not wait_healthz(port, hub):
            raise RuntimeError(f"keruta-hub not healthy within 30 s (see {root}/hub.log)")
        hub_url = f"http://127.0.0.1:{port}"
        for rep in range(args.reps):
            task = f"up-{rep}-{secrets.token_hex(3)}"
            run = [agent, "run", "--task-id", task, "--hub", hub_url, "--spool-dir", str(root / "up"),
                   "--drain-timeout", "600", "--", *cmd]
            record("hub_up", *timed(run, env)[:2])
            out["hub_up_stored"] = stored(port, task)

            if args.skip_no_wait:
                continue
            task = f"nowait-{rep}-{secrets.token_hex(3)}"
            spool = str(root / "nowait")
            run = [agent, "run", "--no-wait", "--task-id", task, "--hub", hub_url, "--spool-dir", spool, "--", *cmd]
            wall_run, cpu_run, code = timed(run, env)
            flush = [agent, "flush", "--wait", "--hub", hub_url, "--spool-dir", spool, "--timeout", "600"]
            wall_flush, cpu_flush, _ = timed(flush, env)
            if code == 0:
                record("hub_up_no_wait_run", wall_run, cpu_run)
                record("hub_up_no_wait", wall_run + wall_flush, cpu_run + cpu_flush)
            out["hub_up_no_wait_stored"] = stored(port, task)
    finally:
        stop(hub)
        shutil.rmtree(root, ignore_errors=True)
    for name, values in walls.items():
        out[f"{name}_s"] = round(median(values) or 0.0, 3)
        out[f"{name}_cpu_s"] = round(median(cpus[name]) or 0.0, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
