"""One WebSocket connection: the Trio driver of its reader, sender and catch-ups.

Only the sender task writes to the socket. Everything else hands it frames
through one bounded outbox (hub/ws/queues.py): the reader awaits room (a client
that does not read stops being read), the broadcaster never waits (a full
outbox is SLOW_CONSUMER), and acks are coalesced (hub/ws/acks.py) so they are
never dropped. Replies to writes (acks, SEQ_GAP and the like, a run's status)
count against the same byte bound: each write holds room for its replies
before it goes to the writer, so a client that never reads them stops being
read once they fill the bound, and after `slow_consumer_after` is cut off as a
slow consumer (a SLOW_CONSUMER error, close 1013). What a subscription sends
when is decided by its sans-IO state (hub/ws/subscription.py); this module
only does the reads and sends it asks for.

Writes (`log`, `logs`, `status`) first take their bytes from the hub's ingest
budget (hub/ingest_budget.py: past it every reader waits, so an
overloaded hub stops reading its sockets instead of queueing). A write that
can go at once (nothing queued before it, the task's tokens and the writer's
inbox have room) is handed to the writer by the reader itself: a small frame
costs a decode and an enqueue. Otherwise it goes to an ingest task through a
small queue, bounded in frames and bytes; the ingest task hands each to the
writer once its task's tokens are there (hub/ws/write_schedule.py: another
task's write on the same socket does not wait behind it). So a throttled
producer is slowed (the reader stops once the queue is full), yet a ping sent
while a frame waits for its tokens is answered at once.

The connection is its writes' `Mailbox` (hub/messages.py): the syncer gives it
one `Written` message per sync, which gives back the frames' budget and wakes
the sender; the sender turns the outcomes into coalesced acks.

Under hypercorn (its patch 6) the common case skips both task hops: a write
frame that can go at once is taken in hypercorn's read task while the reader
waits on an empty queue, and the acks a `Written` brings, or a live frame
the broadcaster offers, are written at once while the sender waits on an
empty outbox. Anything else goes the ways above, in order.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import attrs
import trio

from hub.auth import Role
from hub.deps import ConnectionDeps
from hub.hypercorn_patches import OVERSIZED
from hub.ingest import RowsFrame, decode_frame, from_records
from hub.messages import StatusChange, WriteOutcome, WriteRequest, Written
from hub.store.base import STORE_RETRY, StoreUnavailable
from hub.ws.acks import WRITE_REPLY_BYTES, Replies
from hub.ws.queues import WAKE, Outbox, WriteQueue
from hub.ws.subscription import (
    Outgoing,
    ReadRange,
    Subscription,
    check_subscribe,
    slow_consumer_frames,
)
from hub.ws.write_schedule import WriteSchedule
from keruta.frames import (
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
)
from keruta.retry import retry
from keruta.timefmt import now_ts
from keruta.wire import dumps

log = logging.getLogger("keruta.hub.ws")

T = TypeVar("T")
# About a minute of retries before the connection gives up on the store.
STORE_RETRIES = 15

# Write frames read but not yet handed to the writer, per connection; beyond
# either bound (one frame is always let in) the reader waits. An agent has at
# most 8 frames unacknowledged, so its pings never queue behind its writes.
INGEST_FRAMES = 8
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN_LATER = 1013


class WebSocket(Protocol):
    """What a Connection uses of its socket (hub/ws/endpoint.py's AsgiWebSocket
    in the hub; an in-memory stand-in in tests/test_unit_connection.py).
    `receive` gives a message's text or bytes, OVERSIZED for one over the limit."""

    async def receive(self) -> str | bytes: ...

    async def send(self, data: str) -> None: ...

    async def close(self, code: int, reason: str = "") -> None: ...


class InlineSocket(Protocol):
    """A socket's inline ways (hub/hypercorn_patches.py InlineLink): a
    message taken where it is read, a frame written without a task hop."""

    on_message: Callable[[str | bytes], bool] | None

    def writable(self) -> bool: ...

    def send_now(self, text: str) -> None: ...


class Connection:
    # Slots: 5,000 idle producers each hold one.
    __slots__ = (
        "_abandon_queue", "_catch_up_scopes", "_decoded", "_handed", "_ingest_scope",
        "_nursery", "_read_scope", "_sender_done", "_settled", "_wake_pending", "_writes",
        "_written", "budget", "closing", "hub", "inflight", "link", "outbox", "replies", "role", "subs", "ws",
    )

    def __init__(self, hub: ConnectionDeps, ws: WebSocket, role: Role) -> None:
        self.hub = hub
        self.ws = ws
        self.role = role
        self.replies = Replies()
        self.outbox = Outbox(hub.config.subscriber_queue, hub.config.subscriber_queue_bytes, hub.metrics, self.replies)
        # A WAKE is in the outbox: the sender will flush the replies anyway.
        self._wake_pending = False
        self.subs: dict[str, Subscription] = {}
        self._catch_up_scopes: dict[Subscription, trio.CancelScope] = {}
        self.inflight = 0
        # Made by whoever waits for the writes in flight to be answered (a
        # shutdown), not by every write: most are answered with nobody waiting.
        self._settled: trio.Event | None = None
        self.closing: str | None = None
        self._read_scope = trio.CancelScope()
        # Made when the sender starts (None: not started).
        self._sender_done: trio.Event | None = None
        self._abandon_queue = False
        self._nursery: trio.Nursery | None = None
        self._writes = WriteQueue(INGEST_FRAMES, hub.config.limits.max_frame_bytes)
        # The ingest task's, made when it starts (None: not started). It
        # starts with the first write that has to wait: a viewer, or a
        # producer whose writes always go at once, costs no task for it.
        self._ingest_scope: trio.CancelScope | None = None
        self.budget = hub.ingest_budget
        # The budget held by each write handed to the writer, in the order it
        # answers them (a connection's writes are answered in the order sent).
        # Made with the first write: an empty deque holds 760 bytes, which
        # 5,000 idle connections (or viewers, which never write) feel.
        self._handed: collections.deque[int] | None = None
        # Answers given by the syncer, for the sender to take (a few at most).
        self._written: list[Written] = []
        self.link: InlineSocket | None = getattr(ws, "link", None)
        # A message the inline path decoded and left to the reader, with its frame.
        self._decoded: tuple[str | bytes, Any] | None = None

    # --- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        metrics = self.hub.metrics
        metrics.connections += 1
        if self.link is not None:
            self.link.on_message = self._take_inline
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    self.hub.shutting_down.subscribe(self._on_shutdown)
                    with self._read_scope:
                        await self._read_loop()
                    # Writes not yet handed to the writer are dropped unacknowledged
                    # (the producer resends them), as when the reader held them.
                    if self._ingest_scope is not None:
                        self._ingest_scope.cancel()
                    self._drop_queued_writes()
                    await self._close()
                    nursery.cancel_scope.cancel()
                finally:
                    # Before the nursery closes to new tasks (its exit checkpoints):
                    # answers the syncer brings from here on start no sender.
                    self._nursery = None
        finally:
            self.hub.shutting_down.unsubscribe(self._on_shutdown)
            if self.link is not None:
                self.link.on_message = None
            metrics.connections -= 1
            for sub in list(self.subs.values()):
                self._drop(sub)

    def _on_shutdown(self) -> None:
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
            self._start_sender()
            self.outbox.try_put(WAKE)
            with trio.move_on_after(timeout) as waited:
                assert self._sender_done is not None, "started above"
                await self._sender_done.wait()
                for payload in slow_consumer_frames(subs):
                    await self.ws.send(payload)
                await self.ws.close(CLOSE_TRY_AGAIN_LATER, "slow consumer")
            if waited.cancelled_caught:
                log.warning("slow consumer did not take its close frame; dropping the connection")
            return
        # Shutdown: everything already handed to the writer is committed and acked first.
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline):
            await self._all_answered()
        # Subscribers resubscribe elsewhere; a catch-up still sending into the
        # outbox would fail once it is closed and take the close down with it.
        for sub in list(self.subs.values()):
            self._drop(sub)
        self._start_sender()
        self.outbox.close()
        with trio.move_on_at(deadline) as waited:
            assert self._sender_done is not None, "started above"
            await self._sender_done.wait()
        if waited.cancelled_caught:
            log.warning("client did not take its last frames in time; dropping the connection")
            return
        # Within hypercorn's graceful timeout (shutdown_timeout + 2).
        with trio.move_on_after(1.0):
            await self.ws.close(CLOSE_GOING_AWAY, "hub shutting down")

    # --- sending ----------------------------------------------------------

    def _start_sender(self) -> None:
        """The sender starts with the outbox's first frame: a connection whose
        frames all go inline (an idle producer, a producer whose acks the
        socket takes at once) costs no task for it."""
        if self._sender_done is None and self._nursery is not None:
            self._sender_done = trio.Event()
            self._nursery.start_soon(self._send_loop, self._sender_done)

    def _sender_idle(self) -> bool:
        """Nothing the sender holds or will take comes before a frame written
        now another way: it is not started, or parked on an empty outbox."""
        return self._sender_done is None or self.outbox.sender_waits()

    async def _send_loop(self, done: trio.Event) -> None:
        try:
            while True:
                try:
                    item = await self.outbox.receive()
                except trio.EndOfChannel:
                    self._take_written()
                    await self._flush_replies()
                    return
                if self._abandon_queue:
                    return
                if item is WAKE:
                    self._wake_pending = False
                self._take_written()
                await self._flush_replies()
                if item is not WAKE:
                    await self.ws.send(item.payload)
                    self.hub.metrics.frames_sent += 1
                self.outbox.taken(item)
                if item.sub is not None:
                    item.sub.on_sent(item.through)
        finally:
            done.set()

    async def _flush_replies(self) -> None:
        while (payload := self.replies.next_frame(self.budget.used)) is not None:
            await self.ws.send(payload)
            self.hub.metrics.frames_sent += 1

    def _offer(self, item: Outgoing) -> bool:
        """The broadcaster's way in: never waits; a full outbox is a slow consumer."""
        if self._write_live_now(item):
            return True
        result = self.outbox.offer(item)
        if result == "queued":
            self._start_sender()
        elif result == "full":
            self._slow()
        return result == "queued"

    def _slow(self) -> None:
        if self.closing is not None:
            return
        self.closing = "SLOW_CONSUMER"
        self.hub.metrics.slow_consumers += 1
        self.replies.abandon()
        for sub in self.subs.values():
            self.hub.broadcaster.remove(sub)
        self._read_scope.cancel()

    async def _send_catching_up(self, item: Outgoing) -> None:
        """History waits for room, but not forever: a client that stops reading
        is a slow consumer whether it is catching up or live."""
        self._start_sender()
        if not await self.outbox.put_within(item, self.hub.config.slow_consumer_after):
            self._slow()
            await trio.sleep_forever()  # the connection is closing; _close cancels us

    async def _send(self, payload: str) -> None:
        # Replies to the client's own frames (pong, subscribed, errors) are
        # small; the frame bound alone keeps them in check.
        self._start_sender()
        await self.outbox.put(Outgoing(payload))

    async def _error(self, code: str, message: str, resume_from: int | None = None) -> None:
        self.hub.metrics.error(code)
        await self._send(dumps(ErrorFrame(code, message, resume_from)))

    def deliver(self, message: Written) -> None:
        """The syncer's answer to this connection's writes (after their commit
        and sync, never before). Never blocks: it gives back the frames' budget
        (the connection may be gone) and wakes the sender, which takes the
        outcomes."""
        for _ in message.outcomes:
            assert self._handed is not None, "answers come only for writes handed"
            self.budget.release(self._handed.popleft())
        self._written.append(message)
        if not self._wake_pending and not self._send_inline():
            # If the outbox is full the sender is busy and takes them before its next frame.
            self._wake_pending = self.outbox.try_put(WAKE)
            self._start_sender()

    def _write_live_now(self, item: Outgoing) -> bool:
        """A live frame written by the broadcaster itself when the sender
        waits on an empty outbox with no replies owed and the socket is free."""
        link = self.link
        if (
            link is None
            or self.closing is not None
            or self._written
            or self._wake_pending
            or not self._sender_idle()
            or not link.writable()
        ):
            return False
        link.send_now(item.payload)
        self.hub.metrics.frames_sent += 1
        if item.sub is not None:
            item.sub.on_sent(item.through)
        return True

    def _send_inline(self) -> bool:
        """Writes the replies now when the sender waits on an empty outbox
        and the socket is free; False leaves (the rest of) them to the sender."""
        link = self.link
        if link is None or self.closing is not None or not self._sender_idle():
            return False
        self._take_written()
        self.outbox.taken(WAKE)
        while link.writable():
            payload = self.replies.next_frame(self.budget.used)
            if payload is None:
                return True
            link.send_now(payload)
            self.hub.metrics.frames_sent += 1
        return False

    def _take_written(self) -> None:
        written, self._written = self._written, []
        for message in written:
            for outcome in message.outcomes:
                self._on_written(outcome)
        self.outbox.record_peak()

    def _on_written(self, outcome: WriteOutcome) -> None:
        self._settle_one()
        self.outbox.release(WRITE_REPLY_BYTES)
        if outcome.error is None:
            for refusal in outcome.refusals:
                self.hub.metrics.error(refusal.code)
        if self.closing == "SLOW_CONSUMER":
            return  # cut off: nothing more is sent
        self.replies.on_written(outcome)

    def _settle_one(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._settled is not None:
            self._settled.set()
            self._settled = None

    async def _all_answered(self) -> None:
        """Until every write handed to the writer is answered."""
        while self.inflight:
            if self._settled is None:
                self._settled = trio.Event()
            await self._settled.wait()

    # --- reading ----------------------------------------------------------

    def _take_inline(self, data: str | bytes) -> bool:
        """A message where hypercorn read it (the reader waits on an empty
        queue): a write that can go at once goes; False leaves it to the
        reader, with its frame if it was decoded."""
        if self.closing is not None or not self._writes.empty or not self.role.can_write:
            return False
        try:
            frame = decode_frame(data, self.hub.config.limits)
        except FrameError:
            return False  # the reader decodes it again and answers
        size = len(data)
        if not isinstance(frame, RowsFrame) or not self.budget.try_take(size):
            self._decoded = (data, frame)
            return False
        if not self._write_now(frame, size):
            self.budget.release(size)
            self._decoded = (data, frame)
            return False
        metrics = self.hub.metrics
        metrics.frames_received += 1
        metrics.frame_bytes.observe(size)
        return True

    async def _read_loop(self) -> None:
        limits = self.hub.config.limits
        while True:
            data = await self.ws.receive()
            self.hub.metrics.frames_received += 1
            if data is OVERSIZED or data == OVERSIZED:
                await self._error("TOO_LARGE", f"frame is larger than {limits.max_frame_bytes} bytes")
                continue
            self.hub.metrics.frame_bytes.observe(len(data))
            decoded, self._decoded = self._decoded, None
            try:
                frame = decoded[1] if decoded is not None and decoded[0] is data else decode_frame(data, limits)
            except FrameError as exc:
                await self._error(exc.code, exc.message)
                continue
            if isinstance(frame, RowsFrame | LogsFrame | LogFrame | StatusFrame):
                size = len(data)
                # Past the budget the reader waits here: the socket is not read.
                await self.budget.take(size)
                if self._writes.empty and self._write_now(frame, size):
                    continue
                if self._ingest_scope is None:
                    assert self._nursery is not None
                    self._ingest_scope = trio.CancelScope()
                    self._nursery.start_soon(self._ingest_loop, self._ingest_scope)
                try:
                    await self._writes.put(frame, size)
                except BaseException:
                    self.budget.release(size)
                    raise
            else:
                try:
                    await self._handle(frame)
                except FrameError as exc:
                    await self._error(exc.code, exc.message)

    async def _ingest_loop(self, scope: trio.CancelScope) -> None:
        """Hands the queued writes to the writer, each once its task's tokens
        are there (hub/ws/write_schedule.py): a throttled task's write waits
        without holding up another task's. What waits still counts in the
        write queue, so the reader stops once it is full."""
        schedule: WriteSchedule[tuple[WriteRequest, int, int]] = WriteSchedule()
        frames = aiter(self._writes)
        with scope:
            try:
                while True:
                    at = schedule.next_at()
                    if at is not None and at <= trio.current_time():
                        request, size, tokens = schedule.pop()
                        await self._hand(request, size, tokens)
                        continue
                    # The next frame, or the next write's time, whichever comes first
                    # (a cancel scope only while a write waits for its tokens).
                    if at is None:
                        frame, size = await anext(frames)
                    else:
                        got = None
                        with trio.move_on_at(at):
                            got = await anext(frames)
                        if got is None:
                            continue
                        frame, size = got
                    try:
                        wanted = self._request(frame)
                    except FrameError as exc:
                        self._unqueue(size)
                        await self._error(exc.code, exc.message)
                        continue
                    if wanted is None:
                        self._unqueue(size)
                        continue
                    task_id, tokens = wanted.task_id, len(wanted.items)
                    schedule.add(task_id, self.hub.limiter(task_id).reserve(tokens), (wanted, size, tokens))
            finally:
                for request, size, tokens in schedule.drain():
                    self._unqueue(size)
                    self._refund(request, tokens)

    async def _hand(self, request: WriteRequest, size: int, tokens: int) -> None:
        handed = False
        try:
            await self._submit(request, size)
            handed = True
        finally:
            self._writes.done(size)
            if not handed:
                self.budget.release(size)
                self._refund(request, tokens)

    def _unqueue(self, size: int) -> None:
        """A queued write that will not be handed: its queue room and budget back."""
        self._writes.done(size)
        self.budget.release(size)

    def _refund(self, request: WriteRequest, tokens: int) -> None:
        if tokens:
            self.hub.limiter(request.task_id).refund(tokens)

    def _drop_queued_writes(self) -> None:
        for _frame, size in self._writes.drain():
            self.budget.release(size)

    async def _handle(self, frame: Any) -> None:
        if isinstance(frame, PingFrame):
            await self._send(dumps(PongFrame()))
        elif isinstance(frame, SubscribeFrame):
            await self._subscribe(frame)
        elif isinstance(frame, UnsubscribeFrame):
            sub = self.subs.get(frame.task_id)
            if sub is not None:
                self._drop(sub)

    def _write_now(self, frame: RowsFrame | LogsFrame | LogFrame | StatusFrame, size: int) -> bool:
        """Hands a write to the writer when nothing has to wait for it (no
        checkpoint); False leaves it, untouched, to the ingest task."""
        if not self.role.can_write or not isinstance(frame, RowsFrame) or not frame.items:
            return False
        items = frame.items
        if not self.outbox.try_reserve(WRITE_REPLY_BYTES):
            return False
        bucket = self.hub.limiter(items[0].task_id).bucket
        # Within the burst only: a larger frame waits for its tokens as `acquire` has it.
        if bucket is not None and (len(items) > bucket.burst or bucket.try_take(len(items), trio.current_time()) > 0):
            self.outbox.release(WRITE_REPLY_BYTES)
            return False
        self._begin(size)
        try:
            self.hub.writer_inbox.send_nowait(WriteRequest(items=items, reply_to=self))
        except trio.WouldBlock:
            self._abandon(size)
            if bucket is not None:
                bucket.refund(len(items))
            return False
        return True

    def _request(self, frame: RowsFrame | LogsFrame | LogFrame | StatusFrame) -> WriteRequest | None:
        """The writer's request for a write frame (None: nothing to write)."""
        if not self.role.can_write:
            raise FrameError("FORBIDDEN", "the viewer token may not write")
        if isinstance(frame, StatusFrame):
            status = StatusChange(
                frame.task_id, frame.state, frame.exit_code, frame.producer, frame.summary, frame.max_bytes
            )
            return WriteRequest(status=status, reply_to=self)
        if isinstance(frame, RowsFrame):
            items = frame.items
        elif isinstance(frame, LogsFrame):
            items = from_records(frame.records, "records", frame.producer)
        else:
            items = from_records([frame.record], "record")
            if not frame.numbered:
                items = [attrs.evolve(items[0], seq=None)]
        if not items:
            return None
        return WriteRequest(items=items, reply_to=self)

    async def _submit(self, request: WriteRequest, size: int) -> None:
        # Room for its replies first: while there is none, the write queue
        # fills and the reader stops; a client that does not read its replies
        # is a slow consumer as a subscriber that does not read its records is.
        if not await self.outbox.reserve_within(WRITE_REPLY_BYTES, self.hub.config.slow_consumer_after):
            self._slow()
            await trio.sleep_forever()  # the connection is closing; run() cancels us
        # Counted as handed before the send: its answer may come before this task runs again.
        self._begin(size)
        try:
            try:
                self.hub.writer_inbox.send_nowait(request)
            except trio.WouldBlock:
                await self.hub.writer_inbox.send(request)
        except BaseException:
            self._abandon(size)
            raise

    def _begin(self, size: int) -> None:
        if self._handed is None:
            self._handed = collections.deque()
        self._handed.append(size)
        self.inflight += 1

    def _abandon(self, size: int) -> None:
        """The write `_begin` counted was not handed after all (the caller
        still holds its budget)."""
        assert self._handed is not None, "_begin made it"
        self._handed.pop()
        self._settle_one()
        self.outbox.release(WRITE_REPLY_BYTES)

    # --- subscriptions ----------------------------------------------------

    async def _subscribe(self, frame: SubscribeFrame) -> None:
        check_subscribe(frame, self.subs, self.hub.config.max_subscriptions)
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
        # Queued with no checkpoint since `add`: before anything the
        # broadcaster offers it (a `redacted` frame, a gap) during the read.
        self._offer(Outgoing(dumps(SubscribedFrame(frame.task_id, now_ts()))))
        sub.on_task(await self._read(lambda: store.task(frame.task_id)))
        scope = trio.CancelScope()
        self._catch_up_scopes[sub] = scope
        assert self._nursery is not None
        self._nursery.start_soon(self._catch_up, sub, scope)

    async def _read(self, operation: Callable[[], Awaitable[T]]) -> T:
        """A store read for this connection, waiting out a short store outage
        (a database restart) instead of dropping the subscriber."""
        return await retry(operation, backoff=STORE_RETRY, retryable=(StoreUnavailable,), retries=STORE_RETRIES)

    def _drop(self, sub: Subscription) -> None:
        if self.subs.get(sub.task_id) is sub:
            del self.subs[sub.task_id]
            self.hub.metrics.subscribers -= 1
        self.hub.broadcaster.remove(sub)
        scope = self._catch_up_scopes.pop(sub, None)
        if scope is not None:
            scope.cancel()

    async def _catch_up(self, sub: Subscription, scope: trio.CancelScope) -> None:
        """Does the reads the subscription asks for while it catches up."""
        store = self.hub.store
        wake = trio.Event()
        wake.set()  # a new subscription starts by catching up
        sub.wake = lambda: wake.set()
        with scope:
            while True:
                await wake.wait()
                wake = trio.Event()
                # No await between reading `known` and the switch to live inside next_read.
                while (step := sub.next_read(self.hub.broadcaster.known_seq(sub.task_id))) is not None:
                    if isinstance(step, ReadRange):
                        while True:
                            rewrites = sub.rewrites
                            records = await self._read(
                                lambda: store.read_range(
                                    step.task_id, step.after, step.through, step.limit, step.source, step.level
                                )
                            )
                            if sub.rewrites == rewrites:
                                break
                            # A gap or a redaction was published while this page
                            # was read, and has gone to the client already: the
                            # page may hold what it took away. Read it again.
                        for item in sub.on_history_page(records):
                            await self._send_catching_up(item)
                    else:
                        sub.on_durable(await self._read(lambda: store.durable_seq(sub.task_id)))
                status = sub.take_status()
                if status is not None:
                    await self._send(status)
