import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keruta.backoff import Backoff


def test_without_jitter_grows_by_factor_then_caps() -> None:
    b = Backoff(initial=1.0, factor=2.0, cap=30.0, jitter=0.0)
    assert [b.delay(i, 0.5) for i in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_first_delay_is_about_initial() -> None:
    b = Backoff(initial=0.5, jitter=0.2)
    assert b.delay(0, 0.0) == pytest.approx(0.4)
    assert b.delay(0, 0.5) == pytest.approx(0.5)
    assert b.delay(0, 0.999999) == pytest.approx(0.6, abs=1e-5)


def test_huge_attempt_does_not_overflow() -> None:
    b = Backoff()
    assert b.delay(10_000, 0.0) == pytest.approx(30 * 0.8)
    assert b.delay(10**9, 0.99) <= 30.0


def test_defaults_match_the_contract() -> None:
    b = Backoff()
    assert (b.initial, b.factor, b.cap, b.jitter) == (1.0, 2.0, 30.0, 0.2)


@pytest.mark.parametrize(
    "kwargs", [{"initial": -1}, {"factor": 0.5}, {"cap": -1}, {"jitter": 1.5}, {"jitter": -0.1}]
)
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_negative_attempt_is_refused() -> None:
    with pytest.raises(ValueError):
        Backoff().delay(-1, 0.5)


@given(
    initial=st.floats(0.001, 10),
    factor=st.floats(1, 4),
    cap=st.floats(0.001, 100),
    jitter=st.floats(0, 1),
    attempt=st.integers(0, 2000),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_delay_stays_within_jitter_bounds_and_cap(
    initial: float, factor: float, cap: float, jitter: float, attempt: int, rand: float
) -> None:
    b = Backoff(initial=initial, factor=factor, cap=cap, jitter=jitter)
    base = b.base(attempt)
    d = b.delay(attempt, rand)
    assert 0 <= d <= cap
    assert base * (1 - jitter) - 1e-9 <= d <= base * (1 + jitter) + 1e-9
    assert base == min(cap, base) and base <= cap


@given(rand=st.floats(0, 1, exclude_max=True), attempt=st.integers(0, 60))
def test_base_never_shrinks(rand: float, attempt: int) -> None:
    b = Backoff()
    assert b.base(attempt + 1) >= b.base(attempt)


def test_delays_are_reproducible_and_capped() -> None:
    b = Backoff()
    rng, rng2 = random.Random(7), random.Random(7)
    first = [b.delay(n, rng.random()) for n in range(50)]
    again = [b.delay(n, rng2.random()) for n in range(50)]
    assert first == again
    assert all(d <= 30.0 for d in first)
    assert 0.8 <= first[0] <= 1.2
    assert all(24.0 <= d <= 30.0 for d in first[10:])


def test_capped_at_bounds_every_wait_and_keeps_the_rest() -> None:
    backoff = Backoff(initial=0.5, factor=2.0, cap=30.0, jitter=0.3)
    assert backoff.capped_at(4.0) == Backoff(initial=0.5, factor=2.0, cap=4.0, jitter=0.3)
    # A bound below the first wait lowers that too: no wait is longer than it.
    short = backoff.capped_at(0.2)
    assert short.initial == 0.2 and short.cap == 0.2
    assert all(short.delay(n, r) <= 0.2 for n in range(10) for r in (0.0, 0.5, 0.999))
