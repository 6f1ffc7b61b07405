"""The uplink: the I/O around UplinkProtocol (agent/link/protocol.py), one WebSocket session at a time.

The uplink actor owns the receive end of the rate limiter's output: a
RecordBatch makes its records sendable, Finished gives the final state. The
sessions (supervised, restarted with a backoff) connect, feed the protocol
what the hub says, and do what it answers: send a frame, read records from
the spool for a `logs` frame, wait. Acks release records from the spool.

A transient failure (no hub, a cut connection, a peer that stops answering
pings, a hub whose store is down) ends the session; the supervisor starts a
new one after a backoff. A permanent one (the hub refuses a frame it will
refuse however often it is resent, or a bug here) ends the uplink with
`UplinkFailed`: the records stay in the spool for `flush` after a fix. The
command never waits for any of this: it only ever writes to the spool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from agent.hubaddr import auth_headers, ws_url
from agent.link.framing import fill_gaps
from agent.link.protocol import (
    Delivered,
    HubRefused,
    ReadRecords,
    ReadSummary,
    SendFrame,
    UplinkProtocol,
)
from agent.pipeline.failures import UplinkFailed, describe, first_permanent, is_transient
from agent.spool.spool import Spool
from keruta.backoff import Backoff
from keruta.frames import FrameError, PingFrame
from keruta.limits import DEFAULT_LIMITS, Limits
from keruta.supervisor import GaveUp, supervise
from keruta.wire import decode_hub_frame, encode_bytes

RECONNECT = Backoff(initial=0.5, factor=2.0, cap=30.0, jitter=0.3)


@attrs.define
class UplinkSettings:
    hub_url: str
    task_id: str
    token: str | None = None
    batch_size: int = 500
    flush_interval: float = 0.2
    # Bytes of records sent and not yet acknowledged (agent/link/batcher.py).
    max_in_flight_bytes: int = 4 << 20
    # Frames in flight below which a record is sent at once (agent/link/batcher.py).
    eager_frames: int = 2
    ping_interval: float = 5.0
    # The hub answers pings while our frames wait for its rate limiter, but a
    # hub whose writer is backed up (its database is away) stops reading once
    # a few of our frames are queued, and answers late: be patient.
    ping_timeout: float = 20.0
    connect_timeout: float = 10.0
    limits: Limits = DEFAULT_LIMITS
    # Sent with the `running` status: the hub keeps at most this much of the
    # task's messages, its first and last halves (its own cap where lower).
    max_bytes: int | None = None


class Uplink:
    def __init__(
        self,
        spool: Spool,
        settings: UplinkSettings,
        *,
        say: Callable[[str], None] = lambda _m: None,
        backoff: Backoff = RECONNECT,
        available_seq: int | None = None,
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.say = say
        self.backoff = backoff
        self.url = ws_url(settings.hub_url)
        # What an earlier run left in the spool is sendable from the start
        # (`available_seq`: what was in it when this run started).
        self.protocol = UplinkProtocol(
            settings.task_id,
            spool.producer,
            acked_seq=spool.acked_seq,
            available_seq=spool.last_seq if available_seq is None else available_seq,
            batch_size=settings.batch_size,
            flush_interval=settings.flush_interval,
            max_in_flight_bytes=settings.max_in_flight_bytes,
            eager_frames=settings.eager_frames,
            limits=settings.limits,
            max_bytes=settings.max_bytes,
        )
        # Set once every record is acknowledged and the final status is stored.
        self.delivered = trio.Event()
        # Set by whoever runs the uplink when it has ended, delivered or not.
        self.stopped = trio.Event()
        self.failures = 0
        # The session's sender parks here while the protocol says wait.
        self._news = trio.lowlevel.ParkingLot()
        self._failing_since: float | None = None
        self._last_complaint: float | None = None

    # --- input -----------------------------------------------------------------

    def records_available(self, last_seq: int) -> None:
        """Records up to `last_seq` are spooled and may be sent."""
        self.protocol.records_available(last_seq, trio.current_time())
        self._news.unpark_all()

    def finish(self, state: str, exit_code: int | None) -> None:
        """Without a pipeline: the command is done; after the last ack, report `state`."""
        self.protocol.finish(state, exit_code)
        self._news.unpark_all()

    # --- running ------------------------------------------------------------

    async def run(self, max_restarts: int | None = None) -> None:
        """Sessions until everything is delivered; never gives up on transient
        failures by default. A permanent one raises UplinkFailed."""
        try:
            await supervise(
                self.session,
                name="uplink",
                backoff=self.backoff,
                max_restarts=max_restarts,
                recoverable=is_transient,
                on_restart=self._on_restart,
                healthy_after=10.0,
            )
        except GaveUp:
            raise
        except Exception as exc:
            cause = first_permanent(exc)
            if isinstance(cause, HubRefused):
                raise UplinkFailed(f"the hub refused a frame: {cause}", internal=False) from cause
            if isinstance(cause, ConnectionRejected | ConnectionClosed):
                raise UplinkFailed(f"the hub {describe(cause)}", internal=False) from cause
            raise UplinkFailed(f"internal error in the uplink: {describe(cause)}", internal=True) from cause

    def _on_restart(self, failures: int, error: BaseException, delay: float) -> None:
        self.failures += 1
        now = trio.current_time()
        if self._failing_since is None:
            self._failing_since = now
        # Say it the first time, then once a minute: the hub may be away for long.
        if self._last_complaint is not None and now - self._last_complaint < 60.0:
            return
        self._last_complaint = now
        waiting = self.spool.unacked
        kept = f"{waiting} records wait in the spool" if waiting else "output waits in the spool"
        self.say(f"hub {self.url}: {describe(error)}; {kept}; retrying in {delay:.1f} s")

    async def session(self) -> None:
        if self.delivered.is_set():
            return
        s = self.settings
        async with open_websocket_url(
            self.url,
            extra_headers=auth_headers(s.token),
            connect_timeout=s.connect_timeout,
            disconnect_timeout=2.0,
        ) as ws:
            if self._failing_since is not None:
                self.say(
                    f"connected to the hub again; sending the {self.spool.unacked} records "
                    "it has not acknowledged"
                )
                self._failing_since = None
                self._last_complaint = None
            try:
                await _Session(self, ws).run()
            finally:
                self.protocol.on_disconnected()


class _Session:
    """The I/O of one connection; its state lives in the protocol."""

    def __init__(self, uplink: Uplink, ws: Any) -> None:
        self.up = uplink
        self.ws = ws
        self.proto = uplink.protocol
        self.last_heard = trio.current_time()

    async def send(self, data: bytes) -> None:
        await self.ws.send_message(data.decode())

    async def run(self) -> None:
        for frame in self.proto.on_connected(trio.current_time()):
            await self.send(frame)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.receive_loop)
            nursery.start_soon(self.ping_loop)
            await self.send_loop()
            nursery.cancel_scope.cancel()

    async def send_loop(self) -> None:
        up, proto, spool = self.up, self.proto, self.up.spool
        while True:
            action = proto.next_frame(trio.current_time())
            if isinstance(action, SendFrame):
                await self.send(action.data)
            elif isinstance(action, ReadRecords):
                records = fill_gaps(
                    proto.task_id,
                    action.start,
                    spool.read(action.start, action.count, action.max_bytes),
                    action.count,
                    proto.available,
                )
                frame = proto.logs_frame(records, trio.current_time())
                if frame is not None:
                    await self.send(frame)
            elif isinstance(action, ReadSummary):
                # The spool tallied what was read to be sent; what was not
                # (sent by an earlier process) it reads now.
                await self.send(proto.status_frame(spool.summary()))
            elif isinstance(action, Delivered):
                await spool.mark_final_delivered()
                up.delivered.set()
                return
            else:
                with trio.move_on_at(action.until if action.until is not None else float("inf")):
                    await up._news.park()

    async def receive_loop(self) -> None:
        up, proto = self.up, self.proto
        while True:
            message = await self.ws.get_message()
            self.last_heard = trio.current_time()
            try:
                frame = decode_hub_frame(message)
            except FrameError as exc:
                up.say(f"ignoring a frame from the hub that does not parse: {exc}")
                continue
            released = proto.on_frame(frame, self.last_heard)
            if released is not None:
                up.spool.release(released)
            up._news.unpark_all()

    async def ping_loop(self) -> None:
        s = self.up.settings
        ping = encode_bytes(PingFrame())
        while True:
            await trio.sleep(s.ping_interval)
            silent = trio.current_time() - self.last_heard
            if silent > s.ping_timeout:
                raise TimeoutError(f"the hub has not answered for {silent:.0f} s")
            await self.send(ping)
