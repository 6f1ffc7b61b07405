"""The hub's shared state: what the routes and connections reach for."""

from __future__ import annotations

import attrs
import trio

from hub.auth import Authorizer
from hub.broadcaster import Broadcaster
from hub.config import HubConfig
from hub.metrics import Metrics
from hub.store.base import Store
from hub.writer import Writer, WriteRequest
from keruta.ratelimit import RateLimiter

# Past this many tasks' rate limiters, idle ones are forgotten (see _evict_idle_limiters).
MAX_LIMITERS = 10_000
_UNLIMITED = RateLimiter(None)


@attrs.define(eq=False)
class Hub:
    config: HubConfig
    store: Store
    writer_inbox: trio.MemorySendChannel[WriteRequest]
    broadcaster: Broadcaster = attrs.field(factory=Broadcaster)
    metrics: Metrics = attrs.field(factory=Metrics)
    authorizer: Authorizer = attrs.field(init=False)
    shutting_down: trio.Event = attrs.field(factory=trio.Event)
    limiters: dict[str, RateLimiter] = attrs.field(factory=dict)
    writer: Writer | None = None

    def __attrs_post_init__(self) -> None:
        self.authorizer = Authorizer(self.config.agent_token, self.config.viewer_token, self.config.admin_token)

    def writer_available(self) -> bool:
        return self.writer is None or self.writer.available.is_set()

    def limiter(self, task_id: str) -> RateLimiter:
        """The task's ingest rate limiter (the seed's RateLimiter, server side)."""
        if not self.config.rate_limit:
            return _UNLIMITED
        limiter = self.limiters.pop(task_id, None)
        if limiter is None:
            self._evict_idle_limiters()
            limiter = RateLimiter(self.config.rate_limit, self.config.rate_burst)
        # Most recently used last: the map is ordered by idle time.
        self.limiters[task_id] = limiter
        return limiter

    def _evict_idle_limiters(self) -> None:
        """Bounded memory without a way around the limit: only a full bucket is
        forgotten (a fresh one starts full, so nothing is lost), longest idle
        first. A bucket that is not full yet (its task is being limited) stays;
        every bucket refills within (burst + debt) / rate seconds, so the
        map holds at most MAX_LIMITERS plus the tasks that wrote that recently."""
        while len(self.limiters) >= MAX_LIMITERS:
            task_id, oldest = next(iter(self.limiters.items()))
            if not oldest.is_full():
                return
            del self.limiters[task_id]
