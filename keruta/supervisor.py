"""Restart an actor that fails with a recoverable error, with backoff, up to a limit."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import trio

from keruta.backoff import Backoff

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


Recoverable = tuple[type[BaseException], ...] | Callable[[BaseException], bool]


def is_recoverable(exc: BaseException, recoverable: Recoverable) -> bool:
    """True if `exc`, or every leaf of an exception group, is recoverable:
    an instance of one of the `recoverable` types, or one the `recoverable`
    predicate accepts (for errors told apart by more than their type).

    Cancellation never is, so it always propagates.
    """
    accepts: Callable[[BaseException], bool]
    if isinstance(recoverable, tuple):
        types = recoverable
        accepts = lambda e: isinstance(e, types)  # noqa: E731
    else:
        accepts = recoverable

    if isinstance(exc, BaseExceptionGroup):
        match, rest = exc.split(lambda e: accepts(e) and not isinstance(e, trio.Cancelled))
        return match is not None and rest is None
    return accepts(exc) and not isinstance(exc, trio.Cancelled)


async def supervise(
    actor: Callable[[], Awaitable[None]],
    *,
    name: str,
    backoff: Backoff = Backoff(),
    max_restarts: int | None = 10,
    healthy_after: float = 30.0,
    recoverable: Recoverable = RECOVERABLE,
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
    rng = rng or random.Random()
    failures = 0
    while True:
        started = trio.current_time()
        try:
            await actor()
            return
        except BaseException as exc:
            if not is_recoverable(exc, recoverable):
                raise
            error = exc
        if trio.current_time() - started >= healthy_after:
            failures = 0
        failures += 1
        if max_restarts is not None and failures > max_restarts:
            log.error("%s: giving up after %d consecutive failures: %r", name, failures, error)
            raise GaveUp(name, failures, error) from error
        delay = backoff.delay(failures - 1, rng.random())
        log.warning(
            "%s failed (%d in a row): %s: %s; restarting in %.2f s",
            name,
            failures,
            type(error).__name__,
            error,
            delay,
        )
        if on_restart is not None:
            on_restart(failures, error, delay)
        del error  # don't keep the traceback (and its frames) alive while sleeping
        await trio.sleep(delay)
