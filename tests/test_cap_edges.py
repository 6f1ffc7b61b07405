"""A task's cap at its edges, on both stores: caps smaller than one line,
lines bigger than the cap, live subscribers from seq 1 while the cap cuts,
and the sizes the CLIs take."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import trio

from hub.store import open_store_from_url
from hub.store.base import LogQuery
from keruta.cliargs import size
from keruta.limits import INT64_MAX
from keruta.summary import Tally
from tests import hubclient
from tests.hubclient import PATIENCE, InProcessHubFactory, fetch_all, logs_frame, make_record
from tests.storedata import rec

hub_factory = hubclient.hub_factory  # fixture


@pytest.mark.parametrize("text", ["0", "-1", "0.1", "", "1e3", "nan", "1" + "0" * 400, "99999999999999999999G"])
def test_an_absurd_size_is_refused_with_a_message(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        size(text)


def test_the_largest_size_is_one_the_hub_takes() -> None:
    assert size(f"{INT64_MAX}") == INT64_MAX
    assert size("8G") == 8 << 30


async def send_lines(ws: Any, task: str, first: int, last: int) -> None:
    for start in range(first, last + 1, 100):
        await ws.send(logs_frame(task, [make_record(task, s, f"line {s:06d} " + "y" * 88)
                                        for s in range(start, min(start + 99, last) + 1)]))
    await ws.wait_ack(task, last)


async def settled(client: Any, task: str, cap: int) -> list[dict[str, Any]]:
    """The task's records once the capper has caught up (within its cap)."""
    with trio.fail_after(PATIENCE):
        while True:
            records = await fetch_all(client, task)
            if sum(len(r["message"].encode()) for r in records if r.get("kind") != "gap") <= cap:
                return records
            await trio.sleep(0.05)


async def test_lines_bigger_than_the_cap_leave_one_gap_and_the_last_line(hub_factory: InProcessHubFactory) -> None:
    hub = await hub_factory.astart()
    task = "huge-lines"
    async with hub.ws() as writer, hub.http() as client:
        await writer.send({"type": "status", "taskId": task, "state": "running", "maxBytes": 100})
        for seq in range(1, 11):
            await writer.send(logs_frame(task, [make_record(task, seq, f"{seq:03d}" + "z" * 997)]))
        await writer.wait_ack(task, 10)
        records = await settled(client, task, 100)
        gaps = [r for r in records if r.get("kind") == "gap"]
        assert len(gaps) == 1, records
        info = gaps[0]["metadata"]["gap"]
        kept = [r["seq"] for r in records if r.get("kind") is None]
        assert info["lines"] + len(kept) == 10
        # Whatever is kept or not, every seq is accounted for exactly once.
        assert sorted(kept + list(range(info["fromSeq"], info["toSeq"] + 1))) == list(range(1, 11))
        # The cap does not keep cutting a task the gap record alone is over.
        await writer.send(logs_frame(task, [make_record(task, 11, "small")]))
        await writer.wait_ack(task, 11)
        again = await settled(client, task, 100)
        assert len([r for r in again if r.get("kind") == "gap"]) == 1


async def test_a_live_subscriber_from_seq_1_sees_every_seq_once_or_inside_a_gap(hub_factory: InProcessHubFactory) -> None:
    """Guarantee 3 under a cap: records arrive in order, none twice; a seq
    the cap took is inside the gap the subscriber was sent (a gap is sent
    again, same seq, as it grows)."""
    hub = await hub_factory.astart("--max-task-bytes", "30K")
    task = "watched"
    last = 3000
    async with hub.ws() as writer, hub.ws() as viewer, hub.http() as client:
        for start in range(1, 501, 100):
            await writer.send(logs_frame(task, [make_record(task, s, f"line {s:06d} " + "y" * 88)
                                                for s in range(start, start + 100)]))
        await writer.wait_ack(task, 500)
        await viewer.subscribe(task, from_seq=1)
        lines: list[int] = []
        gaps: dict[int, dict[str, Any]] = {}

        async def send_rest() -> None:
            for start in range(501, last + 1, 100):
                await writer.send(logs_frame(task, [make_record(task, s, f"line {s:06d} " + "y" * 88)
                                                    for s in range(start, start + 100)]))
            await writer.wait_ack(task, last)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_rest)
            with trio.fail_after(PATIENCE):
                while not lines or lines[-1] < last:
                    frame = await viewer.recv()
                    assert frame["type"] != "error", frame
                    if frame["type"] != "logs":
                        continue
                    for r in frame["records"]:
                        if r.get("kind") == "gap":
                            gaps[r["seq"]] = r["metadata"]["gap"]
                        else:
                            lines.append(r["seq"])
        assert lines == sorted(set(lines)), "a record arrived twice or out of order"
        covered = {s for g in gaps.values() for s in range(g["fromSeq"], g["toSeq"] + 1)}
        # Every seq arrived as a line, or lies inside a gap the subscriber holds.
        assert set(range(1, last + 1)) <= set(lines) | covered
        stored = await settled(client, task, 30 * 1024)
        (gap,) = [r for r in stored if r.get("kind") == "gap"]
        assert gap["seq"] in gaps


async def test_two_hubs_cutting_one_task_at_once_leave_one_gap_that_adds_up(store) -> None:  # type: ignore[no-untyped-def]
    """Two stores on one database (two hubs), each cutting the task as its
    own commits take it past the cap, while both append: one gap, every
    record kept or accounted for, and the log verifies."""
    other = open_store_from_url(store.url)
    await other.open()
    cap = 40_000
    tallies = {"a": Tally(), "b": Tally()}
    try:

        async def hub(target, producer: str) -> None:  # type: ignore[no-untyped-def]
            for start in range(1, 3001, 100):
                batch = [rec(p, f"{producer}{p:06d} " + "x" * 92, producer=producer, at=p)
                         for p in range(start, start + 100)]
                for p, r in enumerate(batch, start):
                    tallies[producer].add(p, r.source, None, False, 0, r.message)
                await target.append(batch)
                while (step := await target.cap_step("t1", cap)) is not None and step.more:
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub, store, "a")
            nursery.start_soon(hub, other, "b")
    finally:
        await other.close()
    for producer, tally in tallies.items():
        await store.set_state("t1", "succeeded", 0, producer, tally.summary(3000))
    records = (await store.query(LogQuery(task_id="t1", size=100_000))).content
    assert len([r for r in records if r.kind == "gap"]) == 1
    assert sum(len(r.message) for r in records if r.kind != "gap") <= cap
    answer = await store.verify("t1")
    assert answer.verdict == "complete", answer.message


async def test_a_task_left_over_its_cap_is_cut_when_the_hub_starts(hub_factory: InProcessHubFactory) -> None:
    """A task whose cut was left undone (here: stored before the hub had a
    cap; as well a hub stopped mid-cut, or a store away) commits no more once
    finished: the hub finds it when it starts, not at a next commit."""
    first = await hub_factory.astart()
    task = "left-over"
    async with first.ws() as writer:
        await send_lines(writer, task, 1, 1000)
        await writer.send({"type": "status", "taskId": task, "state": "succeeded", "exitCode": 0})
    await first.astop()
    second = await hub_factory.astart("--max-task-bytes", "40K", db=first.db)
    async with second.http() as client:
        records = await settled(client, task, 40 * 1024)
    assert len([r for r in records if r.get("kind") == "gap"]) == 1


async def test_an_admin_delete_sends_its_gap_to_live_viewers(hub_factory: InProcessHubFactory) -> None:
    """The gap a DELETE ?before= leaves reaches a live viewer at once, under
    the first seq it stands for (the viewer then reads what it covers again),
    as a cap's gap does; before, it saw it only at its next read."""
    hub = await hub_factory.astart()
    task = "deleting"
    async with hub.ws() as writer, hub.ws() as viewer, hub.http() as client:
        records = [
            make_record(task, s, f"line {s}", timestamp=f"2026-01-01T00:00:{s:02d}.000Z") for s in range(1, 21)
        ]
        await writer.send(logs_frame(task, records))
        await writer.wait_ack(task, 20)
        await viewer.subscribe(task, from_seq=1)
        seen: list[int] = []
        with trio.fail_after(PATIENCE):
            while len(seen) < 20:
                frame = await viewer.recv()
                if frame["type"] == "logs":
                    seen += [r["seq"] for r in frame["records"]]
        resp = await client.delete(f"/api/v1/tasks/{task}/logs", params={"before": "2026-01-01T00:00:11.000Z"})
        assert resp.json() == {"deletedCount": 10}
        with trio.fail_after(PATIENCE):
            while True:
                frame = await viewer.recv()
                if frame["type"] == "logs":
                    break
        (gap,) = frame["records"]
        assert gap["seq"] == 1 and gap["kind"] == "gap"
        info = gap["metadata"]["gap"]
        assert (info["reason"], info["fromSeq"], info["toSeq"], info["lines"]) == ("deleted", 1, 10, 10)
