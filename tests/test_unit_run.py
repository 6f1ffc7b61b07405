"""agent/run.py's timed parts on the autojump clock: the pipe grace period
after the command exits, the drain timeout and what cuts it short."""

from __future__ import annotations

import signal
from pathlib import Path

import trio
import trio.testing

from agent.pipeline import spool_sync
from agent.pipeline.delivery import drain
from agent.pipeline.signals import SignalRouter
from agent.pipeline.uplink import Uplink, UplinkSettings
from agent.run import PIPE_GRACE, PIPE_GRACE_LIMIT, PipeGrace
from agent.spool.spool import Spool


async def test_pipe_grace_cuts_quiet_pipes_grace_seconds_after_exit(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as captures:
        grace = PipeGrace(captures.cancel_scope)
        captures.start_soon(trio.sleep_forever)  # a pipe something else holds open
        await trio.sleep(100)  # the command runs: no deadline while it does
        exited = trio.current_time()
        grace.exited()
    assert captures.cancel_scope.cancelled_caught
    assert trio.current_time() - exited == PIPE_GRACE


async def test_pipe_grace_counts_from_the_last_read(autojump_clock: trio.testing.MockClock) -> None:
    reads_until = 0.0

    async def pipe(grace: PipeGrace) -> None:
        nonlocal reads_until
        # Reads after the exit, each within the grace of the one before.
        for _ in range(5):
            await trio.sleep(PIPE_GRACE * 0.9)
            grace.read()
        reads_until = trio.current_time()
        await trio.sleep_forever()

    async with trio.open_nursery() as captures:
        grace = PipeGrace(captures.cancel_scope)
        grace.exited()
        captures.start_soon(pipe, grace)
    assert captures.cancel_scope.cancelled_caught
    assert trio.current_time() - reads_until == PIPE_GRACE


async def test_pipe_grace_ends_pipes_that_never_go_quiet(autojump_clock: trio.testing.MockClock) -> None:
    # Something the command left running writes on and on: it does not hold the agent for ever.
    async def chatty(grace: PipeGrace) -> None:
        while True:
            await trio.sleep(PIPE_GRACE / 10)
            grace.read()

    async with trio.open_nursery() as captures:
        grace = PipeGrace(captures.cancel_scope)
        grace.exited()
        exited = trio.current_time()
        captures.start_soon(chatty, grace)
    assert captures.cancel_scope.cancelled_caught
    assert trio.current_time() - exited == PIPE_GRACE_LIMIT * PIPE_GRACE


async def test_pipe_grace_reads_before_the_exit_set_no_deadline(autojump_clock: trio.testing.MockClock) -> None:
    with trio.CancelScope() as scope:
        grace = PipeGrace(scope)
        grace.read()
        assert scope.deadline == float("inf")
        await trio.sleep(PIPE_GRACE * 10)
    assert not scope.cancelled_caught


async def test_pipes_that_end_in_time_are_not_cut(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as captures:
        grace = PipeGrace(captures.cancel_scope)
        grace.exited()
        captures.start_soon(trio.sleep, PIPE_GRACE / 2)
    assert not captures.cancel_scope.cancelled_caught


def _uplink(tmp_path: Path) -> Uplink:
    spool = Spool.open(tmp_path, "drain", hub_url="http://127.0.0.1:9")
    return Uplink(spool, UplinkSettings(hub_url="http://127.0.0.1:9", task_id="drain"))


async def test_drain_waits_at_most_its_timeout(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    uplink = _uplink(tmp_path)
    start = trio.current_time()
    await drain(uplink, SignalRouter(), 30.0)
    assert trio.current_time() - start == 30.0
    uplink.spool.close()


async def test_drain_ends_when_the_uplink_stops(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    uplink = _uplink(tmp_path)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, uplink, SignalRouter(), 30.0)
        await trio.sleep(2.0)
        uplink.stopped.set()
    assert trio.current_time() - start == 2.0
    uplink.spool.close()


async def test_a_signal_after_the_exit_cuts_the_drain_short(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    uplink = _uplink(tmp_path)
    router = SignalRouter()
    send, receive = trio.open_memory_channel[int](1)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(router.run, receive)
        nursery.start_soon(drain, uplink, router, 30.0)
        await trio.sleep(3.0)
        await send.send(signal.SIGTERM)
        await trio.sleep(0)  # let the router pass it on
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert router.after_exit == 1
    assert trio.current_time() - start == 3.0
    uplink.spool.close()


async def test_a_signal_before_the_drain_starts_skips_it(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    uplink = _uplink(tmp_path)
    router = SignalRouter()
    router.after_exit = 1
    start = trio.current_time()
    await drain(uplink, router, 30.0)
    assert trio.current_time() == start
    uplink.spool.close()


def test_sync_interval_is_a_second() -> None:
    # The spool syncer's period is what bounds how much a power cut can cost.
    assert spool_sync.SYNC_INTERVAL == 1.0
