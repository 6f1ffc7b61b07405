"""The asyncio loop asyncpg needs, inside Trio, for a hub's (or a test's) life.

A connection cut mid-operation can leave an asyncpg future failed with nobody
awaiting it ("Future exception was never retrieved"); trio-asyncio's default
handler raises such an error into the loop's nursery, ending the hub. The
store already turned the failure its caller saw into StoreUnavailable, so
here it is logged and the loop goes on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio_asyncio

log = logging.getLogger("keruta.hub.store")

__all__ = ["asyncio_loop"]


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_asyncio_error)
        yield


def _log_asyncio_error(_loop: object, context: dict[str, object]) -> None:
    log.warning("asyncio: %s: %s", context.get("message"), context.get("exception"))
