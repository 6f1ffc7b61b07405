"""The uplink's protocol, sans I/O: what to send next, and what the hub's frames mean.

`UplinkProtocol` holds the state of delivery to the hub: the ack watermark,
the window of frames in flight, the cursor (next seq to send), the final
status handshake. It never touches a socket, a clock or the spool: the I/O
shell (agent/pipeline/uplink.py) tells it what happened with plain method calls and
does what it answers::

    on_connected(now)        -> frames to send first (the `running` status)
    records_available(seq, now)  records up to `seq` are spooled and may go
    finish(state, exit_code)     the command is done
    next_frame(now)          -> ReadRecords | ReadSummary | SendFrame | Wait | Delivered
    logs_frame(records, now) -> the `logs` frame for what ReadRecords read
    status_frame(summary)    -> the final `status` frame, once ReadSummary asked
    on_frame(hub_frame)      -> a seq the spool may release, or None
    on_disconnected()

A session starts from the ack watermark (everything unacknowledged is sent
again: the hub de-duplicates), frames are sized by the Batcher, and the
records in unacknowledged frames take at most `max_in_flight_bytes`. Once the command has finished and every
record is acknowledged, the final status goes out, and delivery is done when
the hub answers with that status for this producer (it does so after the
commit). An error frame raises HubRefused; SEQ_GAP with `resumeFrom`
rewinds the cursor instead.
"""

from __future__ import annotations

import collections

import attrs

from agent.link.batcher import Batcher, Send
from agent.link.framing import fit_frame
from keruta.frames import AckFrame, ErrorFrame, HubFrame, StatusFrame
from keruta.limits import DEFAULT_LIMITS, Limits
from keruta.recordjson import logs_frame
from keruta.summary import Summary
from keruta.wire import encode_bytes

# Room for the frame's envelope around the records, when reading the spool;
# the frame itself is measured before it is sent (fit_frame).
FRAME_OVERHEAD = 1024

# Error codes the hub repeats however often the same frame is resent.
# Anything else (STORE_ERROR, STORE_UNAVAILABLE, SLOW_CONSUMER, RATE_LIMITED,
# a code this agent does not know) is retried after a backoff.
PERMANENT_CODES = frozenset(
    {
        "TOO_LARGE",
        "INVALID_MESSAGE_FORMAT",
        "FORBIDDEN",
        "FORBIDDEN_ORIGIN",
        "FORBIDDEN_HOST",
        "UNAUTHORIZED",
        "SEQ_CONFLICT",
        "TASK_FULL",
    }
)


class HubRefused(Exception):
    """The hub answered with an error frame (bad token, refused frame...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.permanent = code in PERMANENT_CODES


@attrs.frozen
class ReadRecords:
    """Read up to `count` records from seq `start` (payloads up to `max_bytes`)
    and hand them to `logs_frame`."""

    start: int
    count: int
    max_bytes: int


@attrs.frozen
class ReadSummary:
    """Every record is acknowledged: take the run's summary (the spool's,
    keruta/summary.py) and hand it to `status_frame`. Asked for only now, not
    at `finish`: the spool tallies its records as they are read to be sent,
    so that capturing a line costs no hashing (agent/spool/spool.py)."""


@attrs.frozen
class SendFrame:
    data: bytes


@attrs.frozen
class Wait:
    """Nothing to do before `until` (None: until something is reported)."""

    until: float | None


@attrs.frozen
class Delivered:
    """Every record and the final status are stored by the hub."""


Action = ReadRecords | ReadSummary | SendFrame | Wait | Delivered


class UplinkProtocol:
    def __init__(
        self,
        task_id: str,
        producer: str,
        *,
        acked_seq: int = 0,
        available_seq: int = 0,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        max_in_flight_bytes: int = 4 << 20,
        eager_frames: int = 1,
        limits: Limits = DEFAULT_LIMITS,
        max_bytes: int | None = None,
    ) -> None:
        self.task_id = task_id
        self.max_bytes = max_bytes
        self.producer = producer
        self.limits = limits
        self.acked = acked_seq
        # Records up to here are spooled and let through (rate limit): sendable.
        self.available = max(available_seq, acked_seq)
        self.final: tuple[str, int | None] | None = None
        self.batcher = Batcher(batch_size, flush_interval, max_in_flight_bytes, eager_frames)
        self.connected = False
        self.cursor = acked_seq + 1
        # The highest seq sent in a logs frame (by this process): an ack past
        # it (a confused hub or proxy) releases no more than that.
        self.sent_high = acked_seq
        # Each unacknowledged frame: its last seq, the bytes of its records.
        self.in_flight: collections.deque[tuple[int, int]] = collections.deque()
        self.outbox: collections.deque[bytes] = collections.deque()
        self.status_sent = False
        self.confirmed = False
        self.delivered = False
        self.max_payload = limits.max_frame_bytes - FRAME_OVERHEAD

    # --- what happened -------------------------------------------------------

    def records_available(self, last_seq: int, now: float) -> None:
        if last_seq > self.available:
            self.available = last_seq
            self._sync_pending(now)

    def finish(self, state: str, exit_code: int | None) -> None:
        self.final = (state, exit_code)
        # The command ended: nothing gathers for records that will not come.
        self.batcher.end()

    def on_connected(self, now: float) -> list[bytes]:
        self.connected = True
        self.cursor = self.acked + 1
        self.in_flight.clear()
        self.outbox.clear()
        self.status_sent = False
        self.confirmed = False
        self.batcher.reset(self.available - self.cursor + 1, now)
        if self.final is None:
            return [
                encode_bytes(StatusFrame(self.task_id, "running", producer=self.producer, max_bytes=self.max_bytes))
            ]
        return []

    def on_disconnected(self) -> None:
        self.connected = False
        self.in_flight.clear()
        self.outbox.clear()

    def on_frame(self, frame: HubFrame, now: float) -> int | None:
        """A frame from the hub; returns the ack watermark when it moved (the
        spool releases everything up to it)."""
        if isinstance(frame, AckFrame):
            if frame.task_id == self.task_id and frame.producer == self.producer:
                self.batcher.hub_says(behind=frame.backlog is not None)
                return self._on_ack(frame.seq, now)
        elif isinstance(frame, StatusFrame):
            if (
                frame.task_id == self.task_id
                and frame.producer == self.producer
                and self.final is not None
                and (frame.state, frame.exit_code) == self.final
            ):
                self.confirmed = True
        elif isinstance(frame, ErrorFrame):
            if frame.code == "SEQ_GAP" and frame.resume_from is not None:
                self._rewind(frame.resume_from, now)
            else:
                raise HubRefused(frame.code, frame.message)
        return None

    def _on_ack(self, seq: int, now: float) -> int | None:
        done = nbytes = 0
        while self.in_flight and self.in_flight[0][0] <= seq:
            nbytes += self.in_flight.popleft()[1]
            done += 1
        if done:
            self.batcher.acked(done, nbytes, now)
        # Never past what was sent: records not sent cannot be stored.
        seq = min(seq, self.sent_high)
        if seq <= self.acked:
            return None
        self.acked = min(seq, self.available)
        if self.acked >= self.cursor:
            self.cursor = self.acked + 1
            self._sync_pending(now)
        return self.acked

    def _rewind(self, resume_from: int, now: float) -> None:
        """The hub holds this producer's records only up to `resume_from - 1`."""
        start = max(resume_from, self.acked + 1)
        if start < self.cursor:
            self.cursor = start
            self.in_flight.clear()
            self.batcher.reset(self.available - self.cursor + 1, now)

    def _sync_pending(self, now: float) -> None:
        self.batcher.set_pending(max(0, self.available - self.cursor + 1), now)

    # --- what to do ----------------------------------------------------------

    def next_frame(self, now: float) -> Action:
        if self.delivered:
            return Delivered()
        if self.outbox:
            return SendFrame(self.outbox.popleft())
        if not self.connected:
            return Wait(None)
        if self.final is not None and self.acked >= self.available:
            return self._final_step()
        decision = self.batcher.decide(now)
        if isinstance(decision, Send):
            count = min(decision.count, self.limits.max_records_per_batch, self.available - self.cursor + 1)
            # No more than the bound has room for (decide sends only when it has some).
            return ReadRecords(self.cursor, count, min(self.max_payload, self.batcher.room))
        return Wait(decision.until)

    def _final_step(self) -> Action:
        if self.confirmed:
            self.delivered = True
            return Delivered()
        if self.status_sent:
            return Wait(None)
        return ReadSummary()

    def status_frame(self, summary: Summary | None) -> bytes:
        """The final `status` frame, with what the run sent (keruta/summary.py;
        None: not known), as ReadSummary asked."""
        assert self.final is not None
        self.status_sent = True
        state, code = self.final
        # The hub answers a run's status with that run's stored state once it
        # is committed: that is how the agent knows its final state is stored.
        # The cap goes again: a command that ended before the link came up sent
        # no `running` status.
        return encode_bytes(StatusFrame(self.task_id, state, code, self.producer, summary, self.max_bytes))

    def logs_frame(self, records: list[tuple[int, bytes]], now: float) -> bytes | None:
        """The frame for `records` read as ReadRecords asked (gaps already
        filled), as much of them as fits; None if there was nothing to read."""
        if not records:
            # The spool holds nothing from the cursor on (its records were acked).
            self.cursor = max(self.cursor, self.available + 1)
            self._sync_pending(now)
            return None
        payloads = [p for _, p in records]
        frame, fitted = fit_frame(
            lambda payloads: logs_frame(self.task_id, payloads, self.producer),
            payloads,
            self.limits.max_frame_bytes,
        )
        last = records[fitted - 1][0]
        covered = last + 1 - self.cursor
        nbytes = sum(map(len, payloads[:fitted]))
        self.cursor = last + 1
        self.sent_high = max(self.sent_high, last)
        self.in_flight.append((last, nbytes))
        self.batcher.sent(min(covered, self.batcher.pending), now, nbytes)
        return frame
