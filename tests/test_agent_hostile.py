"""A hostile suite against `keruta-agent run`, as a user's command would stress it.

Real agent processes (`python -m agent`), real commands, a real hub (served in
the test's trio run, SQLite); nothing mocked, no private attribute read. Each
test checks the contract's answer (../shared/CONTRACT.md, README "The agent",
docs/agent.md): every line stored exactly once and in order (read back over
REST), the exit code, a clear message on the agent's stderr (never a
traceback), and nothing the command started left running.

A test that shows the agent breaking the contract is kept and marked
`xfail(strict=True)` with the bug it shows.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests import hubclient
from tests.agentclient import (
    agent,
    agent_env,
    check_records,
    expected_streams,
    free_port,
    group_members,
    joined_lines,
    lines_of,
    program,
    run_args,
)

sqlite_hub_factory = hubclient.sqlite_hub_factory  # a fixture
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc"),
]

PY = sys.executable
# Hang guard for one agent run (never a performance assertion).
RUN_PATIENCE = 60.0


@pytest.fixture
async def hub(sqlite_hub_factory: hubclient.InProcessHubFactory) -> hubclient.InProcessHub:
    return await sqlite_hub_factory.astart()


def nobody_there(port: int | None = None) -> str:
    """A hub URL where nothing listens."""
    return f"http://127.0.0.1:{port or free_port()}"


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def assert_clear(stderr: str) -> None:
    """The agent's own words: lines of its voice, no Python traceback, no bug report."""
    assert "Traceback (most recent call last)" not in stderr, stderr[-3000:]
    assert "internal error" not in stderr, stderr[-3000:]


def command_pid(records: list[dict[str, Any]]) -> int:
    """COMMAND's pid (the leader of its process group), from a stored line's metadata."""
    for r in records:
        if r["source"] in ("stdout", "stderr"):
            return int(r["metadata"]["processId"])
    raise AssertionError("no line of the command is stored")


def assert_no_leftovers(records: list[dict[str, Any]], groups: list[int]) -> None:
    pgid = command_pid(records)
    groups.append(pgid)
    assert group_members(pgid) == [], "the command's process group must be gone"


@dataclass
class Ran:
    """A finished `python -m agent` run."""

    code: int
    stdout: bytes
    stderr: bytes

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


async def run_to_end(args: list[str], env: dict[str, str] | None = None) -> Ran:
    """`python -m agent ARGS` to its end."""
    async with agent(args, env=env) as a:
        code = await a.wait(RUN_PATIENCE)
    return Ran(code, bytes(a.stdout), bytes(a.stderr))


def py(code: str) -> list[str]:
    return [PY, "-c", code]


async def stored(hub: hubclient.InProcessHub, task_id: str, token: str | None = None) -> list[dict[str, Any]]:
    async with hub.http(token) as client:
        return await hubclient.fetch_all(client, task_id)


async def task_state(hub: hubclient.InProcessHub, task_id: str) -> dict[str, Any]:
    async with hub.http() as client:
        resp = await client.get(f"/api/v1/tasks/{task_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]


async def verdict(hub: hubclient.InProcessHub, task_id: str, token: str | None = None) -> dict[str, Any]:
    async with hub.http(token) as client:
        resp = await client.get(f"/api/v1/tasks/{task_id}/verify")
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]


async def flush(spool: Path, hub_url: str, *extra: str) -> Ran:
    return await run_to_end(
        ["flush", "--spool-dir", str(spool), "--hub", hub_url, "--timeout", "30", "--reconnect-max", "0.5", *extra]
    )


# A command that makes exactly these os.write calls, pausing between the
# groups so that a multibyte character or a CRLF is cut at a read boundary.
WRITER = r"""
import os, sys, time
for group in GROUPS:
    for fd, data in group:
        os.write(fd, data)
    time.sleep(0.15)
"""


def writer(groups: list[list[tuple[int, bytes]]]) -> tuple[list[str], dict[str, bytes]]:
    """The command and what it writes, per source."""
    code = WRITER.replace("GROUPS", repr(groups))
    out = {"stdout": b"", "stderr": b""}
    for group in groups:
        for fd, data in group:
            out["stdout" if fd == 1 else "stderr"] += data
    return py(code), out


# --- 1. output edge cases -----------------------------------------------------


async def test_a_ten_megabyte_line_without_newline(hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]) -> None:
    """Split into partial pieces (never dropped), rejoining to the line; the mirror is byte-exact."""
    size = 10 * 1024 * 1024
    code = (
        "import os\n"
        f"line = bytes(range(33, 127)) * ({size} // 94 + 1)\n"
        f"line = line[:{size}]\n"
        "for i in range(0, len(line), 1 << 20):\n"
        "    os.write(1, line[i:i + (1 << 20)])\n"
    )
    a = await run_to_end(run_args(hub.url, "big-nonl", tmp_path / "spool") + py(code))
    assert a.code == 0
    want = (bytes(range(33, 127)) * (size // 94 + 1))[:size]
    assert bytes(a.stdout) == want
    assert a.stderr_text == ""
    records = await stored(hub, "big-nonl")
    check_records(records, {"stdout": want, "stderr": b""})
    assert all(len(r["message"].encode()) <= 64 * 1024 for r in records)
    assert all(r.get("partial") for r in records[:-1]) and not records[-1].get("partial")
    assert (await verdict(hub, "big-nonl"))["verdict"] == "complete"
    assert_no_leftovers(records, groups)


async def test_line_endings_nul_ansi_and_invalid_utf8(hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]) -> None:
    """CRLF and lone CR, NUL, ANSI escapes, invalid UTF-8 of every kind, multibyte
    characters cut between two reads, and a last line cut inside a character."""
    cmd, want = writer([
        [(1, b"crlf line\r\n"), (1, b"lone\rcarriage\rreturns\n"), (1, b"\r\n"), (1, b"\n")],
        [(1, b"nul\x00in\x00the\x00middle\n"), (1, b"\x00\n")],
        [(1, b"\x1b[31mERROR red\x1b[0m \x1b]0;a title\x07 \x1b[2K\x1b[1A\n")],
        [(1, b"invalid \xff\xfe end\n"), (1, b"overlong \xc0\xaf \xe0\x80\xaf \xf0\x80\x80\xaf\n")],
        [(1, b"surrogates \xed\xa0\x80 \xed\xbf\xbf\n"), (1, b"beyond U+10FFFF \xf4\x90\x80\x80\n")],
        [(1, b"euro cut \xe2\x82")], [(1, b"\xac here\n")],
        [(1, b"emoji cut \xf0\x9f")], [(1, b"\x98\x80 here\n")],
        [(1, b"lead byte then ascii \xe2")], [(1, b"A\n")],
        [(1, b"crlf cut\r")], [(1, b"\nafter\n")],
        [(2, b"stderr cr cr \r\r\n"), (2, b"stderr ends inside a character \xe2\x82")],
    ])
    a = await run_to_end(run_args(hub.url, "edges", tmp_path / "spool") + cmd)
    assert a.code == 0
    # The mirror is the command's output, unchanged.
    assert bytes(a.stdout) == want["stdout"]
    assert bytes(a.stderr) == want["stderr"]
    records = await stored(hub, "edges")
    check_records(records, want)
    stdout = joined_lines(records, "stdout")
    assert "euro cut € here" in stdout and "emoji cut 😀 here" in stdout
    assert "crlf cut" in stdout and "nul\x00in\x00the\x00middle" in stdout
    assert_no_leftovers(records, groups)


async def test_a_binary_blob(hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]) -> None:
    blob = random.Random(7).randbytes(1 << 20)
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    a = await run_to_end(run_args(hub.url, "blob", tmp_path / "spool", "--quiet") + ["cat", str(path)])
    assert a.code == 0
    assert_clear(a.stderr_text)
    records = await stored(hub, "blob")
    check_records(records, {"stdout": blob, "stderr": b""})
    assert (await verdict(hub, "blob"))["verdict"] == "complete"
    assert_no_leftovers(records, groups)


async def test_a_hundred_thousand_empty_lines(hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]) -> None:
    n = 100_000
    a = await run_to_end(run_args(hub.url, "empties", tmp_path / "spool", "--quiet") + py(f"import os; os.write(1, b'\\n' * {n})"))
    assert a.code == 0
    assert a.stderr_text == ""
    records = await stored(hub, "empties")
    assert len(records) == n
    check_records(records, {"stdout": b"\n" * n, "stderr": b""})
    assert (await verdict(hub, "empties"))["verdict"] == "complete"
    assert_no_leftovers(records, groups)


async def test_many_threads_interleaving_stdout_and_stderr(
    hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]
) -> None:
    threads, per_thread = 8, 2500
    code = (
        "import os, threading\n"
        "def w(t):\n"
        f"    for i in range({per_thread}):\n"
        "        fd = 1 if (i + t) % 3 else 2\n"
        "        os.write(fd, f't{t} i{i} {\"x\" * (i % 70)}\\n'.encode())\n"
        f"ts = [threading.Thread(target=w, args=(t,)) for t in range({threads})]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
    )
    a = await run_to_end(run_args(hub.url, "threads", tmp_path / "spool") + py(code))
    assert a.code == 0
    records = await stored(hub, "threads")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert len(records) == threads * per_thread
    for source, fd in (("stdout", 1), ("stderr", 2)):
        lines = joined_lines(records, source)
        # The mirror shows the same lines in the same order as stored.
        mirrored = (a.stdout if fd == 1 else a.stderr).decode().splitlines()
        assert mirrored == lines
        assert [r["lineNumber"] for r in records if r["source"] == source] == list(range(1, len(lines) + 1))
        seen: dict[int, list[int]] = {}
        for line in lines:
            m = re.fullmatch(r"t(\d+) i(\d+) x*", line)
            assert m, f"a line mangled or mixed with another: {line!r}"
            seen.setdefault(int(m[1]), []).append(int(m[2]))
        for t in range(threads):
            want = [i for i in range(per_thread) if ((i + t) % 3 != 0) == (fd == 1)]
            assert seen.get(t, []) == want, f"thread {t} on {source}: lost, doubled or reordered"
    assert_no_leftovers(records, groups)


async def test_the_agents_own_stdout_closed_by_its_reader(
    hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]
) -> None:
    """`keruta-agent run -- CMD | head -1`: the mirror breaks, the command and the
    stream to the hub do not."""
    n = 50_000
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = await trio.run_process(
            [PY, "-m", "agent", *run_args(hub.url, "epipe", tmp_path / "spool"), "seq", "1", str(n)],
            stdin=subprocess.DEVNULL, stdout=write_end, capture_stderr=True, check=False, env=agent_env(),
        )
    finally:
        os.close(write_end)
    assert result.returncode == 0
    assert_clear(result.stderr.decode())
    records = await stored(hub, "epipe")
    check_records(records, {"stdout": "".join(f"{i}\n" for i in range(1, n + 1)).encode(), "stderr": b""})
    assert_no_leftovers(records, groups)


# --- 2. the command's process ------------------------------------------------


async def test_a_command_that_closes_its_stdout_early_and_keeps_running(
    hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]
) -> None:
    code = (
        "import os, time\n"
        "os.write(1, b'before close\\n')\n"
        "os.close(1)\n"
        "time.sleep(1.5)\n"  # longer than --pipe-grace: stdout's end is not the command's end
        "os.write(2, b'still running\\n')\n"
        "raise SystemExit(4)\n"
    )
    a = await run_to_end(run_args(hub.url, "closes", tmp_path / "spool", "--pipe-grace", "0.5") + py(code))
    assert a.code == 4
    records = await stored(hub, "closes")
    check_records(records, {"stdout": b"before close\n", "stderr": b"still running\n"})
    state = await task_state(hub, "closes")
    assert (state["state"], state["exitCode"]) == ("failed", 4)
    assert bytes(a.stderr).startswith(b"still running\n")
    assert_no_leftovers(records, groups)


async def test_a_daemon_holding_the_pipes_does_not_hang_the_agent(
    hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]
) -> None:
    """What the command leaves running is left alone (docs/agent.md, Signals), but
    the agent stops reading after --pipe-grace of quiet and exits."""
    cmd = ["sh", "-c", "echo $$; (sleep 0.2; echo from the daemon; exec sleep 60) & echo parent done"]
    a = await run_to_end(run_args(hub.url, "daemon", tmp_path / "spool", "--pipe-grace", "0.5") + cmd)
    pgid = int(bytes(a.stdout).split(b"\n")[0])
    groups.append(pgid)
    assert a.code == 0
    assert "holds its output open" in a.stderr_text
    assert_clear(a.stderr_text)
    records = await stored(hub, "daemon")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    lines = joined_lines(records, "stdout")
    assert lines == [str(pgid), "parent done", "from the daemon"]
    assert (await task_state(hub, "daemon"))["state"] == "succeeded"
    # Documented: left alone. The fixture kills it.
    assert any(m.startswith("sleep ") for m in group_members(pgid))


async def test_a_chatty_daemon_after_the_command_exits_and_a_sigterm(
    hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]
) -> None:
    """The command exits, leaving a background process that writes on forever.
    A SIGTERM to the agent then must end it (CONTRACT: after COMMAND has exited,
    signals cut the agent's waiting short), with the command's exit code."""
    cmd = ["sh", "-c", "echo $$; (while true; do echo tick; sleep 0.1; done) & echo parent done; exit 7"]
    async with agent(run_args(hub.url, "chatty", tmp_path / "spool", "--pipe-grace", "0.5") + cmd) as a:
        await a.wait_for_output(b"parent done\n", RUN_PATIENCE)
        pgid = int(bytes(a.stdout).split(b"\n")[0])
        groups.append(pgid)
        with trio.fail_after(RUN_PATIENCE):
            while pid_alive(pgid):  # the command itself (the group's leader) has exited
                await trio.sleep(0.05)
        await trio.sleep(1.0)  # past --pipe-grace: the agent is in its after-exit phase
        a.signal(signal.SIGTERM)
        code = await a.wait(10)  # a hang guard
    assert code == 7
    assert_clear(a.stderr_text)
    # The signal cut the wait for the hub short too: what it had not acked is in the spool.
    f = await flush(tmp_path / "spool", hub.url)
    assert f.code == 0, f.stderr_text
    records = await stored(hub, "chatty")
    # The daemon's first tick may come before "parent done".
    lines = joined_lines(records, "stdout")
    assert lines[0] == str(pgid) and "parent done" in lines, lines


async def test_a_chatty_daemon_after_the_command_exits_is_given_up_on(
    hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]
) -> None:
    """Without a signal: the agent reads what the daemon writes for at most ten
    times --pipe-grace after the command exits (agent/run.py PIPE_GRACE_LIMIT),
    says so, and ends with the command's exit code."""
    cmd = ["sh", "-c", "echo $$; (while true; do echo tick; sleep 0.1; done) & echo parent done; exit 7"]
    async with agent(run_args(hub.url, "chatty-alone", tmp_path / "spool", "--pipe-grace", "0.3") + cmd) as a:
        await a.wait_for_output(b"parent done\n", RUN_PATIENCE)
        groups.append(int(bytes(a.stdout).split(b"\n")[0]))
        code = await a.wait(20)  # 3 s of ticks, then the drain; a hang guard
    assert code == 7
    assert_clear(a.stderr_text)
    assert "still holds its output open" in a.stderr_text
    lines = joined_lines(await stored(hub, "chatty-alone"), "stdout")
    # The daemon's first tick may come before "parent done".
    assert "parent done" in lines and 5 < lines.count("tick") < 60, lines


async def test_the_same_task_twice_at_once_is_refused(tmp_path: Path, groups: list[int]) -> None:
    """One agent per task and spool: the second is refused before its command runs."""
    spool = tmp_path / "spool"
    marker = tmp_path / "second-ran"
    async with agent(run_args(nobody_there(), "twice", spool, "--drain-timeout", "0") + ["sh", "-c", "echo $$; sleep 30"]) as first:
        await first.wait_for_output(b"\n", RUN_PATIENCE)
        groups.append(int(bytes(first.stdout).split(b"\n")[0]))
        second = await run_to_end(run_args(nobody_there(), "twice", spool) + ["touch", str(marker)])
        assert second.code != 0
        assert "already running" in second.stderr_text
        assert_clear(second.stderr_text)
        assert not marker.exists()
        first.signal(signal.SIGTERM)
        assert await first.wait(RUN_PATIENCE) == 128 + signal.SIGTERM


async def test_sigterm_with_a_grandchild_that_ignores_it(
    hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]
) -> None:
    """The command dies of the SIGTERM passed on to its group; the grandchild that
    ignores it is SIGKILLed after --kill-grace; the agent exits only then, with
    the command's code (143), and says so."""
    script = tmp_path / "gc.sh"
    script.write_text(
        "echo $$\n"
        f"{PY} -c \"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('grandchild ready', flush=True); time.sleep(60)\" &\n"
        "wait\n"
    )
    async with agent(run_args(hub.url, "gc-term", tmp_path / "spool", "--kill-grace", "0.5") + ["sh", str(script)]) as a:
        await a.wait_for_output(b"grandchild ready\n", RUN_PATIENCE)
        pgid = int(bytes(a.stdout).split(b"\n")[0])
        groups.append(pgid)
        assert len(group_members(pgid)) == 2
        a.signal(signal.SIGTERM)
        code = await a.wait(RUN_PATIENCE)
        # Exited only once the whole group had ended.
        assert group_members(pgid) == []
    assert code == 128 + signal.SIGTERM
    assert "SIGKILL" in a.stderr_text
    assert_clear(a.stderr_text)
    records = await stored(hub, "gc-term")
    assert joined_lines(records, "stdout") == [str(pgid), "grandchild ready"]
    state = await task_state(hub, "gc-term")
    assert (state["state"], state["exitCode"]) == ("failed", 143)


@pytest.mark.parametrize(
    ("shell", "code"),
    [
        ("kill -USR1 $$", 128 + signal.SIGUSR1),
        ("kill -PIPE $$", 128 + signal.SIGPIPE),
        ("kill -TERM $$", 128 + signal.SIGTERM),
        ("exit 255", 255),
    ],
    ids=["SIGUSR1", "SIGPIPE", "SIGTERM-itself", "exit-255"],
)
async def test_exit_codes_and_death_by_signal(
    hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int], shell: str, code: int
) -> None:
    task = f"sig-{code}"
    a = await run_to_end(run_args(hub.url, task, tmp_path / "spool") + ["sh", "-c", f"echo going; {shell}"])
    assert a.code == code
    assert_clear(a.stderr_text)
    records = await stored(hub, task)
    check_records(records, {"stdout": b"going\n", "stderr": b""})
    state = await task_state(hub, task)
    assert (state["state"], state["exitCode"]) == ("failed", code)
    assert_no_leftovers(records, groups)


def _plain_file(tmp_path: Path) -> str:
    path = tmp_path / "plain.txt"
    path.write_text("echo hi\n")
    path.chmod(0o644)
    return str(path)


def _exec_format_file(tmp_path: Path) -> str:
    path = tmp_path / "garbage-binary"
    path.write_bytes(b"\x7fELF\x00 not really an executable")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    ("make", "code"),
    [
        pytest.param(lambda tmp: "/nonexistent/keruta-command", 127, id="missing"),
        pytest.param(lambda tmp: "keruta-no-such-command-on-path", 127, id="missing-on-PATH"),
        pytest.param(lambda tmp: str(tmp), 126, id="a-directory"),
        pytest.param(_plain_file, 126, id="not-executable"),
        pytest.param(_exec_format_file, 126, id="exec-format-error"),
    ],
)
async def test_a_command_that_cannot_run(hub: hubclient.InProcessHub, tmp_path: Path, make: Any, code: int) -> None:
    command = make(tmp_path)
    task = f"cannot-{code}"
    a = await run_to_end(run_args(hub.url, task, tmp_path / "spool") + [command, "arg"])
    assert_clear(a.stderr_text)
    assert "cannot run" in a.stderr_text
    records = await stored(hub, task)
    assert len(records) == 1 and records[0]["source"] == "agent" and records[0]["level"] == "ERROR"
    assert "cannot run" in records[0]["message"]
    state = await task_state(hub, task)
    assert (state["state"], state["exitCode"]) == ("failed", code)
    assert a.code == code


# --- 3. the hub ----------------------------------------------------------------


async def test_hub_down_for_the_whole_run_then_flush(
    hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]
) -> None:
    """The command is not affected; after --drain-timeout the agent says what it
    keeps and where, exits with the command's code; `flush` delivers it all once."""
    n = 3000
    spool = tmp_path / "spool"
    a = await run_to_end(
        run_args(nobody_there(), "down-1", spool, "--drain-timeout", "1", "--reconnect-max", "0.5")
        + program(n, seed=31, exit_code=3)
    )
    want = expected_streams(n, seed=31)
    assert a.code == 3
    assert bytes(a.stdout) == want["stdout"]
    assert_clear(a.stderr_text)
    assert "has not acknowledged" in a.stderr_text and str(spool / "down-1") in a.stderr_text
    assert (spool / "down-1").is_dir()
    f = await flush(spool, hub.url)
    assert f.code == 0, f.stderr_text
    records = await stored(hub, "down-1")
    check_records(records, want)
    state = await task_state(hub, "down-1")
    assert (state["state"], state["exitCode"]) == ("failed", 3)
    assert (await verdict(hub, "down-1"))["verdict"] == "complete"
    assert not (spool / "down-1").exists()
    assert_no_leftovers(records, groups)


async def test_sigterm_while_waiting_for_an_absent_hub_cuts_the_wait(tmp_path: Path) -> None:
    """After the command has exited a signal only cuts the wait for the hub
    short: the command's exit code, the records left in the spool."""
    spool = tmp_path / "spool"
    async with agent(
        run_args(nobody_there(), "drain-cut", spool, "--drain-timeout", "600") + ["sh", "-c", "echo done; exit 5"]
    ) as a:
        with trio.fail_after(RUN_PATIENCE):
            while b"done\n" not in a.stdout or b"retrying in" not in a.stderr:
                await trio.sleep(0.02)
        a.signal(signal.SIGTERM)
        code = await a.wait(30)
    assert code == 5
    assert_clear(a.stderr_text)
    assert "has not acknowledged" in a.stderr_text
    assert (spool / "drain-cut").is_dir()


@asynccontextmanager
async def not_a_hub(answer: bytes) -> AsyncIterator[int]:
    """A TCP server that reads a request and answers `answer`, then closes; its port."""

    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.receive_some(65536)
            await stream.send_all(answer)
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


GARBAGE = b"\x00\xff\xfe not http at all \r\n\r\n" * 64
HTTP_200 = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(HTTP_200, id="http-200-no-upgrade"),
        pytest.param(b"", id="accepts-and-closes"),
        pytest.param(GARBAGE, id="garbage"),
    ],
)
async def test_a_port_that_is_not_a_hub(
    hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int], answer: bytes
) -> None:
    """A clear message, the command unaffected, the lines kept in the spool for `flush`."""
    spool = tmp_path / "spool"
    async with not_a_hub(answer) as port:
        a = await run_to_end(
            run_args(f"http://127.0.0.1:{port}", "nothub", spool, "--drain-timeout", "2", "--reconnect-max", "0.5")
            + ["sh", "-c", "echo one; echo two >&2; echo three; exit 6"]
        )
    assert a.code == 6
    assert (spool / "nothub").is_dir()
    f = await flush(spool, hub.url)
    assert f.code == 0, f.stderr_text
    records = await stored(hub, "nothub")
    check_records(records, {"stdout": b"one\nthree\n", "stderr": b"two\n"})
    assert_no_leftovers(records, groups)
    assert_clear(a.stderr_text)


async def test_hub_restarted_mid_run(hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]) -> None:
    """Stopped (not gracefully) while the command streams, then started again on
    its port and database: every line stored once."""
    n = 2000
    cmd = program(n, seed=33, pause_every=100, pause=0.05)
    args = run_args(hub.url, "restart-1", tmp_path / "spool", "--quiet", "--reconnect-max", "0.2")
    async with agent(args + cmd) as a:
        with trio.fail_after(RUN_PATIENCE):
            while True:
                async with hub.http() as client:
                    resp = await client.get("/api/v1/tasks/restart-1")
                if resp.status_code == 200 and resp.json()["totalLogs"] >= 300:
                    break
                await trio.sleep(0.05)
        await hub.astop()
        with trio.fail_after(RUN_PATIENCE):
            while b"retrying in" not in a.stderr:
                await trio.sleep(0.02)
        await hub.astart()
        code = await a.wait(RUN_PATIENCE)
    assert code == 0
    assert_clear(a.stderr_text)
    records = await stored(hub, "restart-1")
    check_records(records, expected_streams(n, seed=33))
    assert (await verdict(hub, "restart-1"))["verdict"] == "complete"
    assert_no_leftovers(records, groups)


# --- 4. arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    "task_id",
    ["a/b", "x" * 129, "", ".", "..", "has space", "caf\u00e9", "../escape", "a\nb"],
    ids=["slash", "129-chars", "empty", "dot", "dotdot", "space", "non-ascii", "dotdot-slash", "newline"],
)
@pytest.mark.parametrize("how", ["flag", "env"])
async def test_a_bad_task_id_is_refused_before_the_command_runs(tmp_path: Path, task_id: str, how: str) -> None:
    marker = tmp_path / "ran"
    if how == "flag":
        args = ["run", "--hub", nobody_there(), "--spool-dir", str(tmp_path / "spool"), "--task-id", task_id]
        env = agent_env()
    else:
        if task_id == "":
            pytest.skip("an empty KERUTA_TASK_ID means 'not set' (a new UUID)")
        args = ["run", "--hub", nobody_there(), "--spool-dir", str(tmp_path / "spool")]
        env = agent_env(KERUTA_TASK_ID=task_id)
    a = await run_to_end([*args, "--", "touch", str(marker)], env=env)
    assert a.code == 2
    assert "task id" in a.stderr_text
    assert_clear(a.stderr_text)
    assert not marker.exists(), "the command must not run"
    assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").iterdir())


async def test_the_longest_task_id_with_every_allowed_character(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    task = ("Az09._:-" * 16)[:128]
    a = await run_to_end(run_args(hub.url, task, tmp_path / "spool") + ["echo", "ok"])
    assert a.code == 0
    assert_clear(a.stderr_text)
    records = await stored(hub, task)
    check_records(records, {"stdout": b"ok\n", "stderr": b""})


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("127.0.0.1:8080", id="no-scheme"),
        pytest.param("ftp://127.0.0.1:8080", id="ftp"),
        pytest.param("http://", id="nothing"),
        pytest.param("http://[::1", id="unclosed-ipv6"),
        pytest.param("http://127.0.0.1:99999", id="port-out-of-range"),
        pytest.param("http://127.0.0.1:-1", id="negative-port"),
        pytest.param("http://127.0.0.1:http", id="port-not-a-number"),
        pytest.param("http://:8080", id="no-host"),
        pytest.param("http://\u2603.invalid:8080", id="host-not-idna"),
        pytest.param("http://" + "a" * 64 + ".invalid:8080", id="label-too-long"),
    ],
)
async def test_a_malformed_hub_url_is_a_usage_error(tmp_path: Path, url: str) -> None:
    """A URL that cannot name a hub: exit 2 with a message naming it, before the
    command runs, as agent/cli.py does for one without a scheme."""
    marker = tmp_path / "ran"
    a = await run_to_end(
        ["run", "--hub", url, "--task-id", "badurl", "--spool-dir", str(tmp_path / "spool"),
         "--drain-timeout", "1", "--", "touch", str(marker)]
    )
    assert_clear(a.stderr_text)
    assert a.code == 2, a.stderr_text
    assert "hub" in a.stderr_text.lower()
    assert not marker.exists()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("ws://{host}", id="ws-scheme"),
        pytest.param("http://{host}/", id="trailing-slash"),
        pytest.param("http://{host}/api/v1/ws", id="the-ws-path-itself"),
        pytest.param("  http://{host}  ", id="spaces-around"),
        pytest.param("HTTP://{host}", id="upper-case-scheme"),
    ],
)
async def test_hub_url_spellings_that_name_the_hub(
    hub: hubclient.InProcessHub, tmp_path: Path, url: str
) -> None:
    host = hub.url.removeprefix("http://")
    a = await run_to_end(run_args(url.format(host=host), "spelling", tmp_path / "spool") + ["echo", "reached"])
    assert a.code == 0
    assert a.stderr_text == ""
    check_records(await stored(hub, "spelling"), {"stdout": b"reached\n", "stderr": b""})


async def test_a_unicode_hub_host_that_does_not_resolve(tmp_path: Path) -> None:
    """A valid international name nobody serves: like any absent hub."""
    spool = tmp_path / "spool"
    a = await run_to_end(
        run_args("http://b\u00fccher.invalid:8080", "idn", spool, "--drain-timeout", "1") + ["echo", "x"]
    )
    assert a.code == 0
    assert_clear(a.stderr_text)
    assert "has not acknowledged" in a.stderr_text
    assert (spool / "idn").is_dir()


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-bytes", "0"],
        ["--max-bytes", "-5"],
        ["--max-bytes", str(2**64)],
        ["--max-bytes", "lots"],
        ["--rate-limit", "0"],
        ["--rate-limit", "-1"],
        ["--rate-limit", "nan"],
        ["--rate-limit", "inf"],
        ["--spool-max-bytes", "0"],
        ["--kill-grace", "-1"],
        ["--pipe-grace", "0"],
        ["--drain-timeout", "-1"],
        ["--batch-size", "0"],
        # Numbers as int() and float() would take them, which are no plain numbers (keruta/cliargs.py).
        ["--batch-size", "١٠"],
        ["--rate-limit", "1_000"],
        ["--kill-grace", " 5"],
        ["--max-bytes", "５M"],
    ],
    ids=lambda f: "=".join(f),
)
async def test_numeric_flags_out_of_range(tmp_path: Path, flags: list[str]) -> None:
    marker = tmp_path / "ran"
    a = await run_to_end(
        run_args(nobody_there(), "flags", tmp_path / "spool", *flags) + ["touch", str(marker)]
    )
    assert a.code == 2
    assert flags[0] in a.stderr_text
    assert_clear(a.stderr_text)
    assert not marker.exists()


async def test_max_bytes_of_one_byte_and_of_the_largest_size(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """--max-bytes 1: the hub keeps (almost) nothing, and one gap record accounts
    for the rest, so the log still verifies complete. 2**63-1: no cap at all."""
    a = await run_to_end(run_args(hub.url, "cap-1", tmp_path / "spool", "--quiet", "--max-bytes", "1") + ["seq", "1", "500"])
    assert a.code == 0
    assert_clear(a.stderr_text)
    records = await stored(hub, "cap-1")
    assert [r["seq"] for r in records] == sorted({r["seq"] for r in records})
    gaps = [r for r in records if r.get("kind") == "gap"]
    assert len(gaps) == 1
    kept = [r for r in records if r.get("kind") != "gap"]
    assert len(kept) + gaps[0]["metadata"]["gap"]["lines"] == 500
    assert (await verdict(hub, "cap-1"))["verdict"] == "complete"

    a = await run_to_end(run_args(hub.url, "cap-max", tmp_path / "spool", "--quiet", "--max-bytes", str(2**63 - 1)) + ["seq", "1", "500"])
    assert a.code == 0
    check_records(await stored(hub, "cap-max"), {"stdout": "".join(f"{i}\n" for i in range(1, 501)).encode(), "stderr": b""})


async def test_a_spool_dir_that_is_a_file(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """Not worth failing the command for: a clear message, a spool elsewhere, every line stored."""
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("I am a file\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    a = await run_to_end(
        run_args(hub.url, "spool-file", not_a_dir) + ["sh", "-c", "echo one; echo two"],
        env=agent_env(TMPDIR=str(tmp)),
    )
    assert a.code == 0
    assert_clear(a.stderr_text)
    assert "cannot use the spool directory" in a.stderr_text
    assert not_a_dir.read_text() == "I am a file\n"
    check_records(await stored(hub, "spool-file"), {"stdout": b"one\ntwo\n", "stderr": b""})


async def test_a_spool_dir_that_is_a_dangling_symlink(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """Not a race to retry for ever (it once spun at 100% CPU): the agent
    falls back to another spool, as for a spool dir that is a file."""
    link = tmp_path / "spool-link"
    link.symlink_to(tmp_path / "does" / "not" / "exist")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    async with agent(run_args(hub.url, "spool-dangling", link) + ["echo", "hi"], env=agent_env(TMPDIR=str(tmp))) as a:
        # A hang guard, generous for a command that takes no time.
        code = await a.wait(10)
    assert code == 0
    assert_clear(a.stderr_text)
    check_records(await stored(hub, "spool-dangling"), {"stdout": b"hi\n", "stderr": b""})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
async def test_a_read_only_spool_dir(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    try:
        a = await run_to_end(run_args(hub.url, "spool-ro", ro) + ["echo", "hi"], env=agent_env(TMPDIR=str(tmp)))
    finally:
        ro.chmod(0o700)
    assert a.code == 0
    assert_clear(a.stderr_text)
    assert "cannot use the spool directory" in a.stderr_text
    check_records(await stored(hub, "spool-ro"), {"stdout": b"hi\n", "stderr": b""})


async def test_a_full_spool_drops_loudly_and_accounts_for_every_line(
    hub: hubclient.InProcessHub, tmp_path: Path
) -> None:
    """Hub away, spool budget tiny: lines past it are dropped, said on stderr, and
    accounted by gap records; after `flush` kept + dropped = written, in order."""
    n = 20_000
    spool = tmp_path / "spool"
    a = await run_to_end(
        run_args(nobody_there(), "full-1", spool, "--quiet", "--spool-max-bytes", "64K", "--drain-timeout", "0")
        + py(f"for i in range(1, {n + 1}): print(f'row {{i:05d}} ' + 'y' * 40)")
    )
    assert a.code == 0
    assert_clear(a.stderr_text)
    assert "DROPPED" in a.stderr_text
    f = await flush(spool, hub.url)
    assert f.code == 0, f.stderr_text
    records = await stored(hub, "full-1")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    gaps = [r for r in records if r.get("kind") == "gap"]
    kept = [r for r in records if r.get("kind") != "gap"]
    assert gaps and all(g["metadata"]["gap"]["reason"] == "spool_full" for g in gaps)
    numbers = [int(r["message"].split()[1]) for r in kept]
    assert numbers == sorted(set(numbers)), "kept lines in order, none doubled"
    assert [r["lineNumber"] for r in kept] == numbers
    dropped = {
        line
        for g in gaps
        for line in range(g["metadata"]["gap"]["sources"]["stdout"]["firstLine"],
                          g["metadata"]["gap"]["sources"]["stdout"]["lastLine"] + 1)
    }
    assert sum(g["metadata"]["gap"]["lines"] for g in gaps) == len(dropped)
    assert dropped.isdisjoint(numbers) and dropped | set(numbers) == set(range(1, n + 1))
    assert (await verdict(hub, "full-1"))["verdict"] == "complete"


# --- 5. secrets -----------------------------------------------------------------

TOKEN = "agent-token-Zq7x9Wv3"

ENV_DUMP = (
    "import os\n"
    "print('names', ' '.join(sorted(n for n in os.environ if n.startswith('KERUTA_'))))\n"
    "print('cred', os.environ.get('CRED', '-'))\n"
    "print('hub', os.environ.get('KERUTA_HUB_URL', '-'))\n"
)


@pytest.mark.parametrize("how", ["KERUTA_TOKEN", "--token"])
async def test_the_agents_token_never_reaches_the_command_nor_the_log(
    sqlite_hub_factory: hubclient.InProcessHubFactory, tmp_path: Path, how: str
) -> None:
    """KERUTA_TOKEN is removed from COMMAND's environment, and so is any other
    KERUTA_* holding the token; a variable under another name is passed on,
    but its value, the token, is masked (KERUTA_TOKEN or KERUTA_AGENT_TOKEN
    hold it: names with TOKEN)."""
    hub = await sqlite_hub_factory.astart("--agent-token", TOKEN)
    env = agent_env(
        KERUTA_AGENT_TOKEN=TOKEN, KERUTA_CI_CRED=TOKEN, KERUTA_NOTE="plain-note",
        KERUTA_HUB_URL=hub.url, CRED=TOKEN,
    )
    args = ["run", "--task-id", "tok-1", "--spool-dir", str(tmp_path / "spool")]
    if how == "KERUTA_TOKEN":
        env["KERUTA_TOKEN"] = TOKEN
    else:
        args += ["--token", TOKEN]
    a = await run_to_end([*args, "--", *py(ENV_DUMP)], env=env)
    assert a.code == 0
    assert_clear(a.stderr_text)
    records = await stored(hub, "tok-1", TOKEN)
    lines = joined_lines(records, "stdout")
    assert lines == ["names KERUTA_HUB_URL KERUTA_NOTE", "cred ***", f"hub {hub.url}"]
    assert TOKEN not in bytes(a.stdout).decode() and TOKEN not in a.stderr_text
    assert all(TOKEN not in r["message"] for r in records)


async def test_secrets_are_masked_in_the_log_and_the_mirror(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """--mask values and env values of *TOKEN*/*SECRET*/*PASSWORD*/*KEY* names,
    also cut between two reads; a last line that only starts like a secret is
    kept, not held back for good."""
    secrets = {"API_KEY": "k3y-Value-0001", "DB_PASSWORD": "pw-Value-0002", "X_SECRET_THING": "s3cret-Value-0003"}
    mask = "hunter2-Value-0004"
    pw = secrets["DB_PASSWORD"]
    cmd, _ = writer([
        [(1, f"key={secrets['API_KEY']} and {mask}\n".encode())],
        [(1, f"pw={pw[:5]}".encode())], [(1, f"{pw[5:]} end\n".encode())],
        [(2, f"{secrets['X_SECRET_THING']} {secrets['X_SECRET_THING']}\n".encode())],
        [(1, b"prefix only " + mask[:6].encode())],
    ])
    a = await run_to_end(
        run_args(hub.url, "mask-1", tmp_path / "spool", "--mask", mask) + cmd, env=agent_env(**secrets)
    )
    assert a.code == 0
    want = {
        "stdout": f"key=*** and ***\npw=*** end\nprefix only {mask[:6]}".encode(),
        "stderr": b"*** ***\n",
    }
    assert bytes(a.stdout) == want["stdout"]
    assert bytes(a.stderr) == want["stderr"]
    records = await stored(hub, "mask-1")
    check_records(records, want)
    for value in [*secrets.values(), mask]:
        assert all(value not in r["message"] for r in records)


# --- sections, --no-wait ---------------------------------------------------------


async def test_hostile_section_markers_are_stored_as_printed(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """Nesting past 16, ends with nothing open, a marker with invalid UTF-8 or
    CR, markers inside a line past the line limit: every line stored as printed."""
    lines = [
        b"::endgroup::",
        b"section_end:1700000000:never_started",
        *[b"::group::level %d" % i for i in range(20)],
        b"::error::deep inside",
        *[b"::endgroup::"] * 25,
        b"section_start:1700000000:bad\xff\xfename[collapsed=true]\r\x1b[0Ktitle \xed\xa0\x80",
        b"section_start:notanumber:x",
        b"--- " + b"z" * 100_000,
        b"+++ open",
        b"~~~ closed",
        b"--- ",
        b"::group::",
        b"::warning::careful",
    ]
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / "markers.txt"
    path.write_bytes(data)
    a = await run_to_end(run_args(hub.url, "sections-1", tmp_path / "spool", "--quiet") + ["cat", str(path)])
    assert a.code == 0
    assert_clear(a.stderr_text)
    records = await stored(hub, "sections-1")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert joined_lines(records, "stdout") == lines_of(data)
    assert [r["lineNumber"] for r in records if not r.get("partial")] == list(range(1, len(lines) + 1))
    async with hub.http() as client:
        resp = await client.get("/api/v1/tasks/sections-1/sections")
    assert resp.status_code == 200, resp.text
    assert (await verdict(hub, "sections-1"))["verdict"] == "complete"


async def test_no_wait_then_flush_wait(hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]) -> None:
    """`run --no-wait` exits with the command's code; the background delivery
    and `flush --wait` store every line once, and nothing is left running."""
    n = 2000
    spool = tmp_path / "spool"
    a = await run_to_end(run_args(hub.url, "nowait-1", spool, "--no-wait", "--quiet") + program(n, seed=35, exit_code=9))
    assert a.code == 9
    assert_clear(a.stderr_text)
    background = re.search(r"\(pid (\d+)\)", a.stderr_text)
    f = await run_to_end(["flush", "--wait", "--spool-dir", str(spool), "--hub", hub.url, "--timeout", "30"])
    assert f.code == 0, f.stderr_text
    records = await stored(hub, "nowait-1")
    check_records(records, expected_streams(n, seed=35))
    state = await task_state(hub, "nowait-1")
    assert (state["state"], state["exitCode"]) == ("failed", 9)
    assert not (spool / "nowait-1").exists()
    if background is not None:
        pid = int(background[1])
        with trio.fail_after(30):
            while pid_alive(pid):
                await trio.sleep(0.05)
    assert_no_leftovers(records, groups)
