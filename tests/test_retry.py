"""keruta.retry: the one retry loop, on the autojump clock."""

from __future__ import annotations

import random

import pytest
import trio

from keruta.backoff import Backoff
from keruta.retry import Failures, is_retryable, retry

NO_JITTER = Backoff(initial=1.0, factor=2.0, cap=5.0, jitter=0.0)


class Flaky:
    """Fails with `error` the first `fails` calls, then returns "done"."""

    def __init__(self, fails: int, error: BaseException = ConnectionError("down")) -> None:
        self.fails = fails
        self.error = error
        self.calls: list[float] = []

    async def __call__(self) -> str:
        self.calls.append(trio.current_time())
        if len(self.calls) <= self.fails:
            raise self.error
        return "done"


async def test_waits_the_backoff_between_tries_and_returns_the_result(autojump_clock: trio.testing.MockClock) -> None:
    op = Flaky(4)
    seen: list[tuple[int, float]] = []
    result = await retry(
        op, backoff=NO_JITTER, retryable=(OSError,), on_failure=lambda n, _e, d: seen.append((n, d))
    )
    assert result == "done"
    assert seen == [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0)]
    assert op.calls == [0.0, 1.0, 3.0, 7.0, 12.0]


async def test_an_error_not_retryable_propagates_at_once(autojump_clock: trio.testing.MockClock) -> None:
    op = Flaky(3, ValueError("bug"))
    with pytest.raises(ValueError, match="bug"):
        await retry(op, backoff=NO_JITTER, retryable=(OSError,))
    assert op.calls == [0.0]


async def test_gives_up_after_the_retries_with_the_last_error(autojump_clock: trio.testing.MockClock) -> None:
    op = Flaky(10)
    with pytest.raises(ConnectionError, match="down"):
        await retry(op, backoff=NO_JITTER, retryable=(OSError,), retries=2)
    assert len(op.calls) == 3
    # Enough retries: the result.
    assert await retry(Flaky(2), backoff=NO_JITTER, retryable=(OSError,), retries=2) == "done"


async def test_on_failure_may_stop_the_retries(autojump_clock: trio.testing.MockClock) -> None:
    class Stop(Exception):
        pass

    def stop_at_three(n: int, error: BaseException, _delay: float) -> None:
        if n == 3:
            raise Stop() from error

    op = Flaky(10)
    with pytest.raises(Stop):
        await retry(op, backoff=NO_JITTER, retryable=(OSError,), on_failure=stop_at_three)
    assert len(op.calls) == 3


async def test_a_reset_restarts_the_backoff(autojump_clock: trio.testing.MockClock) -> None:
    failures = Failures()
    delays: list[float] = []

    async def op() -> str:
        if len(delays) == 2:
            failures.reset()  # made progress (connected) before failing again
        if len(delays) < 4:
            raise ConnectionError("down")
        return "done"

    await retry(
        op, backoff=NO_JITTER, retryable=(OSError,), failures=failures,
        on_failure=lambda _n, _e, d: delays.append(d),
    )
    assert delays == [1.0, 2.0, 1.0, 2.0]


async def test_jitter_comes_from_the_given_rng(autojump_clock: trio.testing.MockClock) -> None:
    jittery = Backoff(initial=1.0, factor=2.0, cap=30.0, jitter=0.5)
    runs = []
    for _ in range(2):
        delays: list[float] = []
        await retry(
            Flaky(5), backoff=jittery, retryable=(OSError,), rng=random.Random(3),
            on_failure=lambda _n, _e, d, delays=delays: delays.append(d),  # type: ignore[misc]
        )
        runs.append(delays)
    assert runs[0] == runs[1]
    assert runs[0] != [1.0, 2.0, 4.0, 8.0, 16.0]


async def test_a_predicate_and_exception_groups(autojump_clock: trio.testing.MockClock) -> None:
    transient = lambda e: isinstance(e, OSError) and "transient" in str(e)  # noqa: E731
    assert is_retryable(OSError("transient"), transient)
    assert not is_retryable(OSError("permanent"), transient)
    group = ExceptionGroup("g", [OSError("transient"), OSError("transient too")])
    assert is_retryable(group, transient)
    assert not is_retryable(ExceptionGroup("g", [OSError("transient"), ValueError()]), (OSError,))
    assert await retry(Flaky(2, group), backoff=NO_JITTER, retryable=transient) == "done"


async def test_cancellation_is_never_retried(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def op() -> None:
        nonlocal calls
        calls += 1
        await trio.sleep_forever()

    with trio.move_on_after(1):
        await retry(op, backoff=NO_JITTER, retryable=lambda e: True)
    assert calls == 1
