"""`keruta-agent run`: one task = one nursery, its actors joined by bounded channels.

COMMAND starts before Trio and the pipeline are even imported (agent/launch.py,
called by agent/cli.py on the standard library alone), so that it never waits
on the agent's own start-up:

    launch: lock the task's spool ─► hold SIGINT/SIGTERM ─► start COMMAND ─► an early
            reader per pipe (a thread: reads into memory, 32 MiB at most, the
            pipes' budget together; agent/earlyread.py)
    then:   import Trio and the pipeline, `run`:

    ┌ task nursery ──────────────────────────────────────────────────────────────────┐
    │ ┌ pipeline nursery ───────────────────────┐                                    │
    │ │ capture stdout ─┐                        │                                    │
    │ │ capture stderr ─┼─LineBatch─► recorder ──┼─RecordBatch─► throttle ─RecordBatch► uplink
    │ │ run (Started,  ─┘             (spool)    │                        (protocol +  │
    │ │  AgentLine, Finished)                    │                         sessions)   │
    │ └──────────────────────────────────────────┘                                    │
    │ spool syncer (1 s timer, or   signal router (the held signals first;           │
    │  a segment filled up)          ─► stopping COMMAND's process group)            │
    └────────────────────────────────────────────────────────────────────────────────┘

Each capture first takes over what its pipe's early reader read (stopping
it), then reads the pipe itself. Each actor owns the receive end of its
input channel and closes its output
when its input ends: after the command exits and its pipes are drained, the
run sends Finished and closes its end, and the close travels down the
pipeline. The pipeline nursery ends when the recorder has spooled the last
line and the final state; the run then waits up to `drain_timeout` for the
uplink to be delivered, and leaves what is left in the spool for
`keruta-agent flush`. With `no_wait` it does not wait: what is not yet
acknowledged is handed to a background `keruta-agent flush --task-id ID`
(`flush --wait` at the job's end waits for it). If a signal was passed on to the command, the run ends
only once its process group has (SIGKILLed `kill_grace` seconds after the
signal if need be): nothing the command started outlives the agent, not
even when the agent itself fails (COMMAND's group is SIGKILLed then).
"""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import attrs
import trio

from agent import exits, process
from agent.launch import Launched, fallback_root, launch
from agent.pipeline.capture import Mirror, capture
from agent.pipeline.delivery import Delivery, drain
from agent.pipeline.messages import AgentLine, CaptureMessage, Finished, SpooledMessage, Started
from agent.pipeline.recorder import Recorder, record
from agent.pipeline.signals import SignalRouter
from agent.pipeline.spool_sync import sync_every
from agent.pipeline.throttle import limit
from agent.spool.spool import Spool
from agent.voice import say
from keruta.limits import DEFAULT_LIMITS, Limits
from keruta.masking import Masker

# Channel capacities, in batches: a LineBatch is at most one pipe read (64 KiB
# of lines); a RecordBatch is a seq range.
CAPTURE_QUEUE = 16
SPOOLED_QUEUE = 64
# After the command exits, its pipes may still be held open by a background
# process it started; stop reading once they have been quiet this long.
PIPE_GRACE = 1.0
# ... and at most this many times that after it exits, quiet or not.
PIPE_GRACE_LIMIT = 10


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


async def run(settings: RunSettings, say: Callable[[str], None] = say, launched: Launched | None = None) -> RunResult:
    """Run `settings.command`, or, when `launched` (agent/launch.py) has
    started it already, take it over."""
    if launched is None:
        launched = launch(
            settings.command, settings.environ, settings.token, settings.spool_root, settings.task_id, say,
            use_pty=settings.pty,
        )
        if launched is None:
            return RunResult(1, False, 0, 0, 0)
    try:
        return await _run(settings, say, launched)
    except BaseException:
        launched.kill()
        raise
    finally:
        launched.restore_signals()


async def _run(settings: RunSettings, say: Callable[[str], None], launched: Launched) -> RunResult:
    masker = Masker.from_env(settings.environ, settings.masks)
    open_spool = functools.partial(
        Spool.open,
        task_id=settings.task_id,
        hub_url=settings.hub_url,
        max_bytes=settings.spool_max_bytes,
        warn=say,
    )
    try:
        spool = open_spool(launched.spool_root, lock_fd=launched.take_lock())
    except OSError as exc:
        # Not worth failing the command for: spool somewhere we can write.
        fallback = fallback_root()
        say(f"cannot use the spool directory {launched.spool_root} ({exc}); using {fallback}")
        spool = open_spool(fallback)
    final = spool.meta.get("final")
    if final is not None and final.get("delivered") and spool.unacked == 0:
        # A previous run of this task id, delivered but not yet cleaned up (its
        # agent stopped just before): this run starts a spool, and a producer, of its own.
        spool.remove()
        spool = open_spool(spool.dir.parent)
    try:
        spool.resume()
    except OSError as exc:
        spool.close()
        fallback = fallback_root()
        say(f"cannot continue the spool {spool.dir} ({exc}); using {fallback}")
        spool = open_spool(fallback)
    delivery = Delivery(settings, spool, say)
    recorder = Recorder(spool, settings.task_id, say=say)
    code = 1
    try:
        with trio.open_signal_receiver(*process.FORWARDED_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(delivery.run)
                to_limiter: trio.MemorySendChannel[SpooledMessage] | None = None
                deliver: Callable[[SpooledMessage], Awaitable[None]] = delivery.offer
                if settings.rate_limit:
                    to_limiter, limiter_inbox = trio.open_memory_channel[SpooledMessage](SPOOLED_QUEUE)
                    nursery.start_soon(limit, limiter_inbox, delivery.offer, settings.rate_limit)
                    deliver = to_limiter.send
                nursery.start_soon(sync_every, spool)
                router = SignalRouter(settings.kill_grace, say)
                router.child = launched.child
                nursery.start_soon(router.run, signals, launched.signals)
                async with trio.open_nursery() as pipeline:
                    to_recorder, recorder_inbox = trio.open_memory_channel[CaptureMessage](CAPTURE_QUEUE)
                    pipeline.start_soon(record, recorder_inbox, recorder, deliver)
                    with to_recorder:
                        code = await _run_command(settings, launched, masker, to_recorder, router, say)
                        await to_recorder.send(Finished("succeeded" if code == 0 else "failed", code))
                if to_limiter is not None:
                    # The recorder has drained: the throttle forwards what it holds and ends.
                    to_limiter.close()
                # Everything, the final state included, is in the spool now.
                if not settings.no_wait:
                    await drain(delivery, router, settings.drain_timeout)
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
    launched: Launched,
    masker: Masker,
    recorder: trio.MemorySendChannel[CaptureMessage],
    router: SignalRouter,
    say: Callable[[str], None],
) -> int:
    child = launched.child
    if child is None:
        exc = launched.error
        assert exc is not None
        # As a shell answers: 127 when there is no such command, 126 when
        # there is one that cannot run (not executable, a directory, a format
        # the kernel does not know).
        code = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
        message = f"cannot run {settings.command[0]!r}: {exc.strerror or exc}"
        say(message)
        # ERROR whatever the OS's wording: it is the one line that explains the failure.
        await recorder.send(AgentLine(f"keruta-agent: {message}", "ERROR"))
        return code
    await recorder.send(Started(child.pid))
    streams = []
    async with trio.open_nursery() as captures:
        grace = PipeGrace(captures.cancel_scope, settings.pipe_grace)
        for source, fd in child.outputs:
            stream = trio.lowlevel.FdStream(fd)
            streams.append(stream)
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
                    early=launched.readers.get(fd),
                )
            )
        returncode = await exits.wait(child)
        # Pipes end when the command (and whatever it left running) closes
        # them. From here a signal is not passed on (the command has exited):
        # it ends this wait, and the wait for the hub after it.
        router.child = None
        router.drain = captures.cancel_scope
        if router.after_exit:
            captures.cancel_scope.cancel()
        grace.exited()
    router.drain = None
    if captures.cancel_scope.cancelled_caught:
        say("the command exited but something it started still holds its output open; not waiting for it")
    for stream in streams:
        await stream.aclose()
    return process.exit_code(returncode)


class PipeGrace:
    """After the command exits, its pipes get `grace` seconds of quiet, counted
    from the last read, before the captures (under `scope`) are cancelled; and
    PIPE_GRACE_LIMIT times `grace` from the exit at most, however much what
    the command left running still writes (it would hold the agent for ever)."""

    def __init__(self, scope: trio.CancelScope, grace: float = PIPE_GRACE) -> None:
        self.scope = scope
        self.grace = grace
        self.last_deadline: float | None = None

    def read(self) -> None:
        if self.last_deadline is not None:
            self.scope.deadline = min(trio.current_time() + self.grace, self.last_deadline)

    def exited(self) -> None:
        now = trio.current_time()
        self.last_deadline = now + PIPE_GRACE_LIMIT * self.grace
        self.scope.deadline = now + self.grace
