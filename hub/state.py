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
        limiter = self.limiters.get(task_id)
        if limiter is None:
            if len(self.limiters) > 10_000:
                # Bounded memory: forget idle buckets; a fresh one starts full.
                self.limiters.clear()
            limiter = self.limiters[task_id] = RateLimiter(
                self.config.rate_limit or None, self.config.rate_burst
            )
        return limiter
