"""The server half of `tests.launch`: forks `python -m hub` / `-m agent` processes
from one interpreter that has already imported them.

A process start spends about 0.4 s of CPU importing trio, quart, hypercorn and
the rest before the CLI reads its first argument; the suite starts over a
hundred. This server imports them once, then for each request forks a child
that becomes what `python -m MODULE ARGS` would be: the request's stdin,
stdout and stderr on fds 0-2, its environment, working directory, argv and
standard streams (buffered as the interpreter would buffer them), default
signal handlers, then the module run as `__main__`. The child is a real
process with its own pid; signals, SIGKILL and exit codes work as for any
child. What it does not repeat is the interpreter's start-up and the imports.

Protocol, over the SOCK_SEQPACKET socket given to `main` (one message per request):
JSON {"module", "argv", "env", "cwd"} with four fds: a status socket, stdin,
stdout, stderr. The server writes the child's pid on the status socket, and
its exit status (as `subprocess` reports it: -N for signal N) when it ends.
EOF on it (the test process is gone) kills what is left and ends the server.
"""

from __future__ import annotations

import gc
import io
import json
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
import traceback
from typing import Any

PRELOAD = (
    "hub.cli", "hub.server", "hub.store.sqlite", "hub.store.postgres",
    "agent.cli", "agent.run", "agent.tail", "agent.flush",
)
STATUS = struct.Struct("!q")
MAX_REQUEST = 1 << 20


def main(control_fd: int) -> None:
    for name in PRELOAD:
        __import__(name)
    # Children share these pages until they write them; a collection in each
    # child would otherwise touch (and copy) every object imported here.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is for the test run
    control = socket.socket(fileno=control_fd)
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd → (pid, status socket)
    with selectors.DefaultSelector() as selector:
        selector.register(control, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is control:
                    try:
                        data, fds, _, _ = socket.recv_fds(control, MAX_REQUEST, 4)
                    except ConnectionResetError:
                        data, fds = b"", []
                    if not data:
                        for pid, _status in children.values():
                            _kill(pid)
                        return
                    status = socket.socket(fileno=fds[0])
                    pid = os.fork()
                    if pid == 0:
                        control.close()
                        selector.close()
                        for pidfd, (_, other) in children.items():
                            os.close(pidfd)
                            other.close()
                        status.close()
                        _become(json.loads(data), fds[1:])  # never returns
                    for fd in fds[1:]:
                        os.close(fd)
                    _send(status, pid)
                    pidfd = os.pidfd_open(pid)
                    children[pidfd] = (pid, status)
                    selector.register(pidfd, selectors.EVENT_READ)
                else:
                    pidfd = key.fd
                    selector.unregister(pidfd)
                    pid, status = children.pop(pidfd)
                    os.close(pidfd)
                    _, wait_status = os.waitpid(pid, 0)
                    _send(status, os.waitstatus_to_exitcode(wait_status))
                    status.close()


def _send(status: socket.socket, value: int) -> None:
    try:
        status.sendall(STATUS.pack(value))
    except OSError:
        pass  # the test process stopped listening; the child still gets reaped


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _become(request: dict, fds: list[int]) -> None:
    """In the forked child: turn into `python -m MODULE ARGV...` and run it."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = _stdio(0, "r", unbuffered)
        sys.stdout = _stdio(1, "w", unbuffered)
        sys.stderr = _stdio(2, "w", unbuffered, errors="backslashreplace", line_buffering=True)
        sys.argv = ["-m", *request["argv"]]
        gc.enable()
        code = _run(request["module"])
    finally:
        os._exit(code)


def _run(module: str) -> int:
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        _flush()
        # As the interpreter does: die of the signal, so the parent sees -SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    import threading

    threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads end first, as at exit
    import atexit

    atexit._run_exitfuncs()
    _flush()
    return code


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _stdio(
    fd: int, mode: str, unbuffered: bool, *, errors: str | None = None, line_buffering: bool = False
) -> io.TextIOWrapper:
    """A standard stream over `fd`, buffered the way the interpreter sets it up."""
    like = {0: sys.__stdin__, 1: sys.__stdout__, 2: sys.__stderr__}[fd]
    encoding = like.encoding if like is not None else "utf-8"
    errors = errors or (like.errors if like is not None else "strict")
    interactive = os.isatty(fd)
    raw = io.FileIO(fd, mode, closefd=False)
    if mode == "w" and unbuffered:
        return io.TextIOWrapper(raw, encoding, errors, line_buffering=line_buffering or interactive, write_through=True)
    buffered: Any = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    return io.TextIOWrapper(buffered, encoding, errors, line_buffering=line_buffering or interactive)

