"""hub/ws/connection.py on its own: the Trio driver of one WebSocket connection,
fed by an in-memory socket that has just the three calls it makes (receive,
send, close), with a real SQLite store and the real writer and broadcaster.
Slow consumers run on the autojump clock: no real waits."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from hub.auth import Role
from hub.config import HubConfig
from hub.deps import ConnectionDeps
from hub.hypercorn_patches import OVERSIZED
from hub.store.sqlite import SQLiteStore
from hub.ws.connection import CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN_LATER, Connection
from tests.hubclient import batch_frames, encode_record, logs_frame, make_record
from tests.hubparts import hub_parts

TASK = "t"
Frame = dict[str, Any]


class MemoryWebSocket:
    """hub.ws.connection.WebSocket over two memory channels. The hub's sends
    wait once `buffered` frames are unread, as on a socket whose buffers are
    full, so a client that stops reading stalls the connection's sender."""

    def __init__(self, buffered: float) -> None:
        self._to_hub, self._from_client = trio.open_memory_channel[str | bytes](math.inf)
        self._to_client, self._from_hub = trio.open_memory_channel[str](buffered)
        self.close_code: int | None = None
        self.connection: Connection | None = None
        # The connection stopped reading this socket (evicted or shutting down).
        self.unread = trio.Event()
        self.unread_at = math.nan
        self.ended = trio.Event()
        self.ended_at = math.nan

    # --- the hub's side -------------------------------------------------

    async def receive(self) -> str | bytes:
        try:
            return await self._from_client.receive()
        except trio.Cancelled:
            self.unread_at = trio.current_time()
            self.unread.set()
            raise

    async def send(self, data: str) -> None:
        await self._to_client.send(data)

    async def close(self, code: int, reason: str = "") -> None:
        self.close_code = code
        self._to_client.close()

    def dropped(self) -> None:
        """The connection ended: the server drops the socket, closed or not."""
        self._to_client.close()

    # --- the client's side ----------------------------------------------

    def put(self, frame: Frame | str | bytes) -> None:
        self._to_hub.send_nowait(orjson.dumps(frame).decode() if isinstance(frame, dict) else frame)

    def unread_frames(self) -> int:
        """Frames this client sent that the hub has not read yet."""
        return self._from_client.statistics().current_buffer_used

    async def recv(self) -> Frame:
        frame: Frame = orjson.loads(await self._from_hub.receive())
        return frame

    async def recv_type(self, kind: str) -> Frame:
        """The next frame of type `kind`; an error frame instead fails the test."""
        while True:
            frame = await self.recv()
            assert frame["type"] != "error" or kind == "error", frame
            if frame["type"] == kind:
                return frame

    async def drain(self) -> list[Frame]:
        """Every frame until the socket is closed or dropped."""
        return [orjson.loads(payload) async for payload in self._from_hub]

    async def subscribe(self, task: str, from_seq: int | None = None) -> None:
        self.put({"type": "subscribe", "taskId": task, **({} if from_seq is None else {"fromSeq": from_seq})})
        await self.recv_type("subscribed")

    async def wait_ack(self, task: str, seq: int) -> list[int]:
        """The acks of `task` up to `seq`."""
        acks: list[int] = []
        while not acks or acks[-1] < seq:
            frame = await self.recv_type("ack")
            assert frame["taskId"] == task, frame
            acks.append(frame["seq"])
        return acks

    async def records(self, task: str, last: int) -> list[int]:
        """The seqs of `task` in `logs` frames, through `last`."""
        seqs: list[int] = []
        while not seqs or seqs[-1] < last:
            frame = await self.recv_type("logs")
            assert frame["taskId"] == task
            seqs += [r["seq"] for r in frame["records"]]
        return seqs


class Hub:
    """A store, writer and broadcaster, and connections to them in a nursery."""

    def __init__(self, deps: ConnectionDeps, nursery: trio.Nursery) -> None:
        self.deps = deps
        self.nursery = nursery

    def connect(self, role: Role = Role.AGENT, buffered: float = 16) -> MemoryWebSocket:
        ws = MemoryWebSocket(buffered)
        ws.connection = Connection(self.deps, ws, role)

        async def serve() -> None:
            try:
                assert ws.connection is not None
                await ws.connection.run()
            finally:
                ws.ended_at = trio.current_time()
                ws.ended.set()
                ws.dropped()

        self.nursery.start_soon(serve)
        return ws


@asynccontextmanager
async def running(store: SQLiteStore, config: HubConfig | None = None) -> AsyncIterator[Hub]:
    """The hub's parts around `store`. On leaving, the connections still open
    are cancelled (their clients went away) and the writer drains."""
    async with hub_parts(store, config or HubConfig()) as (deps, connections):
        yield Hub(deps, connections)


def padded(task_id: str, seq: int) -> Any:
    return make_record(task_id, seq, f"line {seq} " + "x" * 120)


async def until(condition: Callable[[], bool]) -> None:
    """Polls on the autojump clock, where nothing else is timed yet.

    Not bounded by `fail_after`: the store answers from threads the autojump
    clock does not wait for, so while one runs the clock jumps to the next
    deadline, however far. The waits below have a bound only where no store
    read or write can run meanwhile."""
    while not condition():
        await trio.sleep(0.001)


def live(ws: MemoryWebSocket, task: str) -> Callable[[], bool]:
    def check() -> bool:
        assert ws.connection is not None
        sub = ws.connection.subs.get(task)
        return sub is not None and sub.live

    return check


# --- serving a connection -----------------------------------------------------


async def test_logs_frames_get_acks_and_a_ping_is_answered_meanwhile(sqlite_store: SQLiteStore) -> None:
    async with running(sqlite_store) as hub:
        producer = hub.connect()
        for frame in batch_frames(TASK, 1, 250, 50):
            producer.put(frame)
        producer.put({"type": "ping"})
        frames: list[Frame] = []
        while not frames or frames[-1] != {"type": "ack", "taskId": TASK, "seq": 250}:
            frames.append(await producer.recv())
        assert {"type": "pong"} in frames
        acks = [f["seq"] for f in frames if f["type"] == "ack"]
        assert acks == sorted(set(acks)), "acks only move forward"
        assert await sqlite_store.durable_seq(TASK) == 250
        assert hub.deps.metrics.records_ingested == 250


async def test_subscribe_from_seq_gets_history_then_live_without_gap_or_duplicate(sqlite_store: SQLiteStore) -> None:
    async with running(sqlite_store) as hub:
        producer = hub.connect()
        for frame in batch_frames(TASK, 1, 1200, 100):
            producer.put(frame)
        await producer.wait_ack(TASK, 1200)

        viewer = hub.connect(Role.VIEWER)
        viewer.put({"type": "subscribe", "taskId": TASK, "fromSeq": 300})
        # More is committed while the viewer catches up on 300..1200 (three pages).
        for frame in batch_frames(TASK, 1201, 1600, 50):
            producer.put(frame)
        assert (await viewer.recv())["type"] == "subscribed"
        assert await viewer.records(TASK, 1600) == list(range(300, 1601))
        assert live(viewer, TASK)(), "the subscription went live once caught up"

        # Live from here: each commit reaches it, and a status after the records.
        producer.put(logs_frame(TASK, [make_record(TASK, s) for s in (1601, 1602)]))
        producer.put({"type": "status", "taskId": TASK, "state": "succeeded", "exitCode": 0})
        assert await viewer.records(TASK, 1602) == [1601, 1602]
        assert await viewer.recv() == {"type": "status", "taskId": TASK, "state": "succeeded", "exitCode": 0}


async def test_bad_frames_get_error_frames_and_the_connection_serves_on(sqlite_store: SQLiteStore) -> None:
    async with running(sqlite_store, HubConfig(max_subscriptions=1)) as hub:
        viewer = hub.connect(Role.VIEWER)
        bad: list[tuple[Frame | str | bytes, str]] = [
            ("{not json", "INVALID_MESSAGE_FORMAT"),
            ({"type": "launch"}, "INVALID_MESSAGE_FORMAT"),
            (OVERSIZED, "TOO_LARGE"),  # what hub/hypercorn_patches.py hands on for a frame over the limit
            (b"", "INVALID_MESSAGE_FORMAT"),  # an empty binary message
            (logs_frame(TASK, [make_record(TASK, 1)]), "FORBIDDEN"),  # a viewer may not write
        ]
        for frame, code in bad:
            viewer.put(frame)
            reply = await viewer.recv()
            assert (reply["type"], reply["code"]) == ("error", code), (frame, reply)
        await viewer.subscribe(TASK)
        viewer.put({"type": "subscribe", "taskId": "another"})
        assert (await viewer.recv())["code"] == "TOO_MANY_SUBSCRIPTIONS"

        # The connection still serves: a ping, and the subscription it holds.
        viewer.put({"type": "ping"})
        assert await viewer.recv() == {"type": "pong"}
        producer = hub.connect()
        producer.put(logs_frame(TASK, [make_record(TASK, s) for s in (1, 2, 3)]))
        assert await viewer.records(TASK, 3) == [1, 2, 3]
        assert await sqlite_store.durable_seq(TASK) == 3, "only the good frame was stored"
        assert not viewer.ended.is_set()


async def test_shutdown_acks_what_was_read_then_closes_going_away(sqlite_store: SQLiteStore) -> None:
    async with running(sqlite_store) as hub:
        producer = hub.connect()
        viewer = hub.connect(Role.VIEWER)
        await viewer.subscribe(TASK)
        for frame in batch_frames(TASK, 1, 400, 100):
            producer.put(frame)
        producer.put({"type": "ping"})
        await producer.recv_type("pong")  # every write frame before it was read
        hub.deps.shutting_down.set()
        frames = await producer.drain()
        assert frames[-1] == {"type": "ack", "taskId": TASK, "seq": 400}, "a write read before the shutdown is acked"
        assert producer.close_code == CLOSE_GOING_AWAY
        assert viewer.close_code == CLOSE_GOING_AWAY
        await viewer.ended.wait()
        await producer.ended.wait()
        assert hub.deps.metrics.connections == 0 and hub.deps.broadcaster.count == 0


# --- slow consumers, on the autojump clock --------------------------------------

# About three live frames of 50 padded records (12 KiB each) fit the byte bound.
SLOW = HubConfig(subscriber_queue=1000, subscriber_queue_bytes=40 * 1024)


async def stalled_and_fast(hub: Hub) -> tuple[MemoryWebSocket, MemoryWebSocket]:
    """Two viewers live on TASK: one that stops reading once two frames are
    in its socket, and one that reads."""
    stalled = hub.connect(Role.VIEWER, buffered=2)
    fast = hub.connect(Role.VIEWER)
    stalled.put({"type": "subscribe", "taskId": TASK})
    await fast.subscribe(TASK)
    await until(lambda: live(stalled, TASK)() and live(fast, TASK)())
    return stalled, fast


async def write_one_by_one(producer: MemoryWebSocket, last: int, batch: int) -> None:
    """One commit per frame: each live frame is small next to the byte bound."""
    for start in range(1, last + 1, batch):
        producer.put(logs_frame(TASK, [padded(TASK, s) for s in range(start, start + batch)]))
        await producer.wait_ack(TASK, start + batch - 1)


def resume_point(frames: list[Frame]) -> tuple[list[int], Frame]:
    """The seqs a cut-off subscriber got, and the error frame it got last."""
    assert frames[0]["type"] == "subscribed", frames[0]
    seqs = [r["seq"] for f in frames if f["type"] == "logs" for r in f["records"]]
    assert [f["type"] for f in frames[1:]] == ["logs"] * (len(frames) - 2) + ["error"], frames
    return seqs, frames[-1]


async def test_a_live_subscriber_that_stops_reading_is_cut_off_by_the_byte_bound(
    sqlite_store: SQLiteStore, autojump_clock: trio.testing.MockClock
) -> None:
    total = 500
    async with running(sqlite_store, SLOW) as hub:
        stalled, fast = await stalled_and_fast(hub)
        got: list[list[int]] = []
        stalled_frames: list[Frame] = []

        async def read_fast() -> None:
            got.append(await fast.records(TASK, total))

        async def stalled_reads_again() -> None:
            # It reads again the moment the hub gives up on it (before its close timeout).
            await stalled.unread.wait()
            stalled_frames.extend(await stalled.drain())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_fast)
            nursery.start_soon(stalled_reads_again)
            # 10 frames: far fewer than its 1000, so bytes cut it off, with frames
            # queued that never go out (the resume point counts only what did).
            await write_one_by_one(hub.connect(), total, 50)
            assert stalled.connection is not None and stalled.connection.closing == "SLOW_CONSUMER"
        assert got[-1] == list(range(1, total + 1)), "the subscriber that reads lost or doubled records"
        seqs, error = resume_point(stalled_frames)
        assert 0 < len(seqs) < total and seqs == list(range(1, len(seqs) + 1))
        assert error["code"] == "SLOW_CONSUMER" and error["resumeFrom"] == len(seqs) + 1, error
        assert stalled.close_code == CLOSE_TRY_AGAIN_LATER
        assert hub.deps.metrics.slow_consumers == 1 and hub.deps.broadcaster.count == 1

        # Resubscribing where it was told to gives the rest.
        again = hub.connect(Role.VIEWER)
        again.put({"type": "subscribe", "taskId": TASK, "fromSeq": error["resumeFrom"]})
        assert await again.records(TASK, total) == list(range(len(seqs) + 1, total + 1))


async def test_a_subscriber_that_never_reads_again_is_dropped_after_the_shutdown_timeout(
    sqlite_store: SQLiteStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(sqlite_store, SLOW) as hub:
        stalled, fast = await stalled_and_fast(hub)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_one_by_one, hub.connect(), 400, 50)
            assert await fast.records(TASK, 400) == list(range(1, 401))
        with trio.fail_after(2 * SLOW.shutdown_timeout):
            await stalled.ended.wait()
        assert stalled.ended_at - stalled.unread_at == pytest.approx(SLOW.shutdown_timeout)
        # Its close frame never went out; what it had not read is a prefix without a gap.
        assert stalled.close_code is None
        frames = await stalled.drain()
        seqs = [r["seq"] for f in frames if f["type"] == "logs" for r in f["records"]]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < 400
        assert hub.deps.metrics.connections == 2 and hub.deps.broadcaster.count == 1


async def test_a_subscriber_catching_up_that_stops_reading_is_cut_off_after_its_patience(
    sqlite_store: SQLiteStore, autojump_clock: trio.testing.MockClock
) -> None:
    total = 1200
    async with running(sqlite_store, SLOW) as hub:
        producer = hub.connect()
        for frame in batch_frames(TASK, 1, total, 200, make=padded):
            producer.put(frame)
        await producer.wait_ack(TASK, total)

        # History frames of 500 records are ~100 KiB: each waits for an empty
        # outbox, and this client takes one frame (`subscribed`) and reads no more.
        stalled = hub.connect(Role.VIEWER, buffered=1)
        started = trio.current_time()
        stalled.put({"type": "subscribe", "taskId": TASK, "fromSeq": 1})
        fast = hub.connect(Role.VIEWER)
        fast.put({"type": "subscribe", "taskId": TASK, "fromSeq": 1})
        await stalled.unread.wait()
        # Nothing else is timed: the clock jumped only to the end of its patience.
        assert stalled.unread_at - started == pytest.approx(SLOW.slow_consumer_after)
        frames = await stalled.drain()
        assert await fast.records(TASK, total) == list(range(1, total + 1))

    seqs, error = resume_point(frames)
    assert 0 < len(seqs) < total and seqs == list(range(1, len(seqs) + 1))
    assert error["code"] == "SLOW_CONSUMER" and error["resumeFrom"] == len(seqs) + 1, error
    assert stalled.close_code == CLOSE_TRY_AGAIN_LATER


# --- replies to a client that never reads them, on the autojump clock -----------

# Room for a few dozen answers (a SEQ_GAP error, a run's status: ~0.25 KiB each).
SMALL_BOUND = HubConfig(subscriber_queue_bytes=16 * 1024)
REFUSED = 2000
RUN = "run-1"


def answered(kind: str, n: int) -> Frame:
    """A write the hub answers with a frame of its own, whatever came before."""
    if kind == "SEQ_GAP":
        # The run's seq 1 never came: every frame of it is refused with SEQ_GAP.
        record = encode_record(make_record(TASK, 2 + n))
        return {"type": "logs", "taskId": TASK, "producer": RUN, "records": [record]}
    # A run's status is answered with its stored status, how an agent knows it is kept.
    return {"type": "status", "taskId": TASK, "producer": RUN, "state": "running"}


@pytest.mark.parametrize("kind", ["SEQ_GAP", "status"])
async def test_a_writer_that_never_reads_its_answers_stops_being_read_and_is_cut_off(
    sqlite_store: SQLiteStore, autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    async with running(sqlite_store, SMALL_BOUND) as hub:
        # Its first answer is taken, then it reads nothing more.
        client = hub.connect(buffered=1)
        connection = client.connection
        assert connection is not None
        for n in range(REFUSED):
            client.put(answered(kind, n))

        def all_read_and_answered() -> bool:
            assert connection is not None
            return client.unread_frames() == 0 and connection.inflight == 0

        await until(lambda: connection.closing is not None or all_read_and_answered())
        # Its answers count against the connection's byte bound: once they
        # fill it the hub stops reading that client, and cuts it off as it
        # cuts off a subscriber that does not read.
        assert connection.closing == "SLOW_CONSUMER", "the hub read every frame and queued every answer"
        assert client.unread_frames() > REFUSED // 2, "the hub read on past its byte bound"
        assert hub.deps.metrics.subscriber_queue_bytes_peak <= SMALL_BOUND.subscriber_queue_bytes
        assert hub.deps.metrics.slow_consumers == 1

        # Reading again, it gets what its socket held, why it was cut off, and the close.
        frames = await client.drain()
        assert len(frames) <= 3, frames
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "SLOW_CONSUMER", frames
        assert client.close_code == CLOSE_TRY_AGAIN_LATER
        await client.ended.wait()
        assert hub.deps.metrics.connections == 0
