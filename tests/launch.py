"""Starting `python -m hub` and `python -m agent` processes for the tests.

By default a child comes from `tests.forkserver`: one interpreter per test
process that has imported the hub and the agent once and forks a child per
start (see that module for what the child is and is not). It saves the 0.4 s
of CPU each start spends on imports; the suite starts over a hundred.
KERUTA_TEST_SPAWN=exec starts every child with `sys.executable -m MODULE`
instead (`.ci/run` runs the suite that way once, on its second interpreter),
and the CLI tests that are about the interpreter's own start use it always.

Either way a test gets a `Child`: a real process (its own pid; signals,
SIGKILL and exit codes as for any child), with the test's ends of its pipes.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import trio

from tests.forkserver import STATUS

PIPE, DEVNULL = subprocess.PIPE, subprocess.DEVNULL
ROOT = Path(__file__).resolve().parent.parent


def exec_mode() -> bool:
    return os.environ.get("KERUTA_TEST_SPAWN") == "exec"


class ForkServer:
    """The `tests.forkserver` process of this test process, started on first use."""

    _lock = threading.Lock()
    _instance: ForkServer | None = None

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control = mine
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", f"from tests.forkserver import main; main({theirs.fileno()})"],
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                pass_fds=(theirs.fileno(),),
            )

    @classmethod
    def get(cls) -> ForkServer:
        with cls._lock:
            if cls._instance is None or cls._instance.proc.poll() is not None:
                cls._instance = cls()
            return cls._instance

    @classmethod
    def stop(cls) -> None:
        """End the server (it kills what children are left) and wait for it."""
        with cls._lock:
            server, cls._instance = cls._instance, None
        if server is not None:
            server.control.close()
            server.proc.wait(30)

    def fork(self, request: dict[str, Any], fds: Sequence[int]) -> tuple[int, socket.socket]:
        status, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            socket.send_fds(self.control, [json.dumps(request).encode()], [theirs.fileno(), *fds])
        pid = STATUS.unpack(_recv_exactly(status, STATUS.size, timeout=30))[0]
        return pid, status


def _recv_exactly(sock: socket.socket, n: int, timeout: float | None) -> bytes:
    data = b""
    while len(data) < n:
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            raise TimeoutError("the fork server did not answer")
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError("the fork server closed a child's status socket without a status")
        data += chunk
    return data


class Child:
    """A started `python -m MODULE` process: `subprocess.Popen`'s sync API
    (poll, wait, send_signal, kill, terminate, returncode, pid), `exited()` for
    trio, and the test's ends of the pipes it was given (`stdin`, `stdout`,
    `stderr` as raw fds, or None)."""

    def __init__(self, pid: int, stdin: int | None, stdout: int | None, stderr: int | None) -> None:
        self.pid = pid
        self.stdin_fd, self.stdout_fd, self.stderr_fd = stdin, stdout, stderr
        self.returncode: int | None = None
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # already ended (and reaped by the fork server)
            self._pidfd = None

    # --- waiting (each kind of child knows its exit status its own way) ---

    def _ready(self, timeout: float | None) -> bool:
        raise NotImplementedError

    def _collect(self) -> int:
        raise NotImplementedError

    async def _ready_async(self) -> None:
        raise NotImplementedError

    def poll(self) -> int | None:
        if self.returncode is None and self._ready(0):
            self._finish(self._collect())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not self._ready(timeout):
                raise subprocess.TimeoutExpired(f"python -m ... (pid {self.pid})", timeout or 0)
            self._finish(self._collect())
        assert self.returncode is not None
        return self.returncode

    async def exited(self) -> int:
        if self.returncode is None:
            await self._ready_async()
            self._finish(self._collect())
        assert self.returncode is not None
        return self.returncode

    def _finish(self, code: int) -> None:
        self.returncode = code
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    # --- signals: by pidfd, so a pid used again after the end is never hit ---

    def send_signal(self, signum: int) -> None:
        if self.poll() is None and self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    # --- the test's ends of the pipes ---

    def _take(self, which: str) -> int:
        fd: int | None = getattr(self, f"{which}_fd")
        assert fd is not None, f"{which} is not a pipe"
        setattr(self, f"{which}_fd", None)
        return fd

    def file(self, which: str, *, text: bool = False) -> IO[Any]:
        """stdin/stdout/stderr as a blocking file object (it owns the fd)."""
        fd = self._take(which)
        mode = "w" if which == "stdin" else "r"
        if text:
            return open(fd, mode, encoding="utf-8", errors="replace")
        return open(fd, mode + "b")

    def stream(self, which: str) -> trio.lowlevel.FdStream:
        """stdin/stdout/stderr as a trio stream (it owns the fd)."""
        return trio.lowlevel.FdStream(self._take(which))

    def communicate(
        self, input: bytes | None = None, timeout: float | None = None, *, read_at_exit: bool = False
    ) -> tuple[int, bytes, bytes]:
        """`Popen.communicate` (blocking): feed stdin (if a pipe), read stdout and
        stderr (those that are pipes) to EOF, wait; (exit status, stdout, stderr).
        With `read_at_exit`, read only once it has ended (what it writes must fit
        in the pipes), so that it sees in them what it wrote."""
        out: dict[str, bytes] = {}

        def read(which: str) -> None:
            with self.file(which) as f:
                out[which] = f.read()

        readers = [
            threading.Thread(target=read, args=(which,), daemon=True)
            for which in ("stdout", "stderr")
            if getattr(self, f"{which}_fd") is not None
        ]
        if not read_at_exit:
            for t in readers:
                t.start()
        if self.stdin_fd is not None:
            with self.file("stdin") as f:
                try:
                    f.write(input or b"")
                except BrokenPipeError:
                    pass
        try:
            code = self.wait(timeout)
        finally:
            self.kill()
        if read_at_exit:
            for t in readers:
                t.start()
        for t in readers:
            t.join(timeout)
            if t.is_alive():
                raise TimeoutError(f"pid {self.pid}: its pipe stayed open after it ended")
        return code, out.get("stdout", b""), out.get("stderr", b"")


class ForkedChild(Child):
    def __init__(self, status: socket.socket, *args: Any) -> None:
        super().__init__(*args)
        self._status = status

    def _ready(self, timeout: float | None) -> bool:
        return bool(select.select([self._status], [], [], timeout)[0])

    async def _ready_async(self) -> None:
        await trio.lowlevel.wait_readable(self._status)

    def _collect(self) -> int:
        with self._status:
            return int(STATUS.unpack(_recv_exactly(self._status, STATUS.size, timeout=None))[0])


class ExecChild(Child):
    def __init__(self, popen: subprocess.Popen[bytes], *args: Any) -> None:
        super().__init__(popen.pid, *args)
        self._popen = popen

    def _ready(self, timeout: float | None) -> bool:
        assert self._pidfd is not None  # a child of ours stays until we reap it
        return bool(select.select([self._pidfd], [], [], timeout)[0])

    async def _ready_async(self) -> None:
        assert self._pidfd is not None
        await trio.lowlevel.wait_readable(self._pidfd)

    def _collect(self) -> int:
        return self._popen.wait()


def spawn(
    module: str,
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: int | None = DEVNULL,
    stdout: int | None = PIPE,
    stderr: int | None = PIPE,
    exec_: bool | None = None,
) -> Child:
    """Start `python -m MODULE ARGS`. Each of stdin/stdout/stderr is PIPE (the
    test gets its end), DEVNULL, or None (the test process's own)."""
    ours: list[int | None] = []
    theirs: list[int] = []
    opened: list[int] = []
    try:
        for n, how in enumerate((stdin, stdout, stderr)):
            if how == PIPE:
                r, w = os.pipe()
                mine, child = (w, r) if n == 0 else (r, w)
                os.set_inheritable(mine, False)
                ours.append(mine)
                theirs.append(child)
                opened.append(child)
            elif how == DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
                ours.append(None)
                theirs.append(fd)
                opened.append(fd)
            elif how is None:
                ours.append(None)
                theirs.append(n)
            else:
                raise ValueError(f"stdio must be PIPE, DEVNULL or None, not {how!r}")
        env = dict(os.environ if env is None else env)
        cwd = str(cwd or os.getcwd())
        if exec_mode() if exec_ is None else exec_:
            popen = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdin=theirs[0], stdout=theirs[1], stderr=theirs[2], env=env, cwd=cwd,
            )
            return ExecChild(popen, *ours)
        pid, status = ForkServer.get().fork(
            {"module": module, "argv": list(args), "env": env, "cwd": cwd}, theirs
        )
        return ForkedChild(status, pid, *ours)
    finally:
        for fd in opened:
            os.close(fd)


async def run_cli(
    module: str,
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    capture_stdout: bool = False,
    capture_stderr: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """`trio.run_process` for `python -m MODULE ARGS` (no check): wait for the end."""
    child = spawn(
        module, args, env=env,
        stdout=PIPE if capture_stdout else None, stderr=PIPE if capture_stderr else None,
    )
    out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

    async def collect(which: str) -> None:
        async with child.stream(which) as stream:
            while chunk := await stream.receive_some(65536):
                out[which].extend(chunk)

    try:
        async with trio.open_nursery() as nursery:
            for which, wanted in (("stdout", capture_stdout), ("stderr", capture_stderr)):
                if wanted:
                    nursery.start_soon(collect, which)
            code = await child.exited()
    finally:
        child.kill()
        with trio.CancelScope(shield=True):
            await child.exited()
    return subprocess.CompletedProcess(
        [module, *args], code,
        bytes(out["stdout"]) if capture_stdout else None, bytes(out["stderr"]) if capture_stderr else None,
    )


def run_cli_sync(
    module: str, args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(..., capture_output=True, text=True)` for `python -m MODULE ARGS`."""
    code, stdout, stderr = spawn(module, args, env=env).communicate(timeout=timeout)
    return subprocess.CompletedProcess([module, *args], code, _text(stdout), _text(stderr))


def _text(data: bytes) -> str:
    """What a text-mode read gives: UTF-8 with replacement, universal newlines."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace").read()
