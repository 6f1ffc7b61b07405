"""Live viewers get a record once it is committed, before it is fsynced
(docs/durability.md): a line a viewer saw is never taken back by a hub SIGKILL,
and acknowledgements still wait for the sync."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from hub.actors.broadcaster import Broadcaster
from hub.actors.writer import Writer, write_within
from hub.messages import StatusChange, WriteOutcome, WriteRequest
from hub.metrics import Metrics
from hub.store.base import Incoming
from hub.store.sqlite import SQLiteStore
from hub.ws.subscription import Outgoing, Subscription
from keruta.timefmt import now_ts
from tests import hubclient
from tests.hubclient import (
    GONE,
    PATIENCE,
    TestHub,
    Ws,
    encode_record,
    fetch_all,
    make_record,
    send_until_gone,
)

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures
hub_process, hub_process_factory = hubclient.hub_process, hubclient.hub_process_factory  # fixtures

PRODUCER = "producer-ws"


def producer_frames(task_id: str, total: int, batch: int) -> list[dict[str, Any]]:
    return [
        {
            "type": "logs",
            "taskId": task_id,
            "producer": PRODUCER,
            "records": [
                encode_record(make_record(task_id, s, f"ws {s}"))
                for s in range(start, min(start + batch, total + 1))
            ],
        }
        for start in range(1, total + 1, batch)
    ]


async def test_a_line_a_viewer_saw_survives_a_hub_sigkill_unchanged(hub_process: TestHub) -> None:
    """Two producers on one task (a WebSocket producer and REST POSTs), so after
    a restart the hub would hand out different seqs to what it resends: a line
    shown before its commit could come back under another seq or not at all."""
    hub = hub_process  # SIGKILL: a process
    task = "seen-then-killed"
    total, batch, kill_at = 15_000, 100, 6_000
    frames = producer_frames(task, total, batch)
    seen: dict[int, str] = {}
    posted: list[str] = []  # REST lines the hub answered 200 for
    killed = trio.Event()

    async def view() -> None:
        # Evicted as a slow consumer (a loaded machine can make this viewer
        # slow), it resubscribes after what it saw, as the viewer page does:
        # otherwise nothing would kill the hub and the POSTs would go on.
        while not killed.is_set():
            try:
                async with hub.ws() as ws:
                    await ws.subscribe(task, from_seq=max(seen, default=0) + 1)
                    while True:
                        frame = await ws.recv()
                        if frame["type"] != "logs":
                            continue
                        for record in frame["records"]:
                            assert record["seq"] not in seen, f"seq {record['seq']} delivered twice"
                            seen[record["seq"]] = record["message"]
                        if len(seen) >= kill_at and not killed.is_set():
                            hub.kill()
                            killed.set()
            except GONE:
                pass

    async def read_acks(ws: Ws) -> None:
        # The producer reads its acks, as an agent does. Unread, they fill
        # trio-websocket's one-message queue and its reader task waits on it
        # for good: once the hub is killed with frames still unread (a reset),
        # closing this connection fails on the close frame, never wakes that
        # task, and the `async with` waits for it until the deadline.
        try:
            while True:
                await ws.recv()
        except GONE:
            pass

    async def post() -> None:
        async with hub.http() as client:
            n = 0
            try:
                while not killed.is_set():
                    n += 1
                    resp = await client.post(hubclient.logs_path(task), json={"message": f"rest {n}"})
                    assert resp.status_code in (200, 201), resp.text
                    posted.append(f"rest {n}")
            except GONE + (httpx.TransportError,):
                pass

    with trio.fail_after(PATIENCE):
        async with hub.ws() as producer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(view)
                nursery.start_soon(send_until_gone, producer, frames)
                nursery.start_soon(read_acks, producer)
                nursery.start_soon(post)
    assert killed.is_set() and len(seen) >= kill_at

    await hub.arestart()
    with trio.fail_after(PATIENCE):
        async with hub.ws() as producer:
            for frame in frames:  # the producer resends what was never acknowledged, and more
                await producer.send(frame)
            await producer.wait_ack(task, total)  # acks count the producer's own seqs
    async with hub.http() as client:
        stored = {r["seq"]: r["message"] for r in await fetch_all(client, task)}
    changed = {seq: (msg, stored.get(seq)) for seq, msg in seen.items() if stored.get(seq) != msg}
    assert not changed, f"{len(changed)} lines a viewer saw are missing or changed: {list(changed.items())[:5]}"
    messages = list(stored.values())
    assert len(messages) == len(set(messages)), "a line is stored twice"
    assert {f"ws {s}" for s in range(1, total + 1)} <= set(messages)
    assert set(posted) <= set(messages), "a POST answered 2xx is missing"


class GatedSync:
    """A real SQLite store whose `sync` waits for a gate: the disk being slow."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.gate = trio.Event()
        self.committed = trio.Event()
        self.syncs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def append(self, items: Any) -> Any:
        # The commit runs in a thread, which autojump_clock does not wait for.
        result = await self.store.append(items)
        self.committed.set()
        return result

    async def sync(self) -> None:
        await self.gate.wait()
        self.syncs += 1
        await self.store.sync()


@pytest.fixture
async def gated(tmp_path: Path) -> Any:
    """(store, inbox, broadcaster) with a writer on a SQLite store whose sync is gated."""
    store = GatedSync(SQLiteStore(tmp_path / "keruta.db"))
    await store.store.open()
    broadcaster = Broadcaster()
    send, recv = trio.open_memory_channel[WriteRequest](64)
    writer = Writer(store, broadcaster, Metrics())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, recv)
        yield store, send, broadcaster
        store.gate.set()
        send.close()
    await store.store.close()


def incoming(task_id: str, message: str) -> Incoming:
    return Incoming(task_id=task_id, seq=None, timestamp=now_ts(), source="stdout", level="INFO", message=message)


async def test_viewers_get_a_commit_before_its_sync_and_answers_wait_for_it(
    gated: Any, autojump_clock: trio.abc.Clock
) -> None:
    store, inbox, broadcaster = gated
    live: list[str] = []

    def offer(out: Outgoing) -> bool:
        live.append(out.payload)
        return True

    sub = Subscription("t", None, None, cursor=0, offer=offer, live=True)
    broadcaster.add(sub)
    answers: list[WriteOutcome] = []
    answered = trio.Event()

    def answer(outcome: WriteOutcome) -> None:
        answers.append(outcome)
        answered.set()

    await inbox.send(WriteRequest(done=answer, items=[incoming("t", "first")]))
    await store.committed.wait()
    await trio.sleep(5)
    assert live and "first" in live[0], "a committed record waits for the disk before viewers see it"
    assert answers == [], "an answer (ack, POST reply) was given before the commit was synced"
    store.gate.set()
    await answered.wait()
    assert [r.message for r in answers[0].records if r] == ["first"]
    assert store.syncs == 1


async def test_a_post_out_of_time_after_its_commit_waits_for_the_answer(
    gated: Any, autojump_clock: trio.abc.Clock
) -> None:
    """Between commit and sync a POST's deadline may pass: the records are stored,
    so the POST must say so (not 503, which would make its retry store them twice)."""
    store, inbox, _ = gated
    result: list[Any] = []

    async def post() -> None:
        result.append(await write_within(inbox, [incoming("t2", "stored late")], 8.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post)
        await store.committed.wait()
        await trio.sleep(20)  # past the POST's deadline, committed but not synced
        assert result == []
        store.gate.set()
    assert result[0] is not None and [r.message for r in result[0].records] == ["stored late"]


async def test_a_status_reaches_viewers_before_its_sync_and_its_answer_waits(
    gated: Any, autojump_clock: trio.abc.Clock
) -> None:
    store, inbox, broadcaster = gated
    live: list[str] = []
    seen = trio.Event()

    def offer(out: Outgoing) -> bool:
        live.append(out.payload)
        seen.set()
        return True

    broadcaster.add(Subscription("t3", None, None, cursor=0, offer=offer, live=True))
    answered = trio.Event()
    answers: list[WriteOutcome] = []

    def answer(outcome: WriteOutcome) -> None:
        answers.append(outcome)
        answered.set()

    await inbox.send(WriteRequest(done=answer, status=StatusChange("t3", "succeeded", 0, "p1")))
    await seen.wait()  # the store runs in worker threads: wait on the event, not the clock
    assert live and '"succeeded"' in live[0], "a committed status waits for the disk before viewers see it"
    assert answers == [], "the status was answered before its commit was synced"
    store.gate.set()
    await answered.wait()
    assert answers[0].task is not None and answers[0].task.state == "succeeded"
    assert answers[0].run_state == ("p1", "succeeded", 0)
