"""What one WebSocket connection uses of the hub, passed to it explicitly."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from hub.config import HubConfig
from hub.ingest_budget import IngestBudget
from hub.messages import WriteRequest
from hub.metrics import Metrics
from hub.shutdown import Shutdown
from hub.store.base import Store
from keruta.ratelimit import RateLimiter

if TYPE_CHECKING:
    # Only named: a connection (hub/ws) reaches the broadcaster through these
    # deps without importing hub/actors, which imports hub/ws.
    from hub.actors.broadcaster import Broadcaster


@attrs.frozen(eq=False)
class ConnectionDeps:
    config: HubConfig
    # Subscriptions' catch-up reads.
    store: Store
    # Writes go to the writer actor, never to the store directly.
    writer_inbox: trio.MemorySendChannel[WriteRequest]
    broadcaster: Broadcaster
    metrics: Metrics
    # The task's ingest rate limiter (hub/task_rate_limits.py Limiters.limiter).
    limiter: Callable[[str], RateLimiter]
    # Set once when the hub starts its graceful shutdown.
    shutting_down: Shutdown
    # The bytes of write frames all connections hold until answered.
    ingest_budget: IngestBudget = attrs.field(factory=lambda: IngestBudget(8 * 1024 * 1024))
