"""Waiting, from Trio, on the command that agent/process.py started: for it
to exit, and, after a signal passed on to it, for its whole process group to
end (SIGKILLed if it takes too long)."""

from __future__ import annotations

import os

import trio

from agent.process import GROUP_POLL, KILL_WAIT, Child, group_alive, kill


async def wait(child: Child) -> int:
    """The command's exit status (-N if signal N killed it), once it has
    exited; it is reaped then."""
    if child.returncode is not None:
        return child.popen.wait()
    try:
        # Nothing else runs on this thread between the look above and this:
        # the pid is still the command's (a reaped pid could name another process).
        pidfd = os.pidfd_open(child.pid)
    except (AttributeError, OSError):
        # Not Linux 5.3+: a worker thread waits (abandoned if cancelled; it
        # ends when the command does).
        return await trio.to_thread.run_sync(child.popen.wait, abandon_on_cancel=True)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return child.popen.wait()


async def stop(child: Child, grace: float) -> bool:
    """After a signal was passed on: give the command (its whole group, when it
    has one) `grace` seconds to end, then SIGKILL what is left of it and wait up
    to KILL_WAIT for that to end. True if it had to be killed."""
    with trio.move_on_after(grace):
        await _ended(child)
        return False
    kill(child)
    with trio.move_on_after(KILL_WAIT):
        await _ended(child)
    return True


async def _ended(child: Child) -> None:
    if not child.own_group:
        await wait(child)
        return
    pause = GROUP_POLL[0]
    # No event says a group has emptied: look, more rarely the longer it lives.
    while await trio.to_thread.run_sync(group_alive, child.pid):
        await trio.sleep(pause)
        pause = min(pause * 2, GROUP_POLL[1])
