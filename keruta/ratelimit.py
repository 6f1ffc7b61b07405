"""Token-bucket rate limiting: the arithmetic in `TokenBucket`, the waiting in `RateLimiter`.

Shaping, not policing: `take` reserves tokens even when they are not there yet
and says how long to wait, so callers queue behind one another in order and no
request is ever dropped. `try_take` is the refusing variant for REST (429 with
Retry-After): it takes nothing unless the tokens are there now.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio


@attrs.define
class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; starts full.

    `tokens` goes negative while reservations wait: the debt is what queued
    callers have been promised. `now` is any monotonic clock in seconds.
    """

    rate: float = attrs.field(validator=attrs.validators.gt(0))
    burst: float = attrs.field(validator=attrs.validators.gt(0))
    tokens: float = attrs.field(default=attrs.Factory(lambda self: self.burst, takes_self=True))
    _last: float | None = attrs.field(default=None, alias="last")

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now

    def take(self, n: float, now: float) -> float:
        """Reserve `n` tokens; return the seconds to wait before using them (0.0: now).

        `n` may exceed `burst`: the caller just waits proportionally longer.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def try_take(self, n: float, now: float) -> float:
        """Take `n` tokens if they are there now and return 0.0; otherwise take
        nothing and return the seconds after which they will be (a Retry-After).

        A request larger than `burst` is allowed once the bucket is full and
        leaves it in debt, so it is never refused forever.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        self._refill(now)
        needed = min(n, self.burst)
        if self.tokens >= needed:
            self.tokens -= n
            return 0.0
        return (needed - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        """Holding `burst` tokens (none reserved): as good as a fresh bucket."""
        self._refill(now)
        return self.tokens >= self.burst

    def refund(self, n: float) -> None:
        """Give back tokens a caller reserved but will not use (e.g. it was cancelled)."""
        self.tokens = min(self.burst, self.tokens + n)


class RateLimiter:
    """Async front of a TokenBucket on trio's clock. `rate` None or 0: unlimited.

    `burst` defaults to one second's worth of tokens (at least 1).
    """

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.rate = rate if rate else None
        self._clock = clock
        self.bucket: TokenBucket | None = None
        if self.rate is not None:
            self.bucket = TokenBucket(self.rate, burst if burst else max(1.0, self.rate))

    @property
    def unlimited(self) -> bool:
        return self.bucket is None

    async def acquire(self, n: float = 1) -> None:
        """Wait until `n` tokens are ours. Callers are served in call order."""
        at = self.reserve(n)
        if at <= self._clock():
            return
        try:
            await trio.sleep_until(at)
        except BaseException:
            self.refund(n)
            raise

    def reserve(self, n: float = 1) -> float:
        """Reserve `n` tokens now; the clock time from which they are ours
        (a caller that will not wait for them gives them back with `refund`)."""
        now = self._clock()
        if self.bucket is None:
            return now
        return now + self.bucket.take(n, now)

    def refund(self, n: float) -> None:
        """Give back reserved tokens that will not be used."""
        if self.bucket is not None:
            self.bucket.refund(n)

    def is_full(self) -> bool:
        """Idle long enough that a fresh limiter would behave the same."""
        return self.bucket is None or self.bucket.full(self._clock())

    def retry_after(self, n: float = 1) -> float:
        """0.0: allowed now and the tokens are taken; otherwise seconds to wait, nothing taken."""
        if self.bucket is None:
            return 0.0
        return self.bucket.try_take(n, self._clock())
