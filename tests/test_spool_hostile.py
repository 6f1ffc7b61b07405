"""A hostile suite against the agent's spool and its delivery: `run` spooling,
`flush` delivering what is spooled, `run --no-wait`, and the hub's acks.

Real agent processes (`python -m agent`), real commands, a real hub served in
the test's trio run (SQLite), real sockets. Where the hub has to misbehave, a
WebSocket hop in the test (`proxied`) sits between the agent and the real hub
and mangles what passes (acks moved ahead or back, an error frame injected, a
frame dropped, the connection closed after every ack), or a listener accepts
and never answers. Spools are damaged on disk between `run` and `flush` as a
crash, a bad disk or another program would: truncated, a byte flipped,
garbage appended, files emptied, a layout from a "newer version", files the
flushing user cannot read, a disk that fills up.

Each test checks the contract (../shared/CONTRACT.md, README "The agent",
docs/agent.md): the exit code, a clear message on stderr (never a
traceback), and what the hub stored, read back over REST: every line exactly
once and in order, every line the spool lost named (a "lost" record, a
`gap` record, a warning naming the seqs), never a line acknowledged that the
hub does not hold. A behaviour still wrong is kept as `xfail(strict=True)`
with the bug it shows.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from agent.link.framing import LOST_RECORD
from agent.spool.segment import HEADER, encode_frame
from tests import hubclient
from tests.agentclient import (
    agent,
    agent_env,
    check_records,
    free_port,
    joined_lines,
    lines_of,
    run_args,
)
from tests.support import python_m

sqlite_hub_factory = hubclient.sqlite_hub_factory  # a fixture
pytestmark = pytest.mark.slow

PY = sys.executable
# Hang guard for one agent process (never a performance assertion).
PATIENCE = 60.0
GONE = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@pytest.fixture
async def hub(sqlite_hub_factory: hubclient.InProcessHubFactory) -> hubclient.InProcessHub:
    return await sqlite_hub_factory.astart()


# --- running the agent ------------------------------------------------------------


@dataclass
class Ran:
    code: int
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")


async def run_to_end(
    args: list[str], env: dict[str, str] | None = None, timeout: float = PATIENCE,
    prefix: list[str] | None = None,
) -> Ran:
    started = trio.current_time()
    if prefix is not None:
        with trio.fail_after(timeout):
            done = await trio.run_process(
                [*prefix, *python_m("agent", *args)], check=False, capture_stdout=True, capture_stderr=True,
                env=env if env is not None else agent_env(), stdin=subprocess.DEVNULL,
            )
        return Ran(done.returncode, done.stdout, done.stderr, trio.current_time() - started)
    async with agent(args, env=env) as a:
        code = await a.wait(timeout)
    return Ran(code, bytes(a.stdout), bytes(a.stderr), trio.current_time() - started)


def dead_hub() -> str:
    """A hub URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def row(i: int, width: int = 30) -> str:
    return f"row {i:05d} " + "x" * width


def rows(n: int, exit_code: int = 0, width: int = 30) -> tuple[list[str], bytes]:
    """A command printing rows 1..n (one write per 100 rows) and what it writes."""
    code = (
        "import os, sys\n"
        f"for start in range(1, {n} + 1, 100):\n"
        f"    os.write(1, ''.join(f'row {{i:05d}} ' + 'x' * {width} + '\\n' for i in range(start, min(start + 100, {n} + 1))).encode())\n"
        f"sys.exit({exit_code})\n"
    )
    return py(code), "".join(row(i, width) + "\n" for i in range(1, n + 1)).encode()


async def spool_offline(spool: Path, task_id: str, command: list[str], *extra: str) -> Ran:
    """`run` with no hub: every record stays in the spool."""
    ran = await run_to_end(
        run_args(dead_hub(), task_id, spool, "--quiet", "--drain-timeout", "0", "--reconnect-max", "0.5", *extra)
        + command
    )
    assert_clear(ran.err)
    assert "has not acknowledged" in ran.err, ran.err
    return ran


async def flush(spool: Path, hub_url: str, *extra: str, timeout: float = 20.0, **kw: Any) -> Ran:
    return await run_to_end(
        ["flush", "--spool-dir", str(spool), "--hub", hub_url, "--timeout", f"{timeout:g}", "--reconnect-max", "0.5", *extra],
        **kw,
    )


def assert_clear(stderr: str) -> None:
    """The agent's own words: no Python traceback, no bug report."""
    assert "Traceback (most recent call last)" not in stderr, stderr[-3000:]
    assert "internal error" not in stderr, stderr[-3000:]


async def stored(hub: hubclient.InProcessHub, task_id: str) -> list[dict[str, Any]]:
    async with hub.http() as client:
        return await hubclient.fetch_all(client, task_id)


async def task_state(hub: hubclient.InProcessHub, task_id: str) -> dict[str, Any] | None:
    async with hub.http() as client:
        resp = await client.get(f"/api/v1/tasks/{task_id}")
    if resp.status_code == 404:
        return None
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def assert_rows(records: list[dict[str, Any]], n: int) -> list[int]:
    """Seqs 1..n without gap or duplicate, seq i holding row i or a record
    saying it was lost; the lost seqs (one run of them per damaged frame)."""
    assert [r["seq"] for r in records] == list(range(1, n + 1)), "seqs 1..n, each once"
    lost = []
    for i, r in enumerate(records, 1):
        if r["source"] == "agent":
            assert r["message"] == LOST_RECORD and r["level"] == "ERROR", r
            lost.append(i)
        else:
            assert (r["source"], r["message"], r["lineNumber"]) == ("stdout", row(i), i), r
    return lost


def segments(spool: Path, task_id: str) -> list[Path]:
    return sorted((spool / task_id).glob("*.seg"))


def frames_of(path: Path) -> list[tuple[int, bytes, int, int]]:
    """A clean segment's frames: (offset, magic, first seq, payload length)."""
    data = path.read_bytes()
    out = []
    pos = 0
    while pos + HEADER.size <= len(data):
        magic, seq, length, _crc = HEADER.unpack_from(data, pos)
        out.append((pos, magic, seq, length))
        pos += HEADER.size + length
    assert pos == len(data), "a clean segment is whole frames"
    return out


def seq_ranges(path: Path, last_seq: int) -> list[tuple[int, int]]:
    """Each frame's seqs (first, last) in a segment whose records end at `last_seq`."""
    frames = frames_of(path)
    firsts = [f[2] for f in frames]
    return [(first, nxt - 1) for first, nxt in zip(firsts, [*firsts[1:], last_seq + 1], strict=True)]


# --- 1. a spool damaged between run and flush ------------------------------------------


async def test_a_spool_truncated_mid_record_names_the_lost_lines(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """The command finished (the final state knows the last seq); the segment is
    cut in the middle of a frame. flush cuts the torn tail off, says which seqs
    were lost, sends a "lost" record for each, and the final state."""
    n = 3000
    spool = tmp_path / "spool"
    cmd, _ = rows(n, exit_code=3)
    ran = await spool_offline(spool, "trunc-1", cmd)
    assert ran.code == 3
    (seg,) = segments(spool, "trunc-1")
    ranges = seq_ranges(seg, n)
    cut_frame = len(ranges) // 2
    offset = frames_of(seg)[cut_frame][0] + HEADER.size + 7
    with seg.open("r+b") as f:
        f.truncate(offset)
    f = await flush(spool, hub.url)
    assert f.code == 0, f.err
    assert_clear(f.err)
    first_lost = ranges[cut_frame][0]
    assert "cut off" in f.err and f"records {first_lost}-{n} were lost" in f.err, f.err
    lost = assert_rows(await stored(hub, "trunc-1"), n)
    assert lost == list(range(first_lost, n + 1))
    state = await task_state(hub, "trunc-1")
    assert state is not None and (state["state"], state["exitCode"]) == ("failed", 3)
    assert not (spool / "trunc-1").exists()


@pytest.mark.parametrize("field", ["magic", "seq", "length", "crc", "payload"])
async def test_a_flipped_byte_loses_one_frame_named_and_no_other(
    hub: hubclient.InProcessHub, tmp_path: Path, field: str
) -> None:
    """A byte flipped in one frame's header field or payload: that frame's
    records become "lost" records (said on stderr), every other is stored once."""
    n = 2000
    spool = tmp_path / "spool"
    cmd, _ = rows(n)
    await spool_offline(spool, "flip-1", cmd)
    (seg,) = segments(spool, "flip-1")
    ranges = seq_ranges(seg, n)
    k = len(ranges) // 2
    start = frames_of(seg)[k][0]
    where = {"magic": 1, "seq": 2 + 7, "length": 10 + 3, "crc": 14 + 3, "payload": HEADER.size + 100}[field]
    data = bytearray(seg.read_bytes())
    data[start + where] ^= 0x20
    seg.write_bytes(bytes(data))
    f = await flush(spool, hub.url)
    assert f.code == 0, f.err
    assert_clear(f.err)
    assert "corrupt" in f.err, f.err
    lost = assert_rows(await stored(hub, "flip-1"), n)
    assert lost == list(range(ranges[k][0], ranges[k][1] + 1))
    state = await task_state(hub, "flip-1")
    assert state is not None and (state["state"], state["exitCode"]) == ("succeeded", 0)


@pytest.mark.parametrize(
    "garbage",
    [
        "random",
        "an old frame again",
        "a frame past the end",
    ],
)
async def test_garbage_appended_to_a_finished_spool(
    hub: hubclient.InProcessHub, tmp_path: Path, garbage: str
) -> None:
    """Bytes appended after the run's last record (another program writing into
    the spool, a segment concatenated twice): the lines the command wrote are
    stored once each, in order, and nothing else."""
    n = 1500
    spool = tmp_path / "spool"
    cmd, data = rows(n)
    await spool_offline(spool, "junk-1", cmd)
    (seg,) = segments(spool, "junk-1")
    if garbage == "random":
        extra = random.Random(5).randbytes(5000)
    elif garbage == "an old frame again":
        first = frames_of(seg)[0]
        extra = seg.read_bytes()[: HEADER.size + first[3]]
    else:
        payload = orjson.dumps({
            "taskId": "junk-1", "seq": n + 1, "timestamp": "2026-01-01T00:00:00.000000Z", "source": "stdout",
            "level": "INFO", "message": "a line the command never wrote", "lineNumber": n + 1, "metadata": {},
        })
        extra = encode_frame(n + 1, payload)
    with seg.open("ab") as f:
        f.write(extra)
    f = await flush(spool, hub.url)
    assert f.code == 0, f.err
    assert_clear(f.err)
    records = await stored(hub, "junk-1")
    check_records(records, {"stdout": data, "stderr": b""})
    state = await task_state(hub, "junk-1")
    assert state is not None and (state["state"], state["exitCode"]) == ("succeeded", 0)


async def test_a_second_run_killed_after_a_finished_undelivered_run(
    hub: hubclient.InProcessHub, tmp_path: Path
) -> None:
    """A run finishes with the hub down, a second run of the same task id
    continues its spool and its agent is SIGKILLed mid-run: flush delivers the
    lines of both runs once each, and the task's end is unknown (failed, no
    exit code), not the first run's success."""
    n, m = 600, 300
    spool = tmp_path / "spool"
    cmd, first = rows(n)
    await spool_offline(spool, "again-1", cmd)
    second = "".join(f"second {i:04d}\n" for i in range(1, m + 1))
    dies = py(
        "import os, signal, sys, time\n"
        f"os.write(1, {second.encode()!r})\n"
        "time.sleep(1.5)\n"  # spooled by then
        "os.kill(os.getppid(), signal.SIGKILL)\n"
    )
    ran = await run_to_end(
        run_args(dead_hub(), "again-1", spool, "--quiet", "--drain-timeout", "0", "--reconnect-max", "0.5") + dies
    )
    assert ran.code == -signal.SIGKILL, ran.err
    f = await flush(spool, hub.url)
    assert f.code == 0, f.err
    assert_clear(f.err)
    records = await stored(hub, "again-1")
    assert [r["seq"] for r in records] == list(range(1, n + m + 2)), "every line of both runs, once, in order"
    assert joined_lines(records, "stdout") == (first.decode() + second).splitlines()
    assert records[-1]["source"] == "agent" and "final state is unknown" in records[-1]["message"], records[-1]
    state = await task_state(hub, "again-1")
    assert state is not None and (state["state"], state.get("exitCode")) == ("failed", None), state


@pytest.mark.parametrize("name", ["segment", "acked", "summary.json", "task.json"])
async def test_a_file_of_the_spool_emptied(hub: hubclient.InProcessHub, tmp_path: Path, name: str) -> None:
    """A file of the spool is zero-length when flush opens it (a crash between
    creating and writing it, a disk that lost it): flush says so, and every line
    is stored exactly once or named as lost."""
    n = 1200
    spool = tmp_path / "spool"
    cmd, data = rows(n)
    await spool_offline(spool, "empty-1", cmd)
    task = spool / "empty-1"
    (seg,) = segments(spool, "empty-1")
    if name == "segment":
        seg.write_bytes(b"")
    else:
        (task / name).write_bytes(b"")
    f = await flush(spool, hub.url)
    assert f.code == 0, f.err
    assert_clear(f.err)
    records = await stored(hub, "empty-1")
    if name == "segment":
        assert f"records 1-{n} were lost" in f.err, f.err
        assert assert_rows(records, n) == list(range(1, n + 1))
    elif name == "task.json":
        # The final state went with it: the task is failed, its exit code unknown, and said so.
        assert "unreadable task.json" in f.err, f.err
        assert [r["message"] for r in records[:n]] == lines_of(data)
        assert "stopped before the command finished" in records[n]["message"]
        assert len(records) == n + 1
    else:
        check_records(records, {"stdout": data, "stderr": b""})
    assert not task.exists()


class SwallowAcks:
    """A hop that passes everything on but the hub's acks: the hub stores every
    record, the agent never learns it."""

    async def from_hub(self, hop: Hop, frame: dict[str, Any], text: str) -> None:
        if frame["type"] != "ack":
            await hop.agent_ws.send_message(text)


@pytest.mark.parametrize(
    "name",
    [
        "acked",
        "task.json",
    ],
)
async def test_an_emptied_file_never_doubles_what_the_hub_already_stored(
    hub: hubclient.InProcessHub, tmp_path: Path, name: str
) -> None:
    """The hub stored every record but its acks never reached the agent (lost
    on the way): the spool still holds them all. With `acked` or task.json
    emptied, flush must still not store any line twice."""
    n = 500
    spool = tmp_path / "spool"
    cmd, data = rows(n)
    async with proxied(hub, SwallowAcks()) as url:
        ran = await run_to_end(run_args(url, "twice-1", spool, "--quiet", "--drain-timeout", "1") + cmd)
    assert ran.code == 0
    assert "has not acknowledged" in ran.err
    assert len(await stored(hub, "twice-1")) == n
    (spool / "twice-1" / name).write_bytes(b"")
    f = await flush(spool, hub.url)
    assert_clear(f.err)
    records = await stored(hub, "twice-1")
    assert joined_lines(records, "stdout") == lines_of(data), "each line once"
    assert f.code == 0, f.err


@pytest.mark.parametrize("newer", ["unknown fields and files", "final state in another shape", "a frame of an unknown kind"])
async def test_a_spool_written_by_a_newer_version(hub: hubclient.InProcessHub, tmp_path: Path, newer: str) -> None:
    """What a later keruta might leave in a spool: fields and files this agent
    does not know (ignored), a final state it cannot read (delivered as a run
    whose state is unknown, said so), a frame kind it does not know (its
    records named as lost, never a crash)."""
    n = 1500
    spool = tmp_path / "spool"
    cmd, data = rows(n)
    await spool_offline(spool, "newer-1", cmd)
    task = spool / "newer-1"
    meta = orjson.loads((task / "task.json").read_bytes())
    (seg,) = segments(spool, "newer-1")
    if newer == "unknown fields and files":
        meta.update({"version": 99, "format": "keruta-spool/9", "compression": "zstd"})
        (task / "task.json").write_bytes(orjson.dumps(meta))
        (task / "index.v9").write_bytes(b"\x00" * 100)
        (task / "00000000000000099999.seg.idx").write_bytes(b"idx")
    elif newer == "final state in another shape":
        meta["final"] = "succeeded"
        (task / "task.json").write_bytes(orjson.dumps(meta))
    else:
        frames = frames_of(seg)
        k = len(frames) // 2
        ranges = seq_ranges(seg, n)
        raw = bytearray(seg.read_bytes())
        start = frames[k][0]
        header = HEADER.unpack_from(raw, start)
        HEADER.pack_into(raw, start, b"\xabZ", *header[1:])
        seg.write_bytes(bytes(raw))
    f = await flush(spool, hub.url)
    assert_clear(f.err)
    assert f.code == 0, f.err
    records = await stored(hub, "newer-1")
    state = await task_state(hub, "newer-1")
    assert state is not None
    if newer == "unknown fields and files":
        check_records(records, {"stdout": data, "stderr": b""})
        assert (state["state"], state["exitCode"]) == ("succeeded", 0)
    elif newer == "final state in another shape":
        assert [r["message"] for r in records[:n]] == lines_of(data)
        assert len(records) == n + 1 and "final state is unknown" in records[n]["message"]
        assert (state["state"], state["exitCode"]) == ("failed", None)
    else:
        assert "corrupt" in f.err
        assert assert_rows(records, n) == list(range(ranges[k][0], ranges[k][1] + 1))


# Root without the capabilities that let it read any file: permissions apply.
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(), reason="needs root and setpriv to drop DAC override"
)
async def test_a_spool_the_flushing_user_cannot_read(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """flush run by a user who may not read a segment, or a task's directory: a
    clear error naming the task, exit 1, the spool kept as it was; once it can
    read them, flush delivers every line once."""
    n = 800
    spool = tmp_path / "spool"
    cmd, data = rows(n)
    await spool_offline(spool, "perm-1", cmd)
    await spool_offline(spool, "perm-2", cmd)
    (seg,) = segments(spool, "perm-1")
    seg.chmod(0o000)
    (spool / "perm-2").chmod(0o000)
    before = {p: p.read_bytes() for p in [spool / "perm-1" / "task.json", spool / "perm-2" / "task.json"]}
    try:
        f = await flush(spool, hub.url, prefix=NO_DAC)
    finally:
        seg.chmod(0o600)
        (spool / "perm-2").chmod(0o700)
    assert_clear(f.err)
    assert f.code == 1, f.err
    assert "perm-1" in f.err and "perm-2" in f.err and "Permission denied" in f.err, f.err
    assert {p: p.read_bytes() for p in before} == before, "the spool is kept as it was"
    again = await flush(spool, hub.url)
    assert again.code == 0, again.err
    for task in ("perm-1", "perm-2"):
        check_records(await stored(hub, task), {"stdout": data, "stderr": b""})


@asynccontextmanager
async def small_disk(where: Path, size: str) -> AsyncIterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
async def test_a_spool_on_a_disk_that_fills_up(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """The spool's disk fills up long before --spool-max-bytes: lines that do not
    fit are dropped, said on stderr, and accounted for by a gap record once
    delivered; the run keeps the command's exit code and final state."""
    n = 6000
    cmd, _ = rows(n, exit_code=4)
    async with small_disk(tmp_path / "disk", "64k") as disk:
        spool = disk / "spool"
        ran = await run_to_end(
            run_args(dead_hub(), "full-1", spool, "--quiet", "--drain-timeout", "0", "--reconnect-max", "0.5") + cmd
        )
        assert ran.code == 4
        assert_clear(ran.err)
        assert "DROPPED" in ran.err and "No space left on device" in ran.err, ran.err
        f = await flush(spool, hub.url)
        assert_clear(f.err)
        assert f.code == 0, f.err
    records = await stored(hub, "full-1")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    kept = [r for r in records if r["source"] == "stdout"]
    gaps = [r for r in records if r.get("kind") == "gap"]
    assert [r["message"] for r in kept] == [row(r["lineNumber"]) for r in kept]
    assert gaps, "the dropped lines are accounted for by a gap record"
    assert all(g["metadata"]["gap"]["reason"] == "spool_error" for g in gaps)
    assert len(kept) + sum(g["metadata"]["gap"]["lines"] for g in gaps) == n
    state = await task_state(hub, "full-1")
    assert state is not None and (state["state"], state["exitCode"]) == ("failed", 4)


# --- 2. concurrency ---------------------------------------------------------------------


async def test_two_flushes_at_once_deliver_each_line_once(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    n = 5000
    spool = tmp_path / "spool"
    cmd, data = rows(n)
    await spool_offline(spool, "twin-1", cmd)
    results: list[Ran] = []

    async def one(*extra: str) -> None:
        results.append(await flush(spool, hub.url, *extra))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
        nursery.start_soon(one, "--wait")
    for r in results:
        assert_clear(r.err)
        assert r.code == 0, r.err
    check_records(await stored(hub, "twin-1"), {"stdout": data, "stderr": b""})
    assert not (spool / "twin-1").exists()


async def test_flush_while_the_run_still_runs(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """A plain flush leaves a running task to its agent; flush --wait waits for
    it and exits 0 only once every line is stored; each line stored once."""
    spool = tmp_path / "spool"
    code = "import time\nfor i in range(1, 401):\n    print(f'row {i:05d} ' + 'x' * 30, flush=True)\n    if i % 100 == 0: time.sleep(0.3)\n"
    data = "".join(row(i) + "\n" for i in range(1, 401)).encode()
    async with agent(run_args(hub.url, "busy-1", spool, "--quiet") + py(code)) as a:
        with trio.fail_after(PATIENCE):
            while not (spool / "busy-1" / "task.json").exists():
                await trio.sleep(0.01)
        plain = await flush(spool, hub.url, "--task-id", "busy-1")
        waiting = await flush(spool, hub.url, "--wait", "--task-id", "busy-1")
        assert await a.wait() == 0
    for r in (plain, waiting):
        assert_clear(r.err)
        assert r.code == 0, r.err
    assert "still running" in plain.err
    check_records(await stored(hub, "busy-1"), {"stdout": data, "stderr": b""})
    assert not (spool / "busy-1").exists()


async def test_run_sigkilled_mid_burst_with_no_hub_then_flush(
    hub: hubclient.InProcessHub, tmp_path: Path, groups: list[int]
) -> None:
    """The agent dies mid-burst (SIGKILL): every line it spooled is stored once,
    in order, followed by the agent's note that it stopped; nothing else."""
    spool = tmp_path / "spool"
    code = "import os, time\ni = 0\nwhile True:\n    i += 1\n    os.write(1, (f'row {i:05d} ' + 'x' * 30 + '\\n').encode())\n    if i % 50 == 0: time.sleep(0.001)\n"
    async with agent(run_args(dead_hub(), "killed-1", spool, "--reconnect-max", "0.5") + py(code)) as a:
        await a.wait_for_output(b"row 02000 ")
        a.signal(signal.SIGKILL)
        assert await a.wait() == -signal.SIGKILL
    mirrored = bytes(a.stdout)
    f = await flush(spool, hub.url)
    assert_clear(f.err)
    assert f.code == 0, f.err
    records = await stored(hub, "killed-1")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    *lines, notice = records
    assert notice["source"] == "agent" and "stopped before the command finished" in notice["message"]
    assert [r["message"] for r in lines] == [row(i) for i in range(1, len(lines) + 1)]
    # Every line the agent mirrored had been spooled first.
    assert len(lines) >= len(lines_of(mirrored[: mirrored.rfind(b"\n") + 1]))
    state = await task_state(hub, "killed-1")
    assert state is not None and (state["state"], state["exitCode"]) == ("failed", None)
    pid = int(lines[0]["metadata"]["processId"])
    groups.append(pid)


# --- 3. a hub that acks oddly ----------------------------------------------------------------


async def to_hub(hop: Hop, frame: dict[str, Any], text: str) -> None:
    await hop.hub_ws.send_message(text)


async def to_agent(hop: Hop, frame: dict[str, Any], text: str) -> None:
    await hop.agent_ws.send_message(text)


class Hop:
    """The state of one proxied connection, handed to the policy's hooks."""

    def __init__(self, policy: Any, agent_ws: WebSocketConnection, hub_ws: WebSocketConnection) -> None:
        self.policy = policy
        self.agent_ws = agent_ws
        self.hub_ws = hub_ws


@asynccontextmanager
async def proxied(hub: hubclient.InProcessHub, policy: Any) -> AsyncIterator[str]:
    """A hub URL whose WebSocket reaches `hub` through `policy`'s hooks."""
    policy.connections = 0
    policy.sent = []  # every logs frame's records' seqs, as the agent sent them

    async def handle(request: WebSocketRequest) -> None:
        agent_ws = await request.accept()
        policy.connections += 1
        try:
            async with open_websocket_url(hub.ws_url, max_message_size=hubclient.MAX_WS_MESSAGE) as hub_ws:
                hop = Hop(policy, agent_ws, hub_ws)
                async with trio.open_nursery() as nursery:

                    async def pump(source: WebSocketConnection, hook: Callable[..., Awaitable[None]]) -> None:
                        try:
                            while True:
                                text = await source.get_message()
                                frame = orjson.loads(text)
                                if source is agent_ws and frame.get("type") == "logs":
                                    policy.sent.append([r["seq"] for r in frame["records"]])
                                await hook(hop, frame, text)
                        except GONE:
                            pass
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(pump, agent_ws, getattr(policy, "from_agent", to_hub))
                    nursery.start_soon(pump, hub_ws, getattr(policy, "from_hub", to_agent))
        except GONE:
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await agent_ws.aclose()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(serve_websocket, handle, "127.0.0.1", 0, None, max_message_size=hubclient.MAX_WS_MESSAGE)
        )
        try:
            yield f"http://127.0.0.1:{server.port}"
        finally:
            nursery.cancel_scope.cancel()


class AckAhead:
    """The first ack the hub sends is turned into one for far more than the
    agent has sent (a buggy hub, a proxy mixing up connections)."""

    done = False

    async def from_hub(self, hop: Hop, frame: dict[str, Any], text: str) -> None:
        if frame["type"] == "ack" and not self.done:
            self.done = True
            self.first = frame["seq"]
            frame = {**frame, "seq": frame["seq"] + 1_000_000}
            text = orjson.dumps(frame).decode()
        await hop.agent_ws.send_message(text)


class AckBackwards:
    """Each ack is followed by stale ones (seq 1, seq - 7, the same again), and
    acks for other producers and tasks."""

    async def from_hub(self, hop: Hop, frame: dict[str, Any], text: str) -> None:
        await hop.agent_ws.send_message(text)
        if frame["type"] == "ack":
            for seq in (1, max(1, frame["seq"] - 7), frame["seq"]):
                await hop.agent_ws.send_message(orjson.dumps({**frame, "seq": seq}).decode())
            await hop.agent_ws.send_message(orjson.dumps({**frame, "seq": 10**9, "producer": "someone-else"}).decode())
            await hop.agent_ws.send_message(orjson.dumps({**frame, "seq": 10**9, "taskId": "other-task"}).decode())


async def test_an_ack_past_what_was_sent_is_not_trusted(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """An ack for seqs the agent has not sent yet (8 MB spooled, at most 4 MiB
    in flight) must not release them: flush goes on sending them, and reports
    the task delivered only once the hub holds every line."""
    n = 8000
    spool = tmp_path / "spool"
    cmd, data = rows(n, width=1000)
    await spool_offline(spool, "ahead-1", cmd)
    policy = AckAhead()
    async with proxied(hub, policy) as url:
        f = await flush(spool, url)
    assert_clear(f.err)
    assert policy.first < n, "the first ack came before everything was acknowledged"
    assert f.code == 0, f.err
    check_records(await stored(hub, "ahead-1"), {"stdout": data, "stderr": b""})
    assert not (spool / "ahead-1").exists()


async def test_acks_going_backwards_and_foreign_acks_are_ignored(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    n = 3000
    spool = tmp_path / "spool"
    cmd, data = rows(n, exit_code=1)
    await spool_offline(spool, "back-1", cmd)
    async with proxied(hub, AckBackwards()) as url:
        f = await flush(spool, url)
    assert_clear(f.err)
    assert f.code == 0, f.err
    check_records(await stored(hub, "back-1"), {"stdout": data, "stderr": b""})
    state = await task_state(hub, "back-1")
    assert state is not None and (state["state"], state["exitCode"]) == ("failed", 1)
    assert not (spool / "back-1").exists()


class Conflict:
    """The hub answers the first logs frame with SEQ_CONFLICT (and does not store it)."""

    async def from_agent(self, hop: Hop, frame: dict[str, Any], text: str) -> None:
        if frame["type"] == "logs":
            await hop.agent_ws.send_message(orjson.dumps({
                "type": "error", "code": "SEQ_CONFLICT",
                "message": f"producer {frame.get('producer')} seq {frame['records'][0]['seq']} holds another record",
            }).decode())
            return
        await hop.hub_ws.send_message(text)


async def test_seq_conflict_stops_flush_clearly_and_keeps_the_spool(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    n = 1000
    spool = tmp_path / "spool"
    cmd, data = rows(n)
    await spool_offline(spool, "conflict-1", cmd)
    async with proxied(hub, Conflict()) as url:
        f = await flush(spool, url)
    assert_clear(f.err)
    assert f.code == 1, f.err
    assert "ERROR" in f.err and "SEQ_CONFLICT" in f.err and f"{n} records stay in" in f.err, f.err
    assert f.seconds < 15, "a permanent refusal is not retried"
    assert await stored(hub, "conflict-1") == []
    assert (spool / "conflict-1" / "task.json").exists()
    again = await flush(spool, hub.url)
    assert again.code == 0, again.err
    check_records(await stored(hub, "conflict-1"), {"stdout": data, "stderr": b""})


class DropSecondFrame:
    """The agent's second logs frame is lost on the way: the real hub answers
    the third with SEQ_GAP and where to resume."""

    logs = 0

    async def from_agent(self, hop: Hop, frame: dict[str, Any], text: str) -> None:
        if frame["type"] == "logs":
            self.logs += 1
            if self.logs == 2:
                return
        await hop.hub_ws.send_message(text)

    async def from_hub(self, hop: Hop, frame: dict[str, Any], text: str) -> None:
        if frame["type"] == "error":
            self.errors = [*getattr(self, "errors", []), frame]
        await hop.agent_ws.send_message(text)


async def test_a_lost_frame_is_resent_after_seq_gap(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    n = 4000
    spool = tmp_path / "spool"
    cmd, data = rows(n)
    await spool_offline(spool, "gap-1", cmd)
    policy = DropSecondFrame()
    async with proxied(hub, policy) as url:
        f = await flush(spool, url)
    assert_clear(f.err)
    assert f.code == 0, f.err
    assert policy.logs >= 3
    assert any(e["code"] == "SEQ_GAP" for e in getattr(policy, "errors", [])), "the hub saw the hole"
    check_records(await stored(hub, "gap-1"), {"stdout": data, "stderr": b""})


class CloseAfterEachAck:
    """The hub's side of the hop goes away after every ack it passes on."""

    async def from_hub(self, hop: Hop, frame: dict[str, Any], text: str) -> None:
        await hop.agent_ws.send_message(text)
        if frame["type"] == "ack":
            await hop.agent_ws.aclose()


async def test_a_hub_that_closes_after_every_ack(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """Each connection moves delivery on by one ack: flush keeps going while it
    makes progress, and stores every line once."""
    n = 6000
    spool = tmp_path / "spool"
    cmd, data = rows(n)
    await spool_offline(spool, "closer-1", cmd)
    policy = CloseAfterEachAck()
    async with proxied(hub, policy) as url:
        f = await flush(spool, url, timeout=40)
    assert_clear(f.err)
    assert f.code == 0, f.err
    check_records(await stored(hub, "closer-1"), {"stdout": data, "stderr": b""})
    assert policy.connections > 4


@asynccontextmanager
async def silent_listener() -> AsyncIterator[str]:
    """A TCP port that accepts connections and never says a word."""
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def mute_hub() -> AsyncIterator[str]:
    """A WebSocket endpoint that accepts the handshake, reads everything and
    never answers (no ack, no pong)."""

    async def handle(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.get_message()
        except GONE:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve_websocket, handle, "127.0.0.1", 0, None, max_message_size=hubclient.MAX_WS_MESSAGE))
        try:
            yield f"http://127.0.0.1:{server.port}"
        finally:
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["tcp", "websocket"])
async def test_flush_to_a_hub_that_never_answers_gives_up_in_time(tmp_path: Path, kind: str) -> None:
    n = 300
    spool = tmp_path / "spool"
    cmd, _ = rows(n)
    await spool_offline(spool, "mute-1", cmd)
    listener = silent_listener() if kind == "tcp" else mute_hub()
    async with listener as url:
        f = await flush(spool, url, timeout=2)
    assert_clear(f.err)
    assert f.code == 1, f.err
    assert f.seconds < 2 + 8, f"--timeout 2 bounds the wait ({f.seconds:.1f} s)"
    assert "mute-1" in f.err and f"{n} records stay in" in f.err, f.err
    assert (spool / "mute-1" / "task.json").exists()


@pytest.mark.parametrize("kind", ["tcp", "websocket"])
async def test_run_against_a_hub_that_never_answers_bounds_its_wait(
    hub: hubclient.InProcessHub, tmp_path: Path, kind: str
) -> None:
    n = 300
    spool = tmp_path / "spool"
    cmd, data = rows(n, exit_code=6)
    listener = silent_listener() if kind == "tcp" else mute_hub()
    async with listener as url:
        ran = await run_to_end(run_args(url, "mute-2", spool, "--quiet", "--drain-timeout", "1") + cmd)
    assert_clear(ran.err)
    assert ran.code == 6
    assert ran.seconds < 1 + 8, f"--drain-timeout 1 bounds the wait ({ran.seconds:.1f} s)"
    assert "has not acknowledged" in ran.err and str(spool / "mute-2") in ran.err, ran.err
    f = await flush(spool, hub.url)
    assert f.code == 0, f.err
    check_records(await stored(hub, "mute-2"), {"stdout": data, "stderr": b""})


# --- 4. lines at the edges, through the spool ------------------------------------------------


async def test_edge_lines_spooled_offline_then_flushed(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """Lines past the line limit, invalid UTF-8, NUL bytes, CR-only endings, 1 MB
    without a newline and a last line without one: spooled while the hub is
    away, delivered by flush exactly as a live run stores them."""
    parts = [
        b"x" * (200 * 1024) + b"\n",
        b"invalid \xff\xfe \xed\xa0\x80 end\n",
        b"nul\x00in\x00the\x00middle\n\x00\n",
        b"cr\ronly\rendings\r\n",
        b"\r\r\r\n",
        b"y" * (1 << 20),
        b"\nlast line without newline \xe2\x82",
    ]
    path = tmp_path / "edges.bin"
    want = b"".join(parts)
    path.write_bytes(want)
    spool = tmp_path / "spool"
    await spool_offline(spool, "edges-1", ["cat", str(path)])
    f = await flush(spool, hub.url)
    assert_clear(f.err)
    assert f.code == 0, f.err
    records = await stored(hub, "edges-1")
    check_records(records, {"stdout": want, "stderr": b""})
    assert all(len(r["message"].encode()) <= 64 * 1024 for r in records)

