"""Floods and backpressure against the hub's memory bounds, as a hostile fleet
would send them: hundreds to a thousand WebSocket connections writing small
`logs` frames as fast as they can and never reading their acks, connections
that send half a frame and stall, connections subscribed to many tasks that
never read, many producers on one task, and a real agent printing 200,000
lines at a hub whose SQLite write lock is held by another process.

Every case checks bounds (bytes held, frames, the hub process's RSS growth,
with generous limits: no timing is asserted), correctness (every acked record
stored exactly once, task seqs contiguous) and that an honest producer and
viewer beside the flood are still served. The hub runs as a process (its RSS
is what is measured, and a flooder must not share its thread); the flooders
are raw sockets that speak RFC 6455 by hand, so "never reading" means the
kernel's buffers fill and the hub must stop reading them (TCP backpressure).
"""

from __future__ import annotations

import bisect
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from keruta.frames import LogsFrame
from keruta.wire import encode_bytes
from tests.agentclient import agent, agent_env, run_args
from tests.hubclient import (
    GONE,
    PATIENCE,
    HubFactory,
    SqliteFiles,
    TestHub,
    fetch_all,
    make_record,
    parse_metrics,
)
from tests.test_listener import RawClient, handshake
from tests.test_store_hostile import SQLITE_HOLDER, holding

pytestmark = pytest.mark.heavy

TS = "2026-01-01T00:00:00.000000Z"
MiB = 1024 * 1024


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[HubFactory]:
    """Hub processes on SQLite files (the write lock another process holds is SQLite's)."""
    factory = HubFactory(SqliteFiles(tmp_path))
    try:
        yield factory
    finally:
        factory.close()


# --- measuring the hub process ----------------------------------------------------


def rss(pid: int) -> int:
    """The process's resident set, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    # A zombie (exited, not yet reaped) has a status but no memory.
    raise ProcessLookupError(f"{pid} has exited: no VmRSS")


class Peak:
    """Samples a process's RSS until stopped; `peak` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = rss(pid)
        self.peak = self.start

    def sample(self) -> None:
        try:
            self.peak = max(self.peak, rss(self.pid))
        except (FileNotFoundError, ProcessLookupError):
            pass

    async def run(self) -> None:
        while True:
            self.sample()
            await trio.sleep(0.02)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def hub_pid(hub: TestHub) -> int:
    assert hub.proc is not None
    return hub.proc.pid


async def metrics(hub: TestHub) -> dict[str, float]:
    async with hub.http() as client:
        return parse_metrics((await client.get("/metrics")).text)


async def settled(hub: TestHub, name: str, quiet: float = 1.0) -> float:
    """Waits until the metric has not changed for `quiet` seconds; its value."""
    last, since = -1.0, trio.current_time()
    while True:
        value = (await metrics(hub)).get(name, 0.0)
        if value != last:
            last, since = value, trio.current_time()
        elif trio.current_time() - since >= quiet:
            return value
        await trio.sleep(0.1)


async def stored_all(hub: TestHub, task: str) -> list[dict[str, Any]]:
    async with hub.http(timeout=PATIENCE) as client:
        return await fetch_all(client, task)


def assert_exactly_once(records: list[dict[str, Any]], expected: list[str]) -> None:
    """The task holds exactly `expected` (any interleaving), each once, seqs 1..n."""
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1)), "task seqs must be 1..n"
    got = [r["message"] for r in records]
    assert len(got) == len(set(got)), "a record was stored twice"
    missing = set(expected) - set(got)
    extra = set(got) - set(expected)
    assert not missing and not extra, f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(extra)} extra"


def in_producer_order(records: list[dict[str, Any]], producer: str) -> list[int]:
    """A producer's own seqs, read back from its messages `<producer> line <n>`, in task-seq order."""
    prefix = f"{producer} line "
    return [int(r["message"][len(prefix):]) for r in records if r["message"].startswith(prefix)]


# --- raw WebSocket clients ----------------------------------------------------------


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame; the all-zero mask leaves the payload as is (RFC 6455 allows any key)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def one_record(task: str, producer: str, seq: int) -> bytes:
    """A `logs` frame of one small record, as a client frame on the wire."""
    record = make_record(task, seq, f"{producer} line {seq}", timestamp=TS)
    return ws_frame(encode_bytes(LogsFrame(task, [record], producer)))


def frames_blob(task: str, producer: str, first: int, last: int) -> tuple[bytes, list[int]]:
    """Frames first..last back to back, and where each ends in the blob."""
    parts = [one_record(task, producer, s) for s in range(first, last + 1)]
    ends: list[int] = []
    total = 0
    for p in parts:
        total += len(p)
        ends.append(total)
    return b"".join(parts), ends


async def open_flooder(port: int, *, rcvbuf: int = 4096, sndbuf: int | None = 4096) -> RawClient:
    """A raw WebSocket client with small socket buffers: not reading stalls the hub's
    sends after a few KiB, and the hub not reading stalls ours soon after."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    await sock.connect(("127.0.0.1", port))
    client = RawClient(trio.SocketStream(sock))
    await client.send(handshake())
    head = await client.head()
    assert head.startswith(b"HTTP/1.1 101 "), head
    return client


async def open_many(port: int, n: int, **kwargs: Any) -> list[RawClient]:
    clients: list[RawClient | None] = [None] * n
    limiter = trio.CapacityLimiter(64)

    async def one(i: int) -> None:
        async with limiter:
            clients[i] = await open_flooder(port, **kwargs)

    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    return [c for c in clients if c is not None]


async def close_all(clients: list[RawClient]) -> None:
    for c in clients:
        await trio.aclose_forcefully(c.stream)


async def read_acks(client: RawClient, task: str, producer: str, last: int) -> list[int]:
    """The seqs of the ack frames for (task, producer) until one covers `last`;
    an error frame fails. The hub's keep-alive pings are skipped."""
    acks: list[int] = []
    while not acks or acks[-1] < last:
        opcode, payload = await client.frame()
        if opcode != 0x1:
            assert opcode == 0x9, (opcode, payload[:200])
            continue
        reply = orjson.loads(payload)
        assert reply["type"] == "ack", f"{producer}: {reply}"
        assert (reply["taskId"], reply.get("producer")) == (task, producer), reply
        assert not acks or reply["seq"] > acks[-1], f"acks go backwards: {acks[-3:]} then {reply}"
        acks.append(reply["seq"])
    return acks


async def remaining_acks(client: RawClient) -> int:
    """After the hub died: the highest ack its socket still holds (0 if none)."""
    best = 0
    try:
        while True:
            opcode, payload = await client.frame()
            if opcode == 0x1:
                reply = orjson.loads(payload)
                if reply.get("type") == "ack":
                    best = max(best, reply["seq"])
    except (EOFError, *GONE):
        return best


# --- honest clients beside the flood ------------------------------------------------


async def honest_producer(hub: TestHub, task: str, n: int, acked: list[int]) -> None:
    """Sends n one-record frames, each after the previous one's ack."""
    async with hub.ws() as ws:
        for seq in range(1, n + 1):
            await ws.send(encode_bytes(LogsFrame(task, [make_record(task, seq, f"honest line {seq}")], "honest")).decode())
            await ws.wait_ack(task, seq)
            acked.append(seq)


async def honest_viewer(hub: TestHub, task: str, n: int, seen: list[int]) -> None:
    async with hub.ws() as ws:
        await ws.subscribe(task, from_seq=1)
        seen.extend(await ws.collect(task, n))


# --- 1. a thousand connections that never read their acks --------------------------

FLOODERS = 1000
FLOOD_FRAMES = 40
FLOOD_TASKS = 20
INGEST_BOUND = 1 * MiB


async def test_a_thousand_flooders_that_never_read_hold_bounded_memory_and_the_honest_are_served(
    hubs: HubFactory,
) -> None:
    hub = await hubs.astart(
        "--ingest-queue-bytes", str(INGEST_BOUND), "--write-flush-interval", "0.02", "--write-batch-size", "2000"
    )
    pid = hub_pid(hub)
    idle = rss(pid)
    flooders = await open_many(hub.port, FLOODERS)
    connected = rss(pid)
    blobs = [
        frames_blob(f"flood-{i % FLOOD_TASKS}", f"p{i:04d}", 1, FLOOD_FRAMES)[0] for i in range(FLOODERS)
    ]
    watch = Peak(pid)
    acked: list[int] = []
    seen: list[int] = []
    try:
        with trio.fail_after(PATIENCE * 2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.run)
                async with trio.open_nursery() as flood:
                    for client, blob in zip(flooders, blobs, strict=True):
                        flood.start_soon(client.send, blob)
                    # The honest pair, in the thick of it.
                    flood.start_soon(honest_viewer, hub, "honest", 50, seen)
                    flood.start_soon(honest_producer, hub, "honest", 50, acked)
                # Every flooder's frames are in; now wait for the commits.
                total = FLOODERS * FLOOD_FRAMES + 50
                while (await metrics(hub))["keruta_records_ingested_total"] < total:
                    await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
        watch.sample()
        seen_metrics = await metrics(hub)
        print(f"idle {idle >> 20} MiB, connected {connected >> 20} MiB, peak growth {watch.growth >> 20} MiB")
        assert acked == list(range(1, 51)) and seen == list(range(1, 51)), "the honest pair was not served"
        assert seen_metrics["keruta_ingest_queue_bytes_peak"] <= INGEST_BOUND, seen_metrics
        # Generous: the flood's frames are 12 MB in all, and the hub may hold 1 MiB of them.
        assert watch.growth < 96 * MiB, f"the hub grew {watch.growth >> 20} MiB under the flood"
        assert connected - idle < FLOODERS * 96 * 1024, f"{(connected - idle) >> 20} MiB for {FLOODERS} idle sockets"

        # Now they read: acks coalesced, the last covering exactly what was sent.
        ack_frames = 0
        with trio.fail_after(PATIENCE):
            for i, client in enumerate(flooders):
                acks = await read_acks(client, f"flood-{i % FLOOD_TASKS}", f"p{i:04d}", FLOOD_FRAMES)
                assert acks[-1] == FLOOD_FRAMES
                ack_frames += len(acks)
        print(f"{ack_frames} ack frames for {FLOODERS * FLOOD_FRAMES} frames")
        assert ack_frames < FLOODERS * FLOOD_FRAMES // 2, f"{ack_frames} acks for {FLOODERS * FLOOD_FRAMES} frames"
    finally:
        await close_all(flooders)
    for t in range(FLOOD_TASKS):
        records = await stored_all(hub, f"flood-{t}")
        expected = [f"p{i:04d} line {s}" for i in range(t, FLOODERS, FLOOD_TASKS) for s in range(1, FLOOD_FRAMES + 1)]
        assert_exactly_once(records, expected)
        for i in range(t, FLOODERS, FLOOD_TASKS):
            assert in_producer_order(records, f"p{i:04d}") == list(range(1, FLOOD_FRAMES + 1))
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


# --- 2. the store cannot commit: the hub stops reading, TCP pushes back --------------

STALLERS = 100
STALL_CAP = 4 * MiB  # what one flooder may push before we call the hub's reading unbounded
STALL_BOUND = 256 * 1024


class Pusher:
    """A flooder sending one-record frames of (task, producer) back to back, made as
    they go, until a send makes no progress for a while (a cancelled socket send
    sends nothing, so what the kernel took is known to the byte)."""

    def __init__(self, client: RawClient, task: str, producer: str) -> None:
        self.client, self.task, self.producer = client, task, producer
        self.buf = bytearray()
        self.ends: list[int] = []  # where each frame made so far ends, from the first byte
        self.made = 0
        self.sent = 0

    async def push_until_stalled(self, stalled_for: float, cap: int) -> None:
        sock = self.client.stream.socket
        while self.sent < cap:
            while len(self.buf) < 65536:
                frame = one_record(self.task, self.producer, len(self.ends) + 1)
                self.buf += frame
                self.made += len(frame)
                self.ends.append(self.made)
            with trio.move_on_after(stalled_for):
                try:
                    n = await sock.send(self.buf[:65536])
                except OSError:
                    return  # the hub is gone

                del self.buf[:n]
                self.sent += n
                continue
            return

    @property
    def started(self) -> int:
        """Frames the hub has at least a byte of."""
        return bisect.bisect_left(self.ends, self.sent) + (0 if self.sent in self.ends or not self.sent else 1)

    async def finish_frame(self) -> None:
        """Sends the rest of the frame the stall cut in two, if any."""
        rest = self.ends[self.started - 1] - self.sent if self.started else 0
        if rest:
            await self.client.send(bytes(self.buf[:rest]))


async def test_a_flood_while_the_store_is_locked_is_stopped_by_tcp_then_stored_exactly_once(
    hubs: HubFactory,
) -> None:
    """Another process holds SQLite's write lock: nothing commits, so once the ingest
    budget is full the hub must stop reading every flooder (their sends stall),
    hold no more than its bound, still answer pings and serve history; once the lock
    goes, every frame the flooders got into the kernel is stored once and acked."""
    hub = await hubs.astart("--ingest-queue-bytes", str(STALL_BOUND))
    async with hub.http() as client:
        resp = await client.post("/api/v1/tasks/history/logs", json=[{"message": f"old {i}"} for i in range(1, 101)])
        assert resp.status_code == 200, resp.text
    pid = hub_pid(hub)
    flooders = await open_many(hub.port, STALLERS)
    pushers = [Pusher(c, "locked", f"p{i:04d}") for i, c in enumerate(flooders)]
    watch = Peak(pid)
    try:
        async with holding(SQLITE_HOLDER, str(hub.db_path)) as holder:
            with trio.fail_after(PATIENCE * 2):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch.run)
                    async with trio.open_nursery() as fleet:
                        for p in pushers:
                            fleet.start_soon(p.push_until_stalled, 2.0, STALL_CAP)
                    # Every flooder is stalled now. The hub still answers the others.
                    async with hub.ws() as honest:
                        await honest.send({"type": "ping"})
                        assert await honest.recv() == {"type": "pong"}, "a ping was not answered beside the flood"
                        await honest.subscribe("history", from_seq=1)
                        assert await honest.collect("history", 100) == list(range(1, 101))
                    m = await metrics(hub)
                    nursery.cancel_scope.cancel()
            watch.sample()
            sent = [p.sent for p in pushers]
            print(f"sent {sum(sent) >> 20} MiB in all, the most {max(sent) >> 10} KiB; hub grew {watch.growth >> 20} MiB")
            assert max(sent) < STALL_CAP, f"a flooder sent {max(sent)} bytes: the hub never stopped reading it"
            assert m["keruta_ingest_queue_bytes_peak"] <= STALL_BOUND, m
            assert watch.growth < 64 * MiB, f"the hub grew {watch.growth >> 20} MiB while it could not commit"
            await holder.release()

        # Lock gone: finish the frame each flooder was cut in, then read its acks.
        # Each flooder reads its acks while it sends: the hub stops reading a
        # client that leaves its replies unread.
        acks_seen = 0

        async def finish(p: Pusher) -> None:
            nonlocal acks_seen
            async with trio.open_nursery() as both:
                both.start_soon(p.finish_frame)
                acks = await read_acks(p.client, "locked", p.producer, p.started)
            assert acks[-1] == p.started, "the last ack covers exactly what was sent"
            acks_seen += len(acks)

        with trio.fail_after(PATIENCE * 2):
            async with trio.open_nursery() as nursery:
                for p in pushers:
                    if p.started:
                        nursery.start_soon(finish, p)
        print(f"{acks_seen} ack frames for {sum(p.started for p in pushers)} frames")
    finally:
        await close_all(flooders)
    records = await stored_all(hub, "locked")
    assert_exactly_once(records, [f"{p.producer} line {s}" for p in pushers for s in range(1, p.started + 1)])
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


# --- 3. SIGKILL right after an ack, mid-flood ----------------------------------------

KILL_FLOODERS = 300
KILL_AFTER = 30


async def test_no_ack_in_a_flood_covers_a_record_a_sigkill_loses(hubs: HubFactory) -> None:
    """Flooders pushing frames and an honest producer waiting for each ack; the
    hub is SIGKILLed the moment the honest producer's 30th ack arrives. Read
    back after a restart: every record any ack covered (the honest producer's,
    and each flooder's, from the acks its socket still held) is stored, once,
    and each producer's stored records are a prefix of what it sent."""
    hub = await hubs.astart("--ingest-queue-bytes", str(512 * 1024))
    flooders = await open_many(hub.port, KILL_FLOODERS)
    pushers = [Pusher(c, f"kill-{i % 10}", f"p{i:04d}") for i, c in enumerate(flooders)]
    acked: list[int] = []
    assert hub.proc is not None
    proc = hub.proc
    try:
        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                for p in pushers:
                    nursery.start_soon(p.push_until_stalled, 5.0, 1 * MiB)
                async with hub.ws() as ws:
                    try:
                        for seq in range(1, KILL_AFTER + 1):
                            record = make_record("honest", seq, f"honest line {seq}")
                            await ws.send(encode_bytes(LogsFrame("honest", [record], "honest")).decode())
                            await ws.wait_ack("honest", seq)
                            acked.append(seq)
                        proc.send_signal(signal.SIGKILL)  # at once: nothing more is committed
                    except GONE:
                        pass
                await trio.to_thread.run_sync(proc.wait)
                nursery.cancel_scope.cancel()
        flooder_acks = []
        with trio.fail_after(PATIENCE):
            for c in flooders:
                flooder_acks.append(await remaining_acks(c))
    finally:
        await close_all(flooders)
    assert acked == list(range(1, KILL_AFTER + 1))
    await hub.arestart()
    honest = in_producer_order(await stored_all(hub, "honest"), "honest")
    assert honest[:KILL_AFTER] == list(range(1, KILL_AFTER + 1)), "an acked honest record was lost"
    assert honest == list(range(1, len(honest) + 1)), "the honest producer's records stored with a gap or twice"
    print(f"flooders' acks still in their sockets: {sum(1 for a in flooder_acks if a)} of {KILL_FLOODERS}")
    for t in range(10):
        records = await stored_all(hub, f"kill-{t}")
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        for i in range(t, KILL_FLOODERS, 10):
            mine = in_producer_order(records, f"p{i:04d}")
            assert mine == list(range(1, len(mine) + 1)), f"p{i:04d}: stored with a gap or twice"
            assert len(mine) >= flooder_acks[i], f"p{i:04d} was acked {flooder_acks[i]} but only {len(mine)} are stored"


# --- 4. many producers on one task at once; acks coalesced ---------------------------

ONE_TASK_PRODUCERS = 200
ONE_TASK_FRAMES = 30


async def test_many_producers_on_one_task_get_contiguous_seqs_and_coalesced_acks(hubs: HubFactory) -> None:
    """200 connections, each its own producer, all on one task, 30 one-record frames
    each sent while a commit cannot happen: once it can, the task's seqs are 1..6000
    without hole or double, each producer's records in its own order, and each
    connection gets a handful of acks, not one per frame."""
    hub = await hubs.astart()
    flooders = await open_many(hub.port, ONE_TASK_PRODUCERS)
    try:
        async with holding(SQLITE_HOLDER, str(hub.db_path)) as holder:
            with trio.fail_after(PATIENCE):
                async with trio.open_nursery() as nursery:
                    for i, c in enumerate(flooders):
                        nursery.start_soon(c.send, frames_blob("one", f"p{i:04d}", 1, ONE_TASK_FRAMES)[0])
                # Let the hub read what it will while the writer is stuck (it stops
                # reading each connection a few frames in: that is its backpressure).
                await settled(hub, "keruta_frames_received_total")
            await holder.release()
        per_connection: list[int] = []
        with trio.fail_after(PATIENCE):
            for i, c in enumerate(flooders):
                acks = await read_acks(c, "one", f"p{i:04d}", ONE_TASK_FRAMES)
                assert acks[-1] == ONE_TASK_FRAMES
                per_connection.append(len(acks))
    finally:
        await close_all(flooders)
    frames = ONE_TASK_PRODUCERS * ONE_TASK_FRAMES
    print(f"{sum(per_connection)} ack frames for {frames} frames, the most on one connection {max(per_connection)}")
    assert sum(per_connection) <= frames // 5, f"{sum(per_connection)} acks for {frames} frames: not coalesced"
    assert max(per_connection) <= ONE_TASK_FRAMES // 3, per_connection
    records = await stored_all(hub, "one")
    assert_exactly_once(
        records, [f"p{i:04d} line {s}" for i in range(ONE_TASK_PRODUCERS) for s in range(1, ONE_TASK_FRAMES + 1)]
    )
    for i in range(ONE_TASK_PRODUCERS):
        assert in_producer_order(records, f"p{i:04d}") == list(range(1, ONE_TASK_FRAMES + 1))


# --- 5. a thousand frames, nothing read: a few acks, the last exactly right -----------


async def test_a_thousand_frames_unread_get_few_acks_and_the_last_covers_only_what_was_stored(
    hubs: HubFactory,
) -> None:
    """One client sends 1,000 one-record frames (seqs 1..990, then 995..1004, ahead of
    what the hub has: SEQ_GAP) without reading. When it reads: far fewer than 1,000
    ack frames, the last one exactly 990 (never past the refused frames), the refusal
    said with resumeFrom 991, and exactly 990 records stored."""
    hub = await hubs.astart()
    client = await open_flooder(hub.port)
    try:
        blob = frames_blob("unread", "solo", 1, 990)[0] + frames_blob("unread", "solo", 995, 1004)[0]
        with trio.fail_after(PATIENCE):
            await client.send(blob)
            # Give the hub time to commit the lot while nobody reads.
            while (await metrics(hub))["keruta_records_ingested_total"] < 990:
                await trio.sleep(0.05)
            await trio.sleep(0.5)
        replies: list[dict[str, Any]] = []
        with trio.fail_after(PATIENCE):
            while not any(r["type"] == "ack" and r["seq"] == 990 for r in replies):
                opcode, payload = await client.frame()
                if opcode == 0x1:
                    replies.append(orjson.loads(payload))
        with trio.move_on_after(1.0):
            while True:
                opcode, payload = await client.frame()
                if opcode == 0x1:
                    replies.append(orjson.loads(payload))
    finally:
        await trio.aclose_forcefully(client.stream)
    acks = [r["seq"] for r in replies if r["type"] == "ack"]
    gaps = [r for r in replies if r["type"] == "error"]
    print(f"{len(acks)} acks, {len(gaps)} errors for 1000 frames")
    assert acks == sorted(acks) and acks[-1] == 990, f"the last ack is {acks[-1]}, 990 were stored"
    assert len(acks) <= 500, f"{len(acks)} ack frames for 1000 frames: not coalesced"
    assert gaps and all(g["code"] == "SEQ_GAP" and g["resumeFrom"] == 991 for g in gaps), gaps
    assert len(replies) == len(acks) + len(gaps), replies
    records = await stored_all(hub, "unread")
    assert in_producer_order(records, "solo") == list(range(1, 991))
    assert [r["seq"] for r in records] == list(range(1, 991))


# --- 6. half a frame, then silence -----------------------------------------------------

HALF_STALLERS = 500
HALF_CLAIMED = 1 * MiB
HALF_SENT = 128 * 1024


async def half_frame_flood(hubs: HubFactory, *args: str) -> int:
    """500 connections each announce a 1 MiB text frame, send 128 KiB of it and stall
    (64 MB in all), beside an honest producer and viewer, who must be served; once
    the stallers go, nothing of theirs is stored and their connections are freed.
    The hub's RSS growth meanwhile."""
    hub = await hubs.astart(*args)
    pid = hub_pid(hub)
    stallers = await open_many(hub.port, HALF_STALLERS, sndbuf=None)
    watch = Peak(pid)
    head = bytes((0x81, 0x80 | 127)) + HALF_CLAIMED.to_bytes(8, "big") + b"\0\0\0\0"
    # The start of a valid `logs` frame, padded with the message it never finishes.
    start = b'{"type":"logs","taskId":"half","records":[{"seq":1,"timestamp":"' + TS.encode() + b'","source":"stdout","level":"INFO","message":"'
    part = head + start + b"x" * (HALF_SENT - len(start))
    acked: list[int] = []
    seen: list[int] = []
    try:
        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.run)
                async with trio.open_nursery() as fleet:
                    for c in stallers:
                        fleet.start_soon(c.send, part)
                await trio.sleep(1.0)  # the hub has read what it will of them
                async with trio.open_nursery() as honest:
                    honest.start_soon(honest_viewer, hub, "honest", 50, seen)
                    honest.start_soon(honest_producer, hub, "honest", 50, acked)
                watch.sample()
                nursery.cancel_scope.cancel()
        print(f"hub grew {watch.growth >> 20} MiB for {HALF_STALLERS * HALF_SENT >> 20} MiB of half frames")
        assert acked == list(range(1, 51)) and seen == list(range(1, 51)), "the honest pair was not served"
    finally:
        await close_all(stallers)
    with trio.fail_after(PATIENCE):
        while (await metrics(hub))["keruta_websocket_connections"]:
            await trio.sleep(0.05)
    assert await stored_all(hub, "half") == []
    assert "Traceback" not in hub.stderr_text, hub.stderr_text
    return watch.growth


async def test_five_hundred_connections_each_stalled_mid_frame_serve_the_honest_and_store_nothing(
    hubs: HubFactory,
) -> None:
    growth = await half_frame_flood(hubs)
    # At most about twice what they sent: per connection it is bounded by the frame limit.
    assert growth < HALF_STALLERS * HALF_SENT * 2 + 64 * MiB, f"the hub grew {growth >> 20} MiB"


async def test_half_frames_held_across_connections_stay_within_the_ingest_bound(hubs: HubFactory) -> None:
    growth = await half_frame_flood(hubs, "--ingest-queue-bytes", str(1 * MiB))
    assert growth < 1 * MiB + 32 * MiB, f"the hub grew {growth >> 20} MiB holding half frames; its bound is 1 MiB"


# --- 7. many subscribers to many tasks that never read -------------------------------

WATCHERS = 300
WATCHED_TASKS = 100
SUB_BOUND = 256 * 1024


async def test_three_hundred_connections_watching_a_hundred_tasks_each_never_reading_are_cut_off(
    hubs: HubFactory,
) -> None:
    """300 connections each subscribe to 100 tasks and never read. A producer then
    writes 40,000 records of 500 bytes over those tasks: every watcher is cut off
    as SLOW_CONSUMER with its queue within the byte bound, the hub's growth stays
    within what 300 such queues may hold, the producer is acked throughout and an
    honest viewer that reads gets every record of its task."""
    hub = await hubs.astart("--subscriber-queue-bytes", str(SUB_BOUND))
    pid = hub_pid(hub)
    watchers = await open_many(hub.port, WATCHERS)
    tasks = [f"w{t:03d}" for t in range(WATCHED_TASKS)]
    subscribe = b"".join(ws_frame(orjson.dumps({"type": "subscribe", "taskId": t})) for t in tasks)
    watch = Peak(pid)
    seen: list[int] = []
    rounds, batch = 20, 20
    try:
        with trio.fail_after(PATIENCE * 2):
            async with trio.open_nursery() as fleet:
                for c in watchers:
                    fleet.start_soon(c.send, subscribe)
            while (await metrics(hub))["keruta_subscribers"] < WATCHERS * WATCHED_TASKS:
                await trio.sleep(0.1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.run)
                async with trio.open_nursery() as honest:
                    honest.start_soon(honest_viewer, hub, tasks[0], rounds * batch, seen)
                    await trio.sleep(0.5)  # subscribed before the first record
                    async with hub.ws() as producer:
                        line = "y" * 480
                        for r in range(rounds):
                            for t in tasks:
                                first = r * batch + 1
                                records = [make_record(t, s, f"{s} {line}") for s in range(first, first + batch)]
                                await producer.send(encode_bytes(LogsFrame(t, records, "writer")).decode())
                            for t in tasks:
                                await producer.wait_ack(t, (r + 1) * batch)
                nursery.cancel_scope.cancel()
            m = await metrics(hub)
    finally:
        frames: list[tuple[int, bytes]] = []
        if watchers:
            with trio.move_on_after(10):
                try:
                    while True:
                        frames.append(await watchers[0].frame())
                except (EOFError, *GONE):
                    pass
        await close_all(watchers)
    print(f"hub grew {watch.growth >> 20} MiB; slow consumers {m['keruta_slow_consumers_total']}; "
          f"queue peak {m['keruta_subscriber_queue_bytes_peak']}")
    assert seen == list(range(1, rounds * batch + 1)), "the honest viewer lost records"
    assert m["keruta_slow_consumers_total"] >= WATCHERS, m
    assert m["keruta_subscriber_queue_bytes_peak"] <= SUB_BOUND, m
    # Generous: each cut-off watcher costs the hub about three times its queue's
    # bound at the peak (its frames in flight, the allocator's slack), the same
    # whether 20 MB or 40 MB are written: bounded, not growing with the volume.
    assert watch.growth < WATCHERS * SUB_BOUND * 4, f"the hub grew {watch.growth >> 20} MiB"
    errors = [orjson.loads(p) for op, p in frames if op == 0x1 and orjson.loads(p)["type"] == "error"]
    assert errors and errors[-1]["code"] == "SLOW_CONSUMER", errors
    closes = [int.from_bytes(p[:2], "big") for op, p in frames if op == 0x8]
    assert closes == [1013], closes
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


# --- 8. a real agent printing 200,000 lines at a hub that cannot commit -----------------

AGENT_LINES = 200_000


async def test_an_agent_printing_200000_lines_at_a_locked_hub_batches_stays_small_and_stores_each_once(
    hubs: HubFactory, tmp_path: Path
) -> None:
    """`keruta-agent run` of a command printing 200,000 short lines as fast as it can,
    while another process holds SQLite's write lock for 4 s: the agent sends few,
    full frames (not one a line), its memory stays small, and once the lock goes
    every line is stored exactly once."""
    hub = await hubs.astart()
    before = (await metrics(hub)).get("keruta_frames_received_total", 0.0)
    program = f"import sys\nw = sys.stdout.write\nfor i in range({AGENT_LINES}):\n    w(f'l{{i}}\\n')\n"
    args = run_args(hub.url, "agent-flood", tmp_path / "spool", "--quiet") + [sys.executable, "-c", program]
    async with holding(SQLITE_HOLDER, str(hub.db_path)) as holder:
        async with agent(args, env=agent_env()) as a:
            watch = Peak(a.process.pid)
            with trio.fail_after(PATIENCE * 2):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch.run)
                    await trio.sleep(4.0)
                    await holder.release()
                    code = await a.wait(PATIENCE * 2)
                    nursery.cancel_scope.cancel()
    assert code == 0, a.stderr_text
    frames = (await metrics(hub))["keruta_frames_received_total"] - before
    print(f"agent: {frames:.0f} frames for {AGENT_LINES} lines, RSS {watch.start >> 20} -> peak {watch.peak >> 20} MiB")
    assert frames <= AGENT_LINES // 100, f"{frames} frames for {AGENT_LINES} lines: the agent did not batch"
    assert watch.peak < 200 * MiB, f"the agent reached {watch.peak >> 20} MiB"
    async with hub.http(timeout=PATIENCE) as client:
        raw = (await client.get("/api/v1/tasks/agent-flood/logs/raw")).text
        state = (await client.get("/api/v1/tasks/agent-flood")).json()
    assert raw.splitlines() == [f"l{i}" for i in range(AGENT_LINES)], "a line lost, doubled or out of order"
    assert state["totalLogs"] == AGENT_LINES and state["state"] == "succeeded", state
