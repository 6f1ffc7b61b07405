"""`keruta-agent run`'s start (agent/launch.py): COMMAND runs, and its pipes
are read, before the agent has loaded its pipeline. What it writes meanwhile
is spooled and mirrored like the rest; a task already running here is still
refused before COMMAND starts. Real agent processes, hub down."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from agent.spool.lock import lock_directory, task_directory
from agent.spool.spool import Spool
from tests.agentclient import agent, check_records, expected_streams, program, run_args

pytestmark = pytest.mark.slow

NO_HUB = "http://127.0.0.1:1"


def spooled_records(root: Path, task_id: str) -> list[dict[str, object]]:
    spool = Spool.open(root, task_id, create=False)
    try:
        return [orjson.loads(payload) for _, payload in spool.read(1, 1 << 30, 1 << 40)]
    finally:
        spool.close()


async def test_what_command_writes_while_the_agent_starts_is_spooled_once_in_order(tmp_path: Path) -> None:
    # ~40,000 writes at full speed, cut mid-line, on both pipes: most of them
    # while the agent still imports, read by the early readers.
    n, seed = 20_000, 7
    args = run_args(NO_HUB, "early", tmp_path, "--drain-timeout", "0")
    async with agent(args + program(n, seed, exit_code=3)) as a:
        assert await a.wait() == 3
    expected = expected_streams(n, seed)
    assert bytes(a.stdout) == expected["stdout"]
    records = spooled_records(tmp_path, "early")
    check_records(records, expected)


async def test_a_task_already_running_here_does_not_start_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    held = lock_directory(task_directory(tmp_path / "spool", "busy"))
    try:
        args = run_args(NO_HUB, "busy", tmp_path / "spool", "--drain-timeout", "0")
        async with agent(args + ["touch", str(marker)]) as a:
            assert await a.wait() == 1
    finally:
        os.close(held)
    assert "already running here" in a.stderr_text
    assert not marker.exists()
