"""Per-task ingest rate limiters (keruta/ratelimit.py's RateLimiter, one per task), bounded in number."""

from __future__ import annotations

from keruta.ratelimit import RateLimiter

# Past this many tasks' rate limiters, idle ones are forgotten (see _evict_idle).
MAX_LIMITERS = 10_000
_UNLIMITED = RateLimiter(None)


class Limiters:
    """One token bucket per task, shared by the WebSocket and REST ingest paths."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        # Most recently used last: the map is ordered by idle time.
        self.buckets: dict[str, RateLimiter] = {}

    def limiter(self, task_id: str) -> RateLimiter:
        """The task's ingest rate limiter."""
        if not self.rate:
            return _UNLIMITED
        limiter = self.buckets.pop(task_id, None)
        if limiter is None:
            self._evict_idle()
            limiter = RateLimiter(self.rate, self.burst)
        self.buckets[task_id] = limiter
        return limiter

    def _evict_idle(self) -> None:
        """Bounded memory without a way around the limit: only a full bucket is
        forgotten (a fresh one starts full, so nothing is lost), longest idle
        first. A bucket that is not full yet (its task is being limited) stays;
        every bucket refills within (burst + debt) / rate seconds, so the
        map holds at most MAX_LIMITERS plus the tasks that wrote that recently."""
        while len(self.buckets) >= MAX_LIMITERS:
            task_id, oldest = next(iter(self.buckets.items()))
            if not oldest.is_full():
                return
            del self.buckets[task_id]
