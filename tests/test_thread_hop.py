"""hub/store/thread_hop.py: a store call in a worker thread, as
trio.to_thread.run_sync's default has it (real threads)."""

from __future__ import annotations

import threading

import pytest
import trio

from hub.store.thread_hop import run_in_thread


async def test_a_call_runs_in_another_thread_and_returns_its_value() -> None:
    assert await run_in_thread(lambda a, b: (a + b, threading.get_ident()), 2, 3) != (5, threading.get_ident())
    assert (await run_in_thread(lambda a, b: a + b, 2, 3)) == 5


async def test_a_call_raises_what_the_function_raised() -> None:
    def fails() -> None:
        raise ValueError("from the thread")

    with pytest.raises(ValueError, match="from the thread"):
        await run_in_thread(fails)


async def test_a_cancelled_call_runs_to_its_end_and_the_cancellation_comes_at_the_next_checkpoint() -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []
    outcomes: list[str] = []

    def transaction() -> str:
        started.set()
        release.wait(10)
        finished.append(True)
        return "committed"

    scope = trio.CancelScope()

    async def cancel_once_started() -> None:
        await trio.to_thread.run_sync(started.wait, 10)
        scope.cancel()
        await trio.sleep(0.05)  # the call is not abandoned meanwhile
        assert not finished
        release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_once_started)
        with scope:
            outcomes.append(await run_in_thread(transaction))
            await trio.lowlevel.checkpoint()
            pytest.fail("the cancellation was not delivered at the next checkpoint")
    assert scope.cancelled_caught and finished == [True] and outcomes == ["committed"]


async def test_an_already_cancelled_task_starts_no_call() -> None:
    ran: list[bool] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await run_in_thread(lambda: ran.append(True))
    assert scope.cancelled_caught and not ran
