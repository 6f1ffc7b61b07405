"""When to send the next frame, and how big: decisions only, no I/O, no clock.

Adaptive, in the manner of Nagle: while fewer than `eager_frames` frames are
in flight a record goes out at once (live latency is one trip); past that new
records gather, and go when `batch_size` of them are waiting, when the oldest
has waited `flush_interval`, or when in-flight frames are acknowledged,
whichever comes first. What is unacknowledged is bounded in bytes (the
records' JSON), not in frames: `max_in_flight_bytes` (4 MiB) lets a fast
producer keep many full frames in flight across the hub's fsync round trip
(a bound of 8 frames held it to ~4,000 lines per round trip), while a frame
still carries at most `batch_size` records. The owner reads no more than
`room` bytes for the next frame, so the bound holds (a single record larger
than it goes alone once nothing is in flight).
The agent runs with `eager_frames=2`: an ack waits for the hub's fsync, which
now and then takes longer than the gap between two quiet lines; a second
frame in flight keeps that wait off the next line.
While the hub says it is behind (its acks carry a `backlog`: it holds more
unstored writes than it commits at once), the batcher keeps one frame in
flight and gathers the rest up to `behind_wait` or `batch_size`: a quiet line
still goes at once, but a chatty producer sends a frame a round trip (or
`behind_wait`) instead of a frame a line, so a fleet of agents offers a slow
hub fewer, fuller frames. An ack without a backlog ends it.
A fleet loads the hub before any one agent's backlog shows: each agent sends
its next frame as soon as a slot frees, so N chatty agents keep the hub at
its limit and every ack waits N frames' worth (N ÷ the frames the hub takes a
second). So the batcher also times its acks and keeps a `spacing`, the least
time between two frames, as LEDBAT keeps its window: each ack's round trip
less the fastest seen on this connection (the network and a hub with room;
what comes on top is waiting in the hub's queue, as TCP Vegas reads it) is
held against `queue_delay`; above it the spacing grows by up to
`spacing_gain` times its share of the excess, below it shrinks, and it
stays between nothing and `max_spacing`. Being an integral, it settles
where the hub's queue is `queue_delay` whatever the number of agents (a
spacing proportional to the excess settles wherever the fleet's size puts
it, and a cap below what the fleet needs left the hub saturated). Lines
gather for the spacing even past `flush_interval`, which bounds a wait only
while acks come back promptly. A quiet line, a line over a slow but unloaded
link, and any line while acks come back fast still go at once; a full batch
never waits.
The records themselves live in the spool; the batcher only counts them.
"""

from __future__ import annotations

import collections
import random

import attrs

from keruta.limits import DEFAULT_LIMITS


@attrs.frozen
class Send:
    """Send up to `count` records now (the frame may carry fewer: byte limit)."""

    count: int


@attrs.frozen
class Wait:
    """Nothing to send before `until` (None: until records or an ack arrive)."""

    until: float | None


Decision = Send | Wait


@attrs.define
class Batcher:
    batch_size: int = attrs.field(default=500, validator=attrs.validators.gt(0))
    flush_interval: float = attrs.field(default=0.2, validator=attrs.validators.ge(0))
    max_in_flight_bytes: int = attrs.field(default=4 << 20, validator=attrs.validators.gt(0))
    eager_frames: int = attrs.field(default=1, validator=attrs.validators.gt(0))
    behind_wait: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    # The last ack said the hub is behind.
    hub_behind: bool = False
    # No more records will come (the command ended): what is pending goes.
    ended: bool = False
    # Records written to the spool but not yet sent.
    pending: int = 0
    # Frames sent and not yet acknowledged, and the bytes of their records.
    in_flight: int = 0
    in_flight_bytes: int = 0
    # When the oldest pending record started waiting.
    waiting_since: float | None = None
    # Acks slower than the fastest by more than this say the hub is queueing.
    queue_delay: float = attrs.field(default=0.01, validator=attrs.validators.gt(0))
    # How fast the spacing moves: at most this share of itself an ack, up
    # (eight times that at most, for a large excess) or down.
    spacing_gain: float = attrs.field(default=0.25, validator=attrs.validators.gt(0))
    max_spacing: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    # Each gap is the spacing times a factor drawn from 1 ± jitter when the
    # frame goes: agents that grew their spacing together (a hub that was slow
    # for all of them) would otherwise send together, a burst a spacing.
    jitter: float = attrs.field(default=0.5, validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    rng: random.Random = attrs.field(factory=random.Random, eq=False, repr=False)
    # The least time between two frames (see the module docstring), and this
    # gap's factor.
    spacing: float = 0.0
    gap_factor: float = 1.0
    # The fastest round trip on this connection (None before the first),
    # and when the last frame went.
    min_rtt: float | None = None
    last_sent: float | None = None
    # When each frame in flight was sent, oldest first.
    sent_at: collections.deque[float] = attrs.field(factory=collections.deque)

    def __attrs_post_init__(self) -> None:
        self.batch_size = min(self.batch_size, DEFAULT_LIMITS.max_records_per_batch)

    def added(self, count: int, now: float) -> None:
        if count <= 0:
            return
        if self.pending == 0:
            self.waiting_since = now
        self.pending += count

    @property
    def room(self) -> int:
        """Bytes of records the next frame may carry without passing the bound."""
        return max(0, self.max_in_flight_bytes - self.in_flight_bytes)

    def decide(self, now: float) -> Decision:
        if self.pending == 0:
            return Wait(None)
        if self.room == 0:
            return Wait(None)
        count = min(self.pending, self.batch_size)
        if self.pending >= self.batch_size or self.ended:
            # A full batch, or the last records there will be: nothing to gather.
            return Send(count)
        # One frame in flight until an ack has timed this connection: a
        # fleet started at once sends its second frames into a queue it
        # cannot see yet.
        eager = 1 if self.hub_behind or self.min_rtt is None else self.eager_frames
        spaced_until = None if self.last_sent is None or not self.spacing else self.last_sent + self.gap
        if self.in_flight < eager:
            if spaced_until is None or now >= spaced_until:
                return Send(count)
            due = spaced_until
        else:
            assert self.waiting_since is not None
            wait = max(self.flush_interval, self.behind_wait) if self.hub_behind else self.flush_interval
            due = self.waiting_since + wait
            if spaced_until is not None:
                due = max(due, spaced_until)
        if now >= due:
            return Send(count)
        return Wait(due)

    @property
    def gap(self) -> float:
        """The least time from the last frame to the next."""
        return self.spacing * self.gap_factor

    def sent(self, count: int, now: float, nbytes: int = 0) -> None:
        """A frame carrying `count` records (`nbytes` of them) went out."""
        if not 0 < count <= self.pending:
            raise ValueError(f"sent {count} records but {self.pending} were pending")
        self.pending -= count
        self.in_flight += 1
        self.in_flight_bytes += nbytes
        self.last_sent = now
        self.gap_factor = 1 + self.jitter * (2 * self.rng.random() - 1)
        self.sent_at.append(now)
        # The rest start a fresh interval; keeping the old start would send
        # every newcomer alone while the window is busy.
        self.waiting_since = now if self.pending else None

    def end(self) -> None:
        """No more records will be added: the rest goes as fast as the bound lets it."""
        self.ended = True

    def hub_says(self, behind: bool) -> None:
        """An ack arrived: with a backlog (the hub is behind) or without."""
        self.hub_behind = behind

    def acked(self, frames: int, nbytes: int = 0, now: float | None = None) -> None:
        """`frames` in-flight frames (`nbytes` of records) were acknowledged,
        at `now` (when given, the newest of them times the round trip)."""
        if not 0 <= frames <= self.in_flight or not 0 <= nbytes <= self.in_flight_bytes:
            raise ValueError(
                f"{frames} frames ({nbytes} bytes) acked but {self.in_flight} "
                f"({self.in_flight_bytes} bytes) were in flight"
            )
        self.in_flight -= frames
        self.in_flight_bytes -= nbytes
        sent = None
        for _ in range(min(frames, len(self.sent_at))):
            sent = self.sent_at.popleft()
        if now is not None and sent is not None:
            self._timed(max(0.0, now - sent))

    # Below this the spacing is none (a frame a line, up to ~200 a second).
    _LEAST_SPACING = 0.005

    def _timed(self, rtt: float) -> None:
        self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)
        queued = rtt - self.min_rtt
        off = (queued - self.queue_delay) / self.queue_delay
        if self.hub_behind:
            # The hub says so: a fleet that came on all at once may have made
            # even the fastest round trip seen here a queue's.
            off, queued = max(off, 8.0), rtt
        if off > 0:
            grown = max(self.spacing, self._LEAST_SPACING) * (1 + self.spacing_gain * min(off, 8.0))
            # Frames closer together than the queue is long only lengthen it.
            self.spacing = min(self.max_spacing, max(grown, queued))
        elif self.spacing:
            shrunk = self.spacing * (1 + self.spacing_gain * max(off, -1.0))
            self.spacing = shrunk if shrunk >= self._LEAST_SPACING else 0.0

    def reset(self, pending: int, now: float) -> None:
        """A new connection: nothing in flight, `pending` records to (re)send."""
        self.hub_behind = False
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.sent_at.clear()
        self.spacing = 0.0
        self.min_rtt = None
        self.last_sent = None
        self.pending = max(0, pending)
        self.waiting_since = now if self.pending else None

    def set_pending(self, pending: int, now: float) -> None:
        """The owner's count of records waiting moved (records arrived, or an
        ack covered some that were never sent on this connection)."""
        if pending == self.pending:
            return
        if pending > 0 and (self.pending == 0 or self.waiting_since is None):
            self.waiting_since = now
        self.pending = max(0, pending)
        if self.pending == 0:
            self.waiting_since = None
