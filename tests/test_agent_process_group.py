"""`keruta-agent run` and what COMMAND starts: a SIGTERM or SIGINT the agent
receives reaches COMMAND's whole process group, and what is still running
--kill-grace seconds later is SIGKILLed, so nothing COMMAND started outlives
the agent. Real agent processes, real shells, the process table read from /proc."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from tests.agentclient import AgentProcess, agent, group_members, run_args

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc"),
]

# No hub: delivery is not the point here, and the agent does not wait for one.
NO_HUB = "http://127.0.0.1:1"


def args(tmp_path: Path, *extra: str) -> list[str]:
    return run_args(NO_HUB, "pgroup", tmp_path / "spool", "--drain-timeout", "0", *extra)


async def command_group(a: AgentProcess, groups: list[int], *names: str) -> int:
    """COMMAND's process group (COMMAND prints `$$` first), once `names` run in it."""
    with trio.fail_after(30):
        while b"\n" not in a.stdout:
            await trio.sleep(0.02)
    pgid = int(bytes(a.stdout).split(b"\n")[0].strip())
    groups.append(pgid)
    with trio.fail_after(30):
        while not all(any(m.startswith(f"{name} ") for m in group_members(pgid)) for name in names):
            await trio.sleep(0.02)
    return pgid


async def test_sigterm_reaches_what_the_command_started(tmp_path: Path, groups: list[int]) -> None:
    async with agent(args(tmp_path) + ["sh", "-c", "echo $$; sleep 30 & wait"]) as a:
        pgid = await command_group(a, groups, "sh", "sleep")
        a.signal(signal.SIGTERM)
        assert await a.wait() == 128 + signal.SIGTERM
        assert group_members(pgid) == []
    assert "SIGKILL" not in a.stderr_text


async def test_a_sigterm_while_the_agent_still_starts_reaches_the_group(
    tmp_path: Path, groups: list[int]
) -> None:
    """COMMAND starts before the agent has loaded its pipeline (agent/launch.py):
    a SIGTERM in between -- here as soon as COMMAND has written its group to a
    file, usually long before the agent could mirror a line -- is held and
    passed on once the pipeline runs. (Later, it is passed on as any.)"""
    where = tmp_path / "pgid"
    cmd = ["sh", "-c", f"echo $$ > {where}.tmp && mv {where}.tmp {where}; sleep 30 & wait"]
    async with agent(args(tmp_path) + cmd) as a:
        with trio.fail_after(30):
            while not where.exists():
                await trio.sleep(0.001)
        pgid = int(where.read_text())
        groups.append(pgid)
        a.signal(signal.SIGTERM)
        assert await a.wait() == 128 + signal.SIGTERM
        assert group_members(pgid) == []
    assert "SIGKILL" not in a.stderr_text


async def test_a_group_that_ignores_sigterm_is_killed_after_the_grace(
    tmp_path: Path, groups: list[int]
) -> None:
    cmd = ["sh", "-c", "echo $$; trap '' TERM; sleep 30 & wait"]
    async with agent(args(tmp_path, "--kill-grace", "0.5") + cmd) as a:
        pgid = await command_group(a, groups, "sh", "sleep")
        a.signal(signal.SIGTERM)
        # COMMAND died of the SIGKILL: that is its exit status, and the agent's.
        assert await a.wait() == 128 + signal.SIGKILL
        assert group_members(pgid) == []
    assert "SIGKILL" in a.stderr_text


async def test_sigint_reaches_the_whole_group(tmp_path: Path, groups: list[int]) -> None:
    # A shell waiting for a foreground pipeline lets the pipeline decide what a
    # SIGINT means: sent to the shell alone, it changes nothing (until the
    # pipeline ends, long after the test's patience).
    async with agent(args(tmp_path) + ["sh", "-c", "echo $$; sleep 600 | cat"]) as a:
        pgid = await command_group(a, groups, "sh", "sleep", "cat")
        a.signal(signal.SIGINT)
        assert await a.wait() == 128 + signal.SIGINT
        assert group_members(pgid) == []


async def test_pty_command_has_the_terminal_and_gets_the_signals(
    tmp_path: Path, groups: list[int]
) -> None:
    cmd = ["sh", "-c", "echo $$; echo on the pty > /dev/tty; sleep 30 & wait"]
    async with agent(args(tmp_path, "--pty") + cmd) as a:
        pgid = await command_group(a, groups, "sh", "sleep")
        a.signal(signal.SIGTERM)
        assert await a.wait() == 128 + signal.SIGTERM
        assert group_members(pgid) == []
    # /dev/tty is COMMAND's controlling terminal: the pty, whose output is captured.
    assert b"on the pty\n" in bytes(a.stdout)


async def test_pty_hangs_up_what_the_command_leaves_running(tmp_path: Path, groups: list[int]) -> None:
    """COMMAND leads the pty's session: when it exits the kernel hangs up its
    group, as a terminal does (without --pty the pipe grace leaves it alone)."""
    cmd = ["sh", "-c", "echo $$; sleep 30 & echo done"]
    async with agent(args(tmp_path, "--pty") + cmd) as a:
        assert await a.wait() == 0
    pgid = int(bytes(a.stdout).split(b"\n")[0].strip())
    groups.append(pgid)
    with trio.fail_after(10):  # well before the sleep would end
        while group_members(pgid):
            await trio.sleep(0.02)
    assert "holds its output open" not in a.stderr_text
