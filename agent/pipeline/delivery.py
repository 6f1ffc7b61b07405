"""Delivery: the end of the pipeline. It is offered what the recorder spooled
(RecordBatch, Finished), through the throttle when there is a rate limit; it
loads the uplink while the command already runs and hands it what arrived
meanwhile. Not an actor: `offer` never waits, so the one that calls it needs
no channel in between (a channel hop on every line's way to the hub)."""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from agent.pipeline.messages import Finished, SpooledMessage
from agent.pipeline.signals import SignalRouter
from agent.spool.spool import Spool

if TYPE_CHECKING:
    from agent.pipeline.uplink import Uplink
    from agent.run import RunSettings


class Delivery:
    """The uplink of a run, loaded once the command runs.

    Its modules (WebSocket, the wire's codec) are a large part of the agent's
    start-up, time by which every command would be held back: they are imported
    in a worker thread while the command already writes, and what the
    pipeline offers the uplink meanwhile (records spooled, the final state)
    is kept and handed over. The uplink never ends the run: the command goes
    on, and the agent exits with its code, whatever happens to delivery.
    """

    def __init__(self, settings: RunSettings, spool: Spool, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.spool = spool
        self.say = say
        # What an earlier run left is sendable at once; this run's records
        # only as the pipeline (its rate limit) lets them through.
        self.start_seq = spool.last_seq
        self.available = spool.last_seq
        self.final: Finished | None = None
        self.uplink: Uplink | None = None
        self.failure: Exception | None = None
        # Set once the uplink has ended, delivered or not.
        self.stopped = trio.Event()

    @property
    def delivered(self) -> bool:
        return self.uplink is not None and self.uplink.delivered.is_set()

    async def run(self) -> None:
        try:
            self.uplink = await self._load()
            if self.available > self.start_seq:
                self.uplink.records_available(self.available)
            if self.final is not None:
                self.uplink.finish(self.final.state, self.final.exit_code)
            await self._deliver(self.uplink)
        finally:
            self.stopped.set()

    async def _load(self) -> Uplink:
        module = await trio.to_thread.run_sync(importlib.import_module, "agent.pipeline.uplink")
        s = self.settings
        uplink: Uplink = module.Uplink(
            self.spool,
            module.UplinkSettings(
                hub_url=s.hub_url,
                task_id=s.task_id,
                token=s.token,
                batch_size=s.batch_size,
                flush_interval=s.flush_interval,
                max_in_flight_bytes=s.max_in_flight_bytes,
                limits=s.limits,
                max_bytes=s.max_bytes,
            ),
            say=self.say,
            backoff=module.RECONNECT.capped_at(s.reconnect_max),
            available_seq=self.start_seq,
        )
        return uplink

    async def offer(self, message: SpooledMessage) -> None:
        """Records spooled (or the final state) that may be sent. Never waits
        (no checkpoint either): the recorder calls it between spool appends."""
        if isinstance(message, Finished):
            self.final = message
            if self.uplink is not None:
                self.uplink.finish(message.state, message.exit_code)
        else:
            self.available = max(self.available, message.last_seq)
            if self.uplink is not None:
                self.uplink.records_available(message.last_seq)

    async def _deliver(self, uplink: Uplink) -> None:
        from agent.pipeline.failures import UplinkFailed

        try:
            await uplink.run()
        except UplinkFailed as exc:
            self.failure = exc
            self.say(f"ERROR: delivery to the hub stopped: {exc}. Output is still spooled, not sent.")
            if exc.internal:
                self.say("".join(traceback.format_exception(exc.__cause__ or exc)).rstrip())
        finally:
            uplink.stopped.set()


async def drain(delivery: Delivery | Uplink, router: SignalRouter, timeout: float) -> None:
    """Wait for the hub's acks, up to `timeout`; a signal cuts the wait short,
    and so does the uplink stopping (delivered, or failed for good)."""
    with trio.move_on_after(timeout) as scope:
        router.drain = scope
        if router.after_exit:
            scope.cancel()
        await delivery.stopped.wait()
