"""Hostile tests of what removes or rewrites stored records, racing what adds
and reads them, on both stores: an admin's DELETE (with and without
`before`), a redaction, a task's cap and retention, each while producers
append, live subscribers replay from `fromSeq`, REST pagers walk `afterSeq`
cursors and `verify` is asked; and the parameters of these calls at their
edges, and who may make them.

Every case checks the status and error code, what REST serves afterwards
(seqs strictly increasing, none twice, no deleted record served, the gap
records README.md "Gaps" documents), what live subscribers were sent (no
deleted record after the gap that covers it, `redacted` frames as
README.md "Taking a secret back out" documents), `verify`'s verdict, and
that another task beside it is untouched.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from hub.redaction import redact as hub_redact
from hub.store.verify import Verification
from keruta.summary import Tally
from keruta.timefmt import now_ts
from tests import hubclient
from tests.hubclient import PATIENCE, InProcessHubFactory, Ws, assert_error, fetch_all, logs_path
from tests.storedata import rec

hub_factory, sqlite_hub_factory = hubclient.hub_factory, hubclient.sqlite_hub_factory  # fixtures

AGENT, VIEWER, ADMIN = "agent-t0k3n", "viewer-t0k3n", "admin-t0k3n"
TOKENS = ("--agent-token", AGENT, "--viewer-token", VIEWER, "--admin-token", ADMIN)
OLD = "2020-01-01T00:00:00.000000Z"  # older than every BEFORE below
BEFORE = "2021-01-01T00:00:00.000000Z"


def old_ts(i: int) -> str:
    """A distinct timestamp in 2020, in seq order (i < 86,400)."""
    return f"2020-01-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}.000000Z"


def lines(first: int, last: int, tag: str, *, ts: str | None = None, pad: int = 0) -> list[dict[str, Any]]:
    """A producer's records first..last (its own seqs), as an agent sends them."""
    return [
        {"seq": s, "timestamp": ts or old_ts(s), "source": "stdout" if s % 5 else "stderr", "level": "INFO",
         "message": f"{tag} line {s}" + ("." * pad), "lineNumber": s, "metadata": {}}
        for s in range(first, last + 1)
    ]


def summary_of(recs: list[dict[str, Any]]) -> dict[str, Any]:
    tally = Tally()
    for r in recs:
        tally.add_record(r["seq"], r)
    return tally.summary(len(recs)).to_json()


async def start_run(ws: Ws, task: str, producer: str) -> None:
    await ws.send({"type": "status", "taskId": task, "state": "running", "producer": producer})


async def send(ws: Ws, task: str, producer: str, recs: list[dict[str, Any]], batch: int = 50) -> None:
    """The records in frames of `batch`, then wait until all are acknowledged."""
    for start in range(0, len(recs), batch):
        await ws.send({"type": "logs", "taskId": task, "producer": producer, "records": recs[start:start + batch]})
    await wait_ack(ws, task, producer, recs[-1]["seq"])


async def wait_ack(ws: Ws, task: str, producer: str, seq: int) -> None:
    """Read until `producer`'s ack covers `seq` (its own seqs); an error frame fails."""
    with trio.fail_after(PATIENCE):
        while True:
            frame = await ws.recv()
            if frame["type"] == "error":
                raise hubclient.HubError(f"error frame while waiting for ack {seq}: {frame}")
            if frame["type"] == "ack" and frame.get("producer") == producer and frame["seq"] >= seq:
                return


async def finish(ws: Ws, task: str, producer: str, recs: list[dict[str, Any]]) -> None:
    await ws.send(json.dumps({"type": "status", "taskId": task, "state": "succeeded", "exitCode": 0,
                              "producer": producer, "summary": summary_of(recs)}))
    with trio.fail_after(PATIENCE):
        while True:
            frame = await ws.recv()
            if frame["type"] == "status" and frame.get("producer") == producer:
                assert frame["state"] == "succeeded", frame
                return
            assert frame["type"] != "error", frame


async def verify(hub: Any, task: str, token: str | None = None) -> dict[str, Any]:
    async with hub.http(token) as client:
        resp = await client.get(f"/api/v1/tasks/{task}/verify")
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    assert answer["verdict"] in ("complete", "incomplete", "unverified"), answer
    return answer


def gap_of(r: dict[str, Any]) -> dict[str, Any] | None:
    return r["metadata"]["gap"] if r.get("kind") == "gap" else None


def check_stored(records: list[dict[str, Any]]) -> None:
    """What REST serves is a log: seqs strictly increasing (so none twice), a
    hub-made gap's span holding its own seq, no line served inside a span
    a `deleted`/`retention`/`cap` gap says went, unless it is newer than the
    cut (a DELETE before a time keeps what is newer on either side)."""
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(set(seqs)), f"seqs not strictly increasing: {seqs[:50]}"
    for r in records:
        gap = gap_of(r)
        if gap is None or "fromSeq" not in gap:
            continue
        assert gap["fromSeq"] <= r["seq"] <= gap["toSeq"], r
        inside = [x for x in records if gap["fromSeq"] <= x["seq"] <= gap["toSeq"] and x is not r]
        if gap["reason"] == "cap":
            assert inside == [], f"records served inside a cap's gap {gap}: {[x['seq'] for x in inside][:20]}"


class Watcher:
    """What a live viewer holds, fed every frame a subscription gets.

    A record under a seq it already holds is a hub-made record replaced
    (a gap grown, a redaction's record): only those may come again. A gap
    drops what it covers (the viewer reads it again). `redacted` marks seqs
    read again (over REST, after that step committed: clean)."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.held: dict[int, dict[str, Any]] = {}
        self.lines: list[int] = []
        self.gaps: dict[int, dict[str, Any]] = {}
        self.redacted: list[int] = []
        self.frames: list[dict[str, Any]] = []
        self.last_status: dict[str, Any] | None = None
        # (seq, gap seq, its fromSeq, toSeq, frame number): a line sent after a gap that says it went.
        self.after_gap: list[tuple[int, int, int, int, int]] = []

    def take(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        kind = frame["type"]
        assert kind != "error", f"subscriber of {self.task} got {frame}"
        if kind == "redacted":
            assert frame["taskId"] == self.task
            for s in frame["seqs"]:
                self.held[s] = {"seq": s, "reread": True}
            self.redacted += frame["seqs"]
        elif kind == "status":
            self.last_status = frame
        elif kind == "logs":
            assert frame["taskId"] == self.task, frame
            for r in frame["records"]:
                self._record(r)

    def _record(self, r: dict[str, Any]) -> None:
        seq = r["seq"]
        gap = gap_of(r)
        if gap is not None and "fromSeq" in gap:
            self.gaps[seq] = gap
            for s in [s for s in self.held if gap["fromSeq"] <= s <= gap["toSeq"] and s != seq]:
                del self.held[s]
            self.held[seq] = r
            return
        if r.get("kind") == "redaction":
            self.held[seq] = r
            return
        assert seq not in self.lines, f"seq {seq} sent twice to a subscriber of {self.task}"
        for at, g in self.gaps.items():
            if g["fromSeq"] <= seq <= g["toSeq"] and g["reason"] != "deleted" or (
                    g["reason"] == "deleted" and g["fromSeq"] <= seq <= g["toSeq"] and r["timestamp"] < BEFORE):
                self.after_gap.append((seq, at, g["fromSeq"], g["toSeq"], len(self.frames)))
        assert not self.lines or seq > self.lines[-1], f"seq {seq} after {self.lines[-1]}: out of order"
        self.lines.append(seq)
        self.held[seq] = r

    @property
    def top(self) -> int:
        # Held seqs count too: a redaction's own record may be the task's last.
        return max([*self.held, *(g["toSeq"] for g in self.gaps.values())], default=0)


async def watch(ws: Ws, watcher: Watcher, until: trio.Event | None = None, last: int | None = None) -> None:
    """Feed `watcher` until `until` is set (and `last` reached, when given)."""
    while True:
        if until is not None and until.is_set() and (last is None or watcher.top >= last):
            return
        if until is None and last is not None and watcher.top >= last:
            return
        with trio.move_on_after(0.05):
            watcher.take(await ws.recv())


async def page_all(client: Any, task: str, pages: list[list[int]], done: trio.Event) -> None:
    """A REST pager following afterSeq cursors from 0 again and again until `done`:
    each walk's seqs strictly increasing."""
    while not done.is_set():
        after, walk = 0, []
        while True:
            resp = await client.get(logs_path(task), params={"afterSeq": after, "size": 137})
            assert resp.status_code == 200, resp.text
            content = resp.json()["content"]
            if not content:
                break
            walk += [r["seq"] for r in content]
            after = content[-1]["seq"]
        assert walk == sorted(set(walk)), f"a pager's walk went back or doubled: {walk[:60]}"
        pages.append(walk)
        await trio.sleep(0)


async def verdicts(hub: Any, task: str, out: list[str], done: trio.Event, token: str | None = None) -> None:
    while not done.is_set():
        out.append((await verify(hub, task, token))["verdict"])
        await trio.sleep(0)


# --- who may remove, and the parameters at their edges ---------------------------


@pytest.mark.parametrize(
    ("tokens", "who", "status", "code"),
    [
        (TOKENS, None, 401, "UNAUTHORIZED"),
        (TOKENS, "wrong-token", 401, "UNAUTHORIZED"),
        (TOKENS, VIEWER, 403, "FORBIDDEN"),
        (TOKENS, AGENT, 403, "FORBIDDEN"),
        # Only agent and viewer tokens: nobody may delete over the API.
        (("--agent-token", AGENT, "--viewer-token", VIEWER), AGENT, 403, "FORBIDDEN"),
        # An admin token alone: the others are nobody.
        (("--admin-token", ADMIN), AGENT, 401, "UNAUTHORIZED"),
    ],
)
async def test_only_the_admin_token_deletes_or_redacts(
    sqlite_hub_factory: InProcessHubFactory, tokens: tuple[str, ...], who: str | None, status: int, code: str
) -> None:
    hub = await sqlite_hub_factory.astart(*tokens)
    writer_token = ADMIN if "--admin-token" in tokens else AGENT
    task = "guarded"
    async with hub.http(writer_token) as owner:
        resp = await owner.post(logs_path(task), json=[{"message": f"secret {i}", "timestamp": OLD} for i in range(5)])
        assert resp.status_code == 200, resp.text
        before = await fetch_all(owner, task)
        async with hub.http(who) as intruder:
            for params in ({}, {"before": BEFORE}):
                assert_error(await intruder.delete(logs_path(task), params=params), status, code)
            # The token as ?token= is judged the same.
            if who is not None:
                assert_error(await intruder.delete(logs_path(task), params={"token": who}), status, code)
            assert_error(await intruder.post(f"/api/v1/tasks/{task}/redact", json={"values": ["secret"]}),
                         status, code)
        assert await fetch_all(owner, task) == before
    if "--admin-token" in tokens:
        async with hub.http(ADMIN) as admin:
            resp = await admin.delete(logs_path(task), params={"before": BEFORE})
            assert resp.status_code == 200 and resp.json() == {"deletedCount": 5}, resp.text


@pytest.mark.parametrize(
    "before",
    [
        "",  # empty is refused, never "all"
        "yesterday",
        "2021-01-01",
        "2021-01-01T00:00:00",  # no offset
        "2021-01-01 00:00:00Z",
        "2021-W01-1T00:00:00Z",
        "20210101T000000Z",
        "2021-01-01T00:00:00,5Z",
        "0000-12-31T23:59:59Z",
        "0001-01-01T00:00:00+01:00",  # UTC falls in year 0
        "10000-01-01T00:00:00Z",
        "9999-12-31T23:59:59-00:01",  # UTC falls in year 10000
        "2021-13-01T00:00:00Z",
        "2021-01-01T24:00:00Z",
        "2021-01-01T00:00:60Z",
        "２０２１-01-01T00:00:00Z",
        "2021-01-01T00:00:00Z\x00",
        "2021-01-01T00:00:00Z; DROP TABLE keruta_chunks",
        "9" * 10_000,
    ],
)
async def test_a_bad_before_is_400_and_deletes_nothing(sqlite_hub_factory: InProcessHubFactory, before: str) -> None:
    hub = await sqlite_hub_factory.astart()
    async with hub.http() as client:
        resp = await client.post(logs_path("kept"), json=[{"message": f"m{i}", "timestamp": OLD} for i in range(3)])
        assert resp.status_code == 200
        held = await fetch_all(client, "kept")
        assert_error(await client.delete(logs_path("kept"), params={"before": before}), 400, "INVALID_PARAMETER",
                     "before")
        assert await fetch_all(client, "kept") == held
        assert (await client.get("/api/v1/tasks/kept")).json()["totalLogs"] == 3


async def test_before_far_past_far_future_and_unknown_tasks(hub_factory: InProcessHubFactory) -> None:
    """`before` older than everything deletes nothing and leaves no gap;
    newer than everything deletes every record into one gap, and the log
    still verifies; an unknown task is made by neither; a bad task id is 400."""
    hub = await hub_factory.astart()
    task, other = "edges", "bystander"
    recs = lines(1, 300, "e")
    async with hub.ws() as ws, hub.http() as client:
        await start_run(ws, task, "run-e")
        await send(ws, task, "run-e", recs)
        await finish(ws, task, "run-e", recs)
        await start_run(ws, other, "run-o")
        await send(ws, other, "run-o", lines(1, 40, "o"))
        bystander = await fetch_all(client, other)
        for far_past in ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000000Z", "2019-12-31T23:59:59.999999Z",
                         "2020-01-01T00:00:01+00:00"):  # the first record is at 00:00:01 exactly: kept (not older)
            resp = await client.delete(logs_path(task), params={"before": far_past})
            assert resp.status_code == 200 and resp.json() == {"deletedCount": 0}, (far_past, resp.text)
        assert [r["seq"] for r in await fetch_all(client, task)] == list(range(1, 301))
        assert (await verify(hub, task))["verdict"] == "complete"
        resp = await client.delete(logs_path(task), params={"before": "9999-12-31T23:59:59.999999Z"})
        assert resp.status_code == 200 and resp.json() == {"deletedCount": 300}, resp.text
        stored = await fetch_all(client, task)
        assert len(stored) == 1, stored
        gap = gap_of(stored[0])
        assert gap is not None and stored[0]["seq"] == 1
        assert (gap["reason"], gap["fromSeq"], gap["toSeq"], gap["lines"]) == ("deleted", 1, 300, 300)
        assert gap["bytes"] == sum(len(r["message"].encode()) for r in recs)
        assert (await verify(hub, task))["verdict"] == "complete"
        # Again: the gap is newer than nothing... it is older than the cut: folded into itself, counted 0.
        resp = await client.delete(logs_path(task), params={"before": "9999-12-31T23:59:59.999999Z"})
        assert resp.status_code == 200 and resp.json() == {"deletedCount": 0}, resp.text
        again = await fetch_all(client, task)
        assert [gap_of(r) for r in again] == [gap], again
        assert (await verify(hub, task))["verdict"] == "complete"
        task_row = (await client.get(f"/api/v1/tasks/{task}")).json()
        assert task_row["totalLogs"] == 1 and task_row["durableSeq"] == 300, task_row
        # Unknown and bad task ids.
        resp = await client.delete(logs_path("never-was"), params={"before": BEFORE})
        assert resp.status_code in (200, 404), resp.text
        if resp.status_code == 200:
            assert resp.json() == {"deletedCount": 0}
        assert (await client.get("/api/v1/tasks/never-was")).status_code == 404
        assert_error(await client.delete(logs_path("bad%20id"), params={"before": BEFORE}), 400, "INVALID_TASK_ID")
        assert await fetch_all(client, other) == bystander


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"values": []}, 400, "INVALID_REQUEST"),
        ({"values": [""]}, 400, "INVALID_REQUEST"),
        ({"values": ["ok", ""]}, 400, "INVALID_REQUEST"),
        ({"values": "secret"}, 400, "INVALID_REQUEST"),
        ({"values": [None]}, 400, "INVALID_REQUEST"),
        ({"values": [1]}, 400, "INVALID_REQUEST"),
        ({"values": [["secret"]]}, 400, "INVALID_REQUEST"),
        ({"values": ["x" * 4097]}, 400, "INVALID_REQUEST"),
        ({"values": [f"v{i}" for i in range(101)]}, 400, "INVALID_REQUEST"),
        ({"values": ["secret"], "regex": True}, 400, "INVALID_REQUEST"),
        ({}, 400, "INVALID_REQUEST"),
        ([], 400, "INVALID_REQUEST"),
        ("secret", 400, "INVALID_REQUEST"),
        (b'{"values": ["secret"', 400, "INVALID_REQUEST"),
        (b'{"values": ["\\ud800"]}', 400, "INVALID_REQUEST"),  # a lone surrogate
        (b"\xff\xfe", 400, "INVALID_REQUEST"),
    ],
)
async def test_a_bad_redaction_is_400_and_changes_nothing(
    sqlite_hub_factory: InProcessHubFactory, body: Any, status: int, code: str
) -> None:
    hub = await sqlite_hub_factory.astart()
    async with hub.http() as client:
        resp = await client.post(logs_path("leak"), json=[{"message": "the secret is here"}] * 3)
        assert resp.status_code == 200
        held = await fetch_all(client, "leak")
        if isinstance(body, bytes):
            resp = await client.post("/api/v1/tasks/leak/redact", content=body,
                                     headers={"Content-Type": "application/json"})
        else:
            resp = await client.post("/api/v1/tasks/leak/redact", json=body)
        assert_error(resp, status, code)
        assert await fetch_all(client, "leak") == held


async def test_redaction_values_are_literal_huge_and_unicode(hub_factory: InProcessHubFactory) -> None:
    """Values are text, not patterns: `.*` and a catastrophic regex take only
    themselves; 100 values of 4096 characters are answered in bounded time;
    unicode and JSON-special values go; the log still verifies."""
    hub = await hub_factory.astart()
    task = "patterns"
    evil = "(a+)+$"
    messages = [
        "keep me whole",
        "literal .* here",
        "a" * 3000 + "!",  # what (a+)+$ as a regex would take forever on
        f"the pattern {evil} itself",
        "ünïcødé 🔑 key",
        'json "\\\u2028 line',
    ]
    recs = [{"seq": i + 1, "timestamp": now_ts(), "source": "stdout", "level": "INFO", "message": m,
             "lineNumber": i + 1, "metadata": {}} for i, m in enumerate(messages)]
    huge = [f"{i:03d}" + "q" * 4093 for i in range(99)]
    async with hub.ws() as ws, hub.http() as client:
        await start_run(ws, task, "run-p")
        await send(ws, task, "run-p", recs)
        await finish(ws, task, "run-p", recs)
        with trio.fail_after(20):
            resp = await client.post(f"/api/v1/tasks/{task}/redact", json={"values": [".*", evil, "🔑", "\u2028"]})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"redactedRecords": 4, "seq": 7}
        with trio.fail_after(20):
            resp = await client.post(f"/api/v1/tasks/{task}/redact", json={"values": [*huge, "a" * 4096]})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"redactedRecords": 0, "seq": 8}
        stored = await fetch_all(client, task)
        assert [r["message"] for r in stored[:6]] == [
            "keep me whole", "literal *** here", "a" * 3000 + "!", "the pattern *** itself",
            "ünïcødé *** key", 'json "\\*** line',
        ]
        assert [r.get("kind") for r in stored[6:]] == ["redaction", "redaction"]
        assert all(evil not in json.dumps(r["metadata"]) for r in stored[6:])
        check_stored(stored)
    assert (await verify(hub, task))["verdict"] == "complete"


# --- DELETE racing appends, replays, pagers and verify ---




async def test_delete_before_while_producers_append_and_subscribers_replay(hub_factory: InProcessHubFactory) -> None:
    """An admin's DELETE ?before= over a task many chunks long, while one run
    appends newer lines, subscribers replay it from seq 1 (one already
    live, more subscribing during the delete), a REST pager walks it and
    verify is asked: every deleted line leaves the log into one `deleted`
    gap at seq 1, every seq reaches each subscriber once as a line or inside
    a gap it was sent, nothing is sent twice or out of order, the verdict
    kept on the task is not stale, and the log verifies afterwards. (A page
    read before a delete and sent after its gap: the xfail
    test_a_page_read_before_a_delete_is_not_sent_after_its_gap.)"""
    hub = await hub_factory.astart()
    task, other = "purged", "neighbour"
    old = lines(1, 6000, "old", pad=40)
    new = [dict(r, timestamp=now_ts()) for r in lines(1, 1500, "new")]
    async with hub.ws() as a, hub.ws() as b, hub.ws() as n, hub.http() as client:
        await start_run(a, task, "run-old")
        # One chunk per frame of 100: 60 chunks, more than one transaction of the delete holds.
        await send(a, task, "run-old", old, batch=100)
        await finish(a, task, "run-old", old)
        await start_run(n, other, "run-n")
        neighbour = lines(1, 500, "n")
        await send(n, other, "run-n", neighbour, batch=100)
        await finish(n, other, "run-n", neighbour)
        neighbour_stored = await fetch_all(client, other)
        await start_run(b, task, "run-new")
        await send(b, task, "run-new", new[:10])
        watchers: list[Watcher] = []
        pages: list[list[int]] = []
        seen_verdicts: list[str] = []
        deleted = trio.Event()
        all_sent = trio.Event()

        async def subscriber(delay: int) -> None:
            async with hub.ws() as ws:
                for _ in range(delay):
                    await trio.sleep(0)
                watcher = Watcher(task)
                watchers.append(watcher)
                await ws.subscribe(task, from_seq=1)
                await watch(ws, watcher, all_sent, 6000 + len(new))

        async def appender() -> None:
            for start in range(10, len(new), 20):
                await b.send({"type": "logs", "taskId": task, "producer": "run-new",
                              "records": new[start:start + 20]})
                await trio.sleep(0)
            await wait_ack(b, task, "run-new", len(new))
            all_sent.set()

        async def deleter() -> None:
            resp = await client.delete(logs_path(task), params={"before": BEFORE})
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"deletedCount": 6000}
            deleted.set()

        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                for delay in (0, 3, 30, 300):
                    nursery.start_soon(subscriber, delay)
                nursery.start_soon(page_all, client, task, pages, all_sent)
                nursery.start_soon(verdicts, hub, task, seen_verdicts, all_sent)
                nursery.start_soon(deleter)
                nursery.start_soon(appender)
        assert deleted.is_set()
        # The verdict kept on the task is one computed after the last cut, or none.
        kept_verdict = (await client.get(f"/api/v1/tasks/{task}")).json()["verdict"]
        assert kept_verdict in ("unverified", (await verify(hub, task))["verdict"]), kept_verdict
        await finish(b, task, "run-new", new)
        stored = await fetch_all(client, task)
        check_stored(stored)
        assert stored[0]["seq"] == 1
        gap = gap_of(stored[0])
        assert gap is not None and gap["reason"] == "deleted" and gap["lines"] == 6000, stored[0]
        assert not [r for r in stored[1:] if r.get("kind") is not None]
        assert all(r["timestamp"] >= BEFORE for r in stored[1:])
        assert [r["message"] for r in stored[1:]] == [r["message"] for r in new]
        for watcher in watchers:
            # Each seq arrived as a line or lies in a gap the subscriber holds,
            # and no old line came after the gap that says it went.
            covered = {s for g in watcher.gaps.values() for s in range(g["fromSeq"], g["toSeq"] + 1)}
            missed = sorted(set(range(1, 6000 + len(new) + 1)) - set(watcher.lines) - covered)
            assert missed == [], (
                f"seqs {missed[:5]}..{missed[-5:]} ({len(missed)}) neither sent nor in a gap sent; "
                f"gaps {[(s, g['fromSeq'], g['toSeq']) for s, g in watcher.gaps.items()]}, "
                f"lines {watcher.lines[:3]}..{watcher.lines[-3:]}"
            )
        for walk in pages:
            assert walk == sorted(set(walk))
        assert await fetch_all(client, other) == neighbour_stored
    answer = await verify(hub, task)
    assert answer["verdict"] == "complete", answer
    assert (await verify(hub, other))["verdict"] == "complete"


async def test_delete_all_while_appending_never_reuses_a_seq_nor_stores_a_resend(
    hub_factory: InProcessHubFactory,
) -> None:
    """DELETE without `before` while a run appends: no gap is left, what was
    appended after it stays at seqs above every deleted one, the deleted
    records resent are acknowledged and not stored again, and verify names
    them missing: never `complete`."""
    hub = await hub_factory.astart()
    task = "wiped"
    first = lines(1, 3000, "w", ts=now_ts())
    async with hub.ws() as ws, hub.ws() as viewer, hub.http() as client:
        await start_run(ws, task, "run-w")
        await send(ws, task, "run-w", first, batch=100)
        await viewer.subscribe(task, from_seq=1)
        watcher = Watcher(task)
        await watch(viewer, watcher, last=3000)
        more = lines(3001, 4000, "w", ts=now_ts())
        counts: list[int] = []

        async def appender() -> None:
            for start in range(0, len(more), 25):
                await ws.send({"type": "logs", "taskId": task, "producer": "run-w", "records": more[start:start + 25]})
                await trio.sleep(0)
            await wait_ack(ws, task, "run-w", 4000)

        async def deleter() -> None:
            resp = await client.delete(logs_path(task))
            assert resp.status_code == 200, resp.text
            counts.append(resp.json()["deletedCount"])

        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(appender)
                nursery.start_soon(deleter)
        stored = await fetch_all(client, task)
        check_stored(stored)
        assert not [r for r in stored if r.get("kind") is not None], "a DELETE without before leaves no gap"
        # What went and what stayed add up to what was sent, each once.
        assert counts[0] + len(stored) == 4000, (counts, len(stored))
        assert all(r["seq"] > 3000 for r in stored)
        kept = [r["seq"] for r in stored]
        # The deleted ones resent: acknowledged, not stored again.
        await ws.send({"type": "logs", "taskId": task, "producer": "run-w", "records": first[:500]})
        await wait_ack(ws, task, "run-w", 500)
        await ws.send({"type": "logs", "taskId": task, "producer": "run-w", "records": lines(4001, 4001, "w")})
        await wait_ack(ws, task, "run-w", 4001)
        after = await fetch_all(client, task)
        assert [r["seq"] for r in after] == [*kept, 4001]
        await finish(ws, task, "run-w", [*first, *more, *lines(4001, 4001, "w")])
        # The live viewer went on: it got the new line at the new seq.
        await watch(viewer, watcher, last=4001)
        assert watcher.lines[-1] == 4001
    answer = await verify(hub, task)
    assert answer["verdict"] == "incomplete", answer
    (run,) = answer["producers"]
    assert run["missing"] and run["missing"][0]["fromPseq"] == 1, run


# --- a redaction racing replays and appends --------------------------------------


SECRET = "hunter2-SECRET-t0ken"


async def test_redaction_while_subscribers_replay_and_a_run_appends(hub_factory: InProcessHubFactory) -> None:
    """A redaction over a task of many chunks while subscribers replay it
    from seq 1, a run appends (lines without the secret) and verify is
    asked: the stored log holds the secret nowhere, the `redacted` seqs are
    records that held it, nothing is sent twice or out of order, verify is
    `complete` before and after, and another task keeps its secret (it was
    not named). (What a subscriber catching up keeps, and verify during the
    redaction: the xfail tests test_a_page_read_before_a_redaction_... and
    test_verify_during_a_redaction_gives_the_verdict_from_before_it.)"""
    hub = await hub_factory.astart()
    task, other = "leaky", "not-leaky"
    recs = [dict(r, message=f"{r['message']} {SECRET}" if r["seq"] % 3 == 0 else r["message"])
            for r in lines(1, 8000, "s", ts=now_ts(), pad=200)]
    holders = {r["seq"] for r in recs if SECRET in r["message"]}
    async with hub.ws() as ws, hub.ws() as ows, hub.http() as client:
        await start_run(ws, task, "run-s")
        # Frames of 250 records of ~230 bytes: ~30 chunks of 64 KiB.
        await send(ws, task, "run-s", recs, batch=250)
        await start_run(ows, other, "run-x")
        other_recs = [dict(r, message=f"x {SECRET}") for r in lines(1, 20, "x")]
        await send(ows, other, "run-x", other_recs)
        assert (await verify(hub, task))["verdict"] == "unverified"
        await finish(ws, task, "run-s", recs)
        assert (await verify(hub, task))["verdict"] == "complete"
        more = lines(1, 600, "late", ts=now_ts())
        watchers: list[Watcher] = []
        seen_verdicts: list[str] = []
        answers: list[dict[str, Any]] = []
        done = trio.Event()

        async def subscriber(delay: int) -> None:
            async with hub.ws() as sub:
                for _ in range(delay):
                    await trio.sleep(0)
                watcher = Watcher(task)
                watchers.append(watcher)
                await sub.subscribe(task, from_seq=1)
                await watch(sub, watcher, done, 8001)
                # Whatever the redaction's last step sent has arrived by now.
                await watch(sub, watcher, last=watcher.top)

        async def appender() -> None:
            async with hub.ws() as late:
                await start_run(late, task, "run-late")
                for start in range(0, len(more), 30):
                    await late.send({"type": "logs", "taskId": task, "producer": "run-late",
                                     "records": more[start:start + 30]})
                    await trio.sleep(0)
                await wait_ack(late, task, "run-late", len(more))
                await finish(late, task, "run-late", more)

        async def redactor() -> None:
            resp = await client.post(f"/api/v1/tasks/{task}/redact", json={"values": [SECRET]})
            assert resp.status_code == 200, resp.text
            answers.append(resp.json())
            done.set()

        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                for delay in (0, 3, 30, 300):
                    nursery.start_soon(subscriber, delay)
                nursery.start_soon(verdicts, hub, task, seen_verdicts, done)
                nursery.start_soon(redactor)
                nursery.start_soon(appender)
        (answer,) = answers
        assert answer["redactedRecords"] == len(holders)
        assert 8001 <= answer["seq"] <= 8001 + len(more)
        stored = await fetch_all(client, task)
        check_stored(stored)
        assert not [r["seq"] for r in stored if SECRET in json.dumps(r)]
        assert len([r for r in stored if r.get("kind") is None]) == 8000 + len(more)
        (audit,) = [r for r in stored if r.get("kind") == "redaction"]
        assert audit["seq"] == answer["seq"]
        assert audit["metadata"]["redaction"]["records"] == len(holders)
        for watcher in watchers:
            assert set(watcher.redacted) <= holders
        assert [r["message"] for r in await fetch_all(client, other)] == [r["message"] for r in other_recs]
    # (`unverified` while the late run has not sent its summary.)
    assert set(seen_verdicts) <= {"complete", "incomplete", "unverified"}, seen_verdicts
    final = await verify(hub, task)
    assert final["verdict"] == "complete", final


async def test_verify_during_a_redaction_gives_the_verdict_from_before_it(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real store, its verification interleaved with a whole redaction at
    one fixed point: once it has hashed its first chunk (the way a redaction
    request arriving then would run). Read in separate snapshots, the chunks
    hashed before a redaction step and the redaction record read after it
    counted the change twice: `incomplete` for a complete log."""
    sent = [rec(p, f"line {p} {SECRET} " + "x" * 80, producer="a", at=p) for p in range(1, 3001)]
    tally = Tally()
    for p, r in enumerate(sent, 1):
        tally.add(p, r.source, None, False, 0, r.message)
    for start in range(0, len(sent), 250):  # a chunk each
        await store.append(sent[start:start + 250])
    await store.set_state("t1", "succeeded", 0, "a", tally.summary(len(sent)))
    assert (await store.verify("t1")).verdict == "complete"
    redacted: list[int] = []
    add_chunk = Verification.add_chunk

    def add_chunk_then_redact(check: Verification, row: Any) -> None:
        add_chunk(check, row)
        if not redacted:
            # Verification hashes in a worker thread: the redaction runs on the
            # test's loop meanwhile, and verification goes on once it is done.
            redacted.append(trio.from_thread.run(hub_redact, store, "t1", [SECRET]).records)

    monkeypatch.setattr(Verification, "add_chunk", add_chunk_then_redact)
    during = await store.verify("t1")
    monkeypatch.undo()
    assert redacted == [3000]
    after = await store.verify("t1")
    assert after.verdict == "complete", after.message
    assert during.verdict == "complete", during.message


# --- a cap under concurrent producers ----------------------------------------------


async def test_a_cap_under_concurrent_producers_and_a_replaying_subscriber(hub_factory: InProcessHubFactory) -> None:
    """Three runs write one capped task at once while a subscriber replays it
    from seq 1 and a pager walks it: one `cap` gap, what is kept within the
    cap, every seq sent to the subscriber once or inside a gap it was sent,
    a dropped record resent is acknowledged and not stored, and the log
    verifies; a task beside it, under the cap, is untouched."""
    cap = 48 * 1024
    hub = await hub_factory.astart("--max-task-bytes", str(cap))
    task, other = "capped", "small"
    runs = {f"run-{k}": lines(1, 700, f"{k}", ts=now_ts(), pad=60) for k in "abc"}
    total = sum(len(v) for v in runs.values())
    async with hub.ws() as o, hub.ws() as viewer, hub.http() as client:
        await start_run(o, other, "run-o")
        small = lines(1, 50, "o", ts=now_ts())
        await send(o, other, "run-o", small)
        await finish(o, other, "run-o", small)
        small_stored = await fetch_all(client, other)
        await viewer.subscribe(task, from_seq=1)
        watcher = Watcher(task)
        pages: list[list[int]] = []
        sent = trio.Event()

        async def producer(name: str) -> None:
            async with hub.ws() as ws:
                await start_run(ws, task, name)
                recs = runs[name]
                for start in range(0, len(recs), 35):
                    await ws.send({"type": "logs", "taskId": task, "producer": name, "records": recs[start:start + 35]})
                    await trio.sleep(0)
                await wait_ack(ws, task, name, len(recs))
                # Its first records sent again (in the head the cap keeps): duplicates,
                # acknowledged. (Dropped ones: test_a_dropped_record_sent_again_is_a_duplicate.)
                await ws.send({"type": "logs", "taskId": task, "producer": name, "records": recs[:20]})
                await wait_ack(ws, task, name, 20)
                await finish(ws, task, name, recs)

        async def producers() -> None:
            async with trio.open_nursery() as inner:
                for name in runs:
                    inner.start_soon(producer, name)
            sent.set()

        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(producers)
                nursery.start_soon(page_all, client, task, pages, sent)
                nursery.start_soon(watch, viewer, watcher, sent, total)
            while True:
                stored = await fetch_all(client, task)
                kept = sum(len(r["message"].encode()) for r in stored if r.get("kind") != "gap")
                if kept <= cap:
                    break
                await trio.sleep(0.05)
        check_stored(stored)
        gaps = [r for r in stored if r.get("kind") == "gap"]
        assert len(gaps) == 1, [r["seq"] for r in gaps]
        info = gap_of(gaps[0])
        assert info is not None and info["reason"] == "cap"
        assert info["lines"] + len(stored) - 1 == total
        assert max(r["seq"] for r in stored) == total, "a resend of a dropped record was stored again"
        covered = {s for g in watcher.gaps.values() for s in range(g["fromSeq"], g["toSeq"] + 1)}
        assert set(range(1, total + 1)) <= set(watcher.lines) | covered
        assert await fetch_all(client, other) == small_stored
    answer = await verify(hub, task)
    assert answer["verdict"] == "complete", answer
    assert (await verify(hub, other))["verdict"] == "complete"


# --- retention and the identity horizon -------------------------------------------


# 0.00003 days is 2.6 s: a producer quiet that long is past the horizon.
RETENTION = ("--retention-days", "0.00003", "--retention-interval", "0.1")


async def wait_for(predicate: Any, what: str) -> None:
    with trio.fail_after(PATIENCE):
        while not await predicate():
            await trio.sleep(0.05)


async def test_retention_cuts_a_running_quiet_run_which_then_resumes(hub_factory: InProcessHubFactory) -> None:
    """Retention takes a running task's old head into one `retention` gap; its
    run, quiet past the horizon but still running, keeps its mark: a resend
    of what went is a duplicate (acknowledged, not stored), its next record
    is taken (no SEQ_GAP), and the log verifies."""
    hub = await hub_factory.astart(*RETENTION)
    task = "aging"
    old = lines(1, 400, "aged")
    async with hub.ws() as ws, hub.ws() as viewer, hub.http() as client:
        await start_run(ws, task, "run-q")
        await send(ws, task, "run-q", old)
        await viewer.subscribe(task, from_seq=1)
        watcher = Watcher(task)

        async def cut() -> bool:
            stored = await fetch_all(client, task)
            return len(stored) == 1 and gap_of(stored[0]) is not None

        await wait_for(cut, "retention to cut the head")
        (gap_row,) = await fetch_all(client, task)
        gap = gap_of(gap_row)
        assert gap is not None and (gap["reason"], gap["fromSeq"], gap["toSeq"], gap["lines"]) == (
            "retention", 1, 400, 400)
        # Past the horizon: a finished run would be forgotten by now.
        await trio.sleep(3.0)
        # (Not seq 1, which the gap took: test_a_dropped_record_sent_again_is_a_duplicate.)
        await ws.send({"type": "logs", "taskId": task, "producer": "run-q", "records": old[1:200]})
        await wait_ack(ws, task, "run-q", 200)
        fresh = [dict(r, timestamp=now_ts()) for r in lines(401, 450, "fresh")]
        await send(ws, task, "run-q", fresh)
        stored = await fetch_all(client, task)
        check_stored(stored)
        assert [r["seq"] for r in stored] == [1, *range(401, 451)], [r["seq"] for r in stored][:20]
        await finish(ws, task, "run-q", [*old, *fresh])
        await watch(viewer, watcher, last=450)
        assert watcher.lines[-1] == 450
        assert not [s for s in watcher.lines if s > 450], watcher.lines[-5:]
        gap_before = any(r.get("kind") == "gap" for r in await fetch_all(client, task))
        answer = await verify(hub, task)
        gap_after = any(r.get("kind") == "gap" for r in await fetch_all(client, task))
    if gap_after:
        assert answer["verdict"] == "complete", answer
    elif not gap_before:
        # The run finished: the next pass took the old gap too, and a finished
        # task's old records go without one (README "Gaps"): never `complete` then.
        assert answer["verdict"] == "incomplete", answer
        assert answer["producers"][0]["missing"][0]["fromPseq"] == 1, answer


async def test_a_finished_run_pruned_by_retention_then_resent_is_stored_at_most_once(
    hub_factory: InProcessHubFactory,
) -> None:
    """docs/identity.md, "the identity horizon": a finished run quiet past the
    horizon is forgotten with its old records (no gap: the task is done);
    its spool flushed after that is stored again, once, never twice, and at
    new seqs; verify never calls the log complete while records are gone.
    A running run of another task, as quiet, keeps its identity."""
    hub = await hub_factory.astart(*RETENTION)
    task, live = "gone", "still-running"
    old = lines(1, 300, "g")
    async with hub.ws() as ws, hub.ws() as lws, hub.http() as client:
        await start_run(ws, task, "run-g")
        await send(ws, task, "run-g", old)
        await finish(ws, task, "run-g", old)
        await start_run(lws, live, "run-l")
        await send(lws, live, "run-l", [dict(r, timestamp=now_ts()) for r in lines(1, 10, "l")])

        async def emptied() -> bool:
            return await fetch_all(client, task) == []

        await wait_for(emptied, "retention to delete the finished task's records")
        assert (await verify(hub, task))["verdict"] != "complete"
        # Past the horizon from the run's last write: it is forgotten.
        await trio.sleep(3.0)
        # The same run's spool flushed again, records and final state.
        async with hub.ws() as again:
            await start_run(again, task, "run-g")
            for start in range(0, len(old), 50):
                await again.send({"type": "logs", "taskId": task, "producer": "run-g",
                                  "records": old[start:start + 50]})
            await wait_ack(again, task, "run-g", 300)
            # And again (not its first record, whose seq a retention gap may hold by now:
            # test_a_resend_of_the_record_under_a_gaps_seq_is_a_duplicate).
            await again.send({"type": "logs", "taskId": task, "producer": "run-g", "records": old[1:]})
            await wait_ack(again, task, "run-g", 300)
            await finish(again, task, "run-g", old)
        stored = await fetch_all(client, task)
        check_stored(stored)
        messages = [r["message"] for r in stored if r.get("kind") is None]
        assert len(messages) == len(set(messages)), "a resent record stored twice"
        assert all(r["seq"] > 300 for r in stored), "a seq handed out again"
        # Complete only when every record is stored or inside a gap (retention may
        # have cut the resent ones while the run said `running` again).
        answer = await verify(hub, task)
        accounted = len(messages) + sum(g["lines"] for r in stored if (g := gap_of(r)) is not None)
        assert answer["verdict"] != "complete" or accounted == 300, (answer, accounted)
        # The quiet running run of the other task kept its mark: its next record is taken.
        nxt = [dict(r, timestamp=now_ts()) for r in lines(11, 12, "l")]
        await send(lws, live, "run-l", nxt)
        assert [r["seq"] for r in await fetch_all(client, live)][-2:] == [11, 12]


@pytest.mark.parametrize("how", ["cap", "delete", "retention"])
async def test_a_dropped_record_sent_again_is_a_duplicate(hub_factory: InProcessHubFactory, how: str) -> None:
    """README "Capping a task": "A dropped line sent again (an agent resending
    after a reconnect) is a duplicate, acknowledged and not stored", and
    docs/identity.md after a DELETE or retention. Every dropped record but
    the one whose seq the gap took (that one: the test below)."""
    task, hub = await dropped_task(hub_factory, how)
    recs = lines(1, 400, "d", ts=None if how != "cap" else now_ts(), pad=100)
    async with hub.ws() as ws, hub.http() as client:
        before = await fetch_all(client, task)
        (gap_row,) = [r for r in before if r.get("kind") == "gap"]
        gap = gap_of(gap_row)
        assert gap is not None
        dropped = [r for r in recs if gap["fromSeq"] <= r["seq"] <= gap["toSeq"] and r["seq"] != gap_row["seq"]]
        assert dropped
        await ws.send({"type": "logs", "taskId": task, "producer": "run-d", "records": dropped})
        await wait_ack(ws, task, "run-d", dropped[-1]["seq"])
        assert await fetch_all(client, task) == before


@pytest.mark.parametrize("how", ["cap", "delete", "retention"])
async def test_a_resend_of_the_record_under_a_gaps_seq_is_a_duplicate(
    hub_factory: InProcessHubFactory, how: str
) -> None:
    task, hub = await dropped_task(hub_factory, how)
    recs = lines(1, 400, "d", ts=None if how != "cap" else now_ts(), pad=100)
    async with hub.ws() as ws, hub.http() as client:
        before = await fetch_all(client, task)
        (gap_row,) = [r for r in before if r.get("kind") == "gap"]
        await ws.send({"type": "logs", "taskId": task, "producer": "run-d", "records": [recs[gap_row["seq"] - 1]]})
        await wait_ack(ws, task, "run-d", gap_row["seq"])
        assert await fetch_all(client, task) == before


async def dropped_task(hub_factory: InProcessHubFactory, how: str) -> tuple[str, Any]:
    """A running task of one run (seqs 1..400, its own seqs the task's) whose
    records were cut into a gap by `how`, the gap settled."""
    args = {"cap": ("--max-task-bytes", "16K"), "delete": (), "retention": RETENTION}[how]
    hub = await hub_factory.astart(*args)
    task = f"dropped-{how}"
    recs = lines(1, 400, "d", ts=None if how != "cap" else now_ts(), pad=100)
    async with hub.ws() as ws, hub.http() as client:
        await start_run(ws, task, "run-d")
        await send(ws, task, "run-d", recs, batch=100)
        if how == "delete":
            resp = await client.delete(logs_path(task), params={"before": old_ts(200)})
            assert resp.json() == {"deletedCount": 199}, resp.text

        async def settled() -> bool:
            stored = await fetch_all(client, task)
            gaps = [r for r in stored if r.get("kind") == "gap"]
            if how == "cap":
                return len(gaps) == 1 and sum(len(r["message"]) for r in stored if not r.get("kind")) <= 16 * 1024
            return len(gaps) == 1 and (how != "retention" or len(stored) == 1)

        await wait_for(settled, f"the {how} to settle")
    return task, hub


# --- a catch-up page read before a removal, sent after it ---------------------------


class PausedCatchUp:
    """The in-process hub's own store (hub.server opens it), whose catch-up
    read (`read_range`) number `nth` of `task` stops once it has read its
    page, until `go` is set: the removal the test makes then commits while
    that page is in flight, as it may on a busy hub."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, task: str, nth: int) -> None:
        import hub.server

        self.task, self.nth, self.reads = task, nth, 0
        self.paused, self.go = trio.Event(), trio.Event()
        opener = hub.server.open_store_from_url

        def open_store(*args: Any, **kwargs: Any) -> Any:
            store = opener(*args, **kwargs)
            read_range = store.read_range

            async def paused_read(task_id: str, *rest: Any, **kw: Any) -> Any:
                records = await read_range(task_id, *rest, **kw)
                if task_id == self.task:
                    self.reads += 1
                    if self.reads == self.nth:
                        self.paused.set()
                        await self.go.wait()
                return records

            store.read_range = paused_read
            return store

        monkeypatch.setattr(hub.server, "open_store_from_url", open_store)


async def test_a_page_read_before_a_delete_is_not_sent_after_its_gap(
    hub_factory: InProcessHubFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = "paged-out"
    pause = PausedCatchUp(monkeypatch, task, nth=2)
    hub = await hub_factory.astart()
    old = lines(1, 3000, "old")
    async with hub.ws() as ws, hub.ws() as viewer, hub.http() as client:
        await start_run(ws, task, "run-p")
        await send(ws, task, "run-p", old, batch=500)
        watcher = Watcher(task)
        await viewer.subscribe(task, from_seq=1)
        with trio.fail_after(20):
            await pause.paused.wait()
            resp = await client.delete(logs_path(task), params={"before": BEFORE})
            assert resp.json() == {"deletedCount": 3000}, resp.text
            pause.go.set()
            await watch(viewer, watcher, last=3000)
            with trio.move_on_after(0.5):
                await watch(viewer, watcher, last=3001)
    assert watcher.gaps, "the subscriber was never sent the gap"
    assert watcher.after_gap == [], f"deleted lines sent after their gap: {watcher.after_gap[:3]}"


async def test_a_page_read_before_a_redaction_is_not_sent_after_its_redacted_frame(
    hub_factory: InProcessHubFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = "leaked-page"
    pause = PausedCatchUp(monkeypatch, task, nth=1)
    hub = await hub_factory.astart()
    recs = [dict(r, message=f"{r['message']} {SECRET}") for r in lines(1, 1000, "p", ts=now_ts())]
    async with hub.ws() as ws, hub.ws() as viewer, hub.http() as client:
        await start_run(ws, task, "run-p")
        await send(ws, task, "run-p", recs, batch=500)
        watcher = Watcher(task)
        await viewer.subscribe(task, from_seq=1)
        with trio.fail_after(20):
            await pause.paused.wait()
            resp = await client.post(f"/api/v1/tasks/{task}/redact", json={"values": [SECRET]})
            assert resp.json() == {"redactedRecords": 1000, "seq": 1001}, resp.text
            pause.go.set()
            await watch(viewer, watcher, last=1000)
            with trio.move_on_after(0.5):
                await watch(viewer, watcher, last=1001)
    assert watcher.redacted, "the subscriber was never sent a `redacted` frame"
    leaked = [s for s, r in watcher.held.items() if SECRET in json.dumps(r)]
    assert leaked == [], f"the subscriber holds the secret in {len(leaked)} records, e.g. {leaked[:3]}"
