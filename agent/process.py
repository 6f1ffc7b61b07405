"""Starting the command, passing signals on, and its exit code.

Imported before the command starts (agent/launch.py), which is before the
agent's heavy imports: the standard library only. What waits on the command
from Trio is agent/exits.py.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Mapping

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long the command's process group has, after the first signal passed on
# to it, to end before it is SIGKILLed (--kill-grace).
KILL_GRACE = 10.0
# After the SIGKILL, the longest wait for the group to be gone: a process in an
# uninterruptible sleep (a hung NFS read) dies only when it wakes.
KILL_WAIT = 5.0
# Between looks at whether a group has ended: the first pause and the longest.
GROUP_POLL = (0.01, 0.25)
# Linux's process table says which processes are zombies; without it, a zombie
# counts as a live member of its group.
PROC_STAT = os.path.exists("/proc/self/stat")


class Child:
    """The running command. (A plain class, not attrs: see the module's docstring.)"""

    def __init__(self, popen: subprocess.Popen[bytes], outputs: list[tuple[str, int]], own_group: bool) -> None:
        self.popen = popen
        # (source, fd) pairs to capture, the read ends of its pipes (non-blocking);
        # under --pty just one, "stdout", the pty's master side.
        self.outputs = outputs
        # Whether the command leads a process group of its own (its id is the
        # command's pid): then the signals we pass on go to the whole group. If not,
        # it shares ours, the terminal's foreground group, and the terminal's
        # Ctrl-C already reached it and everything it started.
        self.own_group = own_group

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has exited (and been reaped), else None."""
        return self.popen.poll()


# The agent's own credential: the command must not be able to write (or, with
# an old hub, delete) as the agent.
AGENT_CREDENTIALS = ("KERUTA_TOKEN",)


def child_env(environ: Mapping[str, str], token: str | None = None) -> dict[str, str]:
    """The command's environment: ours without the agent's credentials.

    Besides KERUTA_TOKEN, no KERUTA_* variable may carry the token the agent
    uses (given with --token, it may also sit in e.g. KERUTA_AGENT_TOKEN).
    Variables under other names are the user's own business and are kept.
    """
    env = {
        name: value
        for name, value in environ.items()
        if name not in AGENT_CREDENTIALS and not (token and name.startswith("KERUTA_") and value == token)
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def exit_code(returncode: int) -> int:
    """The shell's convention: 128 + N for a command killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _stdin_is_tty() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def start(command: list[str], env: Mapping[str, str], use_pty: bool = False) -> Child:
    """Start `command` with its stdout/stderr captured.

    The command leads a process group of its own, so that a signal meant for
    the agent reaches it, and everything it started, once, through us (as a
    terminal's Ctrl-C reaches a whole foreground job). Under a pty it leads a
    session too, whose controlling terminal is the pty. Only with a terminal on
    stdin and no pty does it stay in our (foreground) group, so that it can
    still read that terminal and open /dev/tty.

    OSError if it cannot be started (PermissionError: not executable).
    """
    if not use_pty:
        own_group = not _stdin_is_tty()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            for fd in (out_r, err_r):
                _widen(fd)
                os.set_blocking(fd, False)
            popen = subprocess.Popen(
                command,
                stdout=out_w,
                stderr=err_w,
                env=dict(env),
                process_group=0 if own_group else None,
            )
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        return Child(popen, [("stdout", out_r), ("stderr", err_r)], own_group)

    master, slave = os.openpty()
    try:
        # No "\n" -> "\r\n" translation: the mirror shows what the command wrote.
        mode = termios.tcgetattr(slave)
        mode[1] &= ~termios.ONLCR
        termios.tcsetattr(slave, termios.TCSANOW, mode)
        _copy_window_size(slave)
        os.set_blocking(master, False)
        popen = subprocess.Popen(
            command,
            stdout=slave,
            stderr=slave,
            env=dict(env),
            start_new_session=True,
            preexec_fn=_take_the_terminal,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return Child(popen, [("stdout", master)], own_group=True)


# A fast command writes on into the pipe while the agent spools what it read:
# 1 MiB (the most an unprivileged process may ask for, by default) rather
# than 64 KiB is held before the command has to wait for the agent.
PIPE_BYTES = 1 << 20


def _widen(fd: int) -> None:
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:
        pass  # Not Linux, or a lower pipe-max-size: the default buffer does.


def _take_the_terminal() -> None:
    """In the child, after its setsid() and before the exec: make the pty (on
    fd 1 by then) its controlling terminal, and its group the pty's foreground
    group, as a terminal emulator does. `subprocess` has no option for this,
    hence the hook (kept to one system call: it runs between fork and exec)."""
    try:
        fcntl.ioctl(1, termios.TIOCSCTTY, 0)
    except OSError:
        pass  # the command still runs, without a controlling terminal


def _copy_window_size(fd: int) -> None:
    for ours in (1, 2, 0):
        try:
            if os.isatty(ours):
                size = os.get_terminal_size(ours)
                fcntl.ioctl(
                    fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.lines, size.columns, 0, 0)
                )
                return
        except OSError:
            continue


def forward(child: Child, signum: int) -> bool:
    """Pass a signal the agent received on to the command, to its whole
    process group when it has one; False if not passed."""
    if signum == signal.SIGINT and not child.own_group:
        return False  # the terminal sent it to the whole group, command included
    if child.returncode is not None:
        return False
    return _signal(child, signum)


def kill(child: Child) -> bool:
    """SIGKILL the command's group (or the command alone, when it has none)."""
    return _signal(child, signal.SIGKILL)


def _signal(child: Child, signum: int) -> bool:
    """Send `signum` to the command's group when it leads one, else to the
    command alone; False if there was nobody left to get it."""
    try:
        if child.own_group:
            os.killpg(child.pid, signum)
        else:
            child.popen.send_signal(signum)
    except ProcessLookupError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a member that has not exited.

    A zombie is not one: a process the command started and left behind is
    adopted by PID 1 (or a subreaper), and in a container that PID 1 may never
    collect it, which would keep the group "alive" for good."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a member we may not signal is a member all the same
    if not PROC_STAT:
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (name) state ppid pgrp ...": the name may hold spaces and ")".
        state, _ppid, pgrp = stat[stat.rindex(b")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in (b"Z", b"X"):
            return True
    return False
