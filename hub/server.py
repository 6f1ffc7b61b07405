"""The hub process: one nursery tree owning the store, the actors and the server.

    serve()
      ├─ writer        (commits batches, acks, feeds the broadcaster and the capper)
      ├─ capper        (cuts tasks over their cap: head, gap record, tail)
      ├─ retention     (with --retention-days)
      ├─ signals       (SIGTERM/SIGINT start a graceful shutdown)
      └─ http          (hub/listener.py: a Connection per WebSocket; hypercorn for REST)

Shutdown: connections stop reading, wait for their writes to commit, send the
acks, close with 1001; hypercorn returns; the writer's inbox is closed and the
writer drains it; the store is closed last.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator

import trio
from hypercorn.config import Config as HypercornConfig

from hub import hypercorn_patches
from hub.actors.broadcaster import Broadcaster
from hub.actors.capper import Capper
from hub.actors.retention import run_retention
from hub.actors.writer import Writer, WriteRequest
from hub.app import create_app, served_websockets
from hub.config import HubConfig
from hub.deps import ConnectionDeps
from hub.ingest_budget import IngestBudget
from hub.listener import serve_http
from hub.metrics import Metrics
from hub.shutdown import Shutdown
from hub.store import open_store_from_url
from hub.store.base import STORE_RETRY, Listens, Store, StoreUnavailable
from hub.task_rate_limits import Limiters
from keruta.backoff import Backoff
from keruta.retry import retry

log = logging.getLogger("keruta.hub")


@contextlib.asynccontextmanager
async def _event_loop_for(url: str) -> AsyncIterator[None]:
    """PostgreSQL goes through asyncpg, which needs one asyncio loop for the hub's life."""
    if url.startswith(("postgresql://", "postgres://")):
        from hub.store.pg_loop import asyncio_loop

        async with asyncio_loop():
            yield
    else:
        yield


async def _open_store(store: Store) -> None:
    def failed(_n: int, exc: BaseException, wait: float) -> None:
        log.warning("store %s unavailable (%s); retrying in %.1fs", store.url, exc, wait)

    await retry(store.open, backoff=Backoff(initial=0.5, cap=10.0), retryable=(StoreUnavailable,), on_failure=failed)


def _hypercorn_config(config: HubConfig) -> HypercornConfig:
    hc = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    # Beyond this a message is discarded as it arrives and answered TOO_LARGE
    # (hub/hypercorn_patches.py); up to it, decode_client_frame applies the exact limit.
    hc.websocket_max_message_size = config.limits.max_frame_bytes + 1024
    # Pings let hypercorn notice a peer that vanished without a close; their
    # sends must not race a connection's close (hub/hypercorn_patches.py).
    hc.websocket_ping_interval = config.ping_interval
    hc.graceful_timeout = config.shutdown_timeout + 2
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


async def serve(config: HubConfig, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    # Hypercorn has no hook for what these change (docs/hypercorn-patches.md);
    # they refuse a hypercorn release they were not written for.
    hypercorn_patches.install()
    store = open_store_from_url(
        config.db, db_timeout=config.db_timeout, db_ping_interval=config.db_ping_interval
    )
    async with _event_loop_for(config.db):
        await _open_store(store)
        try:
            await _serve_with(store, config, task_status)
        finally:
            with trio.CancelScope(shield=True):
                await store.close()


async def _serve_with(store: Store, config: HubConfig, task_status: trio.TaskStatus[list[str]]) -> None:
    inbox_send, inbox_recv = trio.open_memory_channel[WriteRequest](config.writer_inbox)
    broadcaster = Broadcaster()
    metrics = Metrics()
    shutting_down = Shutdown()
    deps = ConnectionDeps(
        config=config, store=store, writer_inbox=inbox_send, broadcaster=broadcaster, metrics=metrics,
        limiter=Limiters(config.rate_limit, config.rate_burst).limiter, shutting_down=shutting_down,
        ingest_budget=IngestBudget(config.ingest_queue_bytes, metrics),
    )
    capper = Capper(store, broadcaster, config.max_task_bytes)
    writer = Writer(
        store, broadcaster, metrics,
        batch_size=config.write_batch_size, flush_interval=config.write_flush_interval, pace=config.write_pace,
        retry=STORE_RETRY.capped_at(config.store_retry_max), capper=capper,
    )
    # A lambda: the writer replaces its `available` event when the store goes away.
    app = create_app(deps, store_available=lambda: writer.available.is_set())
    async with trio.open_nursery() as services:
        if config.retention_days:
            services.start_soon(run_retention, store, config.retention_days, config.retention_interval)
        services.start_soon(_watch_signals, shutting_down)
        services.start_soon(capper.run)
        if isinstance(store, Listens):
            from hub.actors.notifier import run_notifier  # PostgreSQL only: not loaded for SQLite

            services.start_soon(run_notifier, store, broadcaster)
        async with trio.open_nursery() as core:
            core.start_soon(writer.run, inbox_recv)

            async def http(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
                with inbox_send:
                    await serve_http(
                        app, _hypercorn_config(config), served_websockets(app),  # type: ignore[arg-type]
                        max_message=config.limits.max_frame_bytes + 1024, ping_interval=config.ping_interval,
                        budget=deps.ingest_budget, message_timeout=config.body_timeout,
                        shutdown_trigger=shutting_down.wait, task_status=task_status,
                    )
                # No connection is left; the writer drains its inbox, within a deadline.
                core.cancel_scope.deadline = trio.current_time() + config.shutdown_timeout

            binds = await core.start(http)
            for bind in binds:
                print(f"keruta-hub: listening on {bind}", file=sys.stderr, flush=True)
            task_status.started(binds)
        services.cancel_scope.cancel()


async def _watch_signals(shutting_down: Shutdown) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            # Said once, in the voice of "listening on", whatever the log level.
            print(f"keruta-hub: {signal.Signals(signum).name}, shutting down", file=sys.stderr, flush=True)
            shutting_down.set()
            return
