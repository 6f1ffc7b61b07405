"""The agent end to end: real hub process, real agent process, real commands."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import trio

from tests import hubclient
from tests.agentclient import (
    agent,
    check_records,
    expected_streams,
    joined_lines,
    lines_of,
    program,
    run_args,
)

# The hub's store plays no part in these: SQLite only (the fault tests run on both).
hub, hub_factory = hubclient.hub, hubclient.hub_factory
hub_process_factory = hubclient.hub_process_factory
pytestmark = pytest.mark.slow


async def test_interleaved_output_is_stored_exactly_once_and_mirrored(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    n = 5000
    async with agent(
        run_args(hub.url, "inter-1", tmp_path / "spool") + program(n, seed=1, exit_code=3)
    ) as a:
        code = await a.wait()
    assert code == 3
    want = expected_streams(n, seed=1)
    # The mirror is the command's output byte for byte.
    assert bytes(a.stdout) == want["stdout"]
    assert want["stderr"] in bytes(a.stderr)  # plus nothing but the agent's own words
    assert bytes(a.stderr).replace(want["stderr"], b"") == b""
    records = await hubclient.stored(hub, "inter-1")
    check_records(records, want)
    state = await hubclient.task_state(hub, "inter-1")
    assert (state["state"], state["exitCode"]) == ("failed", 3)
    assert not (tmp_path / "spool" / "inter-1").exists(), "a fully delivered task leaves no spool"


async def test_success_and_signal_exit_codes(hub: hubclient.TestHub, tmp_path: Path) -> None:
    async with agent(run_args(hub.url, "ok-1", tmp_path / "s") + ["sh", "-c", "echo hi"]) as a:
        assert await a.wait() == 0
    assert (await hubclient.task_state(hub, "ok-1"))["state"] == "succeeded"
    kill_self = [
        sys.executable,
        "-c",
        "import os, signal; print('bye', flush=True); os.kill(os.getpid(), signal.SIGKILL)",
    ]
    async with agent(run_args(hub.url, "sig-1", tmp_path / "s") + kill_self) as a:
        assert await a.wait() == 128 + signal.SIGKILL
    state = await hubclient.task_state(hub, "sig-1")
    assert (state["state"], state["exitCode"]) == ("failed", 137)
    assert [r["message"] for r in await hubclient.stored(hub, "sig-1")] == ["bye"]


async def test_missing_command_is_exit_127_and_reported(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    async with agent(run_args(hub.url, "nf-1", tmp_path / "s") + ["/nonexistent/cmd"]) as a:
        assert await a.wait() == 127
    assert "cannot run" in a.stderr_text
    records = await hubclient.stored(hub, "nf-1")
    assert records[0]["source"] == "agent" and "cannot run" in records[0]["message"]
    # The one line that explains the failure is an ERROR: `tail --level ERROR` shows it.
    assert records[0]["level"] == "ERROR"
    assert (await hubclient.task_state(hub, "nf-1"))["exitCode"] == 127


async def test_big_line_invalid_utf8_and_last_line_without_newline(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    code = (
        "import os\n"
        "big = bytes(range(33, 127)) * (3 * 1024 * 1024 // 94 + 1)\n"
        "os.write(1, b'before\\n')\n"
        "for i in range(0, len(big), 100_000):\n"
        "    os.write(1, big[i:i + 100_000])\n"
        "os.write(1, b'\\n')\n"
        "os.write(2, b'bad \\xff\\xfe\\xe2\\x82 bytes \\xf0\\x9f\\x98\\x80 emoji\\r\\n')\n"
        "os.write(1, b'the end, no newline')\n"
    )
    async with agent(
        run_args(hub.url, "big-1", tmp_path / "s") + [sys.executable, "-c", code]
    ) as a:
        assert await a.wait() == 0
    big = bytes(range(33, 127)) * (3 * 1024 * 1024 // 94 + 1)
    want_stdout = b"before\n" + big + b"\nthe end, no newline"
    assert bytes(a.stdout) == want_stdout
    records = await hubclient.stored(hub, "big-1")
    assert joined_lines(records, "stdout") == lines_of(want_stdout)
    assert joined_lines(records, "stderr") == ["bad \ufffd\ufffd\ufffd bytes 😀 emoji"]
    pieces = [r for r in records if r["source"] == "stdout" and r["lineNumber"] == 2]
    assert len(pieces) >= 3 * 1024 * 1024 // (64 * 1024)
    assert all(r.get("partial") for r in pieces[:-1]) and not pieces[-1].get("partial")
    assert all(len(r["message"].encode()) <= 64 * 1024 for r in records)
    assert records[-1]["message"] == "the end, no newline"


async def test_masked_secret_appears_nowhere(
    hub_factory: hubclient.HubFactory, tmp_path: Path
) -> None:
    """The hub is down while the command runs, so the records stay in the spool
    where we can look at them; then `flush` delivers them."""
    from tests.agentclient import agent_env, free_port

    env_secret = "tok-ENV-0123456789"
    cli_secret = "cli-secret-value"
    port = free_port()
    code = (
        "import os, time\n"
        f"os.write(1, b'env {env_secret[:7]}')\n"
        "time.sleep(0.3)\n"  # the secret straddles two reads of the pipe
        f"os.write(1, b'{env_secret[7:]} and {cli_secret}\\n')\n"
        f"os.write(2, b'err {cli_secret[:4]}')\n"
        "time.sleep(0.3)\n"
        f"os.write(2, b'{cli_secret[4:]}')\n"
    )
    spool = tmp_path / "spool"
    env = agent_env(API_TOKEN=env_secret)
    args = run_args(
        f"http://127.0.0.1:{port}", "mask-1", spool, "--mask", cli_secret, "--drain-timeout", "0.2"
    )
    async with agent(args + [sys.executable, "-c", code], env=env) as a:
        assert await a.wait() == 0
    for secret in (env_secret, cli_secret):
        assert secret.encode() not in a.stdout and secret.encode() not in a.stderr
        for path in spool.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    assert bytes(a.stdout) == b"env *** and ***\n"
    # The agent's own lines (it cannot reach the hub) may land between the
    # command's two writes on the same stderr.
    assert b"err ***" in re.sub(rb"keruta-agent: [^\n]*\n", b"", bytes(a.stderr))
    hub = hub_factory.make()
    hub.port = port
    await hub.astart()
    async with agent(["flush", "--spool-dir", str(spool)], env=env) as f:
        assert await f.wait() == 0
    records = await hubclient.stored(hub, "mask-1")
    assert [r["message"] for r in records] == ["env *** and ***", "err ***"]
    assert not (spool / "mask-1").exists()


async def test_pty_mode(hub: hubclient.TestHub, tmp_path: Path) -> None:
    code = "import sys; print('tty', sys.stdout.isatty()); print('err', file=sys.stderr)"
    async with agent(
        run_args(hub.url, "pty-1", tmp_path / "s", "--pty") + [sys.executable, "-c", code]
    ) as a:
        assert await a.wait() == 0
    assert bytes(a.stdout) == b"tty True\nerr\n"
    records = await hubclient.stored(hub, "pty-1")
    assert [(r["source"], r["message"]) for r in records] == [
        ("stdout", "tty True"),
        ("stdout", "err"),
    ]


async def test_quiet_and_rate_limit(hub: hubclient.TestHub, tmp_path: Path) -> None:
    n = 600
    args = run_args(
        hub.url, "rl-1", tmp_path / "s", "--quiet", "--rate-limit", "500", "--batch-size", "50"
    )
    async with agent(args + program(n, seed=5)) as a:
        assert await a.wait() == 0
    assert bytes(a.stdout) == b""
    check_records(await hubclient.stored(hub, "rl-1"), expected_streams(n, seed=5))


async def test_tail_follows_a_running_task_and_exits_with_its_code(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    n = 400
    run = run_args(hub.url, "tail-1", tmp_path / "s") + program(
        n, seed=9, pause_every=40, pause=0.1, exit_code=4
    )
    async with agent(["tail", "tail-1", "--hub", hub.url]) as t:
        async with agent(run) as a:
            assert await a.wait() == 4
        assert await t.wait() == 4
    want = expected_streams(n, seed=9)
    printed = bytes(t.stdout).decode().splitlines()
    # Everything exactly once; each source's lines in their order.
    assert sorted(printed) == sorted(lines_of(want["stdout"]) + lines_of(want["stderr"]))
    assert [line for line in printed if "fd1" in line] == lines_of(want["stdout"])
    # A finished task: history, then exit with its code at once.
    async with agent(["tail", "tail-1", "--hub", hub.url, "--source", "stderr"]) as t2:
        assert await t2.wait() == 4
    assert bytes(t2.stdout).decode().splitlines() == lines_of(want["stderr"])
    async with agent(["tail", "tail-1", "--hub", hub.url, "--no-follow", "--from-seq", "11"]) as t3:
        assert await t3.wait() == 0
    assert len(bytes(t3.stdout).decode().splitlines()) == len(printed) - 10


async def test_tail_of_a_task_the_hub_does_not_know_says_so(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    # --no-follow: nothing to print, said on stderr, and not a success.
    async with agent(["tail", "no-such-task", "--hub", hub.url, "--no-follow"]) as t:
        assert await t.wait() == 1
    assert bytes(t.stdout) == b""
    assert "task 'no-such-task' does not exist" in t.stderr_text
    # Following: it says it is waiting, then prints the task once it starts.
    async with agent(["tail", "later-1", "--hub", hub.url]) as t:
        with trio.fail_after(30):
            while "waiting for it to start" not in t.stderr_text:
                await trio.sleep(0.05)
        async with agent(run_args(hub.url, "later-1", tmp_path / "s") + ["sh", "-c", "echo hello; exit 3"]) as a:
            assert await a.wait() == 3
        assert await t.wait() == 3
    assert bytes(t.stdout) == b"hello\n"


async def test_tail_of_a_task_with_long_lines_joins_pieces(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    code = "import sys; sys.stdout.write('a' * 200000 + '\\nshort\\n')"
    async with agent(
        run_args(hub.url, "tail-2", tmp_path / "s", "--quiet") + [sys.executable, "-c", code]
    ) as a:
        assert await a.wait() == 0
    async with agent(["tail", "tail-2", "--hub", hub.url]) as t:
        assert await t.wait() == 0
    assert bytes(t.stdout) == b"a" * 200000 + b"\nshort\n"


async def test_hub_url_errors_are_clear(tmp_path: Path) -> None:
    async with agent(["run", "--hub", "ftp://x", "--", "true"]) as a:
        assert await a.wait() == 2
    assert "not a hub URL" in a.stderr_text
    async with agent(["run", "--hub", "http://127.0.0.1:1"]) as a:
        assert await a.wait() == 2
    assert "give the command" in a.stderr_text


async def test_a_line_reaches_a_subscriber_while_the_command_runs(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    """Live latency: a line appears at a subscriber while the command still runs."""
    code = "import time; print('ready', flush=True); time.sleep(30)"
    async with agent(
        run_args(hub.url, "live-1", tmp_path / "s") + [sys.executable, "-c", code]
    ) as a:
        async with hub.ws() as ws:
            await ws.subscribe("live-1", from_seq=1)
            with trio.fail_after(20):
                frame = await ws.recv_type("logs", skip=("ack", "status"))
        assert frame["records"][0]["message"] == "ready"
        a.signal(signal.SIGTERM)
        assert await a.wait() == 128 + signal.SIGTERM


async def test_tail_resumes_without_gap_after_slow_consumer(
    hub_process_factory: hubclient.HubFactory, tmp_path: Path
) -> None:
    """A tail that stops reading is cut off by the hub (SLOW_CONSUMER) and
    resubscribes from where it was: every line still printed exactly once."""
    # A process: 20 000 records acked within the agent's 30 s drain timeout, with
    # a tail evicted and resubscribing all along, needs the hub's own CPU on a
    # loaded machine.
    hub = await hub_process_factory.astart("--subscriber-queue", "2")
    n = 20000
    run = run_args(hub.url, "slow-1", tmp_path / "s", "--quiet", "--batch-size", "20") + program(
        n, seed=31, pause_every=2000, pause=0.05
    )
    async with agent(["tail", "slow-1", "--hub", hub.url]) as t:
        async with agent(run) as a:
            await t.wait_for_output(b"line 10 ")
            t.reading = trio.Event()  # stop reading the tail's output for a while
            async with hub.http() as client:
                with trio.fail_after(60):
                    while True:
                        metrics = hubclient.parse_metrics((await client.get("/metrics")).text)
                        if metrics.get("keruta_slow_consumers_total", 0) >= 1:
                            break
                        await trio.sleep(0.05)
            t.reading.set()
            assert await a.wait() == 0
        assert await t.wait() == 0
    assert "fell behind" in t.stderr_text or "connection lost" in t.stderr_text
    want = expected_streams(n, seed=31)
    printed = bytes(t.stdout).decode().splitlines()
    assert len(printed) == n
    assert [line for line in printed if "fd1" in line] == lines_of(want["stdout"])
    assert [line for line in printed if "fd2" in line] == lines_of(want["stderr"])


async def test_quiet_command_before_exit_loses_nothing(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    """A command silent for longer than the pipe grace period just before it
    exits: its last line is still mirrored and stored."""
    # Silent for 0.6 s, twice the grace it is given.
    cmd = ["sh", "-c", "echo first; sleep 0.6; echo last; exit 1"]
    async with agent(run_args(hub.url, "quiet-1", tmp_path / "s", "--pipe-grace", "0.3") + cmd) as a:
        assert await a.wait() == 1
    assert bytes(a.stdout) == b"first\nlast\n"
    assert [r["message"] for r in await hubclient.stored(hub, "quiet-1")] == ["first", "last"]
    assert "holds its output open" not in a.stderr_text


async def test_background_process_holding_the_pipes_does_not_hold_the_agent(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    cmd = ["sh", "-c", "echo start; (sleep 30; echo late) & echo parent done"]
    async with agent(run_args(hub.url, "bg-1", tmp_path / "s", "--pipe-grace", "0.3") + cmd) as a:
        # Well before the background process would let go of the pipes.
        assert await a.wait(timeout=20) == 0
    assert "holds its output open" in a.stderr_text
    records = await hubclient.stored(hub, "bg-1")
    assert [r["message"] for r in records] == ["start", "parent done"]
    # The command ran in its own process group: clean up what it left behind.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(records[0]["metadata"]["processId"], signal.SIGKILL)


async def test_tail_notices_an_ended_task_without_its_status_frame(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    """The REST fallback tail uses when the link stays quiet: prints the rest, returns the code."""
    import io

    from agent.tail import Printer, TailSettings, _ended_meanwhile

    cmd = ["sh", "-c", "echo a; echo b; echo c; exit 6"]
    async with agent(run_args(hub.url, "rest-1", tmp_path / "s", "--quiet") + cmd) as a:
        assert await a.wait() == 6
    out = io.BytesIO()
    printer = Printer(out, colour=False)  # type: ignore[arg-type]
    printer.next_seq = 2
    code = await _ended_meanwhile(TailSettings(hub_url=hub.url, task_id="rest-1"), printer)
    assert code == 6 and out.getvalue() == b"b\nc\n"
    assert await _ended_meanwhile(TailSettings(hub_url=hub.url, task_id="nope"), printer) is None


async def test_agent_a_byte_bound_below_one_record_still_delivers_every_line(
    hub: hubclient.TestHub, tmp_path: Path
) -> None:
    """Issue 17: --max-in-flight-bytes bounds the records in flight in bytes; a
    record larger than the bound goes alone, so a tiny bound is slow, not stuck."""
    n = 300
    args = run_args(hub.url, "tiny-1", tmp_path / "s", "--max-in-flight-bytes", "100", "--quiet")
    async with agent(args + program(n, seed=7)) as a:
        assert await a.wait() == 0
    check_records(await hubclient.stored(hub, "tiny-1"), expected_streams(n, seed=7))
