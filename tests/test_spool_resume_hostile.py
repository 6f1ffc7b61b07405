"""Hostile tests of a spool continued by a later run of the same task id
(agent/spool/spool.py Spool.resume, Spool._load; agent/spool/segment.py
recover(end_seq)): a run that finished but was not delivered, then more runs,
kills at various moments, damaged final states, flush racing a run.

Real agent processes, a real in-process hub (SQLite), real sockets. Every
test checks what the hub stored over REST: every line of every run once, in
order, and the task's final state is the last run's.
"""

from __future__ import annotations

import signal
from pathlib import Path

import orjson
import pytest
import trio

from tests import hubclient
from tests.agentclient import agent, joined_lines, run_args
from tests.test_spool_hostile import (
    PATIENCE,
    assert_clear,
    dead_hub,
    flush,
    py,
    run_to_end,
    spool_offline,
    stored,
    task_state,
)

sqlite_hub_factory = hubclient.sqlite_hub_factory
pytestmark = pytest.mark.slow


@pytest.fixture
async def hub(sqlite_hub_factory: hubclient.InProcessHubFactory) -> hubclient.InProcessHub:
    return await sqlite_hub_factory.astart()


def printing(tag: str, n: int, exit_code: int = 0, pause: float = 0.0) -> tuple[list[str], list[str]]:
    """A command printing `tag NNNN` 1..n (then sleeping `pause`, then exiting with `exit_code`)."""
    lines = [f"{tag} {i:04d}" for i in range(1, n + 1)]
    text = "".join(line + "\n" for line in lines)
    code = f"import os, sys, time\nos.write(1, {text.encode()!r})\ntime.sleep({pause})\nsys.exit({exit_code})\n"
    return py(code), lines


def final_of(spool: Path, task_id: str) -> object:
    return orjson.loads((spool / task_id / "task.json").read_bytes()).get("final")


async def test_three_runs_offline_then_one_flush(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """Three runs of one task id with the hub down (exits 0, 3, 5), then one
    flush: every line of every run once, in order, and the last run's end."""
    spool = tmp_path / "spool"
    expected: list[str] = []
    for tag, n, code in (("one", 300, 0), ("two", 200, 3), ("three", 100, 5)):
        cmd, lines = printing(tag, n, code)
        ran = await spool_offline(spool, "thrice-1", cmd)
        assert ran.code == code, ran.err
        expected += lines
        final = final_of(spool, "thrice-1")
        assert isinstance(final, dict) and final["exitCode"] == code and final["lastSeq"] == len(expected), final
    f = await flush(spool, hub.url)
    assert f.code == 0, f.err
    assert_clear(f.err)
    records = await stored(hub, "thrice-1")
    assert [r["seq"] for r in records] == list(range(1, len(expected) + 1))
    assert joined_lines(records, "stdout") == expected
    state = await task_state(hub, "thrice-1")
    assert state is not None and (state["state"], state["exitCode"]) == ("failed", 5), state
    assert not (spool / "thrice-1").exists()


@pytest.mark.parametrize("moment", ["at-once", "after-its-final"])
async def test_a_second_run_sigkilled_at_various_moments(
    hub: hubclient.InProcessHub, tmp_path: Path, moment: str
) -> None:
    """The second run of a finished, undelivered task id is SIGKILLed at once
    (maybe before it resumed the spool) or after its command ended and its
    own final state was saved (still waiting for the hub): flush delivers each
    line once, and the task's end is never the first run's."""
    spool = tmp_path / "spool"
    cmd, first = printing("first", 400, 0)
    await spool_offline(spool, "killed-2", cmd)
    second_cmd, second = printing("second", 150, 7)
    args = run_args(dead_hub(), "killed-2", spool, "--quiet", "--drain-timeout", "60", "--reconnect-max", "0.5") + second_cmd
    async with agent(args) as a:
        if moment == "after-its-final":
            with trio.fail_after(PATIENCE):
                while True:
                    final = final_of(spool, "killed-2")
                    if isinstance(final, dict) and final.get("exitCode") == 7:
                        break
                    await trio.sleep(0.02)
        a.signal(signal.SIGKILL)
        assert await a.wait() == -signal.SIGKILL
    f = await flush(spool, hub.url)
    assert f.code == 0, f.err
    assert_clear(f.err)
    records = await stored(hub, "killed-2")
    lines = joined_lines(records, "stdout")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1)), "each seq once"
    # The first run's lines all; the second's a prefix of them (all, once its final was saved).
    assert lines[:400] == first
    assert lines[400:] == second[: len(lines) - 400]
    state = await task_state(hub, "killed-2")
    assert state is not None
    if moment == "after-its-final":
        assert lines[400:] == second
        assert (state["state"], state["exitCode"]) == ("failed", 7), state
    elif len(lines) > 400:
        # The second run had begun: its end is unknown, not the first run's success.
        assert (state["state"], state.get("exitCode")) == ("failed", None), state
    else:
        # Killed before it touched the spool: the first run's end stands.
        assert state["state"] in ("succeeded", "failed"), state


async def test_a_damaged_final_state_then_a_second_run(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """The first run's final state is garbage (lastSeq not a number): the
    second run continues the spool anyway and flush delivers every line of
    both runs once, with the second run's end."""
    spool = tmp_path / "spool"
    cmd, first = printing("first", 300, 0)
    await spool_offline(spool, "damaged-final", cmd)
    path = spool / "damaged-final" / "task.json"
    meta = orjson.loads(path.read_bytes())
    meta["final"]["lastSeq"] = "three hundred"
    path.write_bytes(orjson.dumps(meta))
    second_cmd, second = printing("second", 100, 2)
    ran = await spool_offline(spool, "damaged-final", second_cmd)
    assert ran.code == 2, ran.err
    f = await flush(spool, hub.url)
    assert f.code == 0, f.err
    assert_clear(f.err)
    records = await stored(hub, "damaged-final")
    assert [r["seq"] for r in records] == list(range(1, 401))
    assert joined_lines(records, "stdout") == first + second
    state = await task_state(hub, "damaged-final")
    assert state is not None and (state["state"], state["exitCode"]) == ("failed", 2), state


async def test_a_final_state_left_behind_by_a_second_run_cuts_that_run_off(
    hub: hubclient.InProcessHub, tmp_path: Path
) -> None:
    """Records past a final state's lastSeq are not its run's: a spool whose
    second run appended rows 301..500 while task.json still holds the first
    run's final state (lastSeq 300: as an agent without `resume`, or a lost
    task.json write, would leave it) is flushed as the first run alone:
    1..300 and its success, the cut named on stderr."""
    spool = tmp_path / "spool"
    cmd, first = printing("first", 300, 0)
    await spool_offline(spool, "cut-after", cmd)
    task_json = (spool / "cut-after" / "task.json").read_bytes()
    second_cmd, _ = printing("second", 200, 9)
    await spool_offline(spool, "cut-after", second_cmd)
    (spool / "cut-after" / "task.json").write_bytes(task_json)
    f = await flush(spool, hub.url)
    assert f.code == 0, f.err
    assert_clear(f.err)
    assert "written after the run ended" in f.err, f.err
    records = await stored(hub, "cut-after")
    assert [r["seq"] for r in records] == list(range(1, 301))
    assert joined_lines(records, "stdout") == first
    state = await task_state(hub, "cut-after")
    assert state is not None and (state["state"], state["exitCode"]) == ("succeeded", 0), state


async def test_flush_while_a_second_run_runs_leaves_it_to_its_agent(
    hub: hubclient.InProcessHub, tmp_path: Path
) -> None:
    """A plain flush while the second run of a finished, undelivered task id
    runs (holding the spool's lock) neither delivers the first run's end nor
    loses lines; once the second run ends, a flush delivers both runs once."""
    spool = tmp_path / "spool"
    cmd, first = printing("first", 300, 0)
    await spool_offline(spool, "locked-2", cmd)
    second_cmd, second = printing("second", 100, 4, pause=3.0)
    args = run_args(dead_hub(), "locked-2", spool, "--drain-timeout", "0", "--reconnect-max", "0.5") + second_cmd
    async with agent(args) as a:
        with trio.fail_after(PATIENCE):
            while final_of(spool, "locked-2") is not None:  # resumed
                await trio.sleep(0.02)
        await a.wait_for_output(b"second 0100")
        plain = await flush(spool, hub.url, "--task-id", "locked-2")
        assert plain.code == 0, plain.err
        assert_clear(plain.err)
        assert "still running" in plain.err, plain.err
        state = await task_state(hub, "locked-2")
        assert state is None or state["state"] not in ("succeeded", "failed"), state
        assert await a.wait(PATIENCE) == 4
    f = await flush(spool, hub.url)
    assert f.code == 0, f.err
    assert_clear(f.err)
    records = await stored(hub, "locked-2")
    assert [r["seq"] for r in records] == list(range(1, 401))
    assert joined_lines(records, "stdout") == first + second
    state = await task_state(hub, "locked-2")
    assert state is not None and (state["state"], state["exitCode"]) == ("failed", 4), state


async def test_run_no_wait_twice_offline_then_flush(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """`run --no-wait` twice for one task id with the hub down, then a flush
    (waiting for any background delivery): both runs' lines once, the second's end."""
    spool = tmp_path / "spool"
    expected: list[str] = []
    for tag, code in (("first", 0), ("second", 6)):
        cmd, lines = printing(tag, 200, code)
        ran = await run_to_end(
            run_args(dead_hub(), "nowait-2", spool, "--quiet", "--no-wait", "--drain-timeout", "0", "--reconnect-max", "0.5")
            + cmd
        )
        assert_clear(ran.err)
        assert ran.code == code, ran.err
        expected += lines
    f = await flush(spool, hub.url, "--wait", timeout=30)
    assert f.code == 0, f.err
    assert_clear(f.err)
    records = await stored(hub, "nowait-2")
    assert [r["seq"] for r in records] == list(range(1, len(expected) + 1))
    assert joined_lines(records, "stdout") == expected
    state = await task_state(hub, "nowait-2")
    assert state is not None and (state["state"], state["exitCode"]) == ("failed", 6), state
