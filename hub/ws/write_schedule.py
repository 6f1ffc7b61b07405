"""The order in which one connection hands its queued writes to the writer.

A connection may carry writes for several tasks (a relay, a multiplexing
client), each behind its own rate limiter. A write is handed once its task's
tokens are there, so a throttled task's write does not hold up another task's
behind it; one task's writes (and its `status` after its records) keep the
order they were read in. Sans-IO: the connection reserves the tokens and says
when they come; this says which write goes next and when.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class WriteSchedule(Generic[T]):
    """Writes waiting for their time, earliest first, in arrival order per task."""

    __slots__ = ("_heap", "_order", "_pending", "_latest")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, T]] = []
        self._order = itertools.count()
        # Per task with writes here: how many, and the latest time one goes.
        self._pending: dict[str, int] = {}
        self._latest: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, task_id: str, ready_at: float, item: T) -> None:
        """`item` may go at `ready_at`, and not before its task's writes already here."""
        at = max(ready_at, self._latest.get(task_id, ready_at))
        self._latest[task_id] = at
        self._pending[task_id] = self._pending.get(task_id, 0) + 1
        heapq.heappush(self._heap, (at, next(self._order), task_id, item))

    def next_at(self) -> float | None:
        """When the next write may go (None: nothing waits)."""
        return self._heap[0][0] if self._heap else None

    def pop(self) -> T:
        """The write that goes next (callers check `next_at` first)."""
        _at, _order, task_id, item = heapq.heappop(self._heap)
        left = self._pending[task_id] - 1
        if left:
            self._pending[task_id] = left
        else:
            del self._pending[task_id]
            del self._latest[task_id]
        return item

    def drain(self) -> Iterator[T]:
        """Everything still waiting, in no particular order (the connection is ending)."""
        while self._heap:
            yield self.pop()
