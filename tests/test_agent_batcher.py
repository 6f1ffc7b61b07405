"""The batcher's decisions, on made-up time: no I/O, no clock."""

from __future__ import annotations

import random

import pytest

from agent.link.batcher import Batcher, Send, Wait


def test_idle_link_sends_a_single_record_at_once() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2)
    assert b.decide(now=0.0) == Wait(None)
    b.added(1, now=10.0)
    assert b.decide(now=10.0) == Send(1)


def test_records_gather_while_a_frame_is_in_flight() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2)
    b.added(1, now=0.0)
    b.sent(1, now=0.0)
    b.added(3, now=0.01)
    # Not yet: the ack may come first, or the interval runs out.
    assert b.decide(now=0.01) == Wait(pytest.approx(0.21))
    b.added(5, now=0.05)
    assert b.decide(now=0.05) == Wait(pytest.approx(0.21))
    assert b.decide(now=0.2101) == Send(8)


def test_ack_releases_what_gathered() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2)
    b.added(1, now=0.0)
    b.sent(1, now=0.0)
    b.added(40, now=0.001)
    assert isinstance(b.decide(now=0.002), Wait)
    b.acked(1)
    assert b.decide(now=0.003) == Send(40)


def test_full_batch_goes_without_waiting() -> None:
    b = Batcher(batch_size=100, flush_interval=0.2)
    b.added(1, now=0.0)
    b.sent(1, now=0.0)
    b.added(250, now=0.01)
    assert b.decide(now=0.01) == Send(100)
    b.sent(100, now=0.01)
    assert b.decide(now=0.01) == Send(100)
    b.sent(100, now=0.01)
    # 50 left: a partial batch waits for the interval (counted from the last send).
    assert b.decide(now=0.01) == Wait(pytest.approx(0.21))


def test_bytes_in_flight_are_bounded() -> None:
    b = Batcher(batch_size=10, flush_interval=0.0, max_in_flight_bytes=3000)
    b.added(100, now=0.0)
    for _ in range(3):
        assert b.decide(now=0.0) == Send(10)
        b.sent(10, now=0.0, nbytes=1000)
    assert b.room == 0
    assert b.decide(now=5.0) == Wait(None)
    b.acked(2, nbytes=2000)
    assert b.room == 2000
    assert b.decide(now=5.0) == Send(10)


def test_agent_batcher_a_fast_producer_keeps_many_full_frames_in_flight() -> None:
    """Issue 17: the bound is bytes, not frames. 100,000 records of ~200 bytes
    waiting: frames of `batch_size` go out until 4 MiB are in flight (a bound of
    8 frames held them to 4,000 records per round trip of the hub's fsync)."""
    b = Batcher(batch_size=500, flush_interval=0.2, eager_frames=2)
    b.added(100_000, now=0.0)
    frames = 0
    while isinstance(decision := b.decide(now=0.0), Send):
        assert decision.count == 500, "frames stay sized by the batcher"
        b.sent(decision.count, now=0.0, nbytes=min(b.room, 500 * 200))
        frames += 1
    assert b.in_flight_bytes == 4 << 20
    assert frames * 500 > 20_000
    b.acked(1, nbytes=500 * 200)
    assert b.decide(now=0.0) == Send(500), "an ack makes room at once"


def test_a_quiet_line_goes_at_once_whatever_the_byte_bound() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2, eager_frames=2, max_in_flight_bytes=4 << 20)
    _round_trip(b, 0.0, 0.002)
    b.added(1, now=0.5)
    assert b.decide(now=0.5) == Send(1)
    b.sent(1, now=0.5, nbytes=120)
    b.added(1, now=1.0)
    assert b.decide(now=1.0) == Send(1)


def test_zero_interval_sends_whatever_is_there() -> None:
    b = Batcher(batch_size=500, flush_interval=0.0)
    b.added(1, now=0.0)
    b.sent(1, now=0.0)
    b.added(2, now=0.0)
    assert b.decide(now=0.0) == Send(2)


def test_batch_size_is_capped_by_the_frame_record_limit() -> None:
    assert Batcher(batch_size=5000).batch_size == 1000


def test_reset_for_a_new_connection_resends_everything_pending() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2)
    b.added(10, now=0.0)
    b.sent(10, now=0.0)
    b.reset(pending=10, now=1.0)
    assert b.in_flight == 0
    assert b.decide(now=1.0) == Send(10)


def test_bookkeeping_errors_are_loud() -> None:
    b = Batcher()
    with pytest.raises(ValueError):
        b.sent(1, now=0.0)
    with pytest.raises(ValueError):
        b.acked(1)
    with pytest.raises(ValueError):
        Batcher(batch_size=0)


def test_decisions_over_a_simulated_burst() -> None:
    """A burst of 10 000 records (100 bytes each) arriving 1 per ms while acks
    take 5 ms: the records go in a few large frames, none waits longer than
    the interval."""
    b = Batcher(batch_size=500, flush_interval=0.2, max_in_flight_bytes=8 * 500 * 100)
    frames: list[int] = []
    acks_due: list[tuple[float, int]] = []
    arrival: list[float] = []
    sent_upto = 0
    worst_wait = 0.0
    now = 0.0
    for i in range(12000):
        now = i * 0.001
        while acks_due and acks_due[0][0] <= now:
            b.acked(1, nbytes=acks_due.pop(0)[1] * 100)
        if i < 10000:
            b.added(1, now)
            arrival.append(now)
        while isinstance(decision := b.decide(now), Send):
            b.sent(decision.count, now, nbytes=decision.count * 100)
            frames.append(decision.count)
            worst_wait = max(worst_wait, now - arrival[sent_upto])
            sent_upto += decision.count
            acks_due.append((now + 0.005, decision.count))
    assert sent_upto == 10000
    assert worst_wait <= 0.2 + 1e-9
    assert len(frames) < 10000 / 4  # batched, not one frame per record


def test_set_pending_starts_and_ends_the_wait() -> None:
    b = Batcher(batch_size=10, flush_interval=0.5)
    b.set_pending(3, now=1.0)
    assert (b.pending, b.waiting_since) == (3, 1.0)
    b.set_pending(5, now=2.0)
    assert b.waiting_since == 1.0, "the oldest record's wait goes on"
    b.set_pending(0, now=3.0)
    assert (b.pending, b.waiting_since) == (0, None)


def test_eager_frames_let_a_second_record_go_before_the_first_ack() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2, eager_frames=2)
    _round_trip(b, -1.0, 0.002)
    b.added(1, now=0.0)
    assert b.decide(0.0) == Send(1)
    b.sent(1, now=0.0)
    b.added(1, now=0.01)
    assert b.decide(0.01) == Send(1), "with one frame in flight the next line goes at once"
    b.sent(1, now=0.01)
    b.added(1, now=0.02)
    assert b.decide(0.02) == Wait(0.22), "past eager_frames in flight, lines gather"


def test_one_frame_in_flight_until_an_ack_has_timed_the_connection() -> None:
    # A fleet started at once would send its second frames into a queue no
    # ack has shown yet.
    b = Batcher(batch_size=500, flush_interval=0.2, eager_frames=2)
    b.added(1, now=0.0)
    b.sent(1, now=0.0)
    b.added(1, now=0.01)
    assert b.decide(0.01) == Wait(pytest.approx(0.21))
    b.acked(1, now=0.012)
    assert b.decide(0.012) == Send(1)
    b.sent(1, now=0.012)
    b.added(1, now=0.02)
    assert b.decide(0.02) == Send(1), "timed: the second eager frame goes"


def test_while_the_hub_is_behind_one_frame_is_in_flight_and_lines_gather_longer() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2, eager_frames=2, behind_wait=1.0)
    b.added(1, now=0.0)
    b.sent(1, now=0.0)
    b.hub_says(behind=True)
    b.added(1, now=0.01)
    assert b.decide(0.01) == Wait(pytest.approx(1.01)), "behind: no second eager frame, and a longer wait"
    b.added(30, now=0.5)
    assert b.decide(0.5) == Wait(pytest.approx(1.01))
    assert b.decide(1.02) == Send(31)


def test_a_quiet_line_still_goes_at_once_while_the_hub_is_behind() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2, eager_frames=2, behind_wait=1.0)
    b.hub_says(behind=True)
    b.added(1, now=5.0)
    assert b.decide(5.0) == Send(1), "nothing in flight: the line goes at once"


def test_a_full_batch_goes_at_once_while_the_hub_is_behind() -> None:
    b = Batcher(batch_size=50, flush_interval=0.2, behind_wait=1.0)
    b.added(1, now=0.0)
    b.sent(1, now=0.0)
    b.hub_says(behind=True)
    b.added(50, now=0.1)
    assert b.decide(0.1) == Send(50), "bounded: a full frame does not wait"


def test_an_ack_without_backlog_ends_the_longer_wait() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2, eager_frames=2, behind_wait=1.0)
    _round_trip(b, -1.0, 0.002)
    b.added(1, now=0.0)
    b.sent(1, now=0.0)
    b.hub_says(behind=True)
    b.added(1, now=0.01)
    assert isinstance(b.decide(0.01), Wait)
    b.hub_says(behind=False)
    assert b.decide(0.02) == Send(1), "caught up: the second eager frame goes"


def _round_trip(b: Batcher, sent: float, rtt: float, lines: int = 1) -> None:
    """`lines` records added and sent at `sent`, acknowledged `rtt` later."""
    b.added(lines, now=sent)
    b.sent(lines, now=sent)
    b.acked(1, now=sent + rtt)


def test_acks_as_fast_as_ever_leave_frames_unspaced() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2)
    t = 0.0
    for _ in range(20):
        b.added(1, now=t)
        assert b.decide(now=t) == Send(1), "each line alone, at once"
        b.sent(1, now=t)
        b.acked(1, now=t + 0.002)
        t += 0.01  # 100 lines a second
    assert b.spacing == 0.0


def test_a_slow_link_that_is_not_queueing_is_not_spaced() -> None:
    # 80 ms every time: the network's, not a queue's.
    b = Batcher(batch_size=500, flush_interval=0.2)
    t = 0.0
    for _ in range(20):
        _round_trip(b, t, 0.08)
        t += 0.1
    assert b.spacing == 0.0
    b.added(1, now=t)
    assert b.decide(now=t) == Send(1)


def test_acks_slowing_down_space_the_frames_and_lines_gather() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2, eager_frames=2, jitter=0)
    _round_trip(b, 0.0, 0.003)  # the fastest: an unloaded hub
    t = 0.05
    for _ in range(30):
        _round_trip(b, t, 0.05)  # now 50 ms: ~47 ms of it queueing in the hub
        t += 0.06
    assert b.spacing == pytest.approx(b.max_spacing), "the queue never shrank: spaced as far as it goes"
    last = t - 0.06
    b.added(1, now=t)
    # Nothing in flight, yet the line waits for the spacing since the last
    # frame, past flush_interval.
    assert b.decide(now=t) == Wait(pytest.approx(last + 1.0))
    b.added(499, now=t + 0.01)
    assert b.decide(now=t + 0.01) == Send(500), "a full batch never waits"


def test_the_spacing_is_at_least_the_queue_and_grows_with_the_excess() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2, queue_delay=0.01, spacing_gain=0.25)
    _round_trip(b, 0.0, 0.002)
    _round_trip(b, 1.0, 0.017)  # 15 ms of queue, 5 ms over the target
    assert b.spacing == pytest.approx(0.015), "no closer together than the queue is long"
    _round_trip(b, 2.0, 0.017)
    assert b.spacing == pytest.approx(0.015 * 1.125), "then by gain x half (the excess is half the target)"
    _round_trip(b, 3.0, 0.302)  # 300 ms of queue
    assert b.spacing == pytest.approx(0.3)


def test_spacing_eases_as_acks_speed_up_again() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2)
    _round_trip(b, 0.0, 0.003)
    t = 1.0
    for _ in range(10):
        _round_trip(b, t, 0.06)
        t += 1.0
    spaced = b.spacing
    for _ in range(30):
        _round_trip(b, t, 0.004)
        t += 1.0
    assert spaced > 0.1 and b.spacing == 0.0


def test_a_hub_that_says_it_is_behind_spaces_frames_by_a_round_trip() -> None:
    # Every ack as slow as the first: no excess to read, but the hub says so.
    b = Batcher(batch_size=500, flush_interval=0.2, eager_frames=2)
    _round_trip(b, 0.0, 0.15)
    assert b.spacing == 0.0
    b.added(1, now=1.0)
    b.sent(1, now=1.0)
    b.hub_says(behind=True)
    b.acked(1, now=1.15)
    assert b.spacing == pytest.approx(0.15)


def test_each_gap_is_the_spacing_give_or_take_the_jitter() -> None:
    gaps = set()
    for seed in range(20):
        b = Batcher(batch_size=500, flush_interval=0.2, rng=random.Random(seed))
        _round_trip(b, 0.0, 0.002)
        _round_trip(b, 1.0, 0.4)
        b.added(1, now=2.0)
        b.sent(1, now=2.0)
        assert 0.5 * b.spacing <= b.gap <= 1.5 * b.spacing
        gaps.add(round(b.gap, 6))
    assert len(gaps) > 10, "agents spaced alike at once would send together"


def test_a_new_connection_forgets_the_old_round_trips() -> None:
    b = Batcher(batch_size=500, flush_interval=0.2)
    _round_trip(b, 0.0, 0.003)
    for i in range(10):
        _round_trip(b, 1.0 + i, 0.06)
    assert b.spacing > 0
    b.reset(pending=1, now=20.0)
    assert b.spacing == 0.0 and b.min_rtt is None
    assert b.decide(now=20.0) == Send(1)


def _fleet(agents: int, capacity: float, seconds: float = 20.0) -> tuple[float, float]:
    """`agents` batchers, each with a line every 50 ms, against a hub that
    answers `capacity` frames a second in order, 2 ms after it took one
    (a frame's own trip). Returns the frames a second offered, and the
    median queueing (ack time less 2 ms), over the last third."""
    step = 0.002
    rng = random.Random(1)
    batchers = [Batcher(batch_size=500, flush_interval=0.2, eager_frames=2, rng=random.Random(i)) for i in range(agents)]
    next_line = [rng.random() * 0.05 for _ in range(agents)]
    queue: list[tuple[int, float]] = []  # (agent, sent)
    free_at = 0.0
    frames, queued = 0, []
    t = 0.0
    while t < seconds:
        for i, b in enumerate(batchers):
            while next_line[i] <= t:
                b.added(1, next_line[i])
                next_line[i] += 0.05
            d = b.decide(t)
            if isinstance(d, Send):
                b.sent(d.count, t)
                queue.append((i, t))
                if t > 2 * seconds / 3:
                    frames += 1
        # The hub: one frame every 1/capacity seconds, first come first served.
        while queue and free_at <= t:
            i, sent = queue.pop(0)
            free_at = max(free_at, sent) + 1 / capacity
            batchers[i].acked(1, now=free_at + 0.002)
            if sent > 2 * seconds / 3:
                queued.append(free_at - sent)
        t += step
    queued.sort()
    # None answered in the last third: the queue only grew.
    return frames / (seconds / 3), queued[len(queued) // 2] if queued else float("inf")


@pytest.mark.parametrize("agents", [100, 400])
def test_a_fleet_settles_below_what_the_hub_takes_whatever_its_size(agents: int) -> None:
    # 100 or 400 agents at 20 lines a second would offer 2,000 or 8,000
    # frames a second, a line each, to a hub that takes 1,000.
    offered, queued = _fleet(agents, capacity=1000.0)
    assert offered < 1000, offered
    assert queued < 0.05, f"the hub's queue settles near queue_delay (10 ms), not {queued * 1000:.0f} ms"


def test_once_the_command_ended_nothing_waits_to_gather() -> None:
    # Spaced and Nagle'd: the last records would wait for lines that will not come.
    b = Batcher(batch_size=500, flush_interval=0.2, eager_frames=2, jitter=0)
    _round_trip(b, 0.0, 0.002)
    _round_trip(b, 1.0, 0.5)
    b.added(2, now=1.6)
    b.sent(1, now=1.6)
    b.sent(1, now=1.6)
    b.added(7, now=1.61)
    assert isinstance(b.decide(1.61), Wait)
    b.end()
    assert b.decide(1.61) == Send(7)
