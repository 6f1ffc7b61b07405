"""One WebSocket connection: a reader, a single sender, and per-subscription catch-up.

Only the sender task writes to the socket. Everything else hands it frames
through one bounded outbox: the reader awaits room (a client that does not
read stops being read), the broadcaster never waits (a full outbox is
SLOW_CONSUMER), and acks are coalesced per task so they are never dropped.
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
from hub.ingest import from_records
from hub.state import Hub
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
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN_LATER = 1013


class Connection:
    def __init__(self, hub: Hub, ws: Any, role: Role) -> None:
        self.hub = hub
        self.ws = ws
        self.role = role
        self.outbox, self._outbox_recv = trio.open_memory_channel[Outgoing](hub.config.subscriber_queue)
        self.acks: dict[str, int] = {}
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

    # --- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        metrics = self.hub.metrics
        metrics.connections += 1
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._send_loop)
                nursery.start_soon(self._watch_shutdown)
                with self._read_scope:
                    await self._read_loop()
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
        with trio.move_on_after(timeout):
            await self.settled.wait()
            self.outbox.close()
            await self._sender_done.wait()
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
                    continue
                await self.ws.send(item.payload)
                self.hub.metrics.frames_sent += 1
                if item.sub is not None and item.through > item.sub.delivered:
                    item.sub.delivered = item.through
        finally:
            self._sender_done.set()

    async def _flush_acks(self) -> None:
        while self.acks:
            task_id, seq = self.acks.popitem()
            await self.ws.send(dumps(AckFrame(task_id, seq)))
            self.hub.metrics.frames_sent += 1

    def _send_nowait(self, item: Outgoing) -> bool:
        try:
            self.outbox.send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def _offer(self, item: Outgoing) -> bool:
        """The broadcaster's way in: never waits; a full outbox is a slow consumer."""
        try:
            self.outbox.send_nowait(item)
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
            await self.outbox.send(item)
            return
        self._slow()
        await trio.sleep_forever()  # the connection is closing; _close cancels us

    async def _send(self, payload: str) -> None:
        await self.outbox.send(Outgoing(payload))

    async def _error(self, code: str, message: str, resume_from: int | None = None) -> None:
        self.hub.metrics.error(code)
        await self._send(dumps(ErrorFrame(code, message, resume_from)))

    def _on_written(self, outcome: WriteOutcome) -> None:
        """Called by the writer after the commit (never before)."""
        self.inflight -= 1
        if self.inflight == 0:
            self.settled.set()
        if outcome.error is not None:
            self._send_nowait(Outgoing(dumps(ErrorFrame("STORE_ERROR", "the hub could not store the records; resend them"))))
            return
        for task_id, seq in outcome.durable.items():
            if seq > self.acks.get(task_id, 0):
                self.acks[task_id] = seq
        if outcome.durable and not self._ack_wake_pending:
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
                await self._handle(frame)
            except FrameError as exc:
                await self._error(exc.code, exc.message)

    async def _handle(self, frame: Any) -> None:
        if isinstance(frame, PingFrame):
            await self._send(dumps(PongFrame()))
        elif isinstance(frame, LogsFrame | LogFrame):
            records = frame.records if isinstance(frame, LogsFrame) else [frame.record]
            where = "records" if isinstance(frame, LogsFrame) else "record"
            if not self._may_write():
                return await self._error("FORBIDDEN", "the viewer token may not write")
            items = from_records(records, where)
            if not items:
                return
            await self.hub.limiter(items[0].task_id).acquire(len(items))
            await self._submit(WriteRequest(self._on_written, items=items))
        elif isinstance(frame, StatusFrame):
            if not self._may_write():
                return await self._error("FORBIDDEN", "the viewer token may not write")
            await self._submit(
                WriteRequest(self._on_written, status=StatusChange(frame.task_id, frame.state, frame.exit_code))
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
