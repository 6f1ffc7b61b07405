"""Starting the command, passing signals on, and its exit code."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Mapping

import attrs
import trio

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@attrs.define
class Child:
    process: trio.Process
    # (source, stream) pairs to capture; under --pty just one, "stdout".
    outputs: list[tuple[str, trio.abc.ReceiveStream]]
    # Whether the command shares our process group (and so our terminal's
    # Ctrl-C): then SIGINT from the terminal already reached it.
    own_group: bool

    @property
    def pid(self) -> int:
        return self.process.pid


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


async def start(command: list[str], env: Mapping[str, str], use_pty: bool = False) -> Child:
    """Start `command` with its stdout/stderr captured.

    Without a terminal on stdin the command gets its own process group, so a
    signal meant for the agent reaches it once, through us. With one, it stays
    in our (foreground) group so that it can still read the terminal.
    """
    own_group = not _stdin_is_tty()
    group = 0 if own_group else None
    if not use_pty:
        process = await trio.lowlevel.open_process(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            process_group=group,
        )
        assert process.stdout is not None and process.stderr is not None
        return Child(process, [("stdout", process.stdout), ("stderr", process.stderr)], own_group)

    master, slave = os.openpty()
    try:
        # No "\n" -> "\r\n" translation: the mirror shows what the command wrote.
        mode = termios.tcgetattr(slave)
        mode[1] &= ~termios.ONLCR
        termios.tcsetattr(slave, termios.TCSANOW, mode)
        _copy_window_size(slave)
        process = await trio.lowlevel.open_process(
            command, stdout=slave, stderr=slave, env=dict(env), process_group=group
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return Child(process, [("stdout", trio.lowlevel.FdStream(master))], own_group)


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
    """Pass a signal the agent received on to the command; False if not passed."""
    if signum == signal.SIGINT and not child.own_group:
        return False  # the terminal sent it to the whole group, command included
    if child.process.returncode is None:
        try:
            child.process.send_signal(signum)
        except ProcessLookupError:
            return False
        return True
    return False
