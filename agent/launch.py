"""`run`'s first steps, before the agent's heavy imports: own the task's
spool (its lock), then start the command and read its pipes at once
(agent/earlyread.py), so that the command never waits on the agent's own
start-up. Importing Trio and the pipeline, and opening the spool, follow
(agent/run.py) while the command already runs.

The standard library only, like everything imported from here.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from agent import process
from agent.earlyread import Budget, EarlyReader
from agent.spool.lock import SpoolLocked, lock_directory, task_directory


class Launched:
    """A started command (or why it could not start), the spool directory
    locked for it, and the signals the agent got before Trio took them over."""

    def __init__(self, spool_root: Path, lock_fd: int) -> None:
        self.spool_root = spool_root
        # The flock on the task's spool directory, for Spool.open to adopt.
        self.lock_fd: int | None = lock_fd
        self.child: process.Child | None = None
        # Why the command could not be started (then `child` is None).
        self.error: OSError | None = None
        # Its pipes' early readers, by fd.
        self.readers: dict[int, EarlyReader] = {}
        # SIGINT/SIGTERM received before the run's signal receiver: it passes them on.
        self.signals: list[int] = []
        self._handlers: dict[int, Any] = {}

    def kill(self) -> None:
        """The agent fails: what COMMAND started must not outlive it (SIGKILL
        to its group, if it still runs)."""
        child = self.child
        if child is not None and child.returncode is None:
            process.kill(child)

    def take_lock(self) -> int | None:
        fd, self.lock_fd = self.lock_fd, None
        return fd

    def _hold_signals(self) -> None:
        def hold(signum: int, _frame: FrameType | None) -> None:
            self.signals.append(signum)

        for signum in process.FORWARDED_SIGNALS:
            self._handlers[signum] = signal.signal(signum, hold)

    def restore_signals(self) -> None:
        """The agent's signal handlers as they were before `launch`."""
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}


def fallback_root() -> Path:
    """The spool's root when the one asked for cannot be used."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"keruta-spool-{os.getuid()}"


def launch(
    command: list[str],
    environ: Mapping[str, str],
    token: str | None,
    spool_root: Path,
    task_id: str,
    say: Callable[[str], None],
    use_pty: bool = False,
) -> Launched | None:
    """Lock the task's spool, then start the command; None (said why) when
    another agent runs this task here: then the command is not started."""
    try:
        lock_fd = lock_directory(task_directory(spool_root, task_id))
    except SpoolLocked as exc:
        say(f"{exc}; is task {task_id} already running here?")
        return None
    except OSError as exc:
        # Not worth failing the command for: spool somewhere we can write.
        fallback = fallback_root()
        say(f"cannot use the spool directory {spool_root} ({exc}); using {fallback}")
        spool_root = fallback
        lock_fd = lock_directory(task_directory(spool_root, task_id))
    launched = Launched(spool_root, lock_fd)
    # From here on a SIGINT/SIGTERM is passed on to the command, not lost
    # (nor does it kill the agent and leave the command running).
    launched._hold_signals()
    try:
        child = process.start(command, process.child_env(environ, token), use_pty=use_pty)
    except OSError as exc:
        launched.error = exc
        return launched
    launched.child = child
    budget = Budget()
    for _source, fd in child.outputs:
        launched.readers[fd] = EarlyReader(fd, budget)
    return launched
