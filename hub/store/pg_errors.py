"""Which PostgreSQL errors are an outage (wait it out) and which are a bug.

An outage -- the database is not reachable or not usable right now -- becomes
StoreUnavailable, which the hub waits out. Everything else (SQL the server
does not understand, a constraint, a type our code got wrong) is a bug and
ends the operation. The server's errors are told apart by their SQLSTATE class.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from hub.store.base import StoreUnavailable

_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, timeouts (TimeoutError is an OSError)
    asyncpg.PostgresConnectionError,  # 08xxx, connection lost mid-query
    # A connection left mid-operation by a cut or a cancellation ("another
    # operation is in progress"); it is terminated, and a retry gets a fresh one.
    asyncpg.InternalClientError,
    # A table altered under a statement asyncpg had prepared: prepared again, it runs.
    asyncpg.InvalidCachedStatementError,
)
_TRANSIENT_SQLSTATE_CLASSES = (
    "08",  # connection exception
    "28",  # authorization: an auth server or pg_hba.conf mid-change refusing us
    "40",  # transaction rollback: serialization failure, deadlock
    "53",  # insufficient resources: too many connections, disk full, out of memory
    "55",  # not in prerequisite state: "database does not allow connections", lock not available
    "57",  # operator intervention: admin shutdown, crash shutdown, cannot connect now (57P03)
    "58",  # system error: I/O error on the server
)
_TRANSIENT_SQLSTATES = (
    "25006",  # read-only transaction: a standby during failover
    "42501",  # insufficient privilege: CONNECT or a table's grant revoked, until granted again
)


def transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES
    # asyncpg says "connection is closed" as a plain InterfaceError.
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


@contextmanager
def unavailable_as_store_error() -> Iterator[None]:
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as exc:
        if transient(exc):
            raise StoreUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc
        raise
