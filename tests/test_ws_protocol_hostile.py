"""Hostile clients at the protocol level: well-formed WebSockets carrying
JSON frames that test every edge of the contract (../shared/CONTRACT.md,
README "WebSocket" and "What the hub accepts", docs/identity.md).

tests/test_listener_hostile.py attacks the bytes; here every frame is a
valid WebSocket message and the attack is in what it says. Each test runs a
real in-process hub on SQLite over real sockets, and checks three things:

- the hub's answer to the attacker: the contract's error code naming the
  field, or the contract's acceptance (an ack in the producer's own seqs), and
  the connection carrying on (the next frames on it are served);
- what is stored, read back over REST: exactly what the contract says, task
  seqs 1..N with no gap, nothing of a refused frame;
- that others are unaffected (`Bystanders`): a subscriber of the attacked task
  from seq 1 sees exactly what is stored, no gap or duplicate, and another
  producer on the same hub keeps getting its acks; no traceback in the hub's log.

`settle` is how a test knows the hub has answered everything sent on a
connection so far without waiting a fixed time: a connection's writes are
answered in the order sent, and its other frames are answered in order too.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed

from keruta import digest
from keruta.limits import MAX_SEQ
from tests import hubclient
from tests.hubclient import (
    PATIENCE,
    Ws,
    drain_until_closed,
    fetch_all,
    open_stalled_ws,
)
from tests.inprocess import InProcessHub, InProcessHubFactory

sqlite_hub_factory = hubclient.sqlite_hub_factory  # fixture

TS = "2026-01-02T03:04:05.000000Z"
SENTINEL = "sentinel"
BYSTANDER_TASK = "bystander"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DROP = object()  # a field to leave out
INVALID = "INVALID_MESSAGE_FORMAT"

# JSON number literals (sent as raw text: orjson cannot write 2**64).
BIG_LITERALS = [
    str(2**53 + 1), str(2**63 - 1), str(2**63), str(2**64), "1e308",
]
NOT_INTEGERS = ["1.5", '"5"', "true"]


@pytest.fixture
async def hub(sqlite_hub_factory: InProcessHubFactory) -> InProcessHub:
    return await sqlite_hub_factory.astart()


# --- frames -------------------------------------------------------------------------


def rec(seq: Any, message: str | None = None, **changes: Any) -> dict[str, Any]:
    """A producer's wire record (its own seq), with `changes` (DROP leaves a field out)."""
    record: dict[str, Any] = {
        "seq": seq, "timestamp": TS, "source": "stdout", "level": "INFO",
        "message": f"line {seq}" if message is None else message,
        "lineNumber": seq if type(seq) is int else 1, "metadata": {},
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not DROP}


def logs(task: str, records: list[Any], producer: Any = DROP) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "logs", "taskId": task, "records": records}
    if producer is not DROP:
        frame["producer"] = producer
    return frame


def with_literal(frame: dict[str, Any], literal: str) -> str:
    """`frame` as JSON text with the string "@@" replaced by a raw JSON literal."""
    text = orjson.dumps(frame).decode()
    assert text.count('"@@"') == 1, text
    return text.replace('"@@"', literal)


# --- talking to the hub -----------------------------------------------------------

_sentinels = itertools.count(1)


async def settle(ws: Ws) -> list[dict[str, Any]]:
    """Every frame the hub sends on `ws` until it has answered all sent before.

    Barriers: a subscribe to a task of its own (frames that are not writes are
    answered in order, through the connection's queue) and a write of a
    producer of its own (writes are answered in the order sent), then a
    second write once the first is acknowledged: acks of one commit come out
    in one burst, in no particular order among themselves, so an earlier
    write's ack may follow the first barrier's. The barriers' own answers are
    left out.
    """
    frames: list[dict[str, Any]] = []
    n = next(_sentinels)
    barrier = f"barrier-{n}"
    await ws.send({"type": "subscribe", "taskId": barrier})
    subscribed = False
    for producer in (f"sentinel-{n}a", f"sentinel-{n}b"):
        await ws.send(logs(SENTINEL, [rec(1, producer)], producer))
        acked = False
        with trio.fail_after(PATIENCE):
            while not (acked and subscribed):
                frame = await ws.recv()
                if frame["type"] == "ack" and frame["taskId"] == SENTINEL and frame.get("producer") == producer:
                    acked = True
                elif frame["type"] == "subscribed" and frame["taskId"] == barrier:
                    subscribed = True
                elif frame["type"] == "error" and frame["code"] == "TOO_MANY_SUBSCRIPTIONS" and not subscribed:
                    raise AssertionError("settle needs a free subscription on the connection")
                else:
                    frames.append(frame)
    await ws.send({"type": "unsubscribe", "taskId": barrier})
    return frames


async def answer(ws: Ws, frame: Any) -> list[dict[str, Any]]:
    """Send one frame (dict, or raw text/bytes) and return everything the hub answers to it."""
    if isinstance(frame, bytes):
        await ws.conn.send_message(frame)
    else:
        await ws.send(frame)
    return await settle(ws)


def errors_of(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == "error"]


def acks_of(frames: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == "ack" and f["taskId"] == task]


def refusal(frames: list[dict[str, Any]], what: str, code: str, mentions: str | None) -> str | None:
    """None if `frames` are exactly one error `code` naming `mentions` and no ack; else what is wrong."""
    errors = errors_of(frames)
    if len(errors) != 1:
        return f"{what}: expected one {code} error, got {frames}"
    if errors[0]["code"] != code:
        return f"{what}: expected {code}, got {errors[0]}"
    if mentions is not None and mentions not in errors[0]["message"]:
        return f"{what}: the error should name {mentions!r}: {errors[0]['message']!r}"
    # A store's refusal may come with an ack of what the producer had stored
    # before (the caller checks how far); a frame refused on sight gets none.
    if code not in ("SEQ_GAP", "SEQ_CONFLICT") and [f for f in frames if f["type"] == "ack"]:
        return f"{what}: a refused frame was acknowledged: {frames}"
    return None


async def stored(hub: InProcessHub, task: str) -> list[dict[str, Any]]:
    """Every record of the task, as REST answers them."""
    async with hub.http() as client:
        return await fetch_all(client, task)


def assert_hub_clean(hub: InProcessHub) -> None:
    assert hub.alive, "the hub stopped serving"
    log = hub.stderr_text
    assert "Traceback" not in log, log
    assert "connection failed" not in log, log


# --- the others, who must not notice -------------------------------------------------


class Watch:
    """A subscriber of one task from seq 1, reading in the background."""

    def __init__(self, ws: Ws, task: str) -> None:
        self.ws = ws
        self.task = task
        self.seqs: list[int] = []
        self.records: dict[int, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.closed = False

    async def run(self) -> None:
        try:
            while True:
                frame = await self.ws.recv()
                if frame["type"] == "logs":
                    assert frame["taskId"] == self.task, frame
                    for record in frame["records"]:
                        self.seqs.append(record["seq"])
                        self.records[record["seq"]] = record
                elif frame["type"] == "error":
                    self.errors.append(frame)
                elif frame["type"] == "status":
                    self.statuses.append(frame)
        except ConnectionClosed:
            self.closed = True

    async def until(self, last: int) -> None:
        with trio.fail_after(PATIENCE):
            while last and (not self.seqs or self.seqs[-1] < last) and not self.closed:
                await trio.sleep(0.01)

    async def sees_exactly(self, records: list[dict[str, Any]]) -> None:
        """What it was sent is `records` (as REST answers them), each once, in order."""
        await self.until(records[-1]["seq"] if records else 0)
        assert not self.errors and not self.closed, (self.errors, self.closed)
        assert self.seqs == [r["seq"] for r in records], (
            f"the subscriber of {self.task} saw seqs {self.seqs}, the store holds {[r['seq'] for r in records]}"
        )
        for r in records:
            seen = self.records[r["seq"]]
            assert (seen["message"], seen.get("producer"), seen["id"]) == (r["message"], r.get("producer"), r["id"])


class Bystanders:
    """A subscriber of the attacked task, and a producer of another task on the same hub."""

    def __init__(self, hub: InProcessHub, task: str, watch: Watch, other: Ws) -> None:
        self.hub = hub
        self.task = task
        self.watch = watch
        self.other = other
        self.sent = 0

    async def write(self, count: int = 5) -> None:
        first = self.sent + 1
        self.sent += count
        await self.other.send(logs(BYSTANDER_TASK, [rec(s) for s in range(first, self.sent + 1)], "steady"))
        with trio.fail_after(PATIENCE):
            while True:
                frame = await self.other.recv()
                assert frame["type"] == "ack", f"the bystander producer got {frame}"
                assert frame.get("producer") == "steady" and frame["taskId"] == BYSTANDER_TASK, frame
                if frame["seq"] == self.sent:
                    break

    async def check(self) -> list[dict[str, Any]]:
        """Everyone else was served as if nothing happened; the attacked task's stored records."""
        await self.write()
        kept = await stored(self.hub, self.task)
        assert [r["seq"] for r in kept] == list(range(1, len(kept) + 1)), "task seqs with a gap"
        await self.watch.sees_exactly(kept)
        theirs = await stored(self.hub, BYSTANDER_TASK)
        assert [(r["seq"], r["message"], r["producer"]) for r in theirs] == [
            (s, f"line {s}", "steady") for s in range(1, self.sent + 1)
        ]
        assert_hub_clean(self.hub)
        return kept


@asynccontextmanager
async def bystanders(hub: InProcessHub, task: str) -> AsyncIterator[Bystanders]:
    async with hub.ws() as watcher, hub.ws() as other, trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await watcher.subscribe(task, from_seq=1)
        watch = Watch(watcher, task)
        nursery.start_soon(watch.run)
        them = Bystanders(hub, task, watch, other)
        await them.write()
        yield them
        nursery.cancel_scope.cancel()


# --- 1. integers at every edge --------------------------------------------------------


async def test_integer_edges_in_record_fields(hub: InProcessHub) -> None:
    """seq: 1..2^53-1, the producer's own; lineNumber: 0..2^53-1; anything else refused by name."""
    task = "ints"
    failures: list[str] = []
    async with bystanders(hub, task) as them, hub.ws() as ws:
        for n, literal in enumerate(["-1", "0", *BIG_LITERALS, *NOT_INTEGERS, "null"]):
            frame = with_literal(logs(task, [rec("@@", "seq edge")], f"seq-{n}"), literal)
            problem = refusal(await answer(ws, frame), f"logs seq {literal}", INVALID, "records[0].seq")
            failures += [problem] if problem else []
            frame = with_literal({"type": "log", **rec("@@", "seq edge"), "taskId": task}, literal)
            problem = refusal(await answer(ws, frame), f"log seq {literal}", INVALID, "seq")
            failures += [problem] if problem else []
        # Past what a double holds: not JSON the hub can read, refused all the same.
        for literal in ("1e400", "1" + "0" * 400):
            frame = with_literal(logs(task, [rec("@@", "seq edge")], "inf"), literal)
            problem = refusal(await answer(ws, frame), f"seq {literal[:8]}...", INVALID, None)
            failures += [problem] if problem else []
        # In range but not the producer's next: its own seq, never a task seq.
        for n, literal in enumerate([str(2**31), str(MAX_SEQ)]):
            frames = await answer(ws, with_literal(logs(task, [rec("@@", "ahead")], f"ahead-{n}"), literal))
            problem = refusal(frames, f"seq {literal} ahead", "SEQ_GAP", literal)
            failures += [problem] if problem else []
            if not problem and errors_of(frames)[0].get("resumeFrom") != 1:
                failures.append(f"seq {literal} ahead: resumeFrom should be 1: {frames}")

        line_numbers: list[int | None] = []
        for literal in ["-1", *BIG_LITERALS, *NOT_INTEGERS, "0", str(2**31), str(MAX_SEQ), "null"]:
            seq = len(line_numbers) + 1
            frame = with_literal(logs(task, [rec(seq, f"lineNumber {literal}", lineNumber="@@")], "ln"), literal)
            frames = await answer(ws, frame)
            value = orjson.loads(literal)
            if value is None or (type(value) is int and 0 <= value <= MAX_SEQ):
                if errors_of(frames) or [a["seq"] for a in acks_of(frames, task)] != [seq]:
                    failures.append(f"lineNumber {literal}: expected ack {seq}, got {frames}")
                line_numbers.append(value)
            else:
                problem = refusal(frames, f"lineNumber {literal}", INVALID, "records[0].lineNumber")
                failures += [problem] if problem else []
        assert not failures, "\n".join(failures)

        kept = await them.check()
    assert [(r["seq"], r["producer"], r["lineNumber"]) for r in kept] == [
        (s, "ln", value) for s, value in enumerate(line_numbers, 1)
    ]


async def test_integer_edges_in_frame_fields(hub: InProcessHub) -> None:
    """fromSeq: 1..2^53-1; exitCode: int32; maxBytes: 1..2^63-1; a refused status creates nothing."""
    failures: list[str] = []
    async with bystanders(hub, "frame-ints") as them, hub.ws() as ws, hub.http() as client:
        for literal in ["-1", "0", *BIG_LITERALS, *NOT_INTEGERS]:
            frame = with_literal({"type": "subscribe", "taskId": "frame-ints", "fromSeq": "@@"}, literal)
            problem = refusal(await answer(ws, frame), f"fromSeq {literal}", INVALID, "fromSeq")
            failures += [problem] if problem else []
        for literal in [str(2**31), str(MAX_SEQ), "null"]:
            frames = await answer(ws, with_literal({"type": "subscribe", "taskId": "watched", "fromSeq": "@@"}, literal))
            if errors_of(frames) or not [f for f in frames if f["type"] == "subscribed"]:
                failures.append(f"fromSeq {literal}: expected subscribed, got {frames}")

        cases = [("exitCode", v, True) for v in ["-1", "0", str(2**31 - 1), str(-(2**31)), "null"]]
        cases += [("exitCode", v, False) for v in [str(2**31), str(-(2**31) - 1), *BIG_LITERALS, *NOT_INTEGERS]]
        cases += [("maxBytes", v, True) for v in [str(2**31), str(2**53 + 1), str(2**63 - 1), "null"]]
        cases += [("maxBytes", v, False) for v in ["-1", "0", str(2**63), str(2**64), "1e308", *NOT_INTEGERS]]
        accepted: dict[str, tuple[str, Any]] = {}
        for n, (field, literal, ok) in enumerate(cases):
            task = f"status-{n}"
            state = "failed" if field == "exitCode" else "running"
            frame = with_literal({"type": "status", "taskId": task, "state": state, "producer": "run", field: "@@"}, literal)
            frames = await answer(ws, frame)
            if not ok:
                problem = refusal(frames, f"{field} {literal}", INVALID, field)
                failures += [problem] if problem else []
                if (await client.get(f"/api/v1/tasks/{task}")).status_code != 404:
                    failures.append(f"{field} {literal}: a refused status created task {task}")
                continue
            value = orjson.loads(literal)
            want = {"type": "status", "taskId": task, "state": state, "producer": "run"}
            if field == "exitCode" and value is not None:
                want["exitCode"] = value
            if frames != [want]:
                failures.append(f"{field} {literal}: expected the run's stored status {want}, got {frames}")
            accepted[task] = (field, value)
        assert not failures, "\n".join(failures)

        for task, (field, value) in accepted.items():
            info = (await client.get(f"/api/v1/tasks/{task}")).json()
            assert info["exitCode"] == (value if field == "exitCode" else None), (task, info)
            if field == "maxBytes":
                # A cap as large as it may be keeps everything.
                frames = await answer(ws, logs(task, [rec(s) for s in (1, 2, 3)], "run"))
                assert [a["seq"] for a in acks_of(frames, task)] == [3], frames
                assert [r["message"] for r in await fetch_all(client, task)] == ["line 1", "line 2", "line 3"]
        await them.check()


# --- producer seqs: ahead, backwards, conflicting -----------------------------------------


async def test_seq_ahead_backwards_and_conflicting(hub: InProcessHub) -> None:
    task = "order"
    async with bystanders(hub, task) as them:
        async with hub.ws() as ws:
            frames = await answer(ws, logs(task, [rec(s) for s in (1, 2, 3)], "p"))
            assert frames == [{"type": "ack", "taskId": task, "seq": 3, "producer": "p"}]

            # Far ahead: SEQ_GAP, resend from the first seq not stored; not acknowledged.
            frames = await answer(ws, logs(task, [rec(10)], "p"))
            assert refusal(frames, "ahead", "SEQ_GAP", None) is None, frames
            assert errors_of(frames)[0]["resumeFrom"] == 4
            assert all(a["seq"] <= 3 for a in acks_of(frames, task)), frames

            # Backwards, the same record: a duplicate, acknowledged (up to what this
            # write carried: hub/actors/writer.py settle), not stored again.
            frames = await answer(ws, logs(task, [rec(2)], "p"))
            assert not errors_of(frames) and [a["seq"] for a in acks_of(frames, task)] == [2], frames

            # Backwards, a different record: SEQ_CONFLICT, never acknowledged, and
            # this connection's acks for the identity stay below it for good.
            frames = await answer(ws, logs(task, [rec(2, "not what p sent")], "p"))
            assert refusal(frames, "conflict", "SEQ_CONFLICT", "seq 2") is None, frames
            frames = await answer(ws, logs(task, [rec(4), rec(5)], "p"))
            assert not errors_of(frames), frames
            assert all(a["seq"] <= 1 for a in acks_of(frames, task)), f"an ack past the conflict: {frames}"

        # Another connection of the same producer: 4 and 5 were stored, so they are duplicates.
        async with hub.ws() as again:
            frames = await answer(again, logs(task, [rec(4), rec(5)], "p"))
            assert not errors_of(frames) and [a["seq"] for a in acks_of(frames, task)] == [5], frames
            # Backwards inside one frame: the repeat is a duplicate of the record just stored.
            frames = await answer(again, logs(task, [rec(6), rec(7), rec(6)], "p"))
            assert not errors_of(frames) and [a["seq"] for a in acks_of(frames, task)] == [7], frames
            # 8, then 10 (a gap), then 9: 8 and 9 follow on, 10 is refused with resumeFrom 10.
            frames = await answer(again, logs(task, [rec(8), rec(10), rec(9)], "p"))
            assert refusal(frames, "gap in a frame", "SEQ_GAP", None) is None, frames
            assert errors_of(frames)[0]["resumeFrom"] == 10, frames
            assert [a["seq"] for a in acks_of(frames, task)] == [9], frames
            # The same identity twice in one frame, differently: the first is stored, the second refused.
            frames = await answer(again, logs(task, [rec(10), rec(10, "changed in flight")], "p"))
            assert refusal(frames, "conflict in a frame", "SEQ_CONFLICT", None) is None, frames
            assert all(a["seq"] <= 9 for a in acks_of(frames, task)), frames

        kept = await them.check()
    assert [(r["seq"], r["message"], r["producer"]) for r in kept] == [(s, f"line {s}", "p") for s in range(1, 11)]


async def test_seq_gap_after_a_conflict_in_the_same_frame_resumes_after_what_is_stored(hub: InProcessHub) -> None:
    task = "gap-after-conflict"
    async with hub.ws() as ws:
        assert await answer(ws, logs(task, [rec(s) for s in (1, 2, 3)], "p")) == [
            {"type": "ack", "taskId": task, "seq": 3, "producer": "p"}
        ]
        frames = await answer(ws, logs(task, [rec(10), rec(2, "changed")], "p"))
        assert {e["code"]: e.get("resumeFrom") for e in errors_of(frames)} == {"SEQ_GAP": 4, "SEQ_CONFLICT": None}
    async with hub.ws() as ws:
        frames = await answer(ws, logs(task, [rec(2, "changed"), rec(10)], "p"))
        gap = [e for e in errors_of(frames) if e["code"] == "SEQ_GAP"]
        assert [e["code"] for e in errors_of(frames)].count("SEQ_CONFLICT") == 1, frames
        assert gap and gap[0]["resumeFrom"] == 4, gap
    assert [r["message"] for r in await stored(hub, task)] == ["line 1", "line 2", "line 3"]


async def test_a_log_frame_naming_a_producer_is_acked_as_stored(hub: InProcessHub) -> None:
    """A `log` frame is one record; whichever producer the hub takes it for, its ack names the one stored."""
    task = "log-producer"
    async with bystanders(hub, task) as them, hub.ws() as ws:
        frames = await answer(ws, {"type": "log", "taskId": task, **rec(1, "named"), "producer": "p"})
        assert not errors_of(frames) and len(acks_of(frames, task)) == 1, frames
        ack = acks_of(frames, task)[0]
        kept = await them.check()
    assert [(r["message"], r["producer"]) for r in kept] == [("named", ack.get("producer", ""))]


# --- producer ids --------------------------------------------------------------------------


async def test_producer_ids(hub: InProcessHub) -> None:
    task = "names"
    refused = [
        "", "x" * 65, "x" * 10_240, "prodüction", "生産者", "emoji😀", "a\nb", "a\x00b", "a\tb", "a\u202eb",
        "with space", "a/b", "~", "~redaction", "~" + "0" * 32, 5, True, ["p"], {"p": 1},
    ]
    failures: list[str] = []
    async with bystanders(hub, task) as them, hub.ws() as ws:
        for producer in refused:
            frames = await answer(ws, logs(task, [rec(1, "refused")], producer))
            problem = refusal(frames, f"producer {str(producer)[:20]!r}", INVALID, "producer")
            failures += [problem] if problem else []
            frame = {"type": "status", "taskId": task, "state": "running", "producer": producer}
            problem = refusal(await answer(ws, frame), f"status producer {str(producer)[:20]!r}", INVALID, "producer")
            failures += [problem] if problem else []
        assert not failures, "\n".join(failures)

        # No producer (or null): the anonymous producer, whose acks name none.
        frames = await answer(ws, logs(task, [rec(1, "anonymous 1")]))
        assert frames == [{"type": "ack", "taskId": task, "seq": 1}]
        frames = await answer(ws, logs(task, [rec(2, "anonymous 2")], None))
        assert frames == [{"type": "ack", "taskId": task, "seq": 2}]
        # The longest id, and one that reads like the hub's own but is a plain client's.
        for producer in ("x" * 64, "redaction", "._:-"):
            frames = await answer(ws, logs(task, [rec(1, producer)], producer))
            assert frames == [{"type": "ack", "taskId": task, "seq": 1, "producer": producer}]

        kept = await them.check()
    assert [(r["message"], r["producer"]) for r in kept] == [
        ("anonymous 1", ""), ("anonymous 2", ""), ("x" * 64, "x" * 64), ("redaction", "redaction"), ("._:-", "._:-"),
    ]


async def test_two_producers_interleaving_on_one_task(hub: InProcessHub) -> None:
    """Each producer acked in its own seqs, the task numbered 1..N with no gap, each producer's order kept."""
    task = "shared"
    plan = {"alpha": (30, 7), "beta": (25, 9)}

    async def produce(ws: Ws, producer: str, frames: int, size: int) -> None:
        for n in range(frames):
            first = n * size + 1
            await ws.send(logs(task, [rec(s, f"{producer} {s}") for s in range(first, first + size)], producer))
            await trio.sleep(0)
        with trio.fail_after(PATIENCE):
            while True:
                frame = await ws.recv()
                assert frame["type"] == "ack" and frame.get("producer") == producer, frame
                if frame["seq"] == frames * size:
                    break

    async with bystanders(hub, task) as them:
        async with hub.ws() as a, hub.ws() as b, hub.ws() as c:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce, a, "alpha", *plan["alpha"])
                nursery.start_soon(produce, b, "beta", *plan["beta"])
                # One connection, two producers: gamma and the anonymous one, alternately.
                for s in range(1, 41):
                    await c.send(logs(task, [rec(s, f"gamma {s}")], "gamma"))
                    await c.send(logs(task, [rec(s, f" {s}")]))
                frames = await settle(c)
            assert not errors_of(frames), frames
            last = {(f.get("producer"), f["seq"]) for f in acks_of(frames, task)}
            assert ("gamma", 40) in last and (None, 40) in last, frames
            assert {f.get("producer") for f in acks_of(frames, task)} == {"gamma", None}
        kept = await them.check()
    total = sum(n * size for n, size in plan.values()) + 80
    assert len(kept) == total
    for producer in ("alpha", "beta", "gamma", ""):
        mine = [r["message"] for r in kept if r["producer"] == producer]
        assert mine == [f"{producer} {s}" for s in range(1, len(mine) + 1)], producer
        assert len(mine) == (plan[producer][0] * plan[producer][1] if producer in plan else 40)


async def test_a_records_own_producer_id_and_task_seq_are_not_the_hubs_to_take(hub: InProcessHub) -> None:
    """A producer names itself on the frame; a record's `producer` is checked and ignored, as its `id` is."""
    task = "forged"
    async with bystanders(hub, task) as them, hub.ws() as ws:
        records = [
            rec(1, "one", producer="forged", id="forged-id", taskId=task),
            rec(2, "two", producer="", id="00000000-0000-0000-0000-000000000000"),
            rec(3, "three", durableSeq=999, totalLogs=0, extra={"x": 1}),
        ]
        assert await answer(ws, logs(task, records, "real")) == [
            {"type": "ack", "taskId": task, "seq": 3, "producer": "real"}
        ]
        # The anonymous producer's record naming a producer is still the anonymous producer's.
        assert await answer(ws, logs(task, [rec(1, "four", producer="real")])) == [
            {"type": "ack", "taskId": task, "seq": 1}
        ]
        # Checked: a record's producer or id that could never be answered is refused.
        failures = [
            refusal(await answer(ws, logs(task, [rec(4, producer="~hub")], "real")), "~hub", INVALID, "producer"),
            refusal(await answer(ws, logs(task, [rec(4, producer=5)], "real")), "5", INVALID, "producer"),
            refusal(await answer(ws, logs(task, [rec(4, id=5)], "real")), "id 5", INVALID, "records[0].id"),
            refusal(await answer(ws, logs(task, [rec(4, taskId="other")], "real")), "other task", INVALID, "taskId"),
        ]
        assert not [f for f in failures if f], failures
        # A client that takes its seq for a task seq (the task holds 4 records) is
        # a new producer sending its seq 5: SEQ_GAP from 1, nothing stored.
        frames = await answer(ws, logs(task, [rec(5, "as if a task seq")], "late"))
        assert refusal(frames, "late", "SEQ_GAP", None) is None and errors_of(frames)[0]["resumeFrom"] == 1
        kept = await them.check()
    assert [(r["seq"], r["message"], r["producer"]) for r in kept] == [
        (1, "one", "real"), (2, "two", "real"), (3, "three", "real"), (4, "four", ""),
    ]
    for r in kept:
        assert UUID.fullmatch(r["id"]) and r["id"] != "00000000-0000-0000-0000-000000000000", r
        assert "durableSeq" not in r and "extra" not in r, r


# --- records ------------------------------------------------------------------------------


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def test_record_fields(hub: InProcessHub) -> None:
    task = "fields"
    # (what, changes to a good record, code or None for stored, a text the error names)
    cases: list[tuple[str, dict[str, Any], str | None, str | None]] = [
        (f"{field} missing", {field: DROP}, INVALID, f"records[0].{field}")
        for field in ("seq", "timestamp", "source", "level", "message")
    ]
    cases += [
        ("message a number", {"message": 5}, INVALID, "records[0].message"),
        ("message null", {"message": None}, INVALID, "records[0].message"),
        ("source a number", {"source": 1}, INVALID, "records[0].source"),
        ("source STDOUT", {"source": "STDOUT"}, INVALID, "records[0].source"),
        ("source empty", {"source": ""}, INVALID, "records[0].source"),
        ("level warn", {"level": "warn"}, INVALID, "records[0].level"),
        ("level WARNING", {"level": "WARNING"}, INVALID, "records[0].level"),
        ("level a list", {"level": ["INFO"]}, INVALID, "records[0].level"),
        ("timestamp a number", {"timestamp": 1_700_000_000}, INVALID, "records[0].timestamp"),
        ("metadata a string", {"metadata": "x"}, INVALID, "records[0].metadata"),
        ("metadata a list", {"metadata": [1]}, INVALID, "records[0].metadata"),
        ("metadata null", {"metadata": None}, INVALID, "records[0].metadata"),
        ("metadata 33 deep", {"metadata": nested(33)}, INVALID, "records[0].metadata"),
        ("metadata over 4 KiB", {"metadata": {"k": "v" * 4096}}, "TOO_LARGE", "records[0].metadata"),
        ("message over 64 KiB", {"message": "m" * (64 * 1024 + 1)}, "TOO_LARGE", "records[0].message"),
        ("message 16Ki 4-byte characters and one more", {"message": "😀" * (16 * 1024) + "x"}, "TOO_LARGE", "message"),
        ("partial a string", {"partial": "yes"}, INVALID, "records[0].partial"),
        ("partial 1", {"partial": 1}, INVALID, "records[0].partial"),
        ("kind unknown", {"kind": "bogus"}, INVALID, "records[0].kind"),
        ("kind a number", {"kind": 5}, INVALID, "records[0].kind"),
        ("kind redaction", {"kind": "redaction"}, INVALID, "records[0].kind"),
        ("kind gap with accounts", {"kind": "gap", "metadata": {"gap": {"accounts": {}}}}, INVALID, "records[0].kind"),
        # Accepted, and stored exactly as sent.
        ("metadata 32 deep", {"metadata": nested(32)}, None, None),
        ("metadata of 4 KiB", {"metadata": {"k": "v" * (4096 - 8)}}, None, None),
        ("message of 64 KiB", {"message": "m" * (64 * 1024)}, None, None),
        ("message with NUL and escapes", {"message": "a\x00b\x1b[31mred\x07\r\u2028\ufeff"}, None, None),
        ("message with astral characters", {"message": "😀 \U0010ffff"}, None, None),
        ("message empty", {"message": ""}, None, None),
        ("an agent's gap", {"kind": "gap", "source": "agent", "level": "WARN", "metadata": {"gap": {"lines": 3}}}, None, None),
        ("kind null", {"kind": None}, None, None),
        ("a section", {"kind": "section_start", "message": "::group::x"}, None, None),
        ("partial", {"partial": True}, None, None),
        ("fields nobody knows", {"colour": "red", "nested": {"a": [1, 2]}}, None, None),
        ("DEBUG on stderr", {"level": "DEBUG", "source": "stderr"}, None, None),
    ]
    failures: list[str] = []
    expected: list[dict[str, Any]] = []
    async with bystanders(hub, task) as them, hub.ws() as ws:
        for what, changes, code, mentions in cases:
            seq = len(expected) + 1
            changed = {**rec(seq + 1, what), **changes}
            pair = [rec(seq, "in a refused frame"), {k: v for k, v in changed.items() if v is not DROP}]
            # A good record first: a refused frame stores none of its records.
            frames = await answer(ws, logs(task, pair, "f"))
            if code is not None:
                problem = refusal(frames, what, code, mentions.replace("[0]", "[1]") if mentions else None)
                failures += [problem] if problem else []
                continue
            if errors_of(frames) or [a["seq"] for a in acks_of(frames, task)] != [seq + 1]:
                failures.append(f"{what}: expected ack {seq + 1}, got {str(frames)[:300]}")
                continue
            expected += pair
        assert not failures, "\n".join(failures)

        # The shape of the records array itself.
        shapes: list[tuple[str, Any, str, str]] = [
            ("records an object", {}, INVALID, "records"),
            ("records null", None, INVALID, "records"),
            ("records a string", "[]", INVALID, "records"),
            ("a record a number", [5], INVALID, "records[0]"),
            ("a record null", [None], INVALID, "records[0]"),
            ("a record a list", [[]], INVALID, "records[0]"),
            ("1001 records", [rec(s) for s in range(1, 1002)], "TOO_LARGE", "records"),
            ("100,000 empty records", [{}] * 100_000, "TOO_LARGE", "records"),
        ]
        for what, records, code, mentions in shapes:
            problem = refusal(await answer(ws, logs(task, records, "f")), what, code, mentions)
            failures += [problem] if problem else []
        assert not failures, "\n".join(failures)
        # An empty batch: nothing to store, nothing refused.
        frames = await answer(ws, logs(task, [], "f"))
        assert not errors_of(frames), frames
        # The most records a frame may hold.
        first = len(expected) + 1
        batch = [rec(s, f"batch {s}") for s in range(first, first + 1000)]
        frames = await answer(ws, logs(task, batch, "f"))
        assert not errors_of(frames) and acks_of(frames, task)[-1]["seq"] == first + 999, str(frames)[:300]
        expected += batch

        kept = await them.check()
    assert len(kept) == len(expected)
    fields = ("message", "source", "level", "lineNumber", "metadata", "timestamp")
    for got, sent in zip(kept, expected, strict=True):
        assert {k: got[k] for k in fields} == {k: sent[k] for k in fields}
        assert got.get("kind") == sent.get("kind") and got.get("partial", False) == sent.get("partial", False)
        assert "colour" not in got and got["producer"] == "f"


async def test_a_lone_surrogate_is_refused_or_replaced_never_stored_as_is(hub: InProcessHub) -> None:
    task = "surrogates"
    async with bystanders(hub, task) as them, hub.ws() as ws:
        for n, escaped in enumerate([r"\ud800", r"a\udfffb", r"\ude00\ud83d"], 1):
            text = orjson.dumps(logs(task, [rec(n, "@@")], "s")).decode().replace('"@@"', f'"{escaped}"')
            frames = await answer(ws, text)
            if errors_of(frames):
                assert refusal(frames, escaped, INVALID, None) is None, frames
                break
            assert [a["seq"] for a in acks_of(frames, task)] == [n], frames
        kept = await them.check()
    # Whatever was taken went in as valid text (the store, the JSON it answers).
    for r in kept:
        r["message"].encode("utf-8")


# --- timestamps ---------------------------------------------------------------------------

REFUSED_TIMES = [
    "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-01-01T24:00:00Z", "0000-01-01T00:00:00Z",
    "10000-01-01T00:00:00Z", "2026-01-01T00:00:00+25:00", "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00", "yesterday", "", "2026-01-01T00:00:00Zjunk",
]
ACCEPTED_TIMES = {
    "2026-01-01T00:00:00Z": "2026-01-01T00:00:00.000000Z",
    "2026-01-01T01:30:00+01:30": "2026-01-01T00:00:00.000000Z",
    "2026-01-01T00:00:00.1Z": "2026-01-01T00:00:00.100000Z",
    "0001-01-01T00:00:00Z": "0001-01-01T00:00:00.000000Z",
    "9999-12-31T23:59:59.999999Z": "9999-12-31T23:59:59.999999Z",
    "2026-01-01T00:00:00-23:59": "2026-01-01T23:59:00.000000Z",
}


async def test_timestamps_outside_rfc3339_utc_years_1_to_9999_are_refused(hub: InProcessHub) -> None:
    task = "times"
    failures: list[str] = []
    async with bystanders(hub, task) as them, hub.ws() as ws:
        for moment in REFUSED_TIMES:
            problem = refusal(await answer(ws, logs(task, [rec(1, timestamp=moment)], "t")), moment, INVALID,
                              "records[0].timestamp")
            failures += [problem] if problem else []
            problem = refusal(await answer(ws, {"type": "log", "taskId": task, **rec(1, timestamp=moment)}),
                              f"log {moment}", INVALID, "timestamp")
            failures += [problem] if problem else []
        for n, moment in enumerate(ACCEPTED_TIMES, 1):
            frames = await answer(ws, logs(task, [rec(n, moment, timestamp=moment)], "t"))
            if errors_of(frames):
                failures.append(f"{moment}: refused: {frames}")
        # A leap second is RFC 3339; refused or stored, it is never stored as an impossible time.
        frames = await answer(ws, logs(task, [rec(len(ACCEPTED_TIMES) + 1, "leap", timestamp="2016-12-31T23:59:60Z")], "t"))
        if errors_of(frames):
            failure = refusal(frames, "leap second", INVALID, "timestamp")
            failures += [failure] if failure else []
        assert not failures, "\n".join(failures)
        kept = await them.check()
    for r in kept:
        assert hubclient.CANONICAL_TS.fullmatch(r["timestamp"]), r
        if r["message"] in ACCEPTED_TIMES:
            assert r["timestamp"] == ACCEPTED_TIMES[r["message"]], r


async def test_timestamps_that_are_not_rfc3339_are_refused(hub: InProcessHub) -> None:
    task = "not-rfc3339"
    not_rfc3339 = [
        "2026-W01-1T00:00:00Z", "20260101T000000Z", "2026-01-01", "2026-01-01T00:00:00",
        "2026-01-01T00:00Z", "2026-01-01T00:00:00,5Z", " 2026-01-01T00:00:00Z ",
    ]
    failures: list[str] = []
    async with hub.ws() as ws:
        for n, moment in enumerate(not_rfc3339):
            problem = refusal(await answer(ws, logs(task, [rec(1, moment, timestamp=moment)], f"t{n}")), repr(moment),
                              INVALID, "records[0].timestamp")
            failures += [problem] if problem else []
        async with hub.http() as client:
            kept = await fetch_all(client, task)
    assert not failures and not kept, "\n".join(failures) + f"\nstored: {[(r['message'], r['timestamp']) for r in kept]}"


async def test_a_lower_case_rfc3339_timestamp_is_taken(hub: InProcessHub) -> None:
    task = "lower-case"
    async with hub.ws() as ws:
        frames = await answer(ws, logs(task, [rec(1, timestamp="2026-01-01t00:00:00.5z")], "t"))
        assert frames == [{"type": "ack", "taskId": task, "seq": 1, "producer": "t"}], frames
    [kept] = await stored(hub, task)
    assert kept["timestamp"] == "2026-01-01T00:00:00.500000Z"


async def test_a_seed_log_frame_without_seq_is_stored(hub: InProcessHub) -> None:
    task = "seed-log"
    async with bystanders(hub, task) as them, hub.ws() as ws:
        # The seed's LogMessage (timestamp in Go's time.RFC3339), with the contract's `type`.
        seed = {
            "type": "log", "taskId": task, "timestamp": "2026-01-02T03:04:05Z", "source": "stdout",
            "level": "INFO", "message": "from a seed client", "lineNumber": 1,
            "metadata": {"processId": 42, "source": "stdout"},
        }
        frames = await answer(ws, seed)
        assert not errors_of(frames), frames
        kept = await them.check()
    assert [(r["seq"], r["message"], r["producer"]) for r in kept] == [(1, "from a seed client", "")]
    # No ack: there is no seq of the client's to acknowledge, and the hub's
    # own numbering is not the client's to see.
    assert not acks_of(frames, task), frames


async def test_seed_log_frames_without_seq_are_each_stored_and_one_naming_a_producer_is_refused(
    hub: InProcessHub,
) -> None:
    task = "seed-log-twice"
    seed = {"type": "log", "taskId": task, "timestamp": "2026-01-02T03:04:05Z", "source": "stdout",
            "level": "INFO", "message": "same line"}
    async with hub.ws() as ws:
        # Without a seq there is no identity to de-duplicate on: two sends are two lines (as a POST without seq).
        assert await answer(ws, seed) == []
        assert await answer(ws, seed) == []
        problem = refusal(await answer(ws, {**seed, "producer": "p"}), "producer without seq", INVALID, "seq")
        assert problem is None, problem
        # With its seq, the anonymous producer's own: acked, and a resend is stored once.
        assert acks_of(await answer(ws, {**seed, "seq": 1, "message": "numbered"}), task) == [
            {"type": "ack", "taskId": task, "seq": 1}
        ]
        assert acks_of(await answer(ws, {**seed, "seq": 1, "message": "numbered"}), task) == [
            {"type": "ack", "taskId": task, "seq": 1}
        ]
    kept = await stored(hub, task)
    assert [(r["seq"], r["message"], r["producer"]) for r in kept] == [
        (1, "same line", ""), (2, "same line", ""), (3, "numbered", ""),
    ]


# --- subscriptions ---------------------------------------------------------------------------


async def test_subscription_limit_and_bad_subscribe_frames(hub: InProcessHub) -> None:
    failures: list[str] = []
    async with hub.ws() as ws, hub.ws() as writer:
        bad = [
            ({"type": "subscribe"}, "taskId"),
            ({"type": "subscribe", "taskId": ""}, "taskId"),
            ({"type": "subscribe", "taskId": "."}, "taskId"),
            ({"type": "subscribe", "taskId": ".."}, "taskId"),
            ({"type": "subscribe", "taskId": "a" * 129}, "taskId"),
            ({"type": "subscribe", "taskId": "bad id"}, "taskId"),
            ({"type": "subscribe", "taskId": "tâche"}, "taskId"),
            ({"type": "subscribe", "taskId": 5}, "taskId"),
            ({"type": "subscribe", "taskId": None}, "taskId"),
            ({"type": "subscribe", "taskId": "t", "source": "nope"}, "source"),
            ({"type": "subscribe", "taskId": "t", "source": 1}, "source"),
            ({"type": "subscribe", "taskId": "t", "level": "LOUD"}, "level"),
            ({"type": "unsubscribe"}, "taskId"),
            ({"type": "unsubscribe", "taskId": "bad id"}, "taskId"),
        ]
        for frame, mentions in bad:
            problem = refusal(await answer(ws, frame), str(frame), INVALID, mentions)
            failures += [problem] if problem else []
        # Unsubscribing from a task not subscribed is not an error.
        assert not errors_of(await answer(ws, {"type": "unsubscribe", "taskId": "never"}))
        assert not failures, "\n".join(failures)

        with trio.fail_after(PATIENCE):
            for n in range(100):
                await ws.subscribe(f"t{n:03d}")
            await ws.send({"type": "subscribe", "taskId": "t100"})
            error = await ws.recv_type("error", skip=())
            assert error["code"] == "TOO_MANY_SUBSCRIPTIONS" and "100" in error["message"], error
            # At the limit: subscribing again to a task watched replaces it.
            await ws.subscribe("t000", from_seq=1)
            await ws.send({"type": "ping"})
            assert await ws.recv() == {"type": "pong"}
            # The connection carries on: its tasks' records come, once.
            await writer.send(logs("t050", [rec(1, "to t050")], "w"))
            await writer.send(logs("t100", [rec(1, "to t100")], "w"))
            await writer.wait_ack("t100", 1)
            frame = await ws.recv_type("logs", skip=("status",))
            assert (frame["taskId"], [r["message"] for r in frame["records"]]) == ("t050", ["to t050"])
            await ws.send({"type": "unsubscribe", "taskId": "t001"})
            await ws.subscribe("t100", from_seq=1)
            frame = await ws.recv_type("logs", skip=("status",))
            assert (frame["taskId"], [r["message"] for r in frame["records"]]) == ("t100", ["to t100"])
            # Nothing else came: neither a second copy nor another task's record.
            await ws.send({"type": "ping"})
            assert (await ws.recv_type("pong", skip=("status",))) == {"type": "pong"}
    assert_hub_clean(hub)


async def collect_until(ws: Ws, task: str, last: int) -> list[int]:
    seqs: list[int] = []
    with trio.fail_after(PATIENCE):
        while not seqs or seqs[-1] < last:
            frame = await ws.recv()
            assert frame["type"] != "error", frame
            if frame["type"] == "logs":
                assert frame["taskId"] == task, frame
                seqs += [r["seq"] for r in frame["records"]]
    return seqs


async def nothing_more(ws: Ws) -> list[dict[str, Any]]:
    """Frames other than `status` that arrive before the answer to a ping."""
    await ws.send({"type": "ping"})
    extra = []
    with trio.fail_after(PATIENCE):
        while (frame := await ws.recv())["type"] != "pong":
            if frame["type"] != "status":
                extra.append(frame)
    return extra


async def test_subscribe_twice_replaces_and_from_seq_beyond_the_end(hub: InProcessHub) -> None:
    task = "again"
    async with hub.ws() as writer, hub.ws() as twice, hub.ws() as ahead, hub.ws() as top:
        await writer.send(logs(task, [rec(s) for s in range(1, 6)], "w"))
        await writer.wait_ack(task, 5)
        with trio.fail_after(PATIENCE):
            await twice.subscribe(task, from_seq=1)
            assert await collect_until(twice, task, 5) == [1, 2, 3, 4, 5]
            # Again, from 3: the new subscription replaces the old one.
            await twice.send({"type": "subscribe", "taskId": task, "fromSeq": 3})
            await twice.recv_type("subscribed", skip=("status",))
            assert await collect_until(twice, task, 5) == [3, 4, 5]
            await ahead.subscribe(task, from_seq=10)
            await top.subscribe(task, from_seq=MAX_SEQ)
            for first in range(6, 16, 3):
                await writer.send(logs(task, [rec(s) for s in range(first, min(first + 3, 16))], "w"))
            await writer.wait_ack(task, 15)
        # Live records once each, on the one subscription left; none below fromSeq.
        assert await collect_until(twice, task, 15) == list(range(6, 16))
        assert await nothing_more(twice) == []
        assert await collect_until(ahead, task, 15) == list(range(10, 16))
        assert await nothing_more(ahead) == []
        assert await nothing_more(top) == []
    assert [r["seq"] for r in await stored(hub, task)] == list(range(1, 16))
    assert_hub_clean(hub)


async def test_subscribing_again_while_the_first_still_catches_up(hub: InProcessHub) -> None:
    """The old subscription's frames all come before the new `subscribed`, a prefix with no gap;
    after it, exactly the new one's: fromSeq on, history then live, once each."""
    task = "resubscribed"
    async with hub.ws() as writer, hub.ws() as ws:
        for first in range(1, 3001, 1000):
            await writer.send(logs(task, [rec(s, f"line {s} " + "y" * 100) for s in range(first, first + 1000)], "w"))
        await writer.wait_ack(task, 3000)
        await ws.send({"type": "subscribe", "taskId": task, "fromSeq": 1})
        await ws.send({"type": "subscribe", "taskId": task, "fromSeq": 2500})
        await writer.send(logs(task, [rec(s) for s in range(3001, 3011)], "w"))
        await writer.wait_ack(task, 3010)
        before: list[int] = []
        after: list[int] = []
        subscribed = 0
        with trio.fail_after(PATIENCE):
            while not after or after[-1] < 3010:
                frame = await ws.recv()
                assert frame["type"] != "error", frame
                if frame["type"] == "subscribed":
                    subscribed += 1
                elif frame["type"] == "logs":
                    (before if subscribed < 2 else after).extend(r["seq"] for r in frame["records"])
        assert await nothing_more(ws) == []
    assert before == list(range(1, len(before) + 1)), "the first subscription's frames have a gap"
    assert after == list(range(2500, 3011)), f"after the second subscribe: {after[:5]}...{after[-5:]}, {len(after)}"
    assert_hub_clean(hub)


async def test_one_producer_on_two_connections_at_once_is_stored_once(hub: InProcessHub) -> None:
    task = "twins"
    frames = [logs(task, [rec(s) for s in range(first, first + 50)], "twin") for first in range(1, 1001, 50)]

    async def send_all(ws: Ws) -> None:
        for frame in frames:
            await ws.send(frame)
            await trio.sleep(0)
        await ws.wait_ack(task, 1000)

    async with bystanders(hub, task) as them, hub.ws() as a, hub.ws() as b:
        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all, a)
                nursery.start_soon(send_all, b)
        kept = await them.check()
    assert [(r["seq"], r["message"]) for r in kept] == [(s, f"line {s}") for s in range(1, 1001)]


async def test_two_connections_racing_one_identity_with_different_records(hub: InProcessHub) -> None:
    """Each identity holds one of the two versions, stored once; each SEQ_CONFLICT names
    one that was not stored. (What the acks say is test_an_ack_never_covers_a_line_refused_in_its_commit.)"""
    task = "race"
    total, size = 200, 5
    got: dict[str, list[dict[str, Any]]] = {}

    async def race(ws: Ws, name: str) -> None:
        for first in range(1, total + 1, size):
            await ws.send(logs(task, [rec(s, f"{name} {s}") for s in range(first, first + size)], "p"))
            await trio.sleep(0)
        got[name] = await settle(ws)

    async with bystanders(hub, task) as them, hub.ws() as a, hub.ws() as b:
        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(race, a, "A")
                nursery.start_soon(race, b, "B")
        kept = await them.check()
    by_pseq = {int(r["message"].split()[1]): r["message"].split()[0] for r in kept}
    assert sorted(by_pseq) == list(range(1, total + 1)) and len(kept) == total
    for name, frames in got.items():
        for error in errors_of(frames):
            assert error["code"] == "SEQ_CONFLICT", error
            pseq = int(re.search(r"'s seq (\d+)", error["message"]).group(1))  # type: ignore[union-attr]
            assert by_pseq[pseq] != name, error


async def test_an_ack_never_covers_a_line_refused_in_its_commit(sqlite_hub_factory: InProcessHubFactory) -> None:
    # A long flush interval puts the three writes below in one commit (they are
    # handed to the writer within milliseconds); nothing here measures time.
    hub = await sqlite_hub_factory.astart("--write-flush-interval", "2")
    task = "one-commit"
    async with hub.ws() as a, hub.ws() as b:

        async def handed(ws: Ws, frame: dict[str, Any]) -> None:
            """Sent, and read by the hub (its reader answers a ping only after the frame before)."""
            await ws.send(frame)
            await ws.send({"type": "ping"})
            await ws.recv_type("pong", skip=("ack",))

        with trio.fail_after(PATIENCE):
            await a.send(logs(task, [rec(s) for s in (1, 2, 3)], "p"))
            await a.wait_ack(task, 3)
            await handed(a, logs(task, [rec(s, f"A {s}") for s in (4, 5, 6)], "p"))
            await handed(b, logs(task, [rec(s, f"B {s}") for s in (7, 8, 9)], "p"))
            await a.send(logs(task, [rec(s, f"A {s}") for s in (7, 8, 9)], "p"))
            frames: list[dict[str, Any]] = []
            # The commit's answers to A come in one burst: errors first, then its ack.
            while not acks_of(frames, task) or not errors_of(frames):
                frames.append(await a.recv())
            await b.wait_ack(task, 9)
    kept = await stored(hub, task)
    assert [r["message"] for r in kept] == ["line 1", "line 2", "line 3", "A 4", "A 5", "A 6", "B 7", "B 8", "B 9"]
    assert [e["code"] for e in errors_of(frames)] == ["SEQ_CONFLICT"], frames
    assert max(f["seq"] for f in acks_of(frames, task)) <= 6, f"A's 7..9 were refused, yet: {frames}"


async def test_frames_at_the_size_limit(hub: InProcessHub) -> None:
    """4 MiB is taken; a byte more is TOO_LARGE, as is a frame past what the hub reads; the connection carries on."""
    task = "sizes"
    limit = 4 * 1024 * 1024
    async with bystanders(hub, task) as them, hub.ws() as ws:
        def padded(seq: int, size: int) -> str:
            frame = orjson.dumps({**logs(task, [rec(seq)], "big"), "pad": ""}).decode()
            return frame.replace('"pad":""', '"pad":"' + "p" * (size - len(frame)) + '"')

        frames = await answer(ws, padded(1, limit))
        assert frames == [{"type": "ack", "taskId": task, "seq": 1, "producer": "big"}], frames
        for size in (limit + 1, limit + 2048, 5 * limit // 4):
            assert refusal(await answer(ws, padded(2, size)), f"{size} bytes", "TOO_LARGE", None) is None
        # Counted in bytes, not characters.
        frame = padded(2, limit - 1024 * 1024).replace('"pad":"', '"pad":"' + "é" * (1024 * 1024 // 2 + 1), 1)
        assert refusal(await answer(ws, frame), "multibyte", "TOO_LARGE", None) is None
        frames = await answer(ws, logs(task, [rec(2)], "big"))
        assert frames == [{"type": "ack", "taskId": task, "seq": 2, "producer": "big"}], frames
        kept = await them.check()
    assert [r["message"] for r in kept] == ["line 1", "line 2"]


async def metric(hub: InProcessHub, name: str) -> float:
    async with hub.http() as client:
        return hubclient.parse_metrics((await client.get("/metrics")).text)[name]


async def test_subscribe_churn_and_a_ping_flood(hub: InProcessHub) -> None:
    """500 subscribe/unsubscribe pairs leave one subscription, nothing held; 5,000 pings
    sent without reading are all answered once read; nobody else waits meanwhile."""
    task = "churn"
    async with bystanders(hub, task) as them:
        assert await metric(hub, "keruta_subscribers") == 1
        async with hub.ws() as writer, hub.ws() as churner, hub.ws() as pinger:
            await writer.send(logs(task, [rec(s) for s in range(1, 301)], "w"))
            await writer.wait_ack(task, 300)
            with trio.fail_after(PATIENCE):
                for _ in range(500):
                    await churner.send({"type": "subscribe", "taskId": task, "fromSeq": 1})
                    await churner.send({"type": "unsubscribe", "taskId": task})
                for _ in range(5000):
                    await pinger.send({"type": "ping"})
                # Others are served while neither reads.
                await them.write()
                await churner.send({"type": "subscribe", "taskId": task, "fromSeq": 1})
                await writer.send(logs(task, [rec(s) for s in range(301, 311)], "w"))
                await writer.wait_ack(task, 310)
                subscribed = 0
                after: list[int] = []
                while not after or after[-1] < 310:
                    frame = await churner.recv()
                    assert frame["type"] != "error", frame
                    if frame["type"] == "subscribed":
                        subscribed += 1
                    elif frame["type"] == "logs" and subscribed == 501:
                        after += [r["seq"] for r in frame["records"]]
                assert subscribed == 501
                assert after == list(range(1, 311))
                assert await nothing_more(churner) == []
                for n in range(5000):
                    assert await pinger.recv() == {"type": "pong"}, n
            assert await metric(hub, "keruta_subscribers") == 2
        with trio.fail_after(PATIENCE):
            while await metric(hub, "keruta_subscribers") != 1:
                await trio.sleep(0.05)
        await them.check()


async def test_a_subscriber_that_never_reads_is_cut_off_and_resumes_exactly(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart("--subscriber-queue", "4")
    task = "flood"
    total, batch = 8000, 100
    async with open_stalled_ws(hub.ws_url) as stalled:
        with trio.fail_after(PATIENCE):
            await stalled.subscribe(task, from_seq=1)
        # From here on the stalled client reads nothing until the flood is over.
        async with hub.ws() as fast, hub.ws() as producer:
            received: list[int] = []
            with trio.fail_after(PATIENCE):
                await fast.subscribe(task, from_seq=1)
                async with trio.open_nursery() as nursery:

                    async def read_fast() -> None:
                        received.extend(await collect_until(fast, task, total))

                    nursery.start_soon(read_fast)
                    for first in range(1, total + 1, batch):
                        await producer.send(
                            logs(task, [rec(s, f"line {s} " + "x" * 150) for s in range(first, first + batch)], "p")
                        )
                        # The producer is unaffected: acked as it goes, no error.
                        await producer.wait_ack(task, max(0, first - 1 - 2000))
                    await producer.wait_ack(task, total)
            assert received == list(range(1, total + 1)), "the reading subscriber lost or doubled records"
        with trio.fail_after(PATIENCE):
            frames, close_code = await drain_until_closed(stalled)
    prefix = [r["seq"] for f in frames if f["type"] == "logs" for r in f["records"]]
    errors = errors_of(frames)
    assert errors and errors[-1]["code"] == "SLOW_CONSUMER", (len(prefix), errors, close_code)
    assert close_code == 1013
    assert len(prefix) < total, "the stalled client was sent everything: it was not stalled"
    assert prefix == list(range(1, len(prefix) + 1)), "what the stalled client got has a gap"
    resume = errors[-1]["resumeFrom"]
    assert resume == len(prefix) + 1, f"got seqs 1..{len(prefix)}, told resumeFrom={resume}"
    async with hub.ws() as again:
        with trio.fail_after(PATIENCE):
            await again.subscribe(task, from_seq=resume)
            assert await collect_until(again, task, total) == list(range(resume, total + 1))
        assert await nothing_more(again) == []
    assert [r["seq"] for r in await stored(hub, task)] == list(range(1, total + 1))
    assert_hub_clean(hub)


# --- status frames ----------------------------------------------------------------------------


async def test_status_frames_at_their_edges(hub: InProcessHub) -> None:
    task = "states"

    def run_status(state: str, producer: str, code: int | None = None) -> dict[str, Any]:
        frame = {"type": "status", "taskId": task, "state": state, "producer": producer}
        return frame if code is None else {**frame, "exitCode": code}

    async with bystanders(hub, task) as them, hub.ws() as ws, hub.http() as client:
        assert await answer(ws, logs(task, [rec(s) for s in (1, 2, 3)], "w")) == [
            {"type": "ack", "taskId": task, "seq": 3, "producer": "w"}
        ]
        # A status from a producer that wrote nothing: a run of its own.
        assert await answer(ws, run_status("running", "other")) == [run_status("running", "other")]
        # The final status twice: the same answer twice.
        for _ in range(2):
            assert await answer(ws, run_status("succeeded", "w", 0)) == [run_status("succeeded", "w", 0)]
        # A `running` after the run's final state changes nothing: the answer is the stored state.
        assert await answer(ws, run_status("running", "w")) == [run_status("succeeded", "w", 0)]
        info = (await client.get(f"/api/v1/tasks/{task}")).json()
        assert (info["state"], info["exitCode"]) == ("succeeded", 0), info
        # The older run's final state is that run's; the task shows the newest run.
        assert await answer(ws, run_status("failed", "other", 3)) == [run_status("failed", "other", 3)]
        info = (await client.get(f"/api/v1/tasks/{task}")).json()
        assert (info["state"], info["exitCode"]) == ("succeeded", 0), info
        # A producer's records after its own final status are still its records.
        assert await answer(ws, logs(task, [rec(4), rec(5)], "w")) == [
            {"type": "ack", "taskId": task, "seq": 5, "producer": "w"}
        ]
        # Bad status frames change nothing.
        failures = [
            refusal(await answer(ws, frame), str(frame), INVALID, mentions)
            for frame, mentions in [
                ({"type": "status", "taskId": task}, "state"),
                ({"type": "status", "taskId": task, "state": "RUNNING"}, "state"),
                ({"type": "status", "taskId": task, "state": None}, "state"),
                ({"type": "status", "state": "running"}, "taskId"),
                ({"type": "status", "taskId": "never", "state": "failed", "summary": "all good"}, "summary"),
                ({"type": "status", "taskId": "never", "state": "failed",
                  "summary": {"records": True, "lines": {}, "bytes": {}, "digest": digest.to_text(0)}}, "records"),
                ({"type": "status", "taskId": "never", "state": "failed",
                  "summary": {"records": 1, "lines": {"nope": 1}, "bytes": {}, "digest": digest.to_text(0)}}, "lines"),
                ({"type": "status", "taskId": "never", "state": "failed",
                  "summary": {"records": 1, "lines": {}, "bytes": {}, "digest": "adhash-blake2b-512:zz"}}, "digest"),
            ]
        ]
        assert not [f for f in failures if f], failures
        assert (await client.get("/api/v1/tasks/never")).status_code == 404
        info = (await client.get(f"/api/v1/tasks/{task}")).json()
        assert (info["state"], info["exitCode"], info["totalLogs"]) == ("succeeded", 0, 5), info

        # A status for a task never written, without a producer (no answer but the state).
        assert await answer(ws, {"type": "status", "taskId": "unwritten", "state": "failed", "exitCode": 7}) == []
        info = (await client.get("/api/v1/tasks/unwritten")).json()
        assert (info["state"], info["exitCode"], info["totalLogs"]) == ("failed", 7, 0), info
        assert await fetch_all(client, "unwritten") == []

        # Two different final states: whichever the hub keeps, it says so, and the task agrees.
        final = {"type": "status", "taskId": "two-finals", "producer": "z"}
        assert await answer(ws, {**final, "state": "succeeded", "exitCode": 0}) == [
            {**final, "state": "succeeded", "exitCode": 0}
        ]
        [kept_state] = await answer(ws, {**final, "state": "failed", "exitCode": 1})
        assert kept_state in ({**final, "state": "succeeded", "exitCode": 0}, {**final, "state": "failed", "exitCode": 1})
        info = (await client.get("/api/v1/tasks/two-finals")).json()
        assert (info["state"], info["exitCode"]) == (kept_state["state"], kept_state["exitCode"]), info

        # A summary claiming the most records there can be: verify says what is missing, bounded.
        huge = {"records": 2**63 - 1, "lines": {"stdout": 2**63 - 1}, "bytes": {"stdout": 2**63 - 1},
                "digest": digest.to_text(12345)}
        frame = {"type": "status", "taskId": "claims", "state": "succeeded", "exitCode": 0, "producer": "liar",
                 "summary": huge}
        frames = await answer(ws, frame)
        assert frames == [{"type": "status", "taskId": "claims", "state": "succeeded", "exitCode": 0,
                           "producer": "liar"}], frames
        resp = await client.get("/api/v1/tasks/claims/verify")
        assert resp.status_code == 200, resp.text
        assert resp.json()["verdict"] == "incomplete", resp.json()

        kept = await them.check()
    assert [(r["seq"], r["producer"]) for r in kept] == [(s, "w") for s in range(1, 6)]
    # The subscriber was told the task's state as it changed; the last it heard is the stored one.
    assert them.watch.statuses and them.watch.statuses[-1] == {
        "type": "status", "taskId": task, "state": "succeeded", "exitCode": 0
    }, them.watch.statuses


def viewer_log(watch: Watch) -> list[tuple[int, str, str | None]]:
    """What a viewer shows from what it was sent: a gap record (new or grown, under
    one seq) replaces what it holds there and drops the records it covers."""
    view = dict(watch.records)
    for record in list(view.values()):
        if record.get("kind") == "gap" and "fromSeq" in record["metadata"].get("gap", {}):
            gap = record["metadata"]["gap"]
            for seq in range(gap["fromSeq"], gap["toSeq"] + 1):
                if seq != record["seq"]:
                    view.pop(seq, None)
    return [(seq, r["message"], r.get("kind")) for seq, r in sorted(view.items())]


async def test_a_summary_that_does_not_add_up_is_never_complete(hub: InProcessHub) -> None:
    """A run's final status may claim anything; verify holds what is stored against it."""
    zero = digest.to_text(0)
    claims = {
        "none": {"records": 0, "lines": {}, "bytes": {}, "digest": zero},
        "fewer": {"records": 2, "lines": {"stdout": 2}, "bytes": {"stdout": 12}, "digest": zero},
        "wrong-digest": {"records": 3, "lines": {"stdout": 3}, "bytes": {"stdout": 18}, "digest": zero},
        "more": {"records": 4, "lines": {"stdout": 4}, "bytes": {"stdout": 24}, "digest": zero},
    }
    async with hub.ws() as ws, hub.http() as client:
        for n, (producer, summary) in enumerate(claims.items()):
            task = f"claim-{n}"
            frames = await answer(ws, logs(task, [rec(s) for s in (1, 2, 3)], producer))
            assert acks_of(frames, task)[-1]["seq"] == 3, frames
            frame = {"type": "status", "taskId": task, "state": "succeeded", "exitCode": 0, "producer": producer,
                     "summary": summary}
            assert not errors_of(await answer(ws, frame))
            resp = await client.get(f"/api/v1/tasks/{task}/verify")
            assert resp.status_code == 200, resp.text
            assert resp.json()["verdict"] == "incomplete", (producer, resp.json())
    assert_hub_clean(hub)


async def test_a_one_byte_cap_keeps_the_log_honest(hub: InProcessHub) -> None:
    """maxBytes 1, the smallest cap: what is not kept is one gap record that accounts
    for it, and a live viewer ends with what is stored."""
    task = "tiny"
    async with hub.ws() as ws, hub.ws() as viewer, hub.http() as client, trio.open_nursery() as nursery:
        await viewer.subscribe(task, from_seq=1)
        watch = Watch(viewer, task)
        nursery.start_soon(watch.run)
        frame = {"type": "status", "taskId": task, "state": "running", "producer": "a", "maxBytes": 1}
        assert await answer(ws, frame) == [{"type": "status", "taskId": task, "state": "running", "producer": "a"}]
        for first in range(1, 41, 10):
            frames = await answer(ws, logs(task, [rec(s, f"line {s:02d}") for s in range(first, first + 10)], "a"))
            assert not errors_of(frames) and acks_of(frames, task)[-1]["seq"] == first + 9, frames
        with trio.fail_after(PATIENCE):
            while True:
                kept = await fetch_all(client, task)
                lines = [r for r in kept if r.get("kind") != "gap"]
                if sum(len(r["message"].encode()) for r in lines) <= 1:
                    break
                await trio.sleep(0.05)
            while viewer_log(watch) != [(r["seq"], r["message"], r.get("kind")) for r in kept]:
                await trio.sleep(0.05)
        assert not watch.errors, watch.errors
        lines_sent = [seq for seq in watch.seqs if watch.records[seq].get("kind") != "gap"]
        assert lines_sent == sorted(set(lines_sent)), "a line reached the viewer twice"
        nursery.cancel_scope.cancel()
    gaps = [r for r in kept if r.get("kind") == "gap"]
    assert len(gaps) == 1, kept
    gap = gaps[0]["metadata"]["gap"]
    covered = set(range(gap["fromSeq"], gap["toSeq"] + 1))
    seqs = [r["seq"] for r in kept]
    assert seqs == sorted(set(seqs)), seqs
    assert covered | {r["seq"] for r in lines} == set(range(1, 41)), (gap, seqs)
    assert gap["lines"] + len(lines) == 40, (gap, lines)
    assert gaps[0]["seq"] == gap["fromSeq"] and "producer" not in gaps[0], gaps[0]
    assert_hub_clean(hub)


# --- what the frame is ---------------------------------------------------------------------------


async def test_frame_type_confusion(hub: InProcessHub) -> None:
    task = "confused"
    good = rec(1, "in a confused frame")
    refused: list[tuple[str, Any, str | None]] = [
        ("no type", '{"taskId": "confused"}', "type"),
        ("type null", '{"type": null}', "type"),
        ("type a number", '{"type": 5}', "type"),
        ("type a float", '{"type": 5.5}', "type"),
        ("type true", '{"type": true}', "type"),
        ("type a list", '{"type": ["ping"]}', "type"),
        ("type an object", '{"type": {"type": "ping"}}', "type"),
        ("type empty", '{"type": ""}', "type"),
        ("type PING", '{"type": "PING"}', "type"),
        ("type with a space", '{"type": " ping"}', "type"),
        ("type with NUL", '{"type": "ping\\u0000"}', "type"),
        ("type unknown", '{"type": "bogus"}', "type"),
        *[(f"the hub's own type {t}", f'{{"type": "{t}", "taskId": "confused", "seq": 1}}', "type")
          for t in ("ack", "subscribed", "pong", "error", "redacted")],
        ("a JSON array", '[{"type": "ping"}]', None),
        ("an empty array", "[]", None),
        ("a bare number", "42", None),
        ("a bare string", '"ping"', None),
        ("null", "null", None),
        ("true", "true", None),
        ("empty text", "", None),
        ("whitespace", " \n", None),
        ("not JSON", "ping", None),
        ("cut short", '{"type": "ping"', None),
        ("trailing garbage", '{"type": "ping"} x', None),
        ("two objects", '{"type": "ping"}{"type": "ping"}', None),
        ("NaN", '{"type": "ping", "x": NaN}', None),
        ("Infinity", '{"type": "ping", "x": Infinity}', None),
        ("a byte order mark", '\ufeff{"type": "ping"}', None),
        ("nested 100,000 deep", "[" * 100_000 + "]" * 100_000, None),
        ("objects nested 100,000 deep", '{"a":' * 100_000 + "1" + "}" * 100_000, None),
        ("logs without records", '{"type": "logs", "taskId": "confused"}', "records"),
        ("binary, not UTF-8", b'{"type": "ping", "x": "\xff\xfe"}', None),
    ]
    failures: list[str] = []
    async with bystanders(hub, task) as them, hub.ws() as ws:
        for what, frame, mentions in refused:
            problem = refusal(await answer(ws, frame), what, INVALID, mentions)
            failures += [problem] if problem else []

        # Either way the hub reads them, they are one frame: a pong, or an
        # error and nothing stored, or an ack and the record stored once.
        pong = '{"type": "logs", "taskId": "confused", "producer": "dup1", "records": [GOOD], "type": "ping"}'
        logs_last = '{"type": "ping", "taskId": "confused", "producer": "dup2", "records": [GOOD], "type": "logs"}'
        binary_logs = orjson.dumps(logs(task, [good], "bin"))
        for what, frame, producer in [
            ("duplicate type, ping last", pong.replace("GOOD", orjson.dumps(good).decode()), "dup1"),
            ("duplicate type, logs last", logs_last.replace("GOOD", orjson.dumps(good).decode()), "dup2"),
            ("a binary frame of valid JSON", binary_logs, "bin"),
            ("a binary ping", b'{"type": "ping"}', None),
        ]:
            frames = await answer(ws, frame)
            kinds = sorted(f["type"] for f in frames)
            if kinds not in (["pong"], ["ack"], ["error"]):
                failures.append(f"{what}: expected one pong, ack or error, got {frames}")
            elif kinds == ["error"] and frames[0]["code"] != INVALID:
                failures.append(f"{what}: {frames}")
            elif kinds == ["ack"] and frames[0] != {"type": "ack", "taskId": task, "seq": 1, "producer": producer}:
                failures.append(f"{what}: {frames}")
        assert not failures, "\n".join(failures)
        kept = await them.check()
    # Only frames that were acknowledged stored anything.
    assert all(r["message"] == "in a confused frame" and r["producer"] in ("dup2", "bin") for r in kept), kept
