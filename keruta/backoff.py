"""Exponential backoff with jitter, as arithmetic only (no clock, no sleeping)."""

from __future__ import annotations

import attrs


@attrs.frozen
class Backoff:
    """Delay before retry number `attempt` (0-based): `initial * factor**attempt`,
    capped at `cap`, spread by +/- `jitter` (a fraction) so that many clients
    cut off together do not come back together. The result never exceeds `cap`.
    """

    initial: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    factor: float = attrs.field(default=2.0, validator=attrs.validators.ge(1))
    cap: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    jitter: float = attrs.field(default=0.2, validator=[attrs.validators.ge(0), attrs.validators.le(1)])

    def base(self, attempt: int) -> float:
        """The delay for `attempt` before jitter."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        try:
            grown = self.initial * self.factor**attempt
        except OverflowError:
            return self.cap
        return min(self.cap, grown)

    def capped_at(self, longest: float) -> Backoff:
        """This backoff waiting at most `longest` (a --reconnect-max or
        --store-retry-max): the cap, and the first wait if it was longer."""
        return attrs.evolve(self, initial=min(self.initial, longest), cap=longest)

    def delay(self, attempt: int, rand: float) -> float:
        """`rand` in [0, 1) comes from the caller so this stays a pure function."""
        spread = 1.0 + self.jitter * (2.0 * rand - 1.0)
        return max(0.0, min(self.cap, self.base(attempt) * spread))
