"""A connection's two bounded queues: its outbox and its write queue.

The outbox is the one queue to the sender, bounded in frames by the channel,
and in bytes (a frame of escaped lines can be megabytes). Its `bytes` are all
that the connection holds for its client: each queued frame from the moment it
is queued until the sender has written it (`taken`), the replies to its writes
(hub/ws/acks.py), and room reserved for the replies of writes not yet
committed. Four ways in: `offer` never waits (the broadcaster: full means
SLOW_CONSUMER), `put` waits for frame room (the reader's own replies, which
are small), `put_within` waits for room in both bounds, up to a patience
(history), and `reserve_within` waits the same way for room for a write's
replies before the write goes to the writer (`release` once it is committed).
Fast paths take room without a checkpoint or a cancel scope: a small frame
costs the hub little when nothing has to wait.

The ingest budget, the hub's one bound on write frames in bytes shared by
every connection, is hub/ingest_budget.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

import trio

from hub.metrics import Metrics
from hub.ws.acks import Replies
from hub.ws.subscription import Outgoing

# Tells the sender to look at the connection's replies (acks, errors).
WAKE = Outgoing("")


def _held(item: Outgoing) -> int:
    # A wake-up holds nothing for the client: it only points at the replies.
    return 0 if item is WAKE else item.size


class Outbox:
    def __init__(self, frames: int, max_bytes: int, metrics: Metrics, replies: Replies | None = None) -> None:
        # Made with the first frame or the sender's first wait: a connection
        # whose replies all go inline never needs it (5,000 idle producers
        # each held one, ~1.7 KB).
        self._channel: tuple[trio.MemorySendChannel[Outgoing], trio.MemoryReceiveChannel[Outgoing]] | None = None
        self._frames = frames
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        # The sender takes these before its next frame; they count against the bound too.
        self.replies = Replies() if replies is None else replies
        # Held for the replies of writes handed to the writer and not yet committed.
        self.reserved = 0
        self._metrics = metrics
        # Set by the sender after each frame: room in the byte bound (made by
        # the first wait for room).
        self._room: trio.Event | None = None

    def _ends(self) -> tuple[trio.MemorySendChannel[Outgoing], trio.MemoryReceiveChannel[Outgoing]]:
        if self._channel is None:
            self._channel = trio.open_memory_channel[Outgoing](self._frames)
        return self._channel

    async def receive(self) -> Outgoing:
        """The sender's next frame; EndOfChannel once closed and empty."""
        return await self._ends()[1].receive()

    def sender_waits(self) -> bool:
        """The sender is parked on an empty outbox: nothing it holds or will
        take comes before a frame written now, by another way."""
        if self._channel is None:
            return False
        stats = self._channel[1].statistics()
        return stats.current_buffer_used == 0 and stats.tasks_waiting_receive > 0

    @property
    def bytes(self) -> int:
        """What the connection holds for its client, against `max_bytes`."""
        return self.queued_bytes + self.replies.bytes + self.reserved

    def taken(self, item: Outgoing) -> None:
        """The sender is done with `item` (written, or a wake-up), and with the replies before it."""
        self.queued_bytes -= _held(item)
        self._wake_room()

    def close(self) -> None:
        self._ends()[0].close()

    def has_room_for(self, size: int) -> bool:
        # One frame larger than the whole bound still goes through an empty queue.
        held = self.bytes
        return held == 0 or held + size <= self.max_bytes

    def record_peak(self) -> None:
        self._metrics.subscriber_queue_bytes_peak = max(self._metrics.subscriber_queue_bytes_peak, self.bytes)

    def _queued(self, item: Outgoing) -> None:
        self.queued_bytes += _held(item)
        self.record_peak()

    def _put_nowait(self, item: Outgoing) -> None:
        self._ends()[0].send_nowait(item)
        self._queued(item)

    def try_put(self, item: Outgoing) -> bool:
        """Queues `item` if the channel has room, whatever the bytes (a wake-up, the close)."""
        try:
            self._put_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def offer(self, item: Outgoing) -> Literal["queued", "full", "closed"]:
        """Never waits: "full" past either bound."""
        if not self.has_room_for(item.size):
            return "full"
        try:
            self._put_nowait(item)
        except trio.WouldBlock:
            return "full"
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return "closed"
        return "queued"

    async def put(self, item: Outgoing) -> None:
        # Counted before the wait: the sender may take it out the moment it is in.
        self._queued(item)
        try:
            await self._ends()[0].send(item)
        except BaseException:
            self.queued_bytes -= item.size
            raise

    async def put_within(self, item: Outgoing, patience: float) -> bool:
        """Waits for room in both bounds, up to `patience` seconds; False if it ran out."""
        with trio.move_on_after(patience):
            await self._room_for(item.size)
            await self.put(item)
            return True
        return False

    async def reserve_within(self, size: int, patience: float) -> bool:
        """Holds `size` bytes for a write's replies once the byte bound has
        room, waiting up to `patience` seconds; False if it ran out."""
        if self.try_reserve(size):
            return True
        with trio.move_on_after(patience):
            await self._room_for(size)
            self.reserved += size
            self.record_peak()
            return True
        return False

    def try_reserve(self, size: int) -> bool:
        """`reserve_within` when there is room now; False (nothing held) otherwise."""
        if not self.has_room_for(size):
            return False
        self.reserved += size
        self.record_peak()
        return True

    def release(self, size: int) -> None:
        """A reservation's write is committed (its replies are in) or withdrawn."""
        self.reserved -= size
        self._wake_room()

    def _wake_room(self) -> None:
        if self._room is not None:
            self._room.set()

    async def _room_for(self, size: int) -> None:
        while not self.has_room_for(size):
            # Every waiter shares the one unset event the sender sets next.
            if self._room is None or self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()


class WriteQueue:
    """Write frames read but not yet handed to the writer, bounded in frames
    and bytes (one frame is always let in): beyond either the reader waits."""

    def __init__(self, frames: int, max_bytes: int) -> None:
        # Made with the first frame: most connections never queue one, and a
        # channel is a few KB that 5,000 idle connections feel.
        self._channel: tuple[trio.MemorySendChannel[tuple[Any, int]], trio.MemoryReceiveChannel[tuple[Any, int]]] | None = None
        self.max_frames = frames
        self.max_bytes = max_bytes
        self.frames = 0
        self.bytes = 0
        # Its own wake-up, apart from the outbox's: one event shared by both
        # let each side orphan the other's waiter. Made by the first wait.
        self._room: trio.Event | None = None

    @property
    def empty(self) -> bool:
        """No frame is queued or being handled."""
        return self.frames == 0

    async def put(self, frame: Any, size: int) -> None:
        while self.frames and (self.frames >= self.max_frames or self.bytes + size > self.max_bytes):
            self._room = trio.Event()
            await self._room.wait()
        self.frames += 1
        self.bytes += size
        self._ends()[0].send_nowait((frame, size))

    def _ends(self) -> tuple[trio.MemorySendChannel[tuple[Any, int]], trio.MemoryReceiveChannel[tuple[Any, int]]]:
        if self._channel is None:
            self._channel = trio.open_memory_channel[tuple[Any, int]](self.max_frames)
        return self._channel

    def __aiter__(self) -> AsyncIterator[tuple[Any, int]]:
        """(frame, size) pairs; call `done(size)` once a frame is handled."""
        return self._ends()[1]

    def drain(self) -> list[tuple[Any, int]]:
        """Takes what is still queued (the connection is ending)."""
        out: list[tuple[Any, int]] = []
        if self._channel is None:
            return out
        while True:
            try:
                out.append(self._channel[1].receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return out

    def done(self, size: int) -> None:
        self.frames -= 1
        self.bytes -= size
        if self._room is not None:
            self._room.set()
