import logging
import random

import pytest
import trio

from keruta.backoff import Backoff
from keruta.supervisor import GaveUp, supervise

NO_JITTER = Backoff(initial=1.0, factor=2.0, cap=30.0, jitter=0.0)


class Actor:
    """Fails with the given errors in turn, then returns; records start times."""

    def __init__(self, errors: list[BaseException | None], run_for: float = 0.0) -> None:
        self.errors = list(errors)
        self.run_for = run_for
        self.starts: list[float] = []

    async def __call__(self) -> None:
        self.starts.append(trio.current_time())
        await trio.sleep(self.run_for)
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error


async def test_returns_when_the_actor_returns(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor([])
    await supervise(actor, name="quiet")
    assert len(actor.starts) == 1


async def test_restarts_with_backoff_delays(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor([ConnectionError("a"), OSError("b"), trio.BrokenResourceError("c"), None])
    seen: list[tuple[int, str, float]] = []
    await supervise(
        actor,
        name="flaky",
        backoff=NO_JITTER,
        on_restart=lambda n, e, d: seen.append((n, str(e), d)),
    )
    gaps = [b - a for a, b in zip(actor.starts, actor.starts[1:], strict=False)]
    assert gaps == pytest.approx([1.0, 2.0, 4.0])
    assert seen == [(1, "a", 1.0), (2, "b", 2.0), (3, "c", 4.0)]


async def test_delays_use_jitter_from_rng(autojump_clock: trio.abc.Clock) -> None:
    backoff = Backoff()
    actor = Actor([OSError()] * 5)
    await supervise(actor, name="j", backoff=backoff, rng=random.Random(3))
    expected_rng = random.Random(3)
    expected = [backoff.delay(i, expected_rng.random()) for i in range(5)]
    gaps = [b - a for a, b in zip(actor.starts, actor.starts[1:], strict=False)]
    assert gaps == pytest.approx(expected)


async def test_gives_up_after_max_restarts(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    actor = Actor([ConnectionError(f"refused {i}") for i in range(10)])
    with caplog.at_level(logging.WARNING, logger="keruta.supervisor"):
        with pytest.raises(GaveUp) as info:
            await supervise(actor, name="uplink", backoff=NO_JITTER, max_restarts=3)
    assert len(actor.starts) == 4  # the first run and three restarts
    err = info.value
    assert err.name == "uplink" and err.attempts == 4
    assert isinstance(err.last_error, ConnectionError)
    assert err.__cause__ is err.last_error
    assert "uplink" in str(err) and "refused 3" in str(err) and "ConnectionError" in str(err)
    assert sum("restarting" in r.getMessage() for r in caplog.records) == 3
    assert any("giving up" in r.getMessage() for r in caplog.records)


async def test_max_restarts_zero_gives_up_on_first_failure(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor([OSError("x")])
    with pytest.raises(GaveUp):
        await supervise(actor, name="once", max_restarts=0)
    assert len(actor.starts) == 1


async def test_none_means_never_give_up(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor([OSError()] * 100)
    await supervise(actor, name="stubborn", backoff=NO_JITTER, max_restarts=None)
    assert len(actor.starts) == 101


async def test_a_healthy_run_resets_the_count(autojump_clock: trio.abc.Clock) -> None:
    # Every run lasts 10 s; healthy_after=10 so every failure counts as the first.
    actor = Actor([OSError()] * 20, run_for=10.0)
    await supervise(actor, name="healthy", backoff=NO_JITTER, max_restarts=2, healthy_after=10.0)
    assert len(actor.starts) == 21
    gaps = [b - a for a, b in zip(actor.starts, actor.starts[1:], strict=False)]
    assert gaps == pytest.approx([11.0] * 20)  # run 10 s + the first delay, every time


async def test_short_runs_do_not_reset_the_count(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor([OSError()] * 20, run_for=9.0)
    with pytest.raises(GaveUp):
        await supervise(
            actor, name="unhealthy", backoff=NO_JITTER, max_restarts=2, healthy_after=10.0
        )
    assert len(actor.starts) == 3


async def test_non_recoverable_propagates_at_once(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor([OSError(), ValueError("bug")])
    with pytest.raises(ValueError, match="bug"):
        await supervise(actor, name="buggy", backoff=NO_JITTER)
    assert len(actor.starts) == 2


async def test_custom_recoverable(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor([KeyError("k"), None])
    await supervise(actor, name="custom", recoverable=(KeyError,))
    assert len(actor.starts) == 2
    with pytest.raises(OSError):
        await supervise(Actor([OSError()]), name="custom", recoverable=(KeyError,))


async def test_exception_group_of_recoverables_is_recoverable(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def failing_nursery() -> None:
        async def fail(e: Exception) -> None:
            raise e

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail, ConnectionError("x"))
            nursery.start_soon(fail, OSError("y"))

    runs = 0

    async def actor() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            await failing_nursery()

    await supervise(actor, name="group", backoff=NO_JITTER)
    assert runs == 3


async def test_exception_group_with_a_bug_propagates(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor([ExceptionGroup("mixed", [OSError("net"), RuntimeError("bug")])])
    with pytest.raises(ExceptionGroup) as info:
        await supervise(actor, name="mixed")
    assert len(actor.starts) == 1
    assert info.group_contains(RuntimeError)


async def test_gave_up_keeps_the_group(autojump_clock: trio.abc.Clock) -> None:
    group = ExceptionGroup("net", [OSError("down")])
    with pytest.raises(GaveUp) as info:
        await supervise(Actor([group]), name="g", max_restarts=0)
    assert info.value.last_error is group


async def test_cancellation_propagates(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor([OSError()] * 100, run_for=1.0)
    with trio.move_on_after(5) as scope:
        await supervise(actor, name="cancelled", backoff=NO_JITTER, max_restarts=None)
    assert scope.cancelled_caught
    assert trio.current_time() == pytest.approx(5)

    async def runs_forever() -> None:
        await trio.sleep_forever()

    with trio.move_on_after(1) as scope:
        await supervise(runs_forever, name="forever", recoverable=(BaseException,))
    assert scope.cancelled_caught

