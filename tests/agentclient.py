"""Running the real agent (`python -m agent ...`) as a child process in tests,
and checking what reached the hub against what the command wrote."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from keruta.levels import determine_level
from tests.support import python_m

# Hang guard only (never a performance assertion).
PATIENCE = 60.0

# A deterministic writer: `writes(n, seed)` is the exact list of os.write calls
# the child makes, so the test knows every byte the command wrote. Lines are
# cut at random points (part of a line now, the rest later), go to stdout or
# stderr at random, and carry levels the hub should detect.
PROGRAM = r"""
import os, random, sys, time

def writes(n, seed, width=120):
    r = random.Random(seed)
    out = []
    for i in range(n):
        fd = 1 if r.random() < 0.6 else 2
        word = r.choice(["", "ERROR ", "warning: ", "debug ", "Exception ", "ok "])
        line = f"{word}line {i} fd{fd} {'z' * r.randint(0, width)}\n".encode()
        cut = r.randint(0, len(line))
        out.append((fd, line[:cut]))
        out.append((fd, line[cut:]))
    return [(fd, b) for fd, b in out if b]

def main(n, seed, pause_every=0, pause=0.0):
    for k, (fd, chunk) in enumerate(writes(n, seed)):
        os.write(fd, chunk)
        if pause_every and k % pause_every == 0:
            time.sleep(pause)
"""


def program(
    n: int, seed: int, pause_every: int = 0, pause: float = 0.0, exit_code: int = 0
) -> list[str]:
    code = PROGRAM + f"\nmain({n}, {seed}, {pause_every}, {pause})\nsys.exit({exit_code})\n"
    return [sys.executable, "-c", code]


def expected_writes(n: int, seed: int) -> list[tuple[int, bytes]]:
    namespace: dict[str, Any] = {}
    exec(PROGRAM, namespace)
    return namespace["writes"](n, seed)


def expected_streams(n: int, seed: int) -> dict[str, bytes]:
    parts: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    for fd, chunk in expected_writes(n, seed):
        parts["stdout" if fd == 1 else "stderr"].append(chunk)
    return {source: b"".join(chunks) for source, chunks in parts.items()}


def lines_of(data: bytes) -> list[str]:
    if not data:
        return []
    parts = data.split(b"\n")
    lines = [(p[:-1] if p.endswith(b"\r") else p).decode("utf-8", "replace") for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1].decode("utf-8", "replace"))
    return lines


def group_members(pgid: int) -> list[str]:
    """The live (not zombie) processes of group `pgid`, as "name pid" (from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        state, _ppid, pgrp = stat[stat.rindex(b")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in (b"Z", b"X"):
            members.append(f"{name} {entry}")
    return sorted(members)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}
    env.update(extra)
    return env


class AgentProcess:
    """A running `python -m agent ...` child; stdout/stderr collected as bytes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.done = trio.Event()
        self._open = 2
        # Cleared: stop reading the child's stdout (its pipe fills and it blocks).
        self.reading = trio.Event()
        self.reading.set()

    async def _pump(self, stream: trio.abc.ReceiveStream, into: bytearray) -> None:
        async with stream:
            while True:
                if into is self.stdout:
                    await self.reading.wait()
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                into.extend(chunk)
        self._open -= 1
        if self._open == 0:
            self.done.set()

    async def wait(self, timeout: float = PATIENCE) -> int:
        with trio.fail_after(timeout):
            code = await self.process.wait()
            await self.done.wait()
        return code

    async def wait_for_output(self, needle: bytes, timeout: float = PATIENCE) -> None:
        with trio.fail_after(timeout):
            while needle not in self.stdout and needle not in self.stderr:
                await trio.sleep(0.02)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


@asynccontextmanager
async def agent(
    args: Sequence[str], env: dict[str, str] | None = None
) -> AsyncIterator[AgentProcess]:
    process = await trio.lowlevel.open_process(
        python_m("agent", *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env if env is not None else agent_env(),
    )
    assert process.stdout is not None and process.stderr is not None
    child = AgentProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child._pump, process.stdout, child.stdout)
            nursery.start_soon(child._pump, process.stderr, child.stderr)
            try:
                yield child
            finally:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
    finally:
        if child.stderr:
            # Shown by pytest only when the test fails.
            print(f"--- agent {' '.join(args[:6])} stderr ---\n{child.stderr_text[-5000:]}")


async def run_agent(
    args: Sequence[str], *, capture_stderr: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`python -m agent ARGS` to its end (trio.run_process, exit status not checked)."""
    return await trio.run_process(
        python_m("agent", *args), check=False, capture_stderr=capture_stderr,
        env=env if env is not None else agent_env(),
    )


def run_args(hub_url: str, task_id: str, spool: Path, *extra: str) -> list[str]:
    return ["run", "--hub", hub_url, "--task-id", task_id, "--spool-dir", str(spool), *extra, "--"]


def joined_lines(records: list[dict[str, Any]], source: str) -> list[str]:
    """A source's lines from stored records in seq order, partial pieces joined."""
    lines: list[str] = []
    current: list[str] = []
    for r in records:
        if r["source"] != source:
            continue
        current.append(r["message"])
        if not r.get("partial"):
            lines.append("".join(current))
            current = []
    if current:
        lines.append("".join(current))
    return lines


def check_records(records: list[dict[str, Any]], expected: dict[str, bytes]) -> None:
    """Every line stored once, in order, with the right source, lineNumber and level."""
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(1, len(records) + 1)), "seqs must be 1..n without gap or duplicate"
    for source, data in expected.items():
        want = lines_of(data)
        got = joined_lines(records, source)
        assert len(got) == len(want), f"{source}: {len(got)} lines stored, {len(want)} written"
        assert got == want
        line, piece_open = 0, False
        for r in records:
            if r["source"] != source:
                continue
            if not piece_open:
                line += 1
            assert r["lineNumber"] == line, "lineNumber counts lines per source; pieces share it"
            piece_open = bool(r.get("partial"))
        assert line == len(want)
    for r in records:
        if r["source"] in ("stdout", "stderr"):
            assert r["level"] == determine_level(r["message"])
            assert r["metadata"].get("processId")
