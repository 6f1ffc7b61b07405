"""Ending PostgreSQL connections within a deadline, whatever the network does.

A link can go silent: a partition or lost NAT state stops the packets of the
connections already open, with no FIN and no RST, while new connections pass.
A polite close then waits for the server's answer for ever, and triopg
shields its `close` (of a connection, of a pool) from cancellation, so a
deadline around it does nothing. Here, then:

- a connection judged dead is terminated (asyncpg's abort: the socket is
  closed, nothing is awaited);
- a healthy one is closed politely only within a deadline, then terminated;
- a pool's idle connections can be dropped at once when one of them was
  found silent: opened over the same link, they would each cost a request
  a whole command timeout before being found out.

triopg exposes neither asyncpg's `close(timeout=...)` nor the pool itself, so
this module reaches for its wrapped objects (`_asyncpg_conn`,
`_asyncpg_pool`) and, for idle connections, asyncpg's pool holders
(`_holders`): asyncpg's own `expire_connections` closes them politely, which
on a silent link never ends.

It also runs a whole transaction on the wrapped connection in one asyncio
call (`in_one_hop`): triopg crosses from Trio to asyncio and back for every
statement, BEGIN and COMMIT included, which cost an append about as much
time again as its statements took on the server. Nothing else in the store
touches those wrapped objects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
import trio_asyncio

__all__ = ["close_pool_within", "close_within", "drop_idle", "in_one_hop"]

T = TypeVar("T")


async def in_one_hop(conn: Any, run: Callable[[Any], Awaitable[T]], transaction: dict[str, Any] | None) -> T:
    """`run(raw)` with `raw` the asyncpg connection a triopg connection wraps,
    in a transaction (`raw.transaction(**transaction)`) unless `transaction`
    is None, as one asyncio task: one hop between the loops, whatever the
    statements.

    When `run` fails, the transaction is left as it is, not rolled back: the
    caller must terminate the connection (PostgresStore._connection does on
    any exception), which ends it on the server without a ROLLBACK that a
    silent link would never answer.
    """
    raw = conn._asyncpg_conn

    async def whole() -> T:
        if transaction is None:
            return await run(raw)
        tx = raw.transaction(**transaction)
        await tx.start()
        result = await run(raw)
        await tx.commit()
        return result

    return await trio_asyncio.aio_as_trio(whole)()


async def close_within(conn: Any, seconds: float) -> None:
    """Close `conn` (a triopg connection) politely if the server answers
    within `seconds`, else terminate it; never longer, even when cancelled."""
    raw = conn._asyncpg_conn
    if raw.is_closed():
        return
    with trio.CancelScope(shield=True), trio.move_on_after(seconds):
        try:
            await trio_asyncio.aio_as_trio(raw.close)(timeout=seconds)
        except Exception:
            pass  # asyncpg aborted it on the way out
    if not raw.is_closed():
        raw.terminate()


async def close_pool_within(pool: Any, seconds: float) -> None:
    """Close a triopg pool politely within `seconds` (waiting for the
    connections in use to come back, then closing each), else terminate
    every connection it holds."""
    raw = pool._asyncpg_pool
    with trio.CancelScope(shield=True), trio.move_on_after(seconds):
        try:
            # Cancelled by the deadline, asyncpg terminates the pool itself.
            await trio_asyncio.aio_as_trio(raw.close)()
            return
        except Exception:
            pass
    raw.terminate()


def drop_idle(pool: Any) -> int:
    """Terminate the idle connections of a triopg pool; the pool opens new
    ones as they are needed. The number dropped."""
    dropped = 0
    for holder in getattr(pool._asyncpg_pool, "_holders", ()):
        con = holder._con
        if con is not None and holder.is_idle() and not con.is_closed():
            con.terminate()
            dropped += 1
    return dropped
