"""`keruta-agent flush`: deliver what earlier runs left in the spool.

Each task directory holds its unacknowledged records and, if the command
finished, its final state. Flush sends both with the same uplink `run` uses
(resending is harmless: the hub de-duplicates on (taskId, seq)) and removes
the directory once the hub has everything. A task whose agent died before the
command finished gets an `agent` record saying so and the state `failed`
without an exit code, so that viewers waiting for its end are released.
A directory locked by a live agent is left alone.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from agent.pipeline.capture import Recorder
from agent.pipeline.uplink import Uplink, UplinkFailed, UplinkSettings, describe
from agent.spool import Spool, SpoolLocked, spooled_tasks
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


def _say(message: str) -> None:
    sys.stderr.write(f"keruta-agent flush: {message}\n")
    sys.stderr.flush()


async def flush(settings: FlushSettings, say: Callable[[str], None] = _say) -> int:
    root = settings.spool_root
    tasks = spooled_tasks(root)
    if not tasks:
        say(f"nothing to deliver in {root}")
        return 0
    failed = 0
    for task_id in tasks:
        if not await flush_task(settings, task_id, say):
            failed += 1
    return 1 if failed else 0


async def flush_task(settings: FlushSettings, task_id: str, say: Callable[[str], None]) -> bool:
    try:
        spool = Spool.open(settings.spool_root, task_id, create=False, warn=say)
    except SpoolLocked:
        say(f"task {task_id}: its agent is still running; it delivers its own records")
        return True
    except FileNotFoundError:
        return True
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
            spool.set_final("failed", None)
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
            ),
            say=say,
            backoff=RETRY.capped_at(settings.reconnect_max),
        )
        uplink.finish(final["state"], final.get("exitCode"))
        try:
            with trio.move_on_after(settings.timeout) as waited:
                await uplink.run(max_restarts=settings.retries)
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
