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
child. What it does not repeat is the interpreter's start-up and the imports:
of the request's environment, the start-up's own variables (PYTHONPATH,
PYTHONHASHSEED, LANG and LC_* for the locale...) have no effect, except
PYTHONUNBUFFERED. tests/test_launch.py compares the two kinds of start.

Protocol, over the SOCK_SEQPACKET socket given to `main` (one message per request):
JSON {"module", "argv", "env", "cwd"} with four fds: a status socket, stdin,
stdout, stderr. The server writes the child's pid on the status socket, and
its exit status (as `subprocess` reports it: -N for signal N) when it ends.
EOF on it (the test process is gone) kills what is left and ends the server.
"""

from __future__ import annotations

import codecs
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
# Each signal's disposition as the interpreter left it at start-up, before the
# preloaded modules: an extension may install a handler of its own from C
# (Python 3.13's readline catches SIGWINCH), which a child must not inherit.
STARTUP_HANDLERS = {
    signum: handler for signum in signal.valid_signals()
    if (handler := signal.getsignal(signum)) in (signal.SIG_DFL, signal.SIG_IGN)
}
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
        for signum, handler in STARTUP_HANDLERS.items():
            try:
                signal.signal(signum, handler)
            except (OSError, ValueError):  # SIGKILL, SIGSTOP
                pass
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        streams = [_stdio(fd, unbuffered) for fd in (0, 1, 2)]
        sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams  # type: ignore[misc]
        if sys.path[0] == "":  # `-c`'s entry; `-m` puts the working directory there
            sys.path[0] = os.getcwd()
        sys.argv = ["-m", *request["argv"]]
        # The module runs in __main__'s namespace, as with `-m`: without what `-c` put there.
        main_globals = vars(sys.modules["__main__"])
        for name in [name for name in main_globals if not name.startswith("__")]:
            del main_globals[name]
        gc.enable()
        code = _run(request["module"])
    except BaseException:  # becoming the child failed (a cwd that is gone...): say so on its stderr
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _run(module: str) -> int:
    """What the interpreter does for `-m MODULE` (Py_RunMain): run it as
    __main__ through runpy's entry point for `-m`, report how it ended, then
    finalize: join non-daemon threads, run atexit handlers, flush stdout and
    stderr (a failure there makes the status 120), and die of SIGINT after an
    uncaught KeyboardInterrupt."""
    interrupted = False
    try:
        runpy._run_module_as_main(module)  # type: ignore[attr-defined]
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException as exc:
        # The traceback `python -m` prints: from runpy's frames down, without this one.
        if exc.__traceback__ is not None:
            exc.__traceback__ = exc.__traceback__.tb_next
        sys.excepthook(type(exc), exc, exc.__traceback__)
        interrupted = isinstance(exc, KeyboardInterrupt)
        code = 1
    import threading

    threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads end first, as at exit
    import atexit

    atexit._run_exitfuncs()
    if not _flush():
        code = 120
    if interrupted:
        # As the interpreter does: die of the signal, so the parent sees -SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    return code


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _flush() -> bool:
    """Flush stdout and stderr as the interpreter does at exit: False if either fails."""
    ok = True
    try:
        if not sys.stdout.closed:
            sys.stdout.flush()
    except Exception as exc:
        ok = False
        try:  # what sys.unraisablehook says (the exception came from C: no traceback)
            if sys.version_info >= (3, 13):
                print("Exception ignored on flushing sys.stdout:", file=sys.stderr)
            else:
                print(f"Exception ignored in: {sys.stdout!r}", file=sys.stderr)
            traceback.print_exception(type(exc), exc, None, file=sys.stderr)
        except Exception:
            pass
    try:
        if not sys.stderr.closed:
            sys.stderr.flush()
    except Exception:
        ok = False
    return ok


def _stdio_codec() -> tuple[str, str]:
    """The standard streams' encoding and error handler for this (the
    request's) environment, as the interpreter picks them: PYTHONIOENCODING's
    "encoding[:errors]" (an encoding alone means strict), else the locale's
    encoding, with surrogateescape under the C/POSIX locale (or its UTF-8
    coercion target) or in UTF-8 mode, and strict otherwise. (tox sets
    PYTHONIOENCODING=utf-8; the server itself may run under another.)"""
    import locale

    name = locale.setlocale(locale.LC_CTYPE, "")
    utf8_mode = os.environ.get("PYTHONUTF8", "1" if sys.flags.utf8_mode else "") == "1"
    lenient = utf8_mode or name in ("C", "POSIX", "C.UTF-8", "C.utf8", "UTF-8")
    default = ("utf-8" if utf8_mode else locale.getpreferredencoding(False)) or "utf-8"
    given, _, errors = os.environ.get("PYTHONIOENCODING", "").partition(":")
    # The codec's own name, as the interpreter reports it ("UTF-8" is "utf-8").
    encoding = codecs.lookup(given or default).name
    if errors:
        return encoding, errors
    return encoding, "surrogateescape" if lenient and not given else "strict"


def _stdio(fd: int, unbuffered: bool) -> io.TextIOWrapper:
    """sys.stdin, stdout or stderr over `fd`, made as the interpreter makes them
    (create_stdio in Python/pylifecycle.c): io.open's buffer (sized by the fd's
    st_blksize; none for an unbuffered stdout/stderr), newline="\\n" (stdin does
    not translate "\\r"), line buffering for a terminal and for stderr, its name
    and mode."""
    encoding, errors = _stdio_codec()
    write = fd != 0
    buffering = 0 if unbuffered and write else -1
    buffer: Any = open(fd, "wb" if write else "rb", buffering=buffering, closefd=False)
    raw = buffer if buffering == 0 else buffer.raw
    raw.name = ("<stdin>", "<stdout>", "<stderr>")[fd]
    stream = io.TextIOWrapper(
        buffer,
        encoding,
        "backslashreplace" if fd == 2 else errors,
        newline="\n",
        line_buffering=not unbuffered and (raw.isatty() or fd == 2),
        write_through=unbuffered,
    )
    stream.mode = "w" if write else "r"  # type: ignore[misc]
    return stream
