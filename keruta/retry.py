"""Try an operation again after the failures worth waiting out, with backoff.

The one retry loop of agent and hub: the hub opening its store, a store read
for a connection, the writer's commits, `tail`'s reconnects and `supervise`
all differ only in what is worth another try, how long to wait, and what to
say (or to give up) on the way.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from keruta.backoff import Backoff

T = TypeVar("T")

Retryable = tuple[type[BaseException], ...] | Callable[[BaseException], bool]
# (failures in a row counting this one, the error, the wait before the next try).
# It may raise to stop retrying: its exception replaces the error.
OnFailure = Callable[[int, BaseException, float], None]


def is_retryable(exc: BaseException, retryable: Retryable) -> bool:
    """True if `exc`, or every leaf of an exception group, is retryable: an
    instance of one of the `retryable` types, or one the `retryable`
    predicate accepts (for errors told apart by more than their type).

    Cancellation never is, so it always propagates.
    """
    accepts: Callable[[BaseException], bool]
    if isinstance(retryable, tuple):
        types = retryable
        accepts = lambda e: isinstance(e, types)  # noqa: E731
    else:
        accepts = retryable

    if isinstance(exc, BaseExceptionGroup):
        match, rest = exc.split(lambda e: accepts(e) and not isinstance(e, trio.Cancelled))
        return match is not None and rest is None
    return accepts(exc) and not isinstance(exc, trio.Cancelled)


@attrs.define
class Failures:
    """The count of failures in a row; an operation that made progress (it
    connected, it ran long enough) resets it so the next wait starts short."""

    count: int = 0

    def reset(self) -> None:
        self.count = 0


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff,
    retryable: Retryable,
    on_failure: OnFailure | None = None,
    retries: int | None = None,
    failures: Failures | None = None,
    rng: random.Random | None = None,
) -> T:
    """`await operation()` until it returns, and return what it returns.

    After the n-th retryable failure in a row (n from 1) wait
    `backoff.delay(n - 1, ...)` and try again; `on_failure(n, error, delay)`
    is called before the wait. After `retries` retries (None: never give up)
    the last error propagates, and so does any error that is not retryable.
    """
    if failures is None:
        failures = Failures()
    uniform = (rng or random).random
    while True:
        try:
            return await operation()
        except BaseException as exc:
            if not is_retryable(exc, retryable) or (retries is not None and failures.count >= retries):
                raise
            error = exc
        failures.count += 1
        delay = backoff.delay(failures.count - 1, uniform())
        if on_failure is not None:
            on_failure(failures.count, error, delay)
        del error  # don't keep the traceback (and its frames) alive while sleeping
        await trio.sleep(delay)
