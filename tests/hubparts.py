"""The hub's parts around a store, in the test's own trio run, for tests that
connect to them without a server: a writer over a real store, a broadcaster,
metrics, and a nursery for the connections the test opens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from hub.actors.broadcaster import Broadcaster
from hub.actors.writer import Writer
from hub.config import HubConfig
from hub.deps import ConnectionDeps
from hub.messages import WriteRequest
from hub.metrics import Metrics
from hub.shutdown import Shutdown
from hub.store.base import Store
from hub.task_rate_limits import Limiters


@asynccontextmanager
async def hub_parts(store: Store, config: HubConfig) -> AsyncIterator[tuple[ConnectionDeps, trio.Nursery]]:
    """The connections' dependencies and a nursery to run them in. On leaving,
    the connections still open are cancelled (their clients went away) and
    the writer drains."""
    send, inbox = trio.open_memory_channel[WriteRequest](config.writer_inbox)
    broadcaster, metrics = Broadcaster(), Metrics()
    deps = ConnectionDeps(
        config=config, store=store, writer_inbox=send, broadcaster=broadcaster, metrics=metrics,
        limiter=Limiters(config.rate_limit, config.rate_burst).limiter, shutting_down=Shutdown(),
    )
    async with trio.open_nursery() as core:
        core.start_soon(Writer(store, broadcaster, metrics).run, inbox)
        with send:
            async with trio.open_nursery() as connections:
                yield deps, connections
                connections.cancel_scope.cancel()
