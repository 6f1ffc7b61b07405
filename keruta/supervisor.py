"""Restart an actor that fails with a recoverable error, with backoff, up to a limit."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import trio

from keruta.backoff import Backoff
from keruta.retry import Failures, Retryable, retry

log = logging.getLogger("keruta.supervisor")

RECOVERABLE: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and TimeoutError
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    EOFError,
)


class GaveUp(Exception):
    """An actor kept failing; raised `from` its last error."""

    def __init__(self, name: str, attempts: int, last_error: BaseException) -> None:
        super().__init__(
            f"{name} failed {attempts} times in a row; giving up. "
            f"Last error: {type(last_error).__name__}: {last_error}"
        )
        self.name = name
        self.attempts = attempts
        self.last_error = last_error


async def supervise(
    actor: Callable[[], Awaitable[None]],
    *,
    name: str,
    backoff: Backoff = Backoff(),
    max_restarts: int | None = 10,
    healthy_after: float = 30.0,
    recoverable: Retryable = RECOVERABLE,
    on_restart: Callable[[int, BaseException, float], None] | None = None,
    rng: random.Random | None = None,
) -> None:
    """Run `actor` until it returns; restart it after recoverable errors.

    The n-th consecutive failure (n from 1) waits `backoff.delay(n - 1, ...)`
    before the restart. A run that lasted `healthy_after` seconds resets the
    count. After more than `max_restarts` consecutive failures (None: never
    give up) raise `GaveUp`. Anything not recoverable propagates at once.
    `on_restart(failures, error, delay)` is called before each wait.
    """
    failures = Failures()

    async def run() -> None:
        started = trio.current_time()
        try:
            await actor()
        except BaseException:
            if trio.current_time() - started >= healthy_after:
                failures.reset()
            raise

    def failed(count: int, error: BaseException, delay: float) -> None:
        if max_restarts is not None and count > max_restarts:
            log.error("%s: giving up after %d consecutive failures: %r", name, count, error)
            raise GaveUp(name, count, error) from error
        log.warning(
            "%s failed (%d in a row): %s: %s; restarting in %.2f s",
            name,
            count,
            type(error).__name__,
            error,
            delay,
        )
        if on_restart is not None:
            on_restart(count, error, delay)

    await retry(
        run, backoff=backoff, retryable=recoverable, on_failure=failed, failures=failures, rng=rng
    )
