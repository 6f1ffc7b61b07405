"""Several hubs on one PostgreSQL database, attacked.

Three hubs A, B and C share one database (README.md "Running several
hubs"): producers on A and B write one task at once (different producer
ids, one producer id from both hubs at once, one producer moving from A to
B mid-run and resending what it is not sure of), viewers on C replay from
seq 1 and follow live; a flood of notices over many tasks with the LISTEN
buffer made tiny so it overflows; C's LISTEN connection terminated
mid-stream; a hub process restarted by SIGTERM while the others write; a
DELETE, a redaction and a cap on one hub while viewers on another replay;
retention on one hub while another appends; verify on one hub while another
appends and a third redacts.

Every case checks what viewers received (each seq once, in order, none
missing, or inside a gap they were sent), that REST answers the same on
every hub, that acks cover only stored records, and that a task beside it
is untouched. Real sockets, real PostgreSQL (KERUTA_TEST_PG_DSN, a database
per test), in-process hubs except where the process is the point.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
from trio_websocket import HandshakeError

from hub.store.chunk import COMPACT_EVERY, compaction_shift
from hub.store.pg_notices import DurableNotices
from hub.store.postgres import PostgresStore
from keruta.timefmt import now_ts
from tests import pgpool
from tests.hubclient import GONE, TEST_DEADLINE, TestHub, Ws, fetch_all, logs_path
from tests.inprocess import InProcessHub, InProcessHubFactory, in_process_hubs
from tests.test_removal_hostile import BEFORE, OLD, RETENTION, SECRET, Watcher, gap_of, summary_of

pytestmark = pytest.mark.pg

PATIENCE = 40.0


# --- helpers ---------------------------------------------------------------------


@pytest.fixture
async def hubs(fresh_pg_url: str) -> AsyncIterator[InProcessHubFactory]:
    """In-process hubs, every one on the test's one database."""
    async with in_process_hubs(lambda: fresh_pg_url, TEST_DEADLINE) as factory:
        yield factory


async def three(hubs: InProcessHubFactory, *args: str) -> tuple[InProcessHub, InProcessHub, InProcessHub]:
    return await hubs.astart(*args), await hubs.astart(*args), await hubs.astart(*args)


def rec(seq: int, message: str, ts: str | None = None) -> dict[str, Any]:
    return {"seq": seq, "timestamp": ts or now_ts(), "source": "stdout" if seq % 7 else "stderr",
            "level": "INFO", "message": message, "lineNumber": seq, "metadata": {}}


def recs(tag: str, first: int, last: int, ts: str | None = None, pad: int = 0) -> list[dict[str, Any]]:
    return [rec(s, f"{tag} {s}" + "." * pad, ts) for s in range(first, last + 1)]


def frame(task: str, producer: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "logs", "taskId": task, "producer": producer, "records": records}


class Producer:
    """A producer's connection: sends frames, follows its acks (by task and
    producer), resends from `resumeFrom` on SEQ_GAP; any other error fails."""

    def __init__(self, ws: Ws, task: str, producer: str) -> None:
        self.ws = ws
        self.task = task
        self.producer = producer
        self.acked = 0
        self.acks: list[int] = []
        self.gaps: list[int] = []
        self.records: dict[int, dict[str, Any]] = {}

    async def send(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.records[r["seq"]] = r
        await self.ws.send(frame(self.task, self.producer, records))

    async def pump(self) -> None:
        """Take one frame from the hub."""
        f = await self.ws.recv()
        if f["type"] == "ack" and f["taskId"] == self.task and f.get("producer") == self.producer:
            assert f["seq"] >= self.acked, f"ack went back: {f} after {self.acked}"
            self.acked = f["seq"]
            self.acks.append(f["seq"])
        elif f["type"] == "error":
            assert f["code"] == "SEQ_GAP", f"{self.producer} on {self.task}: {f}"
            self.gaps.append(f["resumeFrom"])
            top = max(self.records)
            first = f["resumeFrom"]
            for start in range(first, top + 1, 50):
                await self.ws.send(frame(self.task, self.producer,
                                         [self.records[s] for s in range(start, min(start + 50, top + 1))]))

    async def until_acked(self, seq: int) -> None:
        with trio.fail_after(PATIENCE):
            while self.acked < seq:
                await self.pump()


async def produce(hub: Any, task: str, producer: str, records: list[dict[str, Any]], batch: int = 50,
                  out: list[Producer] | None = None, pause: float = 0.0) -> Producer:
    """Every record in frames of `batch`, pipelined, then wait for the last ack."""
    async with hub.ws() as ws:
        p = Producer(ws, task, producer)
        if out is not None:
            out.append(p)
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def reader() -> None:
                while not done.is_set():
                    with trio.move_on_after(0.05):
                        await p.pump()

            nursery.start_soon(reader)
            for start in range(0, len(records), batch):
                await p.send(records[start:start + batch])
                await trio.sleep(pause)
            with trio.fail_after(PATIENCE):
                while p.acked < records[-1]["seq"]:
                    await trio.sleep(0.01)
            done.set()
        return p


class Seen:
    """What one plain viewer got: every `logs` record, checked as it comes."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.records: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.frames: list[Any] = []

    def take(self, f: dict[str, Any]) -> None:
        assert f["type"] != "error", f"viewer of {self.task}: {f}"
        if f["type"] == "logs":
            assert f["taskId"] == self.task, f
            self.frames.append((f["records"][0]["seq"], f["records"][-1]["seq"]) if f["records"] else ())
            for r in f["records"]:
                if self.records:
                    assert r["seq"] > self.records[-1]["seq"], (
                        f"viewer of {self.task}: seq {r['seq']} after {self.records[-1]['seq']} "
                        f"(doubled or out of order); frames {self.frames}")
                self.records.append(r)
        elif f["type"] == "status":
            self.statuses.append(f)

    @property
    def seqs(self) -> list[int]:
        return [r["seq"] for r in self.records]

    @property
    def top(self) -> int:
        return self.records[-1]["seq"] if self.records else 0


async def follow(ws: Ws, seen: Seen | Watcher, enough: Callable[[], bool]) -> None:
    with trio.fail_after(PATIENCE):
        while not enough():
            with trio.move_on_after(0.05):
                seen.take(await ws.recv())


async def view(hub: Any, seen: Seen, last: int, ready: trio.Event | None = None, from_seq: int | None = 1,
               delay: float = 0.0) -> None:
    await trio.sleep(delay)
    async with hub.ws() as ws:
        await ws.subscribe(seen.task, from_seq=from_seq)
        if ready is not None:
            ready.set()
        await follow(ws, seen, lambda: seen.top >= last)


async def rest(hub: Any, task: str) -> list[dict[str, Any]]:
    async with hub.http() as client:
        return await fetch_all(client, task)


async def same_everywhere(task: str, *hubs: Any) -> list[dict[str, Any]]:
    """REST answers the task's records and its row identically on every hub."""
    answers = [await rest(h, task) for h in hubs]
    for h, answer in zip(hubs[1:], answers[1:], strict=True):
        assert answer == answers[0], f"{h.url} answers {task} differently from {hubs[0].url}"
    rows = []
    for h in hubs:
        async with h.http() as client:
            resp = await client.get(f"/api/v1/tasks/{task}")
            assert resp.status_code == 200, resp.text
            rows.append(resp.json())
            stats = (await client.get(logs_path(task, "/stats"))).json()
        rows[-1]["stats"] = stats
    assert all(r == rows[0] for r in rows), rows
    return answers[0]


def exactly_once(stored: list[dict[str, Any]], *streams: list[str]) -> None:
    """Task seqs 1..n, no hole; each stream's messages stored once, in its order; nothing else."""
    assert [r["seq"] for r in stored] == list(range(1, len(stored) + 1)), "task seqs skip or repeat"
    messages = [r["message"] for r in stored]
    assert len(messages) == len(set(messages)), "a record stored twice"
    expected = [m for s in streams for m in s]
    assert sorted(messages) == sorted(expected), "records lost, or stored that were never sent"
    for s in streams:
        wanted = set(s)
        assert [m for m in messages if m in wanted] == s, "a producer's records out of its order"


def acks_stored(stored: list[dict[str, Any]], producers: list[Producer]) -> None:
    """Every ack a producer got covers only records that are stored."""
    messages = {r["message"] for r in stored}
    for p in producers:
        for seq in range(1, p.acked + 1):
            assert p.records[seq]["message"] in messages, f"{p.producer} acked through {p.acked}, {seq} not stored"


async def bystander(hub: Any, task: str = "bystander") -> list[dict[str, Any]]:
    async with hub.http() as client:
        resp = await client.post(logs_path(task), json=[{"message": f"{task} {i} {SECRET}", "timestamp": OLD}
                                                        for i in range(1, 41)])
        assert resp.status_code == 200, resp.text
        return await fetch_all(client, task)


def no_traceback(*hubs: Any) -> None:
    for h in hubs:
        assert "Traceback" not in h.stderr_text, h.stderr_text


async def pg_rows(url: str, query: str) -> list[Any]:
    out: list[Any] = []

    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            out.extend(await conn.fetch(query))
        finally:
            await conn.close()

    await trio.to_thread.run_sync(pgpool._in_own_thread, run)
    return out


LISTENERS = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
             "AND application_name = 'keruta-hub-listen'")


async def listen_pids(url: str) -> set[int]:
    return {row["pid"] for row in await pg_rows(url, LISTENERS)}


async def new_listen_pid(url: str, others: set[int]) -> int:
    with trio.fail_after(PATIENCE):
        while True:
            fresh = await listen_pids(url) - others
            if fresh:
                assert len(fresh) == 1, fresh
                return fresh.pop()
            await trio.sleep(0.05)


# --- writers on two hubs, viewers on a third ------------------------------------------


async def test_producers_on_two_hubs_viewers_on_a_third(hubs: InProcessHubFactory) -> None:
    """pa writes on A, pb on B, and `twin` sends the very same records on A
    and B at once (one producer id from two hubs): task seqs 1..n without
    hole or double, twin stored once; viewers on C (from seq 1 before the
    writes, from seq 1 midway, and live without fromSeq) get every seq once,
    in order; REST and the task row are the same on every hub."""
    a, b, c = await three(hubs)
    task, n, m = "shared", 900, 600
    other = await bystander(c)
    pa, pb, twin = recs("pa", 1, n), recs("pb", 1, n), recs("twin", 1, m)
    total = 2 * n + m
    early = [Seen(task) for _ in range(3)]
    late = Seen(task)
    live = Seen(task)
    producers: list[Producer] = []
    with trio.fail_after(PATIENCE * 2):
        async with trio.open_nursery() as nursery:
            for s in early:
                ready = trio.Event()
                nursery.start_soon(view, c, s, total, ready)
                await ready.wait()
            ready = trio.Event()
            nursery.start_soon(view, c, live, total, ready, None)
            await ready.wait()
            async with trio.open_nursery() as writers:
                writers.start_soon(produce, a, task, "pa", pa, 30, producers)
                writers.start_soon(produce, b, task, "pb", pb, 30, producers)
                writers.start_soon(produce, a, task, "twin", twin, 40, producers)
                writers.start_soon(produce, b, task, "twin", twin, 25, producers)
                nursery.start_soon(view, c, late, total, None, 1, 0.05)
    for s in [*early, late]:
        assert s.seqs == list(range(1, total + 1)), f"a viewer on C: {len(s.seqs)} records"
    assert live.seqs == list(range(live.seqs[0], total + 1)), "the live viewer skipped or doubled"
    stored = await same_everywhere(task, a, b, c)
    exactly_once(stored, [r["message"] for r in pa], [r["message"] for r in pb], [r["message"] for r in twin])
    assert [r["message"] for r in early[0].records] == [r["message"] for r in stored]
    assert {r["producer"] for r in stored} == {"pa", "pb", "twin"}
    acks_stored(stored, producers)
    assert await same_everywhere("bystander", a, b, c) == other
    no_traceback(a)


async def test_a_producer_moving_from_a_to_b_mid_run_resends_what_it_is_not_sure_of(
    hubs: InProcessHubFactory,
) -> None:
    """`mover` pipelines 1..1200 to A and drops the connection with most of
    it unacknowledged (some still being committed by A), then sends again
    from its last ack + 1 to B while A may still be committing: every record
    stored once, in order; a steady producer on A goes on meanwhile; a
    viewer on C gets everything once, in order."""
    a, b, c = await three(hubs)
    task, n, m = "moving", 2000, 800
    mover, steady = recs("mover", 1, n), recs("steady", 1, m)
    total = n + m
    seen = Seen(task)
    producers: list[Producer] = []
    with trio.fail_after(PATIENCE * 2):
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(view, c, seen, total, ready)
            await ready.wait()
            nursery.start_soon(produce, a, task, "steady", steady, 20, producers, 0.002)
            async with a.ws() as ws:
                first = Producer(ws, task, "mover")
                for start in range(0, 1200, 100):
                    await first.send(mover[start:start + 100])
                # Wait for some acks, not all: the rest is what the mover is not sure of.
                with trio.fail_after(PATIENCE):
                    while first.acked < 100:
                        await first.pump()
            # Gone from A (a clean close: A stores what it read). Resend from the last ack to B.
            async with b.ws() as ws:
                second = Producer(ws, task, "mover")
                producers.extend([first, second])
                second.records.update(first.records)
                for start in range(first.acked, n, 100):
                    await second.send(mover[start:start + 100])
                await second.until_acked(n)
    assert seen.seqs == list(range(1, total + 1))
    stored = await same_everywhere(task, a, b, c)
    exactly_once(stored, [r["message"] for r in mover], [r["message"] for r in steady])
    assert [r["message"] for r in seen.records] == [r["message"] for r in stored]
    acks_stored(stored, producers)
    no_traceback(a)


# --- a flood of notices, the LISTEN buffer overflowing ------------------------------


async def test_a_flood_of_notices_overflowing_the_listen_buffer_loses_nothing(
    hubs: InProcessHubFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers on A and B pour many small commits into 40 tasks (ids up to
    128 characters: the longest notice payload) while viewers on C follow
    every task (ids whose small chunks are never merged within the test: the
    merge races history reads, test_a_history_read_across_a_chunk_merge_...).
    The hubs LISTEN with a buffer of 2 notices (PostgresStore.listen
    wrapped) and take 2 ms over each, so it overflows over and over; the notifier re-reads the
    watermarks after each overflow (README: a lost notice costs latency,
    never data): every viewer gets every seq of its task once, in order."""
    listen = PostgresStore.listen

    def tiny_listen(self: PostgresStore, *, buffer: int = 1024, ping_interval: float | None = None,
                    ignore_own: bool = False) -> Any:
        return listen(self, buffer=2, ping_interval=ping_interval, ignore_own=ignore_own)

    overflows: list[int] = []
    anext = DurableNotices.__anext__

    async def counting_anext(self: DurableNotices) -> tuple[str, int] | None:
        notice = await anext(self)
        if notice is None:
            overflows.append(1)
        else:
            # A busy hub: the notifier takes a while over each notice.
            await trio.sleep(0.002)
        return notice

    monkeypatch.setattr(PostgresStore, "listen", tiny_listen)
    monkeypatch.setattr(DurableNotices, "__anext__", counting_anext)
    a, b, c = await three(hubs, "--subscriber-queue", "4096")
    per = 30  # records per producer per task
    tasks = never_compacted(40, 2 * per)
    views = {t: Seen(t) for t in tasks}
    producers: list[Producer] = []

    async def viewer(group: list[str], ready: trio.Event) -> None:
        async with c.ws() as ws:
            for t in group:
                await ws.subscribe(t, from_seq=1)
            ready.set()
            with trio.fail_after(PATIENCE * 2):
                while not all(views[t].top >= 2 * per for t in group):
                    f = await ws.recv()
                    if f["type"] in ("logs", "status", "error"):
                        views[f.get("taskId", group[0])].take(f)

    async def writer(hub: InProcessHub, name: str, group: list[str]) -> None:
        async with hub.ws() as ws:
            ps = {t: Producer(ws, t, name) for t in group}
            producers.extend(ps.values())
            for start in range(1, per + 1, 2):
                for t in group:
                    await ps[t].send(recs(f"{name}@{t[:12]}", start, start + 1))
            with trio.fail_after(PATIENCE * 2):
                while min(p.acked for p in ps.values()) < per:
                    f = await ws.recv()
                    assert f["type"] != "error", f
                    if f["type"] == "ack":
                        ps[f["taskId"]].acked = max(ps[f["taskId"]].acked, f["seq"])

    with trio.fail_after(PATIENCE * 3):
        async with trio.open_nursery() as nursery:
            for i in range(0, len(tasks), 10):
                ready = trio.Event()
                nursery.start_soon(viewer, tasks[i:i + 10], ready)
                await ready.wait()
            for hub, name in ((a, "wa"), (b, "wb")):
                for i in range(0, len(tasks), 20):
                    nursery.start_soon(writer, hub, name, tasks[i:i + 20])
    assert overflows, "the LISTEN buffer never overflowed: the test did not test overflow"
    for t in tasks:
        missing = sorted(set(range(1, 2 * per + 1)) - set(views[t].seqs))
        assert views[t].seqs == list(range(1, 2 * per + 1)), (
            f"viewer of {t[:12]} on C: seqs {missing} never sent; frames {views[t].frames}")
    for t in tasks[::7]:
        stored = await same_everywhere(t, a, b, c)
        exactly_once(stored, [f"wa@{t[:12]} {s}" for s in range(1, per + 1)],
                     [f"wb@{t[:12]} {s}" for s in range(1, per + 1)])
    no_traceback(a)


def never_compacted(count: int, seqs: int) -> list[str]:
    """Task ids, every fifth 128 characters long, whose trailing small chunks
    are not merged while their seqs stay within `seqs` (hub/store/chunk.py)."""
    out: list[str] = []
    i = 0
    while len(out) < count:
        t = (f"flood-{i:04d}" + ("x" * 128 if len(out) % 5 == 0 else ""))[:128]
        i += 1
        shift = compaction_shift(t)
        if (seqs + shift) // COMPACT_EVERY == shift // COMPACT_EVERY:
            out.append(t)
    return out


async def test_a_history_read_across_a_chunk_merge_sends_no_record_twice(
    hubs: InProcessHubFactory, monkeypatch: pytest.MonkeyPatch, fresh_pg_url: str
) -> None:
    """A viewer on C replays a task of 40 one-record chunks; between two of
    its catch-up's chunk reads, A's 64th commit merges the trailing small
    chunks into one (pinned by wrapping the statement runner PostgresStore
    drives its steps with). The viewer must get seqs 1..64 once each, in order."""
    import asyncio

    import hub.store.postgres as pg

    a, b, c = await three(hubs)
    task = next(t for t in (f"merge-{i}" for i in range(10_000)) if compaction_shift(t) == 0)
    async with a.http() as client:
        for i in range(1, 41):
            assert (await client.post(logs_path(task), json={"message": f"m {i}"})).status_code == 200
    merged = {"go": False, "held": False}
    do = pg._do

    async def do_then_wait(conn: Any, op: Any) -> Any:
        answer = await do(conn, op)
        _, sql, args = op
        if ("seq_last > $2 AND seq_first <= $3" in sql and args and args[0] == task and args[1] == 0
                and not merged["held"]):
            merged["held"] = True
            while not merged["go"]:  # on the asyncio side of trio-asyncio: the trio loop runs on
                await asyncio.sleep(0.01)
        return answer

    monkeypatch.setattr(pg, "_do", do_then_wait)
    seen = Seen(task)
    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(view, c, seen, 64)
            while not merged["held"]:
                await trio.sleep(0.01)
            async with a.http() as client:
                for i in range(41, 65):
                    assert (await client.post(logs_path(task), json={"message": f"m {i}"})).status_code == 200
            while len(await pg_rows(fresh_pg_url, f"SELECT 1 FROM keruta_chunks WHERE task_id = '{task}'")) > 2:
                await trio.sleep(0.02)
            merged["go"] = True
    assert seen.seqs == list(range(1, 65))


# --- C's LISTEN connection terminated mid-stream --------------------------------------


async def test_the_listen_connection_of_the_viewers_hub_terminated_mid_stream(
    hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """pg_terminate_backend on C's LISTEN connection (only C's: found as the
    one that appeared when C started), three times while A and B stream:
    C's viewer catches up after each and gets every seq once, in order; a
    viewer on B is not disturbed; C's own writes and REST go on."""
    a, b = await hubs.astart(), await hubs.astart()
    others = await listen_pids(fresh_pg_url)
    while len(others) < 2:
        await trio.sleep(0.05)
        others = await listen_pids(fresh_pg_url)
    c = await hubs.astart("--store-retry-max", "0.5")
    task, n = "listened", 1500
    on_c, on_b = Seen(task), Seen(task)
    producers: list[Producer] = []
    killed: list[int] = []
    ra, rb, rc = recs("ra", 1, n), recs("rb", 1, n), recs("rc", 1, 300)
    total = 2 * n + 300

    async def killer() -> None:
        for _ in range(3):
            await trio.sleep(0.4)
            pid = await new_listen_pid(fresh_pg_url, others)
            await pg_rows(fresh_pg_url, f"SELECT pg_terminate_backend({pid})")
            killed.append(pid)

    with trio.fail_after(PATIENCE * 2):
        async with trio.open_nursery() as nursery:
            for hub, s in ((c, on_c), (b, on_b)):
                ready = trio.Event()
                nursery.start_soon(view, hub, s, total, ready)
                await ready.wait()
            nursery.start_soon(killer)
            nursery.start_soon(produce, a, task, "ra", ra, 10, producers, 0.01)
            nursery.start_soon(produce, b, task, "rb", rb, 10, producers, 0.01)
            nursery.start_soon(produce, c, task, "rc", rc, 5, producers, 0.02)
    assert len(set(killed)) == 3, killed
    assert (await listen_pids(fresh_pg_url)) - others, "C listens again"
    assert on_c.seqs == list(range(1, total + 1))
    assert on_b.seqs == list(range(1, total + 1))
    stored = await same_everywhere(task, a, b, c)
    exactly_once(stored, *[[r["message"] for r in x] for x in (ra, rb, rc)])
    acks_stored(stored, producers)
    no_traceback(a)


# --- a hub process restarted while the others write ------------------------------------


async def test_a_hub_process_sigtermed_and_started_again_while_the_others_write(
    hubs: InProcessHubFactory, fresh_pg_url: str
) -> None:
    """C is a `python -m hub` process; A and B write, a producer writes on C
    and a viewer follows on C. SIGTERM C mid-stream (exit 0, its WebSockets
    closed 1001 after it acknowledged what it read), start it again on the
    same port: the viewer resubscribes from its last seq + 1 and the producer
    resends from its last ack + 1; everything is stored and seen once."""
    a, b = await hubs.astart(), await hubs.astart()
    c = TestHub(fresh_pg_url)
    await c.astart()
    try:
        task, n = "restarted", 1500
        ra, rb, rc = recs("ra", 1, n), recs("rb", 1, n), recs("rc", 1, 600)
        total = 2 * n + 600
        seen = Seen(task)
        producers: list[Producer] = []
        restarted = trio.Event()
        exit_codes: list[int] = []

        async def viewer() -> None:
            with trio.fail_after(PATIENCE * 2):
                while seen.top < total:
                    try:
                        async with c.ws() as ws:
                            await ws.subscribe(task, from_seq=seen.top + 1)
                            await follow(ws, seen, lambda: seen.top >= total)
                    except (*GONE, HandshakeError):
                        await trio.sleep(0.1)

        async def producer_on_c() -> None:
            acked = 0
            with trio.fail_after(PATIENCE * 2):
                while acked < len(rc):
                    try:
                        async with c.ws() as ws:
                            p = Producer(ws, task, "rc")
                            p.acked = acked
                            p.records.update((r["seq"], r) for r in rc)
                            producers.append(p)
                            for start in range(acked, len(rc), 10):
                                await p.send(rc[start:start + 10])
                                await trio.sleep(0.01)
                            await p.until_acked(len(rc))
                    except (*GONE, HandshakeError):
                        await trio.sleep(0.1)
                    acked = max(acked, *(p.acked for p in producers if p.producer == "rc"))

        async def restarter() -> None:
            await trio.sleep(0.8)
            exit_codes.append(await c.aterminate())
            await c.arestart()
            restarted.set()

        with trio.fail_after(PATIENCE * 2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(viewer)
                nursery.start_soon(producer_on_c)
                nursery.start_soon(restarter)
                nursery.start_soon(produce, a, task, "ra", ra, 10, producers, 0.005)
                nursery.start_soon(produce, b, task, "rb", rb, 10, producers, 0.005)
        assert restarted.is_set() and exit_codes == [0], (exit_codes, c.stderr_text)
        assert seen.seqs == list(range(1, total + 1))
        stored = await same_everywhere(task, a, b, c)
        exactly_once(stored, *[[r["message"] for r in x] for x in (ra, rb, rc)])
        assert [r["message"] for r in seen.records] == [r["message"] for r in stored]
        acks_stored(stored, producers)
        no_traceback(a, c)
    finally:
        c.stop()


# --- removal on one hub while viewers on another replay ---------------------------------


def covered(watcher: Watcher) -> set[int]:
    return {s for g in watcher.gaps.values() for s in range(g["fromSeq"], g["toSeq"] + 1)}


async def replaying(hub: Any, watcher: Watcher, until: trio.Event, last: int, delay: float) -> None:
    await trio.sleep(delay)
    async with hub.ws() as ws:
        await ws.subscribe(watcher.task, from_seq=1)
        with trio.fail_after(PATIENCE):
            while not (until.is_set() and watcher.top >= last):
                with trio.move_on_after(0.05):
                    watcher.take(await ws.recv())
            # Whatever the last step sent has arrived by now.
            with trio.move_on_after(0.3):
                while True:
                    watcher.take(await ws.recv())


async def test_delete_before_on_a_while_viewers_on_c_replay(hubs: InProcessHubFactory) -> None:
    """An admin's DELETE ?before= on A over a long old task while B appends
    new lines and viewers on C replay it from seq 1: each viewer gets every
    seq once, as a line or inside the `deleted` gap it was sent (README
    "Gaps": live viewers get a DELETE's gap at once), and no old line after
    that gap; REST is the same everywhere."""
    a, b, c = await three(hubs)
    task = "purged"
    other = await bystander(b)
    old = [dict(r, timestamp=f"2020-01-01T00:{r['seq'] // 60 % 60:02d}:{r['seq'] % 60:02d}.000000Z")
           for r in recs("old", 1, 3600, pad=40)]
    new = recs("new", 1, 600)
    await produce(a, task, "run-old", old, 100)
    watchers = [Watcher(task) for _ in range(4)]
    done = trio.Event()
    producers: list[Producer] = []
    total = len(old) + len(new)

    async def deleter() -> None:
        await trio.sleep(0.02)
        async with a.http() as client:
            resp = await client.delete(logs_path(task), params={"before": BEFORE})
        assert resp.status_code == 200 and resp.json() == {"deletedCount": len(old)}, resp.text

    async def appender() -> None:
        await produce(b, task, "run-new", new, 20, producers, 0.002)

    with trio.fail_after(PATIENCE * 2):
        async with trio.open_nursery() as nursery:
            for w, delay in zip(watchers, (0, 0.01, 0.05, 0.2), strict=True):
                nursery.start_soon(replaying, c, w, done, total, delay)
            async with trio.open_nursery() as work:
                work.start_soon(deleter)
                work.start_soon(appender)
            done.set()
    stored = await same_everywhere(task, a, b, c)
    gap = gap_of(stored[0])
    assert gap is not None and (gap["reason"], gap["fromSeq"], gap["toSeq"]) == ("deleted", 1, len(old))
    assert [r["message"] for r in stored[1:]] == [r["message"] for r in new]
    acks_stored([*stored, *old], producers)
    for w in watchers:
        missed = sorted(set(range(1, total + 1)) - set(w.lines) - covered(w))
        assert missed == [], (f"a viewer on C: seqs {missed[:3]}..{missed[-3:]} ({len(missed)}) neither sent "
                              f"nor in a gap sent; gaps {list(w.gaps)}")
        assert w.after_gap == [], f"old lines sent after the gap that says they went: {w.after_gap[:3]}"
    assert await same_everywhere("bystander", a, b, c) == other


async def test_redaction_on_a_while_viewers_on_c_replay_and_b_appends(hubs: InProcessHubFactory) -> None:
    """A redaction on A while B appends and viewers on C replay from seq 1:
    no viewer ends holding the secret (each record that held it is either
    sent after the redaction or named in a `redacted` frame, README "Taking a
    secret back out"); nothing sent twice or out of order; REST is the same
    everywhere and holds the secret nowhere; the bystander keeps its own."""
    a, b, c = await three(hubs)
    task = "leaky"
    other = await bystander(b)
    base = [dict(r, message=f"{r['message']} {SECRET}" if r["seq"] % 3 == 0 else r["message"])
            for r in recs("s", 1, 4000, pad=150)]
    more = recs("late", 1, 400)
    await produce(a, task, "run-s", base, 250)
    watchers = [Watcher(task) for _ in range(4)]
    done = trio.Event()
    total = len(base) + len(more) + 1
    answers: list[dict[str, Any]] = []

    async def redactor() -> None:
        await trio.sleep(0.03)
        async with a.http() as client:
            resp = await client.post(f"/api/v1/tasks/{task}/redact", json={"values": [SECRET]})
        assert resp.status_code == 200, resp.text
        answers.append(resp.json())

    with trio.fail_after(PATIENCE * 2):
        async with trio.open_nursery() as nursery:
            for w, delay in zip(watchers, (0, 0.01, 0.05, 0.3), strict=True):
                nursery.start_soon(replaying, c, w, done, total, delay)
            async with trio.open_nursery() as work:
                work.start_soon(redactor)
                work.start_soon(produce, b, task, "run-late", more, 20, None, 0.002)
            done.set()
    (answer,) = answers
    assert answer["redactedRecords"] == len(base) // 3
    stored = await same_everywhere(task, a, b, c)
    assert not [r["seq"] for r in stored if SECRET in json.dumps(r)]
    assert len(stored) == total
    for w in watchers:
        assert sorted(set(range(1, total + 1)) - set(w.lines) - set(w.held)) == []
        holding = sorted(s for s, r in w.held.items() if SECRET in json.dumps(r))
        assert holding == [], (f"a viewer on C still holds the secret in {len(holding)} records "
                               f"({holding[:5]}...): no `redacted` frame reached it")
    assert await same_everywhere("bystander", a, b, c) == other


async def test_a_cap_cut_on_a_while_a_viewer_on_c_replays(hubs: InProcessHubFactory) -> None:
    """A task capped by A (--max-task-bytes) while its run writes on A and
    viewers on C replay from seq 1: each viewer gets every seq once, as a
    line or inside the `cap` gap it was sent (README "Capping a task": live
    viewers get a cap's gap at once), REST the same everywhere."""
    cap = 48 * 1024
    a = await hubs.astart("--max-task-bytes", str(cap))
    b, c = await hubs.astart(), await hubs.astart()
    task = "capped"
    other = await bystander(c)
    run = recs("cap", 1, 3000, pad=60)
    watchers = [Watcher(task) for _ in range(3)]
    done = trio.Event()
    producers: list[Producer] = []
    with trio.fail_after(PATIENCE * 2):
        async with trio.open_nursery() as nursery:
            for w, delay in zip(watchers, (0, 0.1, 0.3), strict=True):
                nursery.start_soon(replaying, c, w, done, len(run), delay)
            await produce(a, task, "run-c", run, 50, producers, 0.003)
            done.set()
    stored = await same_everywhere(task, a, b, c)
    gaps = [r for r in stored if r.get("kind") == "gap"]
    assert len(gaps) == 1 and gap_of(gaps[0])["reason"] == "cap", gaps  # type: ignore[index]
    acks_stored([*stored, *run], producers)
    for w in watchers:
        missed = sorted(set(range(1, len(run) + 1)) - set(w.lines) - covered(w))
        assert missed == [], (f"a viewer on C: seqs {missed[:3]}..{missed[-3:]} ({len(missed)}) neither sent "
                              f"nor in a gap sent; gaps {[(g['fromSeq'], g['toSeq']) for g in w.gaps.values()]}")
    assert await same_everywhere("bystander", a, b, c) == other


# --- retention on one hub while another appends ------------------------------------------


async def test_retention_on_a_while_b_appends_old_lines(hubs: InProcessHubFactory) -> None:
    """A runs retention every 0.1 s with a horizon of ~2.6 s while B's run
    appends lines stamped in 2020 to a running task: the head goes into one
    `retention` gap, no seq is handed out twice, every record acked is
    stored or accounted in the gap, a viewer on C gets its lines once and
    in order, every record still stored reaches it; REST is the same on
    every hub; a fresh task beside it is untouched."""
    a = await hubs.astart(*RETENTION)
    b, c = await hubs.astart(), await hubs.astart()
    task = "aging"
    async with c.http() as client:
        resp = await client.post(logs_path("fresh"), json=[{"message": f"fresh {i}"} for i in range(20)])
        assert resp.status_code == 200
    fresh = await rest(c, "fresh")
    old = [dict(r, timestamp=f"2020-01-01T00:{r['seq'] // 60 % 60:02d}:{r['seq'] % 60:02d}.000000Z")
           for r in recs("aged", 1, 2000)]
    seen = Seen(task)
    producers: list[Producer] = []

    async def run_on_b() -> None:
        async with b.ws() as ws:
            await ws.send({"type": "status", "taskId": task, "state": "running", "producer": "run-q"})
        await produce(b, task, "run-q", old, 20, producers, 0.01)

    with trio.fail_after(PATIENCE * 2):
        async with trio.open_nursery() as nursery:
            ready = trio.Event()

            async def viewer() -> None:
                async with c.ws() as ws:
                    await ws.subscribe(task, from_seq=1)
                    ready.set()
                    await follow(ws, seen, lambda: seen.top >= len(old))

            nursery.start_soon(viewer)
            await ready.wait()
            await run_on_b()

        async def cut() -> bool:
            stored = await rest(a, task)
            return bool(stored) and gap_of(stored[0]) is not None and gap_of(stored[0])["toSeq"] == len(old)

        while not await cut():
            await trio.sleep(0.05)
    # A's passes go on re-stamping the task meanwhile: stop them, then B and C must agree.
    await a.astop()
    stored = await same_everywhere(task, b, c)
    gap = gap_of(stored[0])
    assert gap is not None and gap["reason"] == "retention" and gap["fromSeq"] == 1, stored[0]
    assert [r["seq"] for r in stored] == sorted({r["seq"] for r in stored})
    accounted = gap["lines"] + len(stored) - 1
    assert accounted == len(old), (gap, len(stored))
    assert seen.top == len(old)
    assert await rest(b, "fresh") == fresh
    no_traceback(a)


# --- verify on one hub while another appends and a third redacts ------------------------


async def test_verify_on_a_while_b_appends_and_c_redacts(hubs: InProcessHubFactory) -> None:
    """A finished run's log (summary sent) holds a secret; C redacts it while
    B appends lines of a REST producer naming itself (no run: it does not
    hold the verdict back) and A is asked `verify` again and again: every
    verdict is `complete` (a redaction under way keeps the verdict from
    before it), and after it all, too, on every hub."""
    a, b, c = await three(hubs)
    task = "verified"
    base = [dict(r, message=f"{r['message']} {SECRET}" if r["seq"] % 4 == 0 else r["message"])
            for r in recs("v", 1, 3000, pad=80)]
    await produce(a, task, "run-v", base, 250)
    async with a.ws() as ws:
        await ws.send(json.dumps({"type": "status", "taskId": task, "state": "succeeded", "exitCode": 0,
                                  "producer": "run-v", "summary": summary_of(base)}))
        with trio.fail_after(PATIENCE):
            while (await ws.recv())["type"] != "status":
                pass
    async with a.http() as client:
        first = (await client.get(f"/api/v1/tasks/{task}/verify")).json()
    assert first["verdict"] == "complete", first
    verdicts: list[str] = []
    done = trio.Event()

    async def verifier() -> None:
        async with a.http() as client:
            while not done.is_set():
                resp = await client.get(f"/api/v1/tasks/{task}/verify")
                assert resp.status_code == 200, resp.text
                verdicts.append(resp.json()["verdict"])
                if resp.json()["verdict"] != "complete":
                    verdicts.append(resp.text)

    async def appender() -> None:
        async with b.http() as client:
            for i in range(1, 301, 10):
                body = [{"producer": "rest-w", "seq": s, "message": f"w {s}"} for s in range(i, i + 10)]
                resp = await client.post(logs_path(task), json=body)
                assert resp.status_code == 200, resp.text

    async def redactor() -> None:
        async with c.http() as client:
            resp = await client.post(f"/api/v1/tasks/{task}/redact", json={"values": [SECRET]})
        assert resp.status_code == 200 and resp.json()["redactedRecords"] == len(base) // 4, resp.text

    with trio.fail_after(PATIENCE * 2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(verifier)
            async with trio.open_nursery() as work:
                work.start_soon(appender)
                work.start_soon(redactor)
            done.set()
    assert verdicts and set(verdicts) == {"complete"}, [v for v in verdicts if v != "complete"][:2]
    for h in (a, b, c):
        async with h.http() as client:
            answer = (await client.get(f"/api/v1/tasks/{task}/verify")).json()
        assert answer["verdict"] == "complete", answer
    stored = await same_everywhere(task, a, b, c)
    assert not [r for r in stored if SECRET in json.dumps(r)]
    assert len([r for r in stored if r.get("producer") == "rest-w"]) == 300
