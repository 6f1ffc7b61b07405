"""`keruta-agent run`: one task = one nursery, its actors joined by bounded channels.

    ┌ task nursery ──────────────────────────────────────────────────────────────────┐
    │ ┌ pipeline nursery ───────────────────────┐                                    │
    │ │ capture stdout ─┐                        │                                    │
    │ │ capture stderr ─┼─LineBatch─► recorder ──┼─RecordBatch─► throttle ─RecordBatch► uplink
    │ │ run (Started,  ─┘             (spool)    │                        (protocol +  │
    │ │  AgentLine, Finished)                    │                         sessions)   │
    │ └──────────────────────────────────────────┘                                    │
    │ spool syncer (1 s timer)   signal router (─► stopping COMMAND's process group) │
    └────────────────────────────────────────────────────────────────────────────────┘

Each actor owns the receive end of its input channel and closes its output
when its input ends: after the command exits and its pipes are drained, the
run sends Finished and closes its end, and the close travels down the
pipeline. The pipeline nursery ends when the recorder has spooled the last
line and the final state; the run then waits up to `drain_timeout` for the
uplink to be delivered, and leaves what is left in the spool for
`keruta-agent flush`. With `no_wait` it does not wait: what is not yet
acknowledged is handed to a background `keruta-agent flush --task-id ID`
(`flush --wait` at the job's end waits for it). If a signal was passed on to the command, the run ends
only once its process group has (SIGKILLed `kill_grace` seconds after the
signal if need be): nothing the command started outlives the agent.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from agent import process
from agent.pipeline.capture import Mirror, capture
from agent.pipeline.messages import AgentLine, CaptureMessage, Finished, SpooledMessage, Started
from agent.pipeline.recorder import Recorder, record
from agent.pipeline.throttle import limit
from agent.spool.lock import SpoolLocked
from agent.spool.spool import Spool
from keruta.limits import DEFAULT_LIMITS, Limits
from keruta.masking import Masker

if TYPE_CHECKING:
    from agent.pipeline.uplink import Uplink

SYNC_INTERVAL = 1.0
# Channel capacities, in batches: a LineBatch is at most one pipe read (64 KiB
# of lines); a RecordBatch is a seq range.
CAPTURE_QUEUE = 16
SPOOLED_QUEUE = 64
# After the command exits, its pipes may still be held open by a background
# process it started; stop reading once they have been quiet this long.
PIPE_GRACE = 1.0


def say(message: str) -> None:
    """The agent's own voice, on stderr."""
    try:
        sys.stderr.write(f"keruta-agent: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


@attrs.define
class RunSettings:
    command: list[str]
    hub_url: str
    task_id: str
    spool_root: Path
    token: str | None = None
    spool_max_bytes: int = 1 << 30
    batch_size: int = 500
    flush_interval: float = 0.2
    rate_limit: float | None = None
    masks: list[str] = attrs.field(factory=list)
    pty: bool = False
    drain_timeout: float = 30.0
    # The longest wait between attempts to reach the hub (--reconnect-max).
    reconnect_max: float = 30.0  # agent/pipeline/uplink.py RECONNECT.cap
    # After COMMAND exits, how long its pipes may stay quiet (--pipe-grace).
    pipe_grace: float = PIPE_GRACE
    # After a signal passed on to COMMAND's group, how long before SIGKILL (--kill-grace).
    kill_grace: float = process.KILL_GRACE
    quiet: bool = False
    # --no-wait: exit once the command has; a background flush delivers the rest.
    no_wait: bool = False
    # --max-in-flight-bytes: records sent and not yet acknowledged, at most.
    max_in_flight_bytes: int = 4 << 20
    # --max-bytes: the most of the task's messages the hub should keep, head and tail.
    max_bytes: int | None = None
    environ: Mapping[str, str] = attrs.field(factory=lambda: dict(os.environ))
    limits: Limits = DEFAULT_LIMITS


@attrs.define
class RunResult:
    exit_code: int
    delivered: bool
    unacked: int
    records: int
    dropped: int


async def run(settings: RunSettings, say: Callable[[str], None] = say) -> RunResult:
    masker = Masker.from_env(settings.environ, settings.masks)
    open_spool = functools.partial(
        Spool.open,
        task_id=settings.task_id,
        hub_url=settings.hub_url,
        max_bytes=settings.spool_max_bytes,
        warn=say,
    )
    try:
        spool = open_spool(settings.spool_root)
    except SpoolLocked as exc:
        say(f"{exc}; is task {settings.task_id} already running here?")
        return RunResult(1, False, 0, 0, 0)
    except OSError as exc:
        # Not worth failing the command for: spool somewhere we can write.
        fallback = Path(tempfile.gettempdir()) / f"keruta-spool-{os.getuid()}"
        say(f"cannot use the spool directory {settings.spool_root} ({exc}); using {fallback}")
        spool = open_spool(fallback)
    final = spool.meta.get("final")
    if final is not None and final.get("delivered") and spool.unacked == 0:
        # A previous run of this task id, delivered but not yet cleaned up (its
        # agent stopped just before): this run starts a spool, and a producer, of its own.
        spool.remove()
        spool = open_spool(spool.dir.parent)
    delivery = Delivery(settings, spool, say)
    recorder = Recorder(spool, settings.task_id, say=say)
    code = 1
    try:
        with trio.open_signal_receiver(*process.FORWARDED_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                to_limiter, limiter_inbox = trio.open_memory_channel[SpooledMessage](SPOOLED_QUEUE)
                to_uplink, uplink_inbox = trio.open_memory_channel[SpooledMessage](SPOOLED_QUEUE)
                nursery.start_soon(delivery.run, uplink_inbox)
                nursery.start_soon(limit, limiter_inbox, to_uplink, settings.rate_limit)
                nursery.start_soon(_sync_loop, spool)
                router = SignalRouter(settings.kill_grace, say)
                nursery.start_soon(router.run, signals)
                async with trio.open_nursery() as pipeline:
                    to_recorder, recorder_inbox = trio.open_memory_channel[CaptureMessage](CAPTURE_QUEUE)
                    pipeline.start_soon(record, recorder_inbox, recorder, to_limiter)
                    with to_recorder:
                        code = await _run_command(settings, masker, to_recorder, router, say)
                        await to_recorder.send(Finished("succeeded" if code == 0 else "failed", code))
                # Everything, the final state included, is in the spool now.
                if not settings.no_wait:
                    await _drain(delivery, router, settings.drain_timeout)
                await router.stopped()
                nursery.cancel_scope.cancel()
    finally:
        spool.save_watermark()
        with trio.CancelScope(shield=True):
            await spool.sync()
    delivered = delivery.delivered
    failure = delivery.failure
    unacked = spool.unacked
    if delivered:
        spool.remove()
    else:
        spool.close()
        what = f"{unacked} records" if unacked else "the final status"
        if settings.no_wait and not failure:
            pid = _deliver_in_background(settings, spool.dir.parent, say)
            if pid is not None:
                say(
                    f"{what} of task {settings.task_id} are delivered in the background "
                    f"(pid {pid}); `keruta-agent flush --wait` waits for that and says what "
                    "was not stored"
                )
        elif failure:
            say(
                f"ERROR: {what} of task {settings.task_id} were NOT delivered ({failure}); "
                f"they are kept in {spool.dir}. Fix the cause, then run `keruta-agent flush`."
            )
        else:
            say(
                f"the hub has not acknowledged {what} of task {settings.task_id} "
                f"(waited {settings.drain_timeout:g} s); they are kept in {spool.dir}. "
                "Run `keruta-agent flush` to deliver them."
            )
    if recorder.dropped_total:
        say(
            f"{recorder.dropped_total:,} output lines ({recorder.dropped_bytes:,} bytes) were DROPPED "
            "(the spool was full or could not be written); a gap record in the task's log says so"
        )
    return RunResult(code, delivered, unacked, recorder.written, recorder.dropped_total)


# How long a background delivery (--no-wait) keeps trying before it leaves
# the task to a later `flush`.
BACKGROUND_TIMEOUT = 600.0


def _deliver_in_background(settings: RunSettings, spool_root: Path, say: Callable[[str], None]) -> int | None:
    """Start `keruta-agent flush --task-id ID` detached from this process
    (its own session: it outlives the step) to deliver the spool this run
    leaves; its pid, or None if it could not be started. Its output goes
    nowhere: `flush --wait` at the job's end reports what it did not deliver.
    The token goes in its environment, not on its command line."""
    env = {k: v for k, v in settings.environ.items() if k != "KERUTA_TOKEN"}
    if settings.token:
        env["KERUTA_TOKEN"] = settings.token
    command = [
        sys.executable, "-m", "agent", "flush",
        "--task-id", settings.task_id,
        "--spool-dir", str(spool_root),
        "--hub", settings.hub_url,
        "--timeout", f"{BACKGROUND_TIMEOUT:g}",
        "--reconnect-max", f"{min(settings.reconnect_max, 5.0):g}",
    ]
    try:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        say(f"cannot start the background delivery ({exc}); run `keruta-agent flush` to deliver")
        return None
    # Not waited for: it is reparented when this process exits.
    child.returncode = 0
    return child.pid


async def _run_command(
    settings: RunSettings,
    masker: Masker,
    recorder: trio.MemorySendChannel[CaptureMessage],
    router: SignalRouter,
    say: Callable[[str], None],
) -> int:
    env = process.child_env(settings.environ, settings.token)
    try:
        child = await process.start(settings.command, env, use_pty=settings.pty)
    except OSError as exc:
        code = 126 if isinstance(exc, PermissionError) else 127
        message = f"cannot run {settings.command[0]!r}: {exc.strerror or exc}"
        say(message)
        await recorder.send(AgentLine(f"keruta-agent: {message}"))
        return code
    await recorder.send(Started(child.pid))
    router.child = child
    async with trio.open_nursery() as captures:
        grace = PipeGrace(captures.cancel_scope, settings.pipe_grace)
        for source, stream in child.outputs:
            mirror = None
            if not settings.quiet:
                mirror = Mirror(1 if source == "stdout" else 2, say)
            captures.start_soon(
                functools.partial(
                    capture,
                    stream,
                    source,
                    recorder.clone(),
                    masker.stream(),
                    mirror,
                    settings.limits,
                    on_read=grace.read,
                )
            )
        returncode = await child.process.wait()
        # Pipes end when the command (and whatever it left running) closes them.
        grace.exited()
    if captures.cancel_scope.cancelled_caught:
        say("the command exited but something it started still holds its output open; not waiting for it")
    router.child = None
    for _source, stream in child.outputs:
        await stream.aclose()
    return process.exit_code(returncode)


class PipeGrace:
    """After the command exits, its pipes get `grace` seconds of quiet, counted
    from the last read, before the captures (under `scope`) are cancelled."""

    def __init__(self, scope: trio.CancelScope, grace: float = PIPE_GRACE) -> None:
        self.scope = scope
        self.grace = grace
        self.has_exited = False

    def read(self) -> None:
        if self.has_exited:
            self.scope.deadline = trio.current_time() + self.grace

    def exited(self) -> None:
        self.has_exited = True
        self.scope.deadline = trio.current_time() + self.grace


class SignalRouter:
    """The agent's SIGINT/SIGTERM: passed to the command's process group while
    the command runs, the first one starting the group's `kill_grace` (SIGKILL
    for what is left of it then); after the command has exited, they cut the
    wait for the hub short."""

    def __init__(self, kill_grace: float = process.KILL_GRACE, say: Callable[[str], None] = say) -> None:
        self.child: process.Child | None = None
        self.drain: trio.CancelScope | None = None
        self.after_exit = 0
        self.kill_grace = kill_grace
        self.say = say
        # Set once the group a passed-on signal is stopping has ended.
        self._group_ended: trio.Event | None = None

    async def run(self, signals: object) -> None:
        async with trio.open_nursery() as nursery:
            async for signum in signals:  # type: ignore[attr-defined]
                if self.child is not None:
                    if process.forward(self.child, signum) and self._group_ended is None:
                        self._group_ended = trio.Event()
                        nursery.start_soon(self._stop, self.child, self._group_ended)
                else:
                    self.after_exit += 1
                    if self.drain is not None:
                        self.drain.cancel()

    async def _stop(self, child: process.Child, ended: trio.Event) -> None:
        try:
            if await process.stop(child, self.kill_grace):
                what = "process group" if child.own_group else "process"
                self.say(
                    f"the command's {what} was still running {self.kill_grace:g} s "
                    "after the signal passed on to it; killed it (SIGKILL)"
                )
        finally:
            ended.set()

    async def stopped(self) -> None:
        """Wait until what a passed-on signal is stopping has ended: at most
        `kill_grace`, then KILL_WAIT after the SIGKILL."""
        if self._group_ended is not None:
            await self._group_ended.wait()


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

    async def run(self, inbox: trio.MemoryReceiveChannel[SpooledMessage]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._consume, inbox)
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

    async def _consume(self, inbox: trio.MemoryReceiveChannel[SpooledMessage]) -> None:
        """What the rate limiter lets through; it never holds the pipeline up."""
        with inbox:
            async for message in inbox:
                if isinstance(message, Finished):
                    self.final = message
                    if self.uplink is not None:
                        self.uplink.finish(message.state, message.exit_code)
                else:
                    self.available = max(self.available, message.last_seq)
                    if self.uplink is not None:
                        self.uplink.records_available(message.last_seq)

    async def _deliver(self, uplink: Uplink) -> None:
        from agent.link.failures import UplinkFailed

        try:
            await uplink.run()
        except UplinkFailed as exc:
            self.failure = exc
            self.say(f"ERROR: delivery to the hub stopped: {exc}. Output is still spooled, not sent.")
            if exc.internal:
                self.say("".join(traceback.format_exception(exc.__cause__ or exc)).rstrip())
        finally:
            uplink.stopped.set()


async def _drain(delivery: Delivery | Uplink, router: SignalRouter, timeout: float) -> None:
    """Wait for the hub's acks, up to `timeout`; a signal cuts the wait short,
    and so does the uplink stopping (delivered, or failed for good)."""
    with trio.move_on_after(timeout) as scope:
        router.drain = scope
        if router.after_exit:
            scope.cancel()
        await delivery.stopped.wait()


async def _sync_loop(spool: Spool) -> None:
    while True:
        await trio.sleep(SYNC_INTERVAL)
        await spool.sync()
        spool.save_watermark()
