"""`keruta-agent flush`: deliver what earlier runs left in the spool.

Each task directory holds its unacknowledged records and, if the command
finished, its final state. Flush sends both with the same uplink `run` uses
(resending is harmless: the hub de-duplicates on (taskId, seq)) and removes
the directory once the hub has everything. A task whose agent died before the
command finished gets an `agent` record saying so and the state `failed`
without an exit code, so that viewers waiting for its end are released.
A directory locked by a live agent is left alone, unless `--wait`: then flush
waits for that agent (a `run` still going, or the background delivery a
`run --no-wait` started, which is this same flush limited to its task) to
end, and delivers what it left. So `flush --wait` at a job's end exits 0 only
once every task's records and final state are stored, and names each task
that is not.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from agent.pipeline.failures import UplinkFailed, describe
from agent.pipeline.recorder import Recorder
from agent.pipeline.uplink import Uplink, UplinkSettings
from agent.spool.lock import SpoolLocked
from agent.spool.root import spooled_tasks
from agent.spool.spool import Spool
from keruta.backoff import Backoff
from keruta.supervisor import GaveUp

RETRY = Backoff(initial=0.5, factor=2.0, cap=5.0, jitter=0.2)


@attrs.define
class FlushSettings:
    spool_root: Path
    # --hub: overrides the hub each task was recorded with.
    hub_url: str | None = None
    # Used for a task whose spool does not say which hub it was for.
    fallback_hub_url: str = "http://127.0.0.1:8080"
    token: str | None = None
    retries: int = 3
    # Per task: a hub that answers pings but never acknowledges (its store is
    # down) would otherwise keep flush waiting forever.
    timeout: float = 60.0
    # The longest wait between attempts to reach the hub (--reconnect-max).
    reconnect_max: float = RETRY.cap
    # --task-id: only this task.
    task_id: str | None = None
    # --wait: a task whose spool another process holds is waited for, not skipped.
    wait: bool = False
    # --max-in-flight-bytes of the uplink.
    max_in_flight_bytes: int = 4 << 20

# How often --wait looks whether the spool's owner has let go of it.
LOCK_POLL = 0.1


def _say(message: str) -> None:
    sys.stderr.write(f"keruta-agent flush: {message}\n")
    sys.stderr.flush()


async def flush(settings: FlushSettings, say: Callable[[str], None] = _say) -> int:
    root = settings.spool_root
    tasks = spooled_tasks(root)
    if settings.task_id is not None:
        tasks = [t for t in tasks if t == settings.task_id]
    if not tasks:
        say(f"nothing to deliver in {root}")
        return 0
    failed = []
    for task_id in tasks:
        if not await flush_task(settings, task_id, say):
            failed.append(task_id)
    if failed and len(tasks) > 1:
        say(f"NOT delivered: {len(failed)} of {len(tasks)} tasks ({', '.join(failed)}); they stay in {root}")
    return 1 if failed else 0


async def _open_waiting(settings: FlushSettings, task_id: str, say: Callable[[str], None]) -> Spool | None:
    """The task's spool once no other process holds it; None if it is gone
    (its owner delivered it) or, past `settings.timeout`, still held."""
    waited = False
    with trio.move_on_after(settings.timeout):
        while True:
            try:
                return Spool.open(settings.spool_root, task_id, create=False, warn=say)
            except FileNotFoundError:
                return None
            except SpoolLocked:
                if not waited:
                    say(f"task {task_id}: waiting for its agent or background delivery to finish")
                    waited = True
                await trio.sleep(LOCK_POLL)
    raise SpoolLocked(f"task {task_id}: still in use after {settings.timeout:g} s (--timeout)")


async def _deliver(uplink: Uplink, spool: Spool, retries: int) -> None:
    """Run the uplink until delivered. `retries` failed connections in a row
    give up, but not when they moved delivery on: a hub that closes every
    connection after an ack or two is reached, and each one delivers more."""
    while True:
        acked = spool.acked_seq
        try:
            await uplink.run(max_restarts=retries)
        except GaveUp:
            if spool.acked_seq > acked:
                continue
            raise
        return


async def flush_task(settings: FlushSettings, task_id: str, say: Callable[[str], None]) -> bool:
    try:
        if settings.wait:
            opened = await _open_waiting(settings, task_id, say)
            if opened is None:
                return True
            spool = opened
        else:
            spool = Spool.open(settings.spool_root, task_id, create=False, warn=say)
    except SpoolLocked as exc:
        if settings.wait:
            say(f"{exc}; its records are NOT known to be stored")
            return False
        say(f"task {task_id}: its agent is still running; it delivers its own records")
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        # Not ours to read (another user's spool), a failing disk: nothing was sent.
        say(
            f"task {task_id}: cannot open its spool ({exc}); its records stay in "
            f"{settings.spool_root / task_id}, NOT delivered"
        )
        return False
    removed = False
    try:
        final = spool.meta.get("final")
        if final is not None and final.get("delivered") and spool.unacked == 0:
            spool.remove()
            removed = True
            return True
        if final is None:
            recorder = Recorder(spool, task_id)
            recorder.write_agent(
                "keruta-agent: the agent stopped before the command finished; "
                "its final state is unknown"
            )
            await spool.set_final("failed", None)
            final = spool.meta["final"]
        hub = settings.hub_url or spool.meta.get("hubUrl") or settings.fallback_hub_url
        pending = spool.unacked
        uplink = Uplink(
            spool,
            UplinkSettings(
                hub_url=hub,
                task_id=task_id,
                token=settings.token,
                batch_size=1000,
                flush_interval=0.05,
                max_in_flight_bytes=settings.max_in_flight_bytes,
            ),
            say=say,
            backoff=RETRY.capped_at(settings.reconnect_max),
        )
        uplink.finish(final["state"], final.get("exitCode"))
        try:
            with trio.move_on_after(settings.timeout) as waited:
                await _deliver(uplink, spool, settings.retries)
        except GaveUp as exc:
            say(
                f"task {task_id}: could not deliver to {hub} ({describe(exc.last_error)}); "
                f"{spool.unacked} records stay in {spool.dir}"
            )
            return False
        except UplinkFailed as exc:
            say(f"task {task_id}: ERROR: {exc}; {spool.unacked} records stay in {spool.dir}")
            if exc.internal:
                say("".join(traceback.format_exception(exc.__cause__ or exc)).rstrip())
            return False
        if waited.cancelled_caught:
            say(
                f"task {task_id}: gave up after {settings.timeout:g} s (--timeout): {hub} has not "
                f"acknowledged everything; {spool.unacked} records stay in {spool.dir}"
            )
            return False
        spool.remove()
        removed = True
        say(
            f"task {task_id}: delivered {pending} records and its final state ({final['state']}) to {hub}"
        )
        return True
    finally:
        if not removed:
            spool.save_watermark()
            spool.close()
