"""`run --no-wait` and `flush --wait` (issue 17): a job's steps exit when their
commands do, delivery goes on in the background, and one `flush --wait` at the
job's end waits for it and says what was not stored. Real agent processes, a
real hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import hubclient
from tests.agentclient import agent, check_records, expected_streams, free_port, program, run_args

sqlite_hub_factory = hubclient.sqlite_hub_factory
pytestmark = pytest.mark.slow


@pytest.fixture
async def hub(sqlite_hub_factory: hubclient.InProcessHubFactory) -> hubclient.InProcessHub:
    return await sqlite_hub_factory.astart()


async def test_agent_run_no_wait_exits_and_flush_wait_sees_every_line_stored(
    hub: hubclient.InProcessHub, tmp_path: Path
) -> None:
    n = 20_000
    spool = tmp_path / "spool"
    # A rate limit keeps most records unacknowledged when the command exits,
    # so the background delivery has them to send.
    args = run_args(hub.url, "nowait-1", spool, "--no-wait", "--rate-limit", "1000", "--quiet")
    async with agent(args + program(n, seed=41, exit_code=4)) as a:
        assert await a.wait() == 4, "the command's exit code, as always"
    assert "delivered in the background" in a.stderr_text
    async with agent(["flush", "--wait", "--spool-dir", str(spool), "--hub", hub.url]) as f:
        assert await f.wait() == 0
    check_records(await hubclient.stored(hub, "nowait-1"), expected_streams(n, seed=41))
    state = await hubclient.task_state(hub, "nowait-1")
    assert (state["state"], state["exitCode"]) == ("failed", 4)
    assert not (spool / "nowait-1").exists(), "delivered: nothing left in the spool"


async def test_agent_flush_wait_says_which_tasks_were_not_stored(
    hub: hubclient.InProcessHub, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    down = f"http://127.0.0.1:{free_port()}"
    for task in ("down-a", "down-b"):
        args = run_args(down, task, spool, "--no-wait", "--reconnect-max", "0.2")
        async with agent(args + ["sh", "-c", f"echo one {task}; echo two {task}"]) as a:
            assert await a.wait() == 0
    # The hub is still down at the job's end: flush --wait waits for the
    # background deliveries, tries itself, and names what is not stored.
    flush = ["flush", "--wait", "--spool-dir", str(spool), "--reconnect-max", "0.2", "--timeout", "30"]
    async with agent([*flush, "--hub", down]) as f:
        assert await f.wait() == 1
    assert "NOT delivered: 2 of 2 tasks (down-a, down-b)" in f.stderr_text
    assert (spool / "down-a").exists() and (spool / "down-b").exists()
    # Once the hub is there, the same call delivers both.
    async with agent([*flush, "--hub", hub.url]) as f:
        assert await f.wait() == 0
    for task in ("down-a", "down-b"):
        assert [r["message"] for r in await hubclient.stored(hub, task)] == [f"one {task}", f"two {task}"]
        assert (await hubclient.task_state(hub, task))["state"] == "succeeded"
