import pytest
import trio

from keruta.ratelimit import RateLimiter, TokenBucket


def test_bucket_starts_full_and_then_shapes() -> None:
    b = TokenBucket(rate=10, burst=5)
    assert [b.take(1, 0.0) for _ in range(5)] == [0.0] * 5
    # The next callers queue, each 1/rate after the previous one.
    assert b.take(1, 0.0) == pytest.approx(0.1)
    assert b.take(1, 0.0) == pytest.approx(0.2)


def test_bucket_refills_but_never_beyond_burst() -> None:
    b = TokenBucket(rate=10, burst=5)
    b.take(5, 0.0)
    assert b.take(3, 0.3) == 0.0
    b2 = TokenBucket(rate=10, burst=5)
    assert b2.take(5, 100.0) == 0.0
    assert b2.take(1, 100.0) == pytest.approx(0.1)


def test_request_larger_than_burst_waits_proportionally() -> None:
    b = TokenBucket(rate=10, burst=5)
    assert b.take(25, 0.0) == pytest.approx(2.0)
    # ... and whoever comes next queues behind it.
    assert b.take(1, 0.0) == pytest.approx(2.1)


def test_clock_going_backwards_adds_nothing() -> None:
    b = TokenBucket(rate=10, burst=5)
    b.take(5, 10.0)
    assert b.take(1, 9.0) == pytest.approx(0.1)


def test_try_take_refuses_without_reserving() -> None:
    b = TokenBucket(rate=2, burst=2)
    assert b.try_take(1, 0.0) == 0.0
    assert b.try_take(1, 0.0) == 0.0
    assert b.try_take(1, 0.0) == pytest.approx(0.5)
    assert b.try_take(1, 0.0) == pytest.approx(0.5)  # the refusal took nothing
    assert b.try_take(2, 0.25) == pytest.approx(0.75)
    assert b.try_take(1, 0.5) == 0.0


def test_try_take_larger_than_burst_is_allowed_when_full() -> None:
    b = TokenBucket(rate=1, burst=3)
    assert b.try_take(10, 0.0) == 0.0
    # It left the bucket in debt: 7 behind, so one token needs 8 seconds.
    assert b.try_take(1, 0.0) == pytest.approx(8.0)


@pytest.mark.parametrize("rate,burst", [(0, 1), (-1, 1), (1, 0)])
def test_bucket_settings_must_be_positive(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_negative_n_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(1, 1).take(-1, 0.0)


async def test_limiter_holds_its_rate_over_simulated_minutes(
    autojump_clock: trio.abc.Clock,
) -> None:
    limiter = RateLimiter(100, burst=50)
    start = trio.current_time()
    count = 0
    with trio.move_on_after(300):
        while True:
            await limiter.acquire()
            count += 1
    assert trio.current_time() - start == pytest.approx(300)
    # burst at once, then exactly `rate` a second
    assert 100 * 300 + 50 - 1 <= count <= 100 * 300 + 50 + 1


async def test_limiter_never_drops_and_serves_in_order(autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(10, burst=1)
    served: list[tuple[int, float]] = []

    async def caller(i: int) -> None:
        await limiter.acquire()
        served.append((i, trio.current_time()))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(caller, i)
            await trio.sleep(0)  # start them in order
    assert [i for i, _ in served] == list(range(50))
    assert served[-1][1] - start == pytest.approx(4.9)


async def test_batches_bigger_than_burst_wait_longer(autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(100, burst=100)
    start = trio.current_time()
    await limiter.acquire(100)
    assert trio.current_time() == start
    await limiter.acquire(500)
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_cancelled_acquire_gives_its_tokens_back(autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(1, burst=1)
    await limiter.acquire()
    with trio.move_on_after(0.5):
        await limiter.acquire(10)
    start = trio.current_time()
    await limiter.acquire()
    assert trio.current_time() - start == pytest.approx(0.5)


async def test_retry_after(autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(2, burst=2)
    assert limiter.retry_after() == 0.0
    assert limiter.retry_after() == 0.0
    assert limiter.retry_after() == pytest.approx(0.5)
    await trio.sleep(0.5)
    assert limiter.retry_after() == 0.0
    assert limiter.retry_after() == pytest.approx(0.5)


@pytest.mark.parametrize("rate", [None, 0])
async def test_unlimited(rate: float | None, autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(rate)
    assert limiter.unlimited
    start = trio.current_time()
    for _ in range(10_000):
        await limiter.acquire(1000)
        assert limiter.retry_after(1000) == 0.0
    assert trio.current_time() == start


def test_default_burst_is_one_second_of_tokens() -> None:
    assert RateLimiter(250, clock=lambda: 0.0).bucket.burst == 250  # type: ignore[union-attr]
    assert RateLimiter(0.5, clock=lambda: 0.0).bucket.burst == 1  # type: ignore[union-attr]
