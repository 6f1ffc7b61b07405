"""agent/flush.py: what `keruta-agent flush` does with each spooled task --
nothing to do, already delivered, locked by a live agent, a hub it cannot
reach, and an unfinished task delivered as failed to a real (in-process) hub."""

from __future__ import annotations

from pathlib import Path

import trio

from agent.flush import FlushSettings, flush, flush_task
from agent.pipeline.recorder import Recorder
from agent.spool.spool import Spool
from tests import hubclient
from tests.agentclient import free_port
from tests.hubclient import fetch_all

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures


def said() -> tuple[list[str], object]:
    lines: list[str] = []
    return lines, lines.append


async def test_nothing_to_deliver(tmp_path: Path) -> None:
    lines, say = said()
    assert await flush(FlushSettings(tmp_path / "empty"), say=say) == 0  # type: ignore[arg-type]
    assert lines == [f"nothing to deliver in {tmp_path / 'empty'}"]


async def test_a_delivered_spool_is_removed_without_asking_a_hub(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "done", hub_url=f"http://127.0.0.1:{free_port()}")
    await spool.set_final("succeeded", 0)
    await spool.mark_final_delivered()
    spool.close()
    lines, say = said()
    assert await flush(FlushSettings(tmp_path), say=say) == 0  # type: ignore[arg-type]
    assert not (tmp_path / "done").exists()


async def test_a_spool_its_agent_holds_is_left_alone(tmp_path: Path) -> None:
    running = Spool.open(tmp_path, "busy", hub_url=f"http://127.0.0.1:{free_port()}")
    try:
        lines, say = said()
        assert await flush_task(FlushSettings(tmp_path), "busy", say)  # type: ignore[arg-type]
        assert any("still running" in line for line in lines), lines
        assert (tmp_path / "busy" / "task.json").exists()
    finally:
        running.close()


async def test_an_unreachable_hub_keeps_the_spool_and_fails(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "stuck", hub_url=f"http://127.0.0.1:{free_port()}")
    Recorder(spool, "stuck").write_agent("a line")
    await spool.set_final("succeeded", 0)
    spool.close()
    lines, say = said()
    with trio.fail_after(60):
        assert await flush(FlushSettings(tmp_path, retries=0), say=say) == 1  # type: ignore[arg-type]
    assert any("could not deliver" in line for line in lines), lines
    assert (tmp_path / "stuck" / "task.json").exists()


async def test_an_unfinished_task_is_delivered_as_failed(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "cut-short", hub_url="http://127.0.0.1:9")
    recorder = Recorder(spool, "cut-short")
    recorder.write_agent("first")
    recorder.write_agent("second")
    spool.close()
    lines, say = said()
    with trio.fail_after(60):
        # --hub wins over the hub the spool was recorded with.
        assert await flush(FlushSettings(tmp_path, hub_url=hub.url), say=say) == 0  # type: ignore[arg-type]
    assert not (tmp_path / "cut-short").exists()
    # Its two lines and the agent record saying the run was cut short.
    assert any("delivered 3 records" in line and "(failed)" in line for line in lines), lines
    async with hub.http() as client:
        messages = [r["message"] for r in await fetch_all(client, "cut-short")]
        state = (await client.get("/api/v1/tasks/cut-short")).json()
    assert messages[:2] == ["first", "second"]
    assert "stopped before the command finished" in messages[2]
    assert state["state"] == "failed" and state.get("exitCode") is None
