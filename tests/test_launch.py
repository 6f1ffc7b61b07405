"""tests/launch.py's forked children against real `python -m` starts.

Most of the suite's hub and agent processes are forked from a preloaded
interpreter (tests/forkserver.py); `.ci/run`'s second pass starts them with
`python -m` (KERUTA_TEST_SPAWN=exec). A test that passes one way and fails the
other would be testing the launcher, not the hub or the agent. So each check
here runs the same thing both ways (`exec_=False` / `exec_=True`) and compares:
the CLIs' output bytes and exit codes (help, usage errors, a command's status,
signals), the environment and working directory the child sees, the fds it
holds, its standard streams (buffering, newline handling, PIPE stdin), the way
it ends (uncaught exceptions, Ctrl-C, non-daemon threads, atexit, a stdout
nobody reads any more), starts from two threads at once, and that no process
is left behind. The interpreter-level checks run a small probe module (written
to tmp_path) as `python -m PROBE`, since neither CLI shows those things.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.http import system_tls
from tests import launch
from tests.launch import DEVNULL, PIPE, Child, ForkServer, run_cli, run_cli_sync, spawn
from tests.support import HubProcess, sqlite_url

pytestmark = pytest.mark.slow

MODES = [pytest.param(False, id="fork"), pytest.param(True, id="exec")]
TIMEOUT = 30  # a hang guard: every child here ends in well under a second or two


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: bytes
    stderr: bytes


def finish(
    child: Child, input: bytes | None = None, timeout: float = TIMEOUT, *, read_at_exit: bool = False
) -> Outcome:
    return Outcome(*child.communicate(input, timeout, read_at_exit=read_at_exit))


def run(
    module: str, args: list[str], *, exec_: bool, input: bytes | None = None,
    read_at_exit: bool = False, **kwargs: object,
) -> Outcome:
    child = spawn(module, args, exec_=exec_, stdin=PIPE if input is not None else DEVNULL, **kwargs)  # type: ignore[arg-type]
    return finish(child, input, read_at_exit=read_at_exit)


def both(module: str, args: list[str], **kwargs: object) -> tuple[Outcome, Outcome]:
    """The same start forked and exec'd: (forked, exec'd)."""
    return run(module, args, exec_=False, **kwargs), run(module, args, exec_=True, **kwargs)  # type: ignore[arg-type]


def env_without(*names: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra)
    return env


def fork_server_env() -> dict[str, str]:
    """The environment the fork server itself runs with (what a child would
    inherit if `spawn` did not replace it)."""
    raw = Path(f"/proc/{ForkServer.get().proc.pid}/environ").read_bytes()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)


# --- the CLIs' own output and exit codes -----------------------------------------------


@pytest.mark.parametrize(
    ("module", "args", "code"),
    [
        ("agent", ["--help"], 0),
        ("agent", ["run", "--help"], 0),
        ("agent", ["bogus"], 2),
        ("agent", ["run"], 2),  # parser.error after parsing: no command
        ("agent", ["run", "--task-id", "no spaces", "--", "true"], 2),
        ("hub", ["--help"], 0),
        ("hub", ["--port", "x"], 2),
        # Refused by check_config, not argparse (were it not, the store could not open: 1).
        ("hub", ["--host", "0.0.0.0", "--port", "0", "--db", "sqlite:////nonexistent/launch.db"], 2),
    ],
    ids=["agent-help", "agent-run-help", "agent-bogus", "agent-run-no-command",
         "agent-bad-task-id", "hub-help", "hub-bad-port", "hub-no-tokens"],
)
def test_cli_output_and_exit_code_are_those_of_python_m(module: str, args: list[str], code: int) -> None:
    # Without the KERUTA_* fallbacks the person running the tests may have set.
    forked, execd = both(module, args, env={k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")})
    assert execd.code == code, execd
    assert forked == execd


@pytest.mark.parametrize("exec_", MODES)
async def test_run_cli_helpers_in_both_modes(exec_: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run_cli` (trio) and `run_cli_sync` follow KERUTA_TEST_SPAWN and give
    what `subprocess.run` of `python -m` gives."""
    monkeypatch.setenv("KERUTA_TEST_SPAWN", "exec" if exec_ else "fork")
    assert launch.exec_mode() is exec_
    want = run("agent", ["bogus"], exec_=True)
    got = await run_cli("agent", ["bogus"], capture_stdout=True, capture_stderr=True)
    assert (got.returncode, got.stdout, got.stderr) == (want.code, want.stdout, want.stderr)
    sync = run_cli_sync("agent", ["bogus"])
    assert (sync.returncode, sync.stdout, sync.stderr) == (want.code, want.stdout.decode(), want.stderr.decode())


# --- with a hub ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One hub (started the suite's way) for the agent checks."""
    process = HubProcess(sqlite_url(tmp_path_factory.mktemp("launch-hub") / "h.db")).start()
    try:
        yield process
    finally:
        process.stop()


def task_state(hub: HubProcess, task_id: str) -> dict:
    resp = httpx.get(f"{hub.url}/api/v1/tasks/{task_id}", timeout=TIMEOUT, verify=system_tls())
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.parametrize("exec_", MODES)
@pytest.mark.parametrize(
    ("command", "code"),
    [(py("import sys; sys.exit(3)"), 3), (py("import os; os.kill(os.getpid(), 9)"), 128 + 9)],
    ids=["exit-3", "sigkill"],
)
def test_agent_exit_status_is_the_commands(
    hub: HubProcess, tmp_path: Path, exec_: bool, command: list[str], code: int
) -> None:
    task_id = f"launch-exit-{code}-{'exec' if exec_ else 'fork'}-{tmp_path.name}"
    result = run(
        "agent", ["run", "--hub", hub.url, "--task-id", task_id, "--spool-dir", str(tmp_path / "spool"),
                  "--", *command], exec_=exec_,
    )
    assert result.code == code, result
    assert task_state(hub, task_id)["exitCode"] == code


@pytest.mark.parametrize("exec_", MODES)
def test_agent_sees_the_given_env_and_cwd_and_pipe_stdin(hub: HubProcess, tmp_path: Path, exec_: bool) -> None:
    """KERUTA_TASK_ID and KERUTA_HUB_URL come from the given env; HOME, which the
    test process and the fork server have, is absent because the given env lacks
    it; a relative --spool-dir is under the given cwd; the command, which inherits
    the agent's stdin, env and cwd, reads the PIPE the test writes."""
    assert "HOME" in os.environ
    if not exec_:
        assert "HOME" in fork_server_env()  # else a forked child could not inherit it anyway
    task_id = f"launch-env-{'exec' if exec_ else 'fork'}-{tmp_path.name}"
    work = tmp_path / "work"
    work.mkdir()
    env = env_without("HOME", "KERUTA_TASK_ID", "KERUTA_HUB_URL", "KERUTA_SPOOL_DIR",
                      KERUTA_TASK_ID=task_id, KERUTA_HUB_URL=hub.url, LAUNCH_MARK="given")
    show = (
        "import os, sys; "
        "print(os.environ.get('HOME'), os.environ.get('LAUNCH_MARK'), os.getcwd(), sys.stdin.read().strip())"
    )
    result = run("agent", ["run", "--spool-dir", "spool", "--", *py(show)],
                 exec_=exec_, env=env, cwd=work, input=b"from the test's pipe\n")
    assert result.code == 0, result
    assert result.stdout.decode() == f"None given {work} from the test's pipe\n"
    assert result.stderr == b""  # no "task id ..." line: the id came from the env
    assert task_state(hub, task_id)["exitCode"] == 0
    assert (work / "spool").is_dir()


# --- a hub on its own: signals, fds ------------------------------------------------------

_LISTENING = re.compile(rb"keruta-hub: listening on (http://\S+)")


class Hub:
    """`python -m hub` on port 0 in `directory`, started one way or the other."""

    def __init__(self, directory: Path, exec_: bool) -> None:
        directory.mkdir()
        self.directory = directory
        self.child = spawn("hub", ["--port", "0", "--db", sqlite_url(directory / "h.db")],
                           stdout=DEVNULL, exec_=exec_)
        self.stderr = self.child.file("stderr")
        first = self.stderr.readline()  # the hub writes it with flush=True once it listens
        match = _LISTENING.search(first)
        assert match, first + self.stderr.read()
        self.url = match.group(1).decode()

    def rest_of_stderr(self) -> bytes:
        with self.stderr:
            return self.stderr.read()

    def close(self) -> None:
        self.child.kill()
        self.child.wait(TIMEOUT)
        self.stderr.close()


@pytest.mark.parametrize("exec_", MODES)
@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 0), (signal.SIGINT, 0)],
    ids=["kill", "term", "int"],
)
def test_hub_signals(tmp_path: Path, exec_: bool, signum: int, code: int) -> None:
    """SIGKILL: -9. SIGTERM and SIGINT (the default Python handler in a forked
    child, not the fork server's SIG_IGN): a clean shutdown, exit 0."""
    hub = Hub(tmp_path / "hub", exec_)
    try:
        assert httpx.get(f"{hub.url}/api/v1/tasks", timeout=TIMEOUT, verify=system_tls()).status_code == 200
        hub.child.send_signal(signum)
        assert hub.child.wait(TIMEOUT) == code
        said = re.sub(rb"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", b"", hub.rest_of_stderr())
        name = signal.Signals(signum).name.encode()
        assert said == (
            b"" if signum == signal.SIGKILL
            else b"keruta.hub WARNING received %s: shutting down\nkeruta-hub: %s, shutting down\n" % (name, name)
        )
    finally:
        hub.close()


def fd_kinds(pid: int, directory: Path) -> Counter[str]:
    """What a process holds open, by kind: pipe, socket, anon_inode:[eventpoll],
    /dev/null, DIR/h.db..."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        target = re.sub(r"^(pipe|socket):\[\d+\]$", r"\1", target)
        kinds[target.replace(str(directory), "DIR")] += 1
    return kinds


def test_a_forked_hub_holds_the_fds_an_execd_one_holds(tmp_path: Path) -> None:
    """Nothing of the fork server (its control socket, other children's status
    sockets or pidfds, the fds of other requests) reaches a child."""
    held = {}
    hubs = []
    try:
        for exec_ in (False, True):
            hub = Hub(tmp_path / ("exec" if exec_ else "fork"), exec_)
            hubs.append(hub)
            # Once it listens the store is open too. (No request first: the
            # connection's socket would come and go with it.)
            held[exec_] = fd_kinds(hub.child.pid, hub.directory)
    finally:
        for hub in hubs:
            hub.close()
    assert held[False] == held[True]
    assert held[True]["socket"] >= 1  # (the listening socket: the comparison means something)


# --- the interpreter as a probe module sees it -------------------------------------------

PROBE = textwrap.dedent(
    """
    initial_globals = sorted(globals())
    import array, atexit, fcntl, gc, json, os, signal, sys, termios, threading, time

    def pending(fd):
        n = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, n)
        return n[0]

    def stream(s):
        return {
            "type": type(s).__name__, "buffer": type(s.buffer).__name__,
            "raw": type(getattr(s.buffer, "raw", s.buffer)).__name__,
            "encoding": s.encoding, "errors": s.errors, "line_buffering": s.line_buffering,
            "write_through": s.write_through, "name": s.name, "mode": getattr(s, "mode", None),
            "fileno": s.fileno(), "repr": repr(s),
        }

    def fds():
        found = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                found[fd] = os.readlink(f"/proc/self/fd/{fd}").split(":[")[0]
            except FileNotFoundError:  # the listing's own fd
                pass
        return found

    what = sys.argv[1]
    if what == "state":
        # How much of what was written is in the pipe already: the buffering.
        print("a line")
        after_print = pending(1)
        sys.stdout.buffer.write(b"x" * 5000)
        after_5000 = pending(1)
        sys.stderr.write("no newline yet")
        after_stderr = pending(2)
        sys.stderr.write("\\n")
        status = dict(
            line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines()
            if line.startswith(("SigBlk", "SigIgn", "SigCgt", "NoNewPrivs"))
        )
        state = {
            "pending": [after_print, after_5000, after_stderr],
            "stdin": repr(sys.stdin.read()),
            "streams": [stream(s) for s in (sys.stdin, sys.stdout, sys.stderr)],
            "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "name": __name__,
            "main": sys.modules["__main__"].__dict__ is globals(), "spec": __spec__.name,
            "env": dict(os.environ), "flags": repr(sys.flags), "fds": fds(),
            "signals": {s.name: repr(signal.getsignal(s)) for s in signal.Signals
                        if s not in (signal.SIGKILL, signal.SIGSTOP)},
            "status": status, "umask": os.umask(0o022),
            "gc": [gc.isenabled(), gc.get_threshold()],
            "threads": threading.active_count(), "globals": initial_globals,
            "dont_write_bytecode": sys.dont_write_bytecode,
        }
        with open(sys.argv[2], "w") as f:
            json.dump(state, f, indent=1, sort_keys=True)
    elif what == "raise":
        atexit.register(print, "atexit", file=sys.stderr)
        raise ValueError("from the probe")
    elif what == "interrupt":
        atexit.register(print, "atexit", file=sys.stderr)
        raise KeyboardInterrupt
    elif what == "exit":
        arg = sys.argv[2]
        sys.exit(int(arg) if arg.lstrip("-").isdigit() else arg)
    elif what == "return":
        pass
    elif what == "thread":
        def late():
            time.sleep(0.1)
            print("thread", file=sys.stderr)
        atexit.register(print, "atexit", file=sys.stderr)
        threading.Thread(target=late).start()
        print("main", file=sys.stderr)
    elif what == "stdout-gone":
        print("never read")  # buffered: the test's end of the pipe is closed before the flush
        sys.stdin.read()  # the test closes stdin once it has closed stdout
        sys.exit(int(sys.argv[2]))
    """
)


@pytest.fixture
def probe(tmp_path: Path) -> str:
    """The name of a module in tmp_path (the cwd the probe runs in)."""
    (tmp_path / "launch_probe.py").write_text(PROBE)
    return "launch_probe"


@pytest.mark.parametrize(
    ("unbuffered", "io_encoding"),
    [(True, None), (False, None), (False, "latin-1")],
    ids=["PYTHONUNBUFFERED", "buffered", "PYTHONIOENCODING"],
)
def test_interpreter_state_is_that_of_python_m(
    probe: str, tmp_path: Path, unbuffered: bool, io_encoding: str | None
) -> None:
    """Standard streams (types, encodings and error handlers, buffering observed
    through what is in the pipe, newline handling of stdin), argv, sys.path[0],
    __main__, the env, signal dispositions and mask, fds, umask, gc. The given
    env decides the streams' codec (tox sets PYTHONIOENCODING=utf-8, under
    which no interpreter decodes the probe's \\xff: it is left out but for the
    case that sets its own)."""
    env = env_without("PYTHONUNBUFFERED", "PYTHONIOENCODING", LAUNCH_MARK="given")
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    if io_encoding is not None:
        env["PYTHONIOENCODING"] = io_encoding
    state = {}
    outcome = {}
    for exec_ in (False, True):
        # The same argv both ways: a file name relative to the cwd.
        outcome[exec_] = run(probe, ["state", "state.json"], exec_=exec_, env=env, cwd=tmp_path,
                             input=b"a\r\nb\rc\n\xff\n", read_at_exit=True)
        assert outcome[exec_].code == 0, outcome[exec_]
        state[exec_] = json.loads((tmp_path / "state.json").read_text())
        (tmp_path / "state.json").unlink()
    assert outcome[False] == outcome[True]
    forked, execd = state[False], state[True]
    assert execd["env"] == env  # what the comparison below holds the forked child to
    differences = {key: {"fork": forked.get(key), "exec": execd[key]}
                   for key in execd if forked.get(key) != execd[key]}
    assert not differences


@pytest.mark.parametrize(
    ("args", "code", "env_change"),
    [
        (["return"], 0, {}),
        (["exit", "3"], 3, {}),
        (["exit", "300"], 300 & 0xFF, {}),
        (["exit", "-1"], 255, {}),
        (["exit", "bye"], 1, {}),
        (["raise"], 1, {}),
        (["interrupt"], -signal.SIGINT, {}),
        (["thread"], 0, {}),
        (["stdout-gone", "0"], 120, {"PYTHONUNBUFFERED": None}),
        (["stdout-gone", "3"], 120, {"PYTHONUNBUFFERED": None}),
    ],
    ids=["return", "exit-3", "exit-300", "exit-minus-1", "exit-text", "uncaught-exception",
         "keyboard-interrupt", "non-daemon-thread", "stdout-gone-exit-0", "stdout-gone-exit-3"],
)
def test_how_the_child_ends_is_that_of_python_m(
    probe: str, tmp_path: Path, args: list[str], code: int, env_change: dict[str, str | None]
) -> None:
    """Exit statuses, what is written on the way out (tracebacks, atexit
    handlers, non-daemon threads joined first) and in which order, and the
    status 120 of an interpreter whose stdout could not be flushed at exit."""
    env = dict(os.environ)
    for name, value in env_change.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    outcomes = []
    for exec_ in (False, True):
        child = spawn(probe, args, exec_=exec_, env=env, cwd=tmp_path, stdin=PIPE)
        if args[0] == "stdout-gone":
            os.close(child.stdout_fd)  # type: ignore[arg-type]
            child.stdout_fd = None
        outcomes.append(finish(child, b""))
    forked, execd = outcomes
    assert execd.code == code, execd
    assert forked == execd


# --- concurrency and clean-up ---------------------------------------------------------


def test_two_threads_start_children_at_once() -> None:
    """Both threads' requests go over the one control socket; each gets its own
    child, with its own output."""
    want = run("agent", ["--help"], exec_=True)
    ForkServer.get()  # started already: the threads race on forks, not on the start
    barrier = threading.Barrier(2)
    results: dict[int, list[tuple[int, Outcome]]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def starts(n: int) -> None:
        try:
            barrier.wait(TIMEOUT)
            for _ in range(4):
                child = spawn("agent", ["--help"], exec_=False)
                results[n].append((child.pid, finish(child)))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=starts, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not errors, errors
    pids = [pid for n in (0, 1) for pid, _ in results[n]]
    assert len(pids) == len(set(pids)) == 8
    for n in (0, 1):
        for _, outcome in results[n]:
            assert outcome == want


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        found.update(int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return found


def gone(pid: int) -> bool:
    """No such process, not even a zombie."""
    return not os.path.exists(f"/proc/{pid}")


def test_the_fork_server_leaves_no_process_behind(tmp_path: Path) -> None:
    server = ForkServer.get().proc.pid
    # Killed, then waited for: reaped by the time wait returns.
    hub = Hub(tmp_path / "killed", exec_=False)
    assert hub.child.pid in children_of(server)
    hub.close()
    assert hub.child.returncode == -signal.SIGKILL
    assert gone(hub.child.pid)
    # Ended on its own: likewise.
    child = spawn("agent", ["--help"], exec_=False, stdout=DEVNULL, stderr=DEVNULL)
    assert child.wait(TIMEOUT) == 0
    assert gone(child.pid)
    # Killed and never waited for by the test: the server reaps it all the same.
    child = spawn("hub", ["--port", "0", "--db", sqlite_url(tmp_path / "h2.db")],
                  exec_=False, stdout=DEVNULL, stderr=DEVNULL)
    pidfd = os.pidfd_open(child.pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)
    deadline = time.monotonic() + TIMEOUT
    while not gone(child.pid):
        assert time.monotonic() < deadline, f"pid {child.pid} is still there"
        time.sleep(0.01)
    assert child.wait(TIMEOUT) == -signal.SIGKILL
    assert not {hub.child.pid, child.pid} & children_of(server)
