"""Exponential backoff with jitter, as arithmetic only (no clock, no sleeping)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import attrs


def _non_negative(_inst: object, attr: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value!r}")


def _fraction(_inst: object, attr: attrs.Attribute, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{attr.name} must be within [0, 1], got {value!r}")


def _growth(_inst: object, attr: attrs.Attribute, value: float) -> None:
    if not value >= 1:
        raise ValueError(f"{attr.name} must be >= 1, got {value!r}")


@attrs.frozen
class Backoff:
    """Delay before retry number `attempt` (0-based): `initial * factor**attempt`,
    capped at `cap`, spread by +/- `jitter` (a fraction) so that many clients
    cut off together do not come back together. The result never exceeds `cap`.
    """

    initial: float = attrs.field(default=1.0, validator=_non_negative)
    factor: float = attrs.field(default=2.0, validator=_growth)
    cap: float = attrs.field(default=30.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.2, validator=_fraction)

    def base(self, attempt: int) -> float:
        """The delay for `attempt` before jitter."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        try:
            grown = self.initial * self.factor**attempt
        except OverflowError:
            return self.cap
        return min(self.cap, grown)

    def delay(self, attempt: int, rand: float) -> float:
        """`rand` in [0, 1) comes from the caller so this stays a pure function."""
        spread = 1.0 + self.jitter * (2.0 * rand - 1.0)
        return max(0.0, min(self.cap, self.base(attempt) * spread))

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The endless sequence of delays for attempts 0, 1, 2, ..."""
        rng = rng or random.Random()
        attempt = 0
        while True:
            yield self.delay(attempt, rng.random())
            attempt += 1
