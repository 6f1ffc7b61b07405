"""One WebSocket connection: a reader, a single sender, and per-subscription catch-up.

Only the sender task writes to the socket. Everything else hands it frames
through one bounded outbox: the reader awaits room (a client that does not
read stops being read), the broadcaster never waits (a full outbox is
SLOW_CONSUMER), and acks are coalesced per task so they are never dropped.
The outbox is bounded twice: in frames by the channel, and in bytes by
`queued_bytes` (a frame of escaped lines can be megabytes), which counts a
frame from the moment it is queued until the sender has written it.

Writes (`log`, `logs`, `status`) go from the reader to an ingest task through
a small queue, bounded in frames and bytes; the ingest task waits for the
task's rate limiter and the writer. So a throttled producer is slowed (the
reader stops once the queue is full), yet a ping sent while a frame waits for
its tokens is answered at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import trio

from hub.auth import Role
from hub.broadcaster import FRAME_RECORDS, Outgoing, Subscription, encode_chunks, status_payload
from hub.deps import ConnectionDeps
from hub.ingest import from_records
from hub.store.base import StoreUnavailable
from hub.writer import StatusChange, WriteOutcome, WriteRequest
from hub.wsbuffer import OVERSIZED
from keruta.backoff import Backoff
from keruta.levels import LEVELS
from keruta.records import SOURCES
from keruta.timefmt import now_ts
from keruta.wire import (
    AckFrame,
    ErrorFrame,
    FrameError,
    LogFrame,
    LogsFrame,
    PingFrame,
    PongFrame,
    StatusFrame,
    SubscribedFrame,
    SubscribeFrame,
    UnsubscribeFrame,
    decode_client_frame,
    dumps,
)

log = logging.getLogger("keruta.hub.ws")

T = TypeVar("T")
STORE_RETRY = Backoff(initial=0.2, cap=5.0)
# About a minute of retries before the connection gives up on the store.
STORE_RETRIES = 15

# Tells the sender that acks are waiting.
_WAKE = Outgoing("")
# Write frames read but not yet handed to the writer, per connection; beyond
# either bound (one frame is always let in) the reader waits. An agent has at
# most 8 frames unacknowledged, so its pings never queue behind its writes.
INGEST_FRAMES = 8
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN_LATER = 1013


class Connection:
    def __init__(self, hub: ConnectionDeps, ws: Any, role: Role) -> None:
        self.hub = hub
        self.ws = ws
        self.role = role
        self.outbox, self._outbox_recv = trio.open_memory_channel[Outgoing](hub.config.subscriber_queue)
        self.queued_bytes = 0
        # Set by the sender after each frame: room in the outbox's byte bound.
        self._room = trio.Event()
        # (task_id, producer or None) -> seq to acknowledge; coalesced, never dropped.
        self.acks: dict[tuple[str, str | None], int] = {}
        # Acks never reach past a record this connection sent that was refused.
        self.ack_caps: dict[tuple[str, str | None], int] = {}
        # Error frames about this connection's writes, coalesced like acks (one
        # per key) so that a full outbox delays them instead of dropping them.
        self.write_errors: dict[str, str] = {}
        # Frames answering this connection's writes (SEQ_CONFLICT, SEQ_GAP, a
        # run's status), sent before acks; at most a few per write in flight.
        self.replies: list[str] = []
        self._ack_wake_pending = False
        self.subs: dict[str, Subscription] = {}
        self._catch_up_scopes: dict[Subscription, trio.CancelScope] = {}
        self.inflight = 0
        self.settled = trio.Event()
        self.settled.set()
        self.closing: str | None = None
        self._read_scope = trio.CancelScope()
        self._sender_done = trio.Event()
        self._abandon_queue = False
        self._nursery: trio.Nursery | None = None
        self._writes, self._writes_recv = trio.open_memory_channel[tuple[Any, int]](INGEST_FRAMES)
        # The ingest queue's own bounds and wake-up, apart from the outbox's:
        # one event shared by both let each side orphan the other's waiter.
        self._ingest_frames = 0
        self._ingest_bytes = 0
        self._ingest_room = trio.Event()
        self._ingest_scope = trio.CancelScope()

    # --- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        metrics = self.hub.metrics
        metrics.connections += 1
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._send_loop)
                nursery.start_soon(self._watch_shutdown)
                nursery.start_soon(self._ingest_loop)
                with self._read_scope:
                    await self._read_loop()
                # Writes not yet handed to the writer are dropped unacknowledged
                # (the producer resends them), as when the reader held them.
                self._ingest_scope.cancel()
                await self._close()
                nursery.cancel_scope.cancel()
        finally:
            metrics.connections -= 1
            for sub in list(self.subs.values()):
                self._drop(sub)

    async def _watch_shutdown(self) -> None:
        await self.hub.shutting_down.wait()
        if self.closing is None:
            self.closing = "SHUTDOWN"
        self._read_scope.cancel()

    async def _close(self) -> None:
        timeout = self.hub.config.shutdown_timeout
        if self.closing == "SLOW_CONSUMER":
            self._abandon_queue = True
            subs = list(self.subs.values())
            for sub in subs:
                self._drop(sub)
            self._send_nowait(_WAKE)
            with trio.move_on_after(timeout) as waited:
                await self._sender_done.wait()
                # Only now is `delivered` final: a frame the sender was blocked on has gone out.
                resume = {s.task_id: s.delivered + 1 for s in subs}
                for task_id, resume_from in resume.items():
                    message = f"subscriber of {task_id} fell behind; resubscribe with fromSeq={resume_from}"
                    await self.ws.send(dumps(ErrorFrame("SLOW_CONSUMER", message, resume_from)))
                await self.ws.close(CLOSE_TRY_AGAIN_LATER, "slow consumer")
            if waited.cancelled_caught:
                log.warning("slow consumer did not take its close frame; dropping the connection")
            return
        # Shutdown: everything already handed to the writer is committed and acked first.
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline):
            await self.settled.wait()
        # Subscribers resubscribe elsewhere; a catch-up still sending into the
        # outbox would fail once it is closed and take the close down with it.
        for sub in list(self.subs.values()):
            self._drop(sub)
        self.outbox.close()
        with trio.move_on_at(deadline) as waited:
            await self._sender_done.wait()
        if waited.cancelled_caught:
            log.warning("client did not take its last frames in time; dropping the connection")
            return
        # Within hypercorn's graceful timeout (shutdown_timeout + 2).
        with trio.move_on_after(1.0):
            await self.ws.close(CLOSE_GOING_AWAY, "hub shutting down")

    # --- sending ----------------------------------------------------------

    async def _send_loop(self) -> None:
        try:
            while True:
                try:
                    item = await self._outbox_recv.receive()
                except trio.EndOfChannel:
                    await self._flush_acks()
                    return
                if self._abandon_queue:
                    return
                if item is _WAKE:
                    self._ack_wake_pending = False
                await self._flush_acks()
                if item is _WAKE:
                    self._unqueued(item)
                    continue
                await self.ws.send(item.payload)
                self._unqueued(item)
                self.hub.metrics.frames_sent += 1
                if item.sub is not None and item.through > item.sub.delivered:
                    item.sub.delivered = item.through
        finally:
            self._sender_done.set()

    async def _flush_acks(self) -> None:
        while self.write_errors:
            _key, payload = self.write_errors.popitem()
            await self.ws.send(payload)
            self.hub.metrics.frames_sent += 1
        while self.replies:
            await self.ws.send(self.replies.pop(0))
            self.hub.metrics.frames_sent += 1
        while self.acks:
            (task_id, producer), seq = self.acks.popitem()
            await self.ws.send(dumps(AckFrame(task_id, seq, producer)))
            self.hub.metrics.frames_sent += 1

    def _queued(self, item: Outgoing) -> None:
        self.queued_bytes += item.size
        metrics = self.hub.metrics
        metrics.subscriber_queue_bytes_peak = max(metrics.subscriber_queue_bytes_peak, self.queued_bytes)

    def _unqueued(self, item: Outgoing) -> None:
        self.queued_bytes -= item.size
        self._room.set()

    def _has_room_for(self, item: Outgoing) -> bool:
        # One frame larger than the whole bound still goes through an empty queue.
        return self.queued_bytes == 0 or self.queued_bytes + item.size <= self.hub.config.subscriber_queue_bytes

    def _put_nowait(self, item: Outgoing) -> None:
        self.outbox.send_nowait(item)
        self._queued(item)

    def _send_nowait(self, item: Outgoing) -> bool:
        try:
            self._put_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def _offer(self, item: Outgoing) -> bool:
        """The broadcaster's way in: never waits; a full outbox is a slow consumer."""
        if not self._has_room_for(item):
            self._slow()
            return False
        try:
            self._put_nowait(item)
        except trio.WouldBlock:
            self._slow()
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def _slow(self) -> None:
        if self.closing is not None:
            return
        self.closing = "SLOW_CONSUMER"
        self.hub.metrics.slow_consumers += 1
        for sub in self.subs.values():
            self.hub.broadcaster.remove(sub)
        self._read_scope.cancel()

    async def _send_catching_up(self, item: Outgoing) -> None:
        """History waits for room, but not forever: a client that stops reading
        is a slow consumer whether it is catching up or live."""
        with trio.move_on_after(self.hub.config.slow_consumer_after):
            while not self._has_room_for(item):
                # Every waiter shares the one unset event the sender sets next.
                if self._room.is_set():
                    self._room = trio.Event()
                await self._room.wait()
            await self._put(item)
            return
        self._slow()
        await trio.sleep_forever()  # the connection is closing; _close cancels us

    async def _put(self, item: Outgoing) -> None:
        # Counted before the wait: the sender may take it out the moment it is in.
        self._queued(item)
        try:
            await self.outbox.send(item)
        except BaseException:
            self.queued_bytes -= item.size
            raise

    async def _send(self, payload: str) -> None:
        # Replies to the client's own frames (pong, subscribed, errors) are
        # small; the frame bound alone keeps them in check.
        await self._put(Outgoing(payload))

    async def _error(self, code: str, message: str, resume_from: int | None = None) -> None:
        self.hub.metrics.error(code)
        await self._send(dumps(ErrorFrame(code, message, resume_from)))

    def _on_written(self, outcome: WriteOutcome) -> None:
        """Called by the writer after the commit (never before)."""
        self.inflight -= 1
        if self.inflight == 0:
            self.settled.set()
        if outcome.error is not None:
            self.write_errors["STORE_ERROR"] = dumps(ErrorFrame("STORE_ERROR", "the hub could not store the records; resend them"))
            if not self._ack_wake_pending:
                self._ack_wake_pending = self._send_nowait(_WAKE)
            return
        for refusal in outcome.refusals:
            self.hub.metrics.error(refusal.code)
            # Bounded: at most a few per write request, and requests in flight are bounded.
            self.replies.append(dumps(ErrorFrame(refusal.code, refusal.message, refusal.resume_from)))
            if refusal.key is not None:
                self.ack_caps[refusal.key] = min(self.ack_caps.get(refusal.key, refusal.cap), refusal.cap)
        acks: list[tuple[tuple[str, str | None], int]] = [
            *(((task_id, None), seq) for task_id, seq in outcome.durable.items()),
            *outcome.producers.items(),
        ]
        for key, seq in acks:
            seq = min(seq, self.ack_caps.get(key, seq))
            if seq > self.acks.get(key, 0):
                self.acks[key] = seq
        if outcome.task is not None and outcome.run_state is not None:
            # The run's own state, to that run: how an agent knows its final status is stored.
            producer, state, code = outcome.run_state
            self.replies.append(dumps(StatusFrame(outcome.task.task_id, state, code, producer)))
        if (outcome.durable or outcome.producers or self.replies) and not self._ack_wake_pending:
            # If the outbox is full the sender is busy and flushes acks before its next frame.
            self._ack_wake_pending = self._send_nowait(_WAKE)

    # --- reading ----------------------------------------------------------

    async def _read_loop(self) -> None:
        limits = self.hub.config.limits
        while True:
            data = await self.ws.receive()
            self.hub.metrics.frames_received += 1
            if data is None:
                # Quart passes an empty binary message on as None (`bytes or text`).
                data = b""
            if data is OVERSIZED or data == OVERSIZED:
                await self._error("TOO_LARGE", f"frame is larger than {limits.max_frame_bytes} bytes")
                continue
            try:
                frame = decode_client_frame(data, limits)
                if isinstance(frame, LogsFrame | LogFrame | StatusFrame):
                    await self._queue_write(frame, len(data))
                else:
                    await self._handle(frame)
            except FrameError as exc:
                await self._error(exc.code, exc.message)

    async def _queue_write(self, frame: Any, size: int) -> None:
        limit = self.hub.config.limits.max_frame_bytes
        while self._ingest_frames and (
            self._ingest_frames >= INGEST_FRAMES or self._ingest_bytes + size > limit
        ):
            self._ingest_room = trio.Event()
            await self._ingest_room.wait()
        self._ingest_frames += 1
        self._ingest_bytes += size
        self._writes.send_nowait((frame, size))

    async def _ingest_loop(self) -> None:
        with self._ingest_scope:
            async for frame, size in self._writes_recv:
                try:
                    await self._handle(frame)
                except FrameError as exc:
                    await self._error(exc.code, exc.message)
                finally:
                    self._ingest_frames -= 1
                    self._ingest_bytes -= size
                    self._ingest_room.set()

    async def _handle(self, frame: Any) -> None:
        if isinstance(frame, PingFrame):
            await self._send(dumps(PongFrame()))
        elif isinstance(frame, LogsFrame | LogFrame):
            records = frame.records if isinstance(frame, LogsFrame) else [frame.record]
            where = "records" if isinstance(frame, LogsFrame) else "record"
            if not self._may_write():
                return await self._error("FORBIDDEN", "the viewer token may not write")
            producer = frame.producer if isinstance(frame, LogsFrame) else None
            items = from_records(records, where, producer)
            if not items:
                return
            await self.hub.limiter(items[0].task_id).acquire(len(items))
            await self._submit(WriteRequest(self._on_written, items=items))
        elif isinstance(frame, StatusFrame):
            if not self._may_write():
                return await self._error("FORBIDDEN", "the viewer token may not write")
            await self._submit(
                WriteRequest(self._on_written, status=StatusChange(frame.task_id, frame.state, frame.exit_code, frame.producer))
            )
        elif isinstance(frame, SubscribeFrame):
            await self._subscribe(frame)
        elif isinstance(frame, UnsubscribeFrame):
            sub = self.subs.get(frame.task_id)
            if sub is not None:
                self._drop(sub)

    def _may_write(self) -> bool:
        return self.role.can_write

    async def _submit(self, request: WriteRequest) -> None:
        self.inflight += 1
        self.settled = trio.Event() if self.settled.is_set() else self.settled
        try:
            await self.hub.writer_inbox.send(request)
        except BaseException:
            self.inflight -= 1
            if self.inflight == 0:
                self.settled.set()
            raise

    # --- subscriptions ----------------------------------------------------

    async def _subscribe(self, frame: SubscribeFrame) -> None:
        if frame.source is not None and frame.source not in SOURCES:
            raise FrameError("INVALID_MESSAGE_FORMAT", f"invalid field 'source': must be one of {', '.join(SOURCES)}", "source")
        if frame.level is not None and frame.level not in LEVELS:
            raise FrameError("INVALID_MESSAGE_FORMAT", f"invalid field 'level': must be one of {', '.join(LEVELS)}", "level")
        old = self.subs.get(frame.task_id)
        if old is None and len(self.subs) >= self.hub.config.max_subscriptions:
            raise FrameError(
                "TOO_MANY_SUBSCRIPTIONS",
                f"this connection already holds {len(self.subs)} subscriptions, the most allowed; "
                "unsubscribe from one first",
            )
        if old is not None:
            self._drop(old)
        store = self.hub.store
        start = (
            frame.from_seq - 1
            if frame.from_seq is not None
            else await self._read(lambda: store.durable_seq(frame.task_id))
        )
        sub = Subscription(frame.task_id, frame.source, frame.level, cursor=start, offer=self._offer, delivered=start)
        # Registered before the state is read: a status committed meanwhile is
        # then either in what we read or published to the subscription.
        self.subs[frame.task_id] = sub
        self.hub.broadcaster.add(sub)
        self.hub.metrics.subscribers += 1
        task = await self._read(lambda: store.task(frame.task_id))
        if task is not None and sub.pending_status is None:
            sub.pending_status = status_payload(task)
        await self._send(dumps(SubscribedFrame(frame.task_id, now_ts())))
        scope = trio.CancelScope()
        self._catch_up_scopes[sub] = scope
        assert self._nursery is not None
        self._nursery.start_soon(self._catch_up, sub, scope)
        sub.go_catch_up()

    async def _read(self, operation: Callable[[], Awaitable[T]]) -> T:
        """A store read for this connection, waiting out a short store outage
        (a database restart) instead of dropping the subscriber."""
        attempt = 0
        while True:
            try:
                return await operation()
            except StoreUnavailable:
                if attempt >= STORE_RETRIES:
                    raise
                await trio.sleep(STORE_RETRY.delay(attempt, random.random()))
                attempt += 1

    def _drop(self, sub: Subscription) -> None:
        if self.subs.get(sub.task_id) is sub:
            del self.subs[sub.task_id]
            self.hub.metrics.subscribers -= 1
        self.hub.broadcaster.remove(sub)
        scope = self._catch_up_scopes.pop(sub, None)
        if scope is not None:
            scope.cancel()

    async def _catch_up(self, sub: Subscription, scope: trio.CancelScope) -> None:
        """Read from the store until the subscription has everything durable, then go live."""
        store = self.hub.store
        with scope:
            while True:
                await sub.wake.wait()
                sub.wake = trio.Event()
                while not sub.live:
                    target = await self._read(lambda: store.durable_seq(sub.task_id))
                    while sub.cursor < target:
                        records = await self._read(
                            partial(
                                store.read_range,
                                sub.task_id, sub.cursor, target, FRAME_RECORDS, sub.source, sub.level,
                            )
                        )
                        through = records[-1].seq if len(records) == FRAME_RECORDS else target
                        for payload, last in encode_chunks(sub.task_id, records, through):
                            await self._send_catching_up(Outgoing(payload, sub, last))
                        sub.cursor = through
                    # No await between this check and going live: the broadcaster
                    # pushes every commit after it.
                    if self.hub.broadcaster.known.get(sub.task_id, 0) <= sub.cursor:
                        sub.live = True
                if sub.pending_status is not None:
                    payload, sub.pending_status = sub.pending_status, None
                    await self._send(payload)
