"""The ingest budget: the hub's one bound, in bytes, on write frames read and
not yet answered, shared by every connection (docs/architecture.md)."""

from __future__ import annotations

import collections
from collections.abc import Callable

import trio

from hub.metrics import Metrics


class IngestBudget:
    """The bytes of write frames the hub holds across all its connections:
    read from a socket and not yet answered (waiting in a connection's write
    queue, the writer's inbox, a commit or its sync). Past `max_bytes` a
    reader waits for room before it takes its frame in, so it stops reading
    its socket (TCP backpressure): the hub's memory for writes is bounded
    whatever the number of connections. Waiters are served in order, each
    woken once; one frame larger than the whole budget goes alone.
    """

    def __init__(self, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self.peak = 0
        self._metrics = metrics
        self._waiters: collections.deque[tuple[int, trio.Event]] = collections.deque()
        # Messages still arriving (hub/ws/stream_socket.py) hold at most this
        # share of the budget, so whole frames always find the rest.
        self.partial_max = max_bytes // 2
        self.partial_used = 0
        self._partial_waiters: collections.deque[tuple[int, trio.Event]] = collections.deque()

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.max_bytes

    def _take(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)
        self._count()

    def _count(self) -> None:
        if self._metrics is not None:
            self._metrics.ingest_queue_bytes = self.used
            self._metrics.ingest_queue_bytes_peak = self.peak

    def try_take(self, size: int) -> bool:
        if self._waiters or not self._fits(size):
            return False
        self._take(size)
        return True

    async def take(self, size: int) -> None:
        """Holds `size` bytes once there is room (no checkpoint when there is)."""
        if not self.try_take(size):
            await self._wait_turn(self._waiters, size, self.release)

    async def _wait_turn(
        self, waiters: collections.deque[tuple[int, trio.Event]], size: int, release: Callable[[int], None]
    ) -> None:
        """Waits in `waiters` until `_wake` gives `size` bytes; a waiter
        cancelled holds nothing (what it was given goes back by `release`)."""
        given = trio.Event()
        entry = (size, given)
        waiters.append(entry)
        try:
            await given.wait()
        except BaseException:
            if given.is_set():
                release(size)
            else:
                waiters.remove(entry)
                self._wake()
            raise

    def release(self, size: int) -> None:
        self.used -= size
        self._count()
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            size, given = self._waiters.popleft()
            self._take(size)
            given.set()
        while self._partial_waiters and self._fits_partial(self._partial_waiters[0][0]):
            size, given = self._partial_waiters.popleft()
            self._take_partial(size)
            given.set()

    # -- messages still arriving ---------------------------------------------

    def _fits_partial(self, size: int) -> bool:
        # One holder at a time goes past the share, so a message larger than
        # it still arrives (a whole frame that size goes alone too), but not
        # beside a whole frame that went alone: at most one is past the bound.
        return (self.partial_used == 0 and self.used <= self.max_bytes) or (
            not self._waiters
            and self.partial_used + size <= self.partial_max
            and self.used + size <= self.max_bytes
        )

    def _take_partial(self, size: int) -> None:
        self.partial_used += size
        self._take(size)

    async def take_partial(self, size: int) -> None:
        """Holds `size` bytes for a message still arriving, once there is
        room within the partial share; waiters are served in order."""
        if not self._partial_waiters and self._fits_partial(size):
            self._take_partial(size)
            return
        await self._wait_turn(self._partial_waiters, size, self.release_partial)

    def release_partial(self, size: int) -> None:
        self.partial_used -= size
        self.release(size)
