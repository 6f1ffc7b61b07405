"""Fault tests: every line stored exactly once through hub crashes, a hub that
is late, connections cut mid-frame, and the agent being signalled or killed."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import trio

from tests import hubclient
from tests.agentclient import (
    PATIENCE,
    agent,
    check_records,
    expected_streams,
    free_port,
    joined_lines,
    lines_of,
    program,
    run_args,
)

# Hub crashes and cut connections run on both stores; what concerns only the
# agent (its signals, its spool) on SQLite.
hub, hub_factory = hubclient.hub, hubclient.hub_factory
hub_process, hub_process_factory = hubclient.hub_process, hubclient.hub_process_factory  # fixtures
pytestmark = pytest.mark.slow


async def wait_stored(hub: hubclient.TestHub, task_id: str, at_least: int) -> None:
    """Until the hub holds `at_least` records of the task (a hang guard, not a timing check)."""
    with trio.fail_after(PATIENCE):
        async with hub.http() as client:
            while True:
                resp = await client.get(f"/api/v1/tasks/{task_id}")
                if resp.status_code == 200 and resp.json()["totalLogs"] >= at_least:
                    return
                await trio.sleep(0.05)


def assert_prefix_of_expected(records: list[dict], expected: dict[str, bytes]) -> None:
    """What was stored is what the command wrote up to some point: no gap, no duplicate."""
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    for source, data in expected.items():
        got = joined_lines(records, source)
        want = lines_of(data)
        assert got[:-1] == want[: len(got) - 1]
        if got:
            # The last line may have been cut where the command stopped writing.
            assert want[len(got) - 1].startswith(got[-1])


async def test_hub_killed_mid_stream_and_restarted(hub_process: hubclient.TestHub, tmp_path: Path) -> None:
    hub = hub_process  # SIGKILL: a process
    n = 3000
    cmd = program(n, seed=21, pause_every=100, pause=0.05)
    # Reconnecting every 0.2 s at most, the agent finds the restarted hub
    # without waiting out a long backoff.
    args = run_args(hub.url, "crash-1", tmp_path / "spool", "--quiet", "--reconnect-max", "0.2")
    async with agent(args + cmd) as a:
        await wait_stored(hub, "crash-1", 500)
        hub.kill()
        # The agent meets the dead hub before it is back.
        with trio.fail_after(PATIENCE):
            while b"; retrying in" not in a.stderr:
                await trio.sleep(0.02)
        await hub.arestart()
        assert await a.wait() == 0
    check_records(await hubclient.stored(hub, "crash-1"), expected_streams(n, seed=21))
    assert (await hubclient.task_state(hub, "crash-1"))["state"] == "succeeded"
    assert not (tmp_path / "spool" / "crash-1").exists()


async def test_hub_not_running_at_start_and_coming_up_later(
    hub_factory: hubclient.InProcessHubFactory, tmp_path: Path
) -> None:
    n = 2000
    port = free_port()
    want = expected_streams(n, seed=22)
    cmd = program(n, seed=22, pause_every=200, pause=0.02)
    async with agent(run_args(f"http://127.0.0.1:{port}", "late-1", tmp_path / "spool") + cmd) as a:
        # The command runs to its end with no hub at all: nothing waits for it.
        with trio.fail_after(PATIENCE):
            while bytes(a.stdout) != want["stdout"]:
                await trio.sleep(0.05)
            # The hub comes up only once the agent has found it down: on a
            # loaded machine its first attempt can come after the command's end.
            while "in the spool; retrying" not in a.stderr_text:
                await trio.sleep(0.05)
        hub = hub_factory.make()
        hub.port = port
        await hub.astart()
        assert await a.wait() == 0
    check_records(await hubclient.stored(hub, "late-1"), want)


class CuttingProxy:
    """A TCP proxy that cuts each of the first `cuts` connections after the
    client has sent `budgets[i]` bytes, in the middle of whatever frame that is."""

    def __init__(self, upstream_port: int, budgets: list[int]) -> None:
        self.upstream_port = upstream_port
        self.budgets = list(budgets)
        self.connections = 0
        self.cut = 0
        self.port = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        budget = self.budgets.pop(0) if self.budgets else None
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        async with trio.open_nursery() as nursery:

            async def pump(
                src: trio.SocketStream, dst: trio.SocketStream, limit: int | None
            ) -> None:
                sent = 0
                try:
                    while data := await src.receive_some(65536):
                        if limit is not None and sent + len(data) >= limit:
                            await dst.send_all(data[: limit - sent])
                            self.cut += 1
                            break
                        await dst.send_all(data)
                        sent += len(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, upstream, budget)
            nursery.start_soon(pump, upstream, client, None)
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(upstream)


async def test_connection_cut_mid_frame_by_a_proxy(hub: hubclient.TestHub, tmp_path: Path) -> None:
    n = 3000
    cmd = program(n, seed=23, pause_every=50, pause=0.02)
    proxy = CuttingProxy(hub.port, budgets=[30_000, 70_011, 150_007])
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        args = run_args(
            f"http://127.0.0.1:{proxy.port}",
            "cut-1",
            tmp_path / "spool",
            "--quiet",
            "--batch-size",
            "100",
            # Each cut is followed by a reconnect within 0.2 s, not a backoff growing to 2 s.
            "--reconnect-max",
            "0.2",
        )
        async with agent(args + cmd) as a:
            assert await a.wait() == 0
        nursery.cancel_scope.cancel()
    assert proxy.cut == 3 and proxy.connections >= 4
    check_records(await hubclient.stored(hub, "cut-1"), expected_streams(n, seed=23))


async def test_agent_sigterm_is_passed_to_the_command(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    """The command dies of the forwarded SIGTERM; everything it wrote is stored."""
    n = 100_000
    cmd = program(n, seed=24, pause_every=100, pause=0.02)
    async with agent(run_args(hub.url, "term-1", tmp_path / "spool", "--quiet") + cmd) as a:
        await wait_stored(hub, "term-1", 300)
        a.signal(signal.SIGTERM)
        assert await a.wait() == 128 + signal.SIGTERM
    records = await hubclient.stored(hub, "term-1")
    assert_prefix_of_expected(records, expected_streams(n, seed=24))
    state = await hubclient.task_state(hub, "term-1")
    assert (state["state"], state["exitCode"]) == ("failed", 143)


async def test_agent_sigterm_with_a_command_that_handles_it(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    code = (
        "import signal, sys, time\n"
        "def bye(signum, frame):\n"
        "    print('got signal', signum, flush=True)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    async with agent(
        run_args(hub.url, "term-2", tmp_path / "spool") + [sys.executable, "-c", code]
    ) as a:
        # The whole line: under PYTHONUNBUFFERED, print writes "ready" and
        # "\n" apart, and a signal between them makes one line of two.
        await a.wait_for_output(b"ready\n")
        a.signal(signal.SIGTERM)
        assert await a.wait() == 0
    assert [r["message"] for r in await hubclient.stored(hub, "term-2")] == [
        "ready",
        f"got signal {int(signal.SIGTERM)}",
    ]
    assert (await hubclient.task_state(hub, "term-2"))["state"] == "succeeded"


async def test_agent_sigkilled_then_flush_delivers_the_rest(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    n = 100_000
    spool = tmp_path / "spool"
    want = expected_streams(n, seed=25)
    cmd = program(n, seed=25, pause_every=100, pause=0.01)
    # A slow link (rate limit) keeps records unacknowledged in the spool.
    args = run_args(hub.url, "kill-1", spool, "--rate-limit", "300", "--batch-size", "50")
    async with agent(args + cmd) as a:
        await wait_stored(hub, "kill-1", 100)
        await a.wait_for_output(b"line 1000 ")
        a.signal(signal.SIGKILL)
        assert await a.wait() == -signal.SIGKILL
    mirrored = bytes(a.stdout)
    assert (spool / "kill-1").exists()
    before = len(await hubclient.stored(hub, "kill-1"))
    async with agent(["flush", "--spool-dir", str(spool), "--hub", hub.url]) as f:
        assert await f.wait() == 0
    records = await hubclient.stored(hub, "kill-1")
    assert len(records) > before
    notice = records[-1]
    assert (
        notice["source"] == "agent" and "stopped before the command finished" in notice["message"]
    )
    assert_prefix_of_expected(records[:-1], want)
    # Every line the agent had mirrored was spooled first, so it is stored.
    complete = mirrored[: mirrored.rfind(b"\n") + 1]
    assert joined_lines(records, "stdout")[: len(lines_of(complete))] == lines_of(complete)
    state = await hubclient.task_state(hub, "kill-1")
    assert (state["state"], state["exitCode"]) == ("failed", None)
    assert not (spool / "kill-1").exists()
    # Nothing left: flushing again is a no-op.
    async with agent(["flush", "--spool-dir", str(spool)]) as f:
        assert await f.wait() == 0


async def test_flush_with_the_hub_down_fails_and_keeps_the_spool(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    port = free_port()
    args = run_args(f"http://127.0.0.1:{port}", "down-1", spool, "--drain-timeout", "0.5")
    async with agent(args + ["sh", "-c", "echo one; echo two"]) as a:
        assert await a.wait() == 0
    assert "keruta-agent flush" in a.stderr_text
    # Its four attempts 0.2 s apart at most, not growing to 2 s.
    async with agent(["flush", "--spool-dir", str(spool), "--reconnect-max", "0.2"]) as f:
        assert await f.wait() == 1
    assert "could not deliver" in f.stderr_text
    assert (spool / "down-1").exists()


async def test_flush_after_spool_corruption_fills_the_hole(
    hub_factory: hubclient.HubFactory, tmp_path: Path
) -> None:
    """Records damaged on disk are skipped with a warning and each replaced by an
    explicit "lost" record, so that the hub's ack watermark can pass them. The
    agent spools a read's lines in run frames (up to 256 records, one checksum):
    a damaged frame loses the records it holds, whether it is in the middle of
    the spool or at its end (the final state remembers the last seq)."""
    spool = tmp_path / "spool"
    port = free_port()
    args = run_args(f"http://127.0.0.1:{port}", "rot-1", spool, "--drain-timeout", "0.3", "--quiet")
    async with agent(args + ["sh", "-c", "for i in $(seq 1 50); do echo line $i; done"]) as a:
        assert await a.wait() == 0
    (segment,) = spool.glob("rot-1/*.seg")
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x55
    segment.write_bytes(bytes(data))
    hub = hub_factory.make()
    hub.port = port
    await hub.astart()
    async with agent(["flush", "--spool-dir", str(spool)]) as f:
        assert await f.wait() == 0
    assert "corrupt" in f.stderr_text
    records = await hubclient.stored(hub, "rot-1")
    assert [r["seq"] for r in records] == list(range(1, 51))
    lost = [r["seq"] for r in records if r["source"] == "agent"]
    assert lost and all("lost" in records[s - 1]["message"] for s in lost)
    assert lost == list(range(lost[0], lost[-1] + 1)), "one frame's records: consecutive"
    kept = [r["message"] for r in records if r["source"] == "stdout"]
    assert kept == [f"line {i}" for i in range(1, 51) if i not in lost]
    assert (await hubclient.task_state(hub, "rot-1"))["state"] == "succeeded"
