"""The uplink: one WebSocket session at a time, sending the spool to the hub.

A session connects, says the task is `running`, and sends from the spool's
ack watermark on: everything unacknowledged is (re)sent, in seq order, in
frames the Batcher sizes, at most `max_in_flight` frames unacknowledged, and
no faster than the rate limiter allows. Acks release records from the spool.
When the command has finished and every record is acknowledged, it sends the
final status and waits until the hub confirms it is stored (the hub does not
ack a status, so the session watches its own task and waits for the hub's
`status` frame, which the hub publishes only after the commit).

A transient failure (no hub, a cut connection, a peer that stops answering
pings, a hub whose store is down) ends the session; the supervisor starts a
new one after a backoff. A permanent one (the hub refuses a frame it will
refuse however often it is resent, or a bug here) ends the uplink with
`UplinkFailed`: the records stay in the spool for `flush` after a fix. The
command never waits for any of this: it only ever writes to the spool.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

from agent.batcher import Batcher, Send
from agent.capture import encode_line
from agent.hubaddr import auth_headers, ws_url
from agent.spool import Spool
from keruta.backoff import Backoff
from keruta.limits import DEFAULT_LIMITS, Limits
from keruta.ratelimit import RateLimiter
from keruta.supervisor import GaveUp, supervise
from keruta.timefmt import now_ts
from keruta.wire import (
    AckFrame,
    ErrorFrame,
    FrameError,
    PingFrame,
    StatusFrame,
    SubscribeFrame,
    decode_hub_frame,
    encode_bytes,
)

# Room for the frame's envelope around the records, when reading the spool;
# the frame itself is measured before it is sent (fit_frame).
FRAME_OVERHEAD = 1024
RECONNECT = Backoff(initial=0.5, factor=2.0, cap=30.0, jitter=0.3)

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
    }
)
# The hub closes with 1008 (policy) after UNAUTHORIZED.
CLOSE_POLICY = 1008


class HubRefused(Exception):
    """The hub answered with an error frame (bad token, refused frame...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.permanent = code in PERMANENT_CODES


class UplinkFailed(Exception):
    """Delivery stopped for good: retrying as it is cannot succeed.
    Raised `from` the error; the records are still in the spool."""

    def __init__(self, reason: str, internal: bool) -> None:
        super().__init__(reason)
        self.internal = internal


_TRANSIENT = (
    OSError,  # refused, reset, timeouts
    HandshakeError,
    ConnectionClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


def is_transient(error: BaseException) -> bool:
    """Worth another session after a backoff (see PERMANENT_CODES)?"""
    if isinstance(error, HubRefused):
        return not error.permanent
    if isinstance(error, ConnectionRejected):
        return error.status_code not in (401, 403)
    if isinstance(error, ConnectionClosed):
        return error.reason is None or error.reason.code != CLOSE_POLICY
    return isinstance(error, _TRANSIENT)


def _first_permanent(error: BaseException) -> BaseException:
    """The error that ended delivery; the hub's own words first (its error
    frame and the close that follows it can both be in the group)."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    leaves = [_first_permanent(e) for e in error.exceptions]
    permanent = [e for e in leaves if not is_transient(e)] or leaves
    return next((e for e in permanent if isinstance(e, HubRefused)), permanent[0])


def fit_frame(build: Callable[[list[bytes]], bytes], payloads: list[bytes], max_bytes: int) -> tuple[bytes, int]:
    """The frame `build` makes of the longest prefix of `payloads` that fits in
    `max_bytes`, measured, and how many payloads it holds (at least one: a
    record too large on its own is sent and refused, not dropped here)."""
    count = len(payloads)
    frame = build(payloads)
    while len(frame) > max_bytes and count > 1:
        excess = len(frame) - max_bytes
        # Each payload beyond the first costs its bytes and a comma.
        while excess > 0 and count > 1:
            count -= 1
            excess -= len(payloads[count]) + 1
        frame = build(payloads[:count])
    return frame, count


def logs_frame(task_id: str, payloads: list[bytes], producer: str | None = None) -> bytes:
    """A `logs` frame from records already encoded for the spool.

    Byte for byte what `encode_bytes(LogsFrame(task_id, records, producer))`
    gives (a test holds it to that), without decoding and re-encoding each record.
    """
    return b"".join(
        (
            b'{"type":"logs","taskId":',
            orjson.dumps(task_id),
            b',"records":[',
            b",".join(payloads),
            b"]",
            b',"producer":' + orjson.dumps(producer) if producer is not None else b"",
            b"}",
        )
    )


@attrs.define
class UplinkSettings:
    hub_url: str
    task_id: str
    token: str | None = None
    batch_size: int = 500
    flush_interval: float = 0.2
    rate_limit: float | None = None
    max_in_flight: int = 8
    ping_interval: float = 5.0
    # The hub answers pings while our frames wait for its rate limiter, but a
    # hub whose writer is backed up (its database is away) stops reading once
    # a few of our frames are queued, and answers late: be patient.
    ping_timeout: float = 20.0
    connect_timeout: float = 10.0
    limits: Limits = DEFAULT_LIMITS


class Uplink:
    def __init__(
        self,
        spool: Spool,
        settings: UplinkSettings,
        *,
        say: Callable[[str], None] = lambda _m: None,
        backoff: Backoff = RECONNECT,
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.say = say
        self.backoff = backoff
        self.url = ws_url(settings.hub_url)
        self.batcher = Batcher(settings.batch_size, settings.flush_interval, settings.max_in_flight)
        self.limiter = RateLimiter(settings.rate_limit)
        self.final: tuple[str, int | None] | None = None
        # Set once every record is acknowledged and the final status is stored.
        self.delivered = trio.Event()
        # Set by whoever runs the uplink when it has ended, delivered or not.
        self.stopped = trio.Event()
        self.sessions = 0
        self.failures = 0
        self.frames_sent = 0
        self.records_sent = 0
        self._wakeup = trio.Event()
        self._failing_since: float | None = None
        self._last_complaint: float | None = None

    # --- what the rest of the agent calls (synchronous) -----------------------

    def records_written(self, count: int) -> None:
        self.batcher.added(count, trio.current_time())
        self._wakeup.set()

    def finish(self, state: str, exit_code: int | None) -> None:
        """The command is done: after the last ack, report `state`."""
        self.final = (state, exit_code)
        self._wakeup.set()

    # --- running ------------------------------------------------------------

    async def run(self, max_restarts: int | None = None) -> None:
        """Sessions until everything is delivered; never gives up on transient
        failures by default. A permanent one raises UplinkFailed."""
        try:
            await supervise(
                self.session,
                name="uplink",
                backoff=self.backoff,
                max_restarts=max_restarts,
                recoverable=is_transient,
                on_restart=self._on_restart,
                healthy_after=10.0,
            )
        except GaveUp:
            raise
        except Exception as exc:
            cause = _first_permanent(exc)
            if isinstance(cause, HubRefused):
                raise UplinkFailed(f"the hub refused a frame: {cause}", internal=False) from cause
            if isinstance(cause, ConnectionRejected | ConnectionClosed):
                raise UplinkFailed(f"the hub {describe(cause)}", internal=False) from cause
            raise UplinkFailed(f"internal error in the uplink: {describe(cause)}", internal=True) from cause

    def _on_restart(self, failures: int, error: BaseException, delay: float) -> None:
        self.failures += 1
        now = trio.current_time()
        if self._failing_since is None:
            self._failing_since = now
        # Say it the first time, then once a minute: the hub may be away for long.
        if self._last_complaint is not None and now - self._last_complaint < 60.0:
            return
        self._last_complaint = now
        waiting = self.spool.unacked
        kept = f"{waiting} records wait in the spool" if waiting else "output waits in the spool"
        self.say(f"hub {self.url}: {describe(error)}; {kept}; retrying in {delay:.1f} s")

    async def session(self) -> None:
        if self.delivered.is_set():
            return
        s = self.settings
        self.sessions += 1
        async with open_websocket_url(
            self.url,
            extra_headers=auth_headers(s.token),
            connect_timeout=s.connect_timeout,
            disconnect_timeout=2.0,
        ) as ws:
            if self._failing_since is not None:
                self.say(
                    f"connected to the hub again; sending the {self.spool.unacked} records "
                    "it has not acknowledged"
                )
                self._failing_since = None
                self._last_complaint = None
            session = _Session(self, ws)
            await session.run()


class _Session:
    """State that lives exactly as long as one connection."""

    def __init__(self, uplink: Uplink, ws: object) -> None:
        self.up = uplink
        self.ws = ws
        self.spool = uplink.spool
        self.task_id = uplink.settings.task_id
        self.producer = self.spool.producer
        self.cursor = self.spool.acked_seq + 1  # the next seq to send
        self.in_flight: collections.deque[int] = collections.deque()  # last seq of each frame
        self.last_heard = trio.current_time()
        self.status_sent = False
        self.confirmed = trio.Event()
        max_frame = uplink.settings.limits.max_frame_bytes
        self.max_payload = max_frame - FRAME_OVERHEAD

    async def send(self, data: bytes) -> None:
        await self.ws.send_message(data.decode())  # type: ignore[attr-defined]

    async def run(self) -> None:
        up = self.up
        up.batcher.reset(self.spool.last_seq - self.cursor + 1, trio.current_time())
        if up.final is None:
            await self.send(encode_bytes(StatusFrame(self.task_id, "running", producer=self.producer)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.receive_loop)
            nursery.start_soon(self.ping_loop)
            await self.send_loop()
            nursery.cancel_scope.cancel()

    async def send_loop(self) -> None:
        up = self.up
        batcher = up.batcher
        limits = up.settings.limits
        while True:
            up._wakeup = trio.Event()
            self._catch_up_with_acks()
            if up.final is not None and self.spool.acked_seq >= self.spool.last_seq:
                if await self.deliver_final():
                    return
                continue
            decision = batcher.decide(trio.current_time())
            if isinstance(decision, Send):
                count = min(decision.count, limits.max_records_per_batch)
                records = fill_gaps(
                    self.task_id,
                    self.cursor,
                    self.spool.read(self.cursor, count, self.max_payload),
                    count,
                    self.spool.last_seq,
                )
                if not records:
                    self._skip_to(self.spool.last_seq + 1)
                    continue
                frame, fitted = fit_frame(
                    lambda payloads: logs_frame(self.task_id, payloads, self.producer),
                    [p for _, p in records],
                    limits.max_frame_bytes,
                )
                records = records[:fitted]
                await up.limiter.acquire(len(records))
                await self.send(frame)
                last = records[-1][0]
                covered = last + 1 - self.cursor
                self.cursor = last + 1
                self.in_flight.append(last)
                batcher.sent(min(covered, batcher.pending), trio.current_time())
                up.frames_sent += 1
                up.records_sent += len(records)
                continue
            with trio.move_on_at(decision.until if decision.until is not None else float("inf")):
                await up._wakeup.wait()

    def _catch_up_with_acks(self) -> None:
        """Keep the cursor and the batcher's counts in step with the spool."""
        if self.spool.acked_seq >= self.cursor:
            self._skip_to(self.spool.acked_seq + 1)
        pending = max(0, self.spool.last_seq - self.cursor + 1)
        if pending != self.up.batcher.pending:
            self.up.batcher.pending = pending
            if pending == 0:
                self.up.batcher.waiting_since = None
            elif self.up.batcher.waiting_since is None:
                self.up.batcher.waiting_since = trio.current_time()

    def _skip_to(self, seq: int) -> None:
        self.cursor = max(self.cursor, seq)

    async def deliver_final(self) -> bool:
        """Send the final status once per session; True once the hub has stored it."""
        up = self.up
        assert up.final is not None
        if not self.status_sent:
            state, code = up.final
            # The hub answers a run's status with that run's stored state, on
            # this connection, once it is committed. A spool from before
            # producers has none: then the task's status, published to its
            # subscribers after the commit, confirms it; subscribing first
            # means that publication cannot be missed.
            if self.producer is None:
                await self.send(
                    encode_bytes(SubscribeFrame(self.task_id, from_seq=self.spool.last_seq + 1))
                )
            await self.send(encode_bytes(StatusFrame(self.task_id, state, code, self.producer)))
            self.status_sent = True
        if self.confirmed.is_set():
            self.spool.mark_final_delivered()
            up.delivered.set()
            return True
        await up._wakeup.wait()
        return False

    async def receive_loop(self) -> None:
        up = self.up
        while True:
            message = await self.ws.get_message()  # type: ignore[attr-defined]
            self.last_heard = trio.current_time()
            try:
                frame = decode_hub_frame(message)
            except FrameError as exc:
                up.say(f"ignoring a frame from the hub that does not parse: {exc}")
                continue
            if isinstance(frame, AckFrame):
                if frame.task_id == self.task_id and frame.producer == self.producer:
                    self.on_ack(frame.seq)
            elif isinstance(frame, StatusFrame):
                if (
                    frame.task_id == self.task_id
                    and frame.producer == self.producer
                    and up.final is not None
                    and (frame.state, frame.exit_code) == up.final
                ):
                    self.confirmed.set()
                    up._wakeup.set()
            elif isinstance(frame, ErrorFrame):
                raise HubRefused(frame.code, frame.message)

    def on_ack(self, seq: int) -> None:
        self.spool.release(seq)
        done = 0
        while self.in_flight and self.in_flight[0] <= seq:
            self.in_flight.popleft()
            done += 1
        if done:
            self.up.batcher.acked(done)
        self.up._wakeup.set()

    async def ping_loop(self) -> None:
        s = self.up.settings
        ping = encode_bytes(PingFrame())
        while True:
            await trio.sleep(s.ping_interval)
            silent = trio.current_time() - self.last_heard
            if silent > s.ping_timeout:
                raise TimeoutError(f"the hub has not answered for {silent:.0f} s")
            await self.send(ping)


LOST_RECORD = "keruta-agent: this record was lost (its spool entry was corrupt)"


def fill_gaps(
    task_id: str,
    start: int,
    records: list[tuple[int, bytes]],
    limit: int,
    last_seq: int,
) -> list[tuple[int, bytes]]:
    """`records` from `start` on, with a placeholder for every seq missing
    (skipped as corrupt when the spool was read back). The hub acknowledges a
    task only up to its first missing seq, so a hole would stall delivery
    forever; an explicit "lost" record says what happened instead."""
    out: list[tuple[int, bytes]] = []
    expected = start
    end = records[-1][0] if records else min(last_seq, start + limit - 1)
    pending = iter(records)
    current = next(pending, None)
    while expected <= end and len(out) < limit:
        if current is not None and current[0] == expected:
            out.append(current)
            current = next(pending, None)
        elif current is not None and current[0] < expected:
            current = next(pending, None)
            continue
        else:
            placeholder = encode_line(
                task_id, expected, now_ts(), "agent", "ERROR", LOST_RECORD, 0, {}, False
            )
            out.append((expected, placeholder))
        expected += 1
    return out


def describe(error: BaseException) -> str:
    """A one-line reason for a failed session, for humans."""
    if isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        return describe(error.exceptions[0])
    if isinstance(error, ConnectionRejected):
        hint = " (check --token / KERUTA_TOKEN)" if error.status_code in (401, 403) else ""
        return f"refused the connection: HTTP {error.status_code}{hint}"
    if isinstance(error, HandshakeError):
        cause = error.__cause__ or error.__context__
        return f"cannot connect ({describe(cause) if cause else type(error).__name__})"
    if isinstance(error, ConnectionClosed):
        reason = error.reason
        if reason is None:
            return "connection closed"
        hint = " (check --token / KERUTA_TOKEN)" if reason.code == CLOSE_POLICY else ""
        return f"connection closed ({reason.code} {reason.reason or ''})".replace(" )", ")") + hint
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
