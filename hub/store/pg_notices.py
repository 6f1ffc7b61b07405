"""Durable-watermark notices between hubs sharing one PostgreSQL database.

Each append that moves a task's watermark sends `NOTIFY keruta_durable,
'TASK_ID SEQ ORIGIN'` inside its transaction, so other hubs hear of it exactly
when it is committed; a state change sends seq STATUS_NOTICE.

Records rewritten in place (a DELETE's or a cap's gap, a redaction) move no
watermark: the hub that rewrote them announces it after the commit,
`'TASK_ID ~KIND SEQS ORIGIN'` (`Rewrite`), so the other hubs' viewers get the
gap or the `redacted` frame as this hub's do. A hub of an older keruta
ignores those notices (its parser takes two or three fields).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import triopg

from hub.store.base import REWRITE_KINDS, Rewrite, StoreUnavailable
from hub.store.core import STATUS_NOTICE
from hub.store.pg_errors import transient, unavailable_as_store_error
from hub.store.pg_link import close_within

NOTIFY_CHANNEL = "keruta_durable"

__all__ = [
    "NOTIFY_CHANNEL", "STATUS_NOTICE", "DurableNotices", "listen", "parse_notice", "parse_rewrite", "rewrite_payload",
]

# A NOTIFY payload must stay under 8000 bytes.
_PAYLOAD_MAX = 7900


def rewrite_payload(rewrite: Rewrite, origin: str) -> str:
    """The notice of a rewrite: its seqs as runs (`3-9,12`); past NOTIFY's
    bound, the one run covering them all (more to read again, nothing missed)."""
    seqs = sorted(set(rewrite.seqs))
    runs: list[str] = []
    start = prev = seqs[0]
    for s in [*seqs[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    payload = f"{rewrite.task_id} ~{rewrite.kind} {','.join(runs)} {origin}"
    if len(payload.encode()) > _PAYLOAD_MAX:
        payload = f"{rewrite.task_id} ~{rewrite.kind} {seqs[0]}-{seqs[-1]} {origin}"
    return payload


def parse_rewrite(payload: str) -> tuple[Rewrite, str] | None:
    """A `rewrite_payload` -> (the rewrite, its origin); None for anything else."""
    parts = payload.split(" ")
    if len(parts) != 4 or not parts[0] or parts[1][1:] not in REWRITE_KINDS or parts[1][:1] != "~":
        return None
    seqs: list[int] = []
    try:
        for run in parts[2].split(","):
            low, _, high = run.partition("-")
            first, last = int(low), int(high or low)
            if not 1 <= first <= last:
                return None
            seqs.extend(range(first, last + 1))
    except ValueError:
        return None
    return Rewrite(parts[0], parts[1][1:], tuple(seqs)), parts[3]


def parse_notice(payload: str) -> tuple[str, int, str] | None:
    """`"TASK_ID SEQ [ORIGIN]"` -> (task_id, seq, origin); None for anything else.

    A task id has no spaces; ORIGIN names the store instance (hub) that sent it.
    """
    parts = payload.split(" ")
    if len(parts) not in (2, 3) or not parts[0]:
        return None
    try:
        return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else ""
    except ValueError:
        return None


@attrs.define
class DurableNotices:
    """The async iterator `PostgresStore.listen` yields.

    Each item is `(task_id, durable_seq)`, a `Rewrite`, or None when notices were dropped
    because the consumer fell behind (re-read the watermarks you care about).
    Raises StoreUnavailable when the LISTEN connection is lost, or judged
    dead: quiet for `ping_interval`, it must answer a ping within
    `ping_timeout`, else it is terminated. Notices sent meanwhile are gone,
    so after reconnecting re-read the watermarks too.
    """

    _receive: trio.MemoryReceiveChannel[tuple[str, int] | Rewrite | None]
    _conn: Any
    _ping_interval: float
    _ping_timeout: float
    _on_dead: Callable[[], None]

    def __aiter__(self) -> DurableNotices:
        return self

    async def __anext__(self) -> tuple[str, int] | Rewrite | None:
        while True:
            with trio.move_on_after(self._ping_interval):
                try:
                    return await self._receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    raise StoreUnavailable("PostgreSQL: the LISTEN connection was lost") from None
            # Quiet for a while: make sure the connection is still there.
            await self._ping()

    async def _ping(self) -> None:
        answered = False
        # asyncpg's own timeout bounds the query; trio's deadline bounds the
        # rest (its cancellation request goes out on a connection of its own).
        with trio.move_on_after(self._ping_timeout + 1.0):
            try:
                await self._conn.fetchval("SELECT 1", timeout=self._ping_timeout)
                answered = True
            except Exception as exc:
                if not transient(exc):
                    raise
        if not answered:
            self._conn.terminate()
            self._on_dead()
            raise StoreUnavailable(
                f"PostgreSQL: the LISTEN connection did not answer a ping within {self._ping_timeout:g} s"
            )


@asynccontextmanager
async def listen(
    dsn: str,
    connect_timeout: float,
    origin: str | None,
    *,
    buffer: int,
    ping_interval: float,
    ping_timeout: float,
    on_dead: Callable[[], None] = lambda: None,
) -> AsyncIterator[DurableNotices]:
    """LISTEN on a dedicated connection; skip notices from `origin` (None: keep all).

    `on_dead` is called when the connection is judged dead (it did not answer
    a ping): connections opened over the same link may be silent too.
    """
    send, receive = trio.open_memory_channel[tuple[str, int] | Rewrite | None](buffer + 1)
    overflowed = False

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        nonlocal overflowed
        notice: tuple[str, int] | Rewrite
        parsed = parse_notice(payload)
        if parsed is not None:
            notice, sender = parsed[:2], parsed[2]
        else:
            rewrite = parse_rewrite(payload)
            if rewrite is None:
                return
            notice, sender = rewrite
        if origin is not None and sender == origin:
            return
        if send.statistics().current_buffer_used >= buffer:
            if not overflowed:
                overflowed = True
                send.send_nowait(None)  # the spare slot
            return
        overflowed = False
        send.send_nowait(notice)

    def on_termination(_conn: Any) -> None:
        send.close()

    with send, receive:
        with unavailable_as_store_error():
            conn = await triopg.connect(
                dsn,
                timeout=connect_timeout,
                command_timeout=ping_timeout,
                server_settings={"application_name": "keruta-hub-listen"},
            ).__aenter__()
        try:
            with unavailable_as_store_error():
                conn.add_termination_listener(on_termination)
                await conn.add_listener(NOTIFY_CHANNEL, on_notify)
            yield DurableNotices(receive, conn, ping_interval, ping_timeout, on_dead)
        except BaseException as exc:
            # Lost, judged dead, or given up on after an error: not worth a
            # goodbye that a silent server would never answer.
            if not isinstance(exc, trio.Cancelled):
                conn.terminate()
            raise
        finally:
            await close_within(conn, ping_timeout)
