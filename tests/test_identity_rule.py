"""One identity rule (docs/identity.md): the hub gives every task seq, a
client's `seq` is its own producer seq, identity is (task, producer, seq).

Each test here is a hole a hostile review found when a client's number could
become a task seq, or when a record had no identity at all.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from hub.store import core
from hub.store.base import CONFLICT, DUPLICATE, GAP, INSERTED, Incoming
from hub.store.sqlite import run_op
from hub.store.sqlite_schema import create_schema
from hub.store.sqlite_sql import SQLiteSql
from hub.store.steps import drive_sync
from keruta.limits import MAX_SEQ
from tests import hubclient
from tests.hubclient import assert_error, fetch_all, logs_path
from tests.inprocess import InProcessHubFactory
from tests.tcpproxy import target_of, tcp_proxy

hub, hub_factory, sqlite_hub_factory = hubclient.hub, hubclient.hub_factory, hubclient.sqlite_hub_factory

PATIENCE = 20


def producer_frame(task: str, producer: str | None, seqs: range, text: str = "line") -> dict[str, Any]:
    records = [
        {"seq": s, "timestamp": "2026-01-02T03:04:05.000000Z", "source": "stdout", "level": "INFO",
         "message": f"{text} {s}", "lineNumber": s, "metadata": {}}
        for s in seqs
    ]
    frame: dict[str, Any] = {"type": "logs", "taskId": task, "records": records}
    if producer is not None:
        frame["producer"] = producer
    return frame


# --- a client's seq never becomes a task seq ---------------------------------


@pytest.mark.parametrize("ahead", [5, MAX_SEQ])
async def test_a_post_ahead_never_freezes_the_live_view(hub, ahead: int) -> None:
    task = "frozen"
    async with hub.ws() as viewer, hub.http() as client:
        await viewer.subscribe(task, from_seq=1)
        resp = await client.post(logs_path(task), json={"message": "ahead", "seq": ahead})
        # The anonymous producer's first record is its seq 1: this one is refused,
        # and says where to resume; it takes no task seq.
        body = assert_error(resp, 409, "SEQ_GAP")
        assert "resend from 1" in body["message"]
        async with hub.ws() as producer:
            await producer.send(producer_frame(task, "run-1", range(1, 4)))
            with trio.fail_after(PATIENCE):
                while not ((f := await producer.recv())["type"] == "ack" and f["seq"] == 3):
                    assert f["type"] != "error", f
        with trio.fail_after(PATIENCE):
            seen = await viewer.collect(task, 3)
        assert seen == [1, 2, 3]
        task_row = (await client.get(f"/api/v1/tasks/{task}")).json()
        assert (task_row["durableSeq"], task_row["totalLogs"]) == (3, 3)
        stored = await fetch_all(client, task)
    assert [(r["seq"], r["message"]) for r in stored] == [(1, "line 1"), (2, "line 2"), (3, "line 3")]


async def test_a_producers_huge_seq_is_its_own_and_the_task_counts_on(hub) -> None:
    task = "huge"
    async with hub.http() as client:
        for seq in (1, 2):
            resp = await client.post(logs_path(task), json={"message": f"p{seq}", "producer": "p", "seq": seq})
            assert resp.status_code == 200, resp.text
            assert resp.json()["seq"] == seq
        # Another producer's seqs start from 1 too: same numbers, other identities.
        resp = await client.post(logs_path(task), json=[{"message": "q1", "producer": "q", "seq": 1}])
        assert resp.status_code == 200, resp.text
        assert resp.json()["seqs"] == [3]
        stored = await fetch_all(client, task)
    assert [r["seq"] for r in stored] == [1, 2, 3]


async def test_anonymous_clients_get_acks_in_their_own_seqs(hub) -> None:
    """The seed's client: `logs` frames without producer, its own seqs 1, 2, 3."""
    task = "seed"
    async with hub.http() as client:
        resp = await client.post(logs_path(task), json={"message": "posted first"})
        assert resp.status_code == 200 and resp.json()["seq"] == 1
    async with hub.ws() as ws:
        await ws.send(producer_frame(task, None, range(1, 4)))
        with trio.fail_after(PATIENCE):
            ack = await ws.recv_type("ack", skip=())
        assert ack == {"type": "ack", "taskId": task, "seq": 3}
    async with hub.http() as client:
        stored = await fetch_all(client, task)
    assert [(r["seq"], r["message"]) for r in stored] == [
        (1, "posted first"), (2, "line 1"), (3, "line 2"), (4, "line 3")
    ]


async def test_a_producer_without_seq_is_refused(hub) -> None:
    async with hub.http() as client:
        resp = await client.post(logs_path("t"), json={"message": "x", "producer": "p"})
        assert_error(resp, 400, "INVALID_REQUEST", "seq")
        resp = await client.post(logs_path("t"), json={"message": "x", "producer": "~hub", "seq": 1})
        assert_error(resp, 400, "INVALID_REQUEST", "producer")


# --- an identity once stored is never stored again -----------------------------


async def test_an_identity_is_not_stored_again_after_a_delete(hub) -> None:
    task = "deleted"
    async with hub.http() as client:
        # Ahead of the anonymous producer: refused before and after the delete.
        assert_error(await client.post(logs_path(task), json={"message": "three", "seq": 3}), 409, "SEQ_GAP")
        for seq in (1, 2, 3):
            resp = await client.post(logs_path(task), json={"message": f"m{seq}", "seq": seq})
            assert resp.status_code == 200, resp.text
        assert (await client.delete(logs_path(task))).json() == {"deletedCount": 3}
        resp = await client.post(logs_path(task), json={"message": "m3", "seq": 3})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"id": None, "seq": None}
        assert await fetch_all(client, task) == []
        # The next one is new, and takes the next task seq: deleted seqs are not reused.
        resp = await client.post(logs_path(task), json={"message": "m4", "seq": 4})
        assert resp.json()["seq"] == 4
        assert [r["message"] for r in await fetch_all(client, task)] == ["m4"]


async def test_a_retried_post_with_producer_and_seq_is_stored_once(hub) -> None:
    task = "retried"
    body = [{"message": f"m{s}", "producer": "ci-step", "seq": s} for s in (1, 2)]
    async with hub.http() as client:
        first = await client.post(logs_path(task), json=body)
        again = await client.post(logs_path(task), json=body)
        assert first.status_code == again.status_code == 200
        assert first.json() == again.json()
        assert [r["message"] for r in await fetch_all(client, task)] == ["m1", "m2"]


# --- a commit whose answer was lost -------------------------------------------


async def test_a_commit_whose_answer_is_lost_stores_each_record_once(
    pg_url: str, sqlite_hub_factory: InProcessHubFactory
) -> None:
    async with tcp_proxy(*target_of(pg_url)) as proxy:
        hub = await sqlite_hub_factory.astart("--store-retry-max", "0.2", db=proxy.url_for(pg_url))
        async with hub.http() as client:
            resp = await client.post(logs_path("t"), json={"message": "before"})
            assert resp.status_code == 200, resp.text
            # No seq: the writer gives these records identities of its own.
            proxy.cut_after_commit()
            resp = await client.post(logs_path("t"), json=[{"message": "once a"}, {"message": "once b"}])
            assert proxy.commits_cut == 1
            assert resp.status_code == 200, resp.text
            # A read may meet the pool's other connection to the cut one: 503, retry.
            with trio.fail_after(PATIENCE):
                while (page := await client.get(logs_path("t"))).status_code == 503:
                    await trio.sleep(0.1)
            stored = page.json()["content"]
        assert [(r["seq"], r["message"]) for r in stored] == [(1, "before"), (2, "once a"), (3, "once b")]
        assert resp.json()["seqs"] == [2, 3]


# --- what identity keeps is bounded ------------------------------------------------


def _run_on(conn: sqlite3.Connection, steps: Any) -> Any:
    """Drive the store's algorithm (hub/store/core.py) on our own SQLite connection."""

    with conn:
        return drive_sync(steps, lambda op: run_op(conn, op))


def _steps_to_register(conn: sqlite3.Connection, producer: str) -> int:
    """SQLite VM steps of one append and one status by a new producer (a
    count of work done, the same on every run, unlike a time)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    item = Incoming("t", 1, "2026-01-02T03:04:05.000000Z", "stdout", "INFO", "x", producer=producer)
    _run_on(conn, core.append(SQLiteSql(), [item]))
    _run_on(conn, core.set_state(SQLiteSql(), "t", "running", None, producer))
    conn.set_progress_handler(None, 1)
    return steps


def test_registering_a_producer_costs_the_same_however_many_the_task_has(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    conn.isolation_level = ""  # `with conn` commits
    with conn:
        create_schema(conn)
    for n in range(50):
        _steps_to_register(conn, f"early-{n}")
    few = _steps_to_register(conn, "at-50")
    for n in range(5000):
        item = Incoming("t", 1, "2026-01-02T03:04:05.000000Z", "stdout", "INFO", "x", producer=f"p{n}")
        _run_on(conn, core.append(SQLiteSql(), [item]))
        _run_on(conn, core.set_state(SQLiteSql(), "t", "running", None, f"p{n}"))
    many = _steps_to_register(conn, "at-5050")
    # A scan of the task's producers would cost thousands of steps more.
    assert many < few * 1.5 + 200, (few, many)


def _rows(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def test_delete_and_retention_keep_identity_in_bounded_space(sqlite_hub_factory, tmp_path: Path) -> None:
    db = tmp_path / "bounded.db"
    hub = await sqlite_hub_factory.astart(db=f"sqlite:///{db}")
    async with hub.http() as client:
        for batch in range(20):
            body = [{"message": f"m{batch}", "producer": f"p{batch % 4}", "seq": batch // 4 + 1}]
            assert (await client.post(logs_path("t"), json=body)).status_code == 200
        ranges_before = _rows(db, "keruta_producer_ranges")
        assert ranges_before > 0 and _rows(db, "keruta_producers") == 4
        assert (await client.delete(logs_path("t"))).json() == {"deletedCount": 20}
        # The ranges went with the rows; the high marks stay, so a resend is a duplicate.
        assert _rows(db, "keruta_producer_ranges") == 0 and _rows(db, "keruta_producers") == 4
        resp = await client.post(logs_path("t"), json=[{"message": "m0", "producer": "p0", "seq": 1}])
        assert resp.json() == {"ids": [None], "seqs": [None]}
        assert await fetch_all(client, "t") == []
    await hub.astop()
    # A retention pass forgets producers that wrote nothing within its horizon.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE keruta_producers SET last_write = '2000-01-01T00:00:00.000000Z' WHERE producer != 'p3'")
    from hub.store.sqlite import SQLiteStore

    store = SQLiteStore(db)
    await store.open()
    try:
        await store.delete_older_than("2001-01-01T00:00:00.000000Z")
    finally:
        await store.close()
    assert _rows(db, "keruta_producers") == 1


async def test_retention_forgets_idle_producers_but_not_a_run_still_under_way(store) -> None:
    def line(producer: str, seq: int) -> Incoming:
        return Incoming("t", seq, "2026-01-02T03:04:05.000000Z", "stdout", "INFO", f"{producer} {seq}", producer=producer)

    await store.append([line("quiet-run", 1), line("done-run", 1)])
    await store.set_state("t", "running", None, "quiet-run")
    await store.set_state("t", "succeeded", 0, "done-run")
    # A horizon past every write: both are idle, only the finished run may go.
    await store.delete_older_than("9999-01-01T00:00:00.000000Z")
    # The quiet run's next record follows on; the forgotten run counts from 1 again.
    assert (await store.append([line("quiet-run", 2)])).status == [INSERTED]
    assert (await store.append([line("done-run", 2)])).status == [GAP]


def test_a_producer_sending_a_record_a_commit_keeps_one_range(tmp_path: Path) -> None:
    # A quiet producer's records each come in a commit of their own; its
    # identity must not cost a row per record.
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    conn.isolation_level = ""
    with conn:
        create_schema(conn)
    for seq in range(1, 201):
        item = Incoming("t", seq, "2026-01-02T03:04:05.000000Z", "stdout", "INFO", f"line {seq}", producer="quiet")
        assert _run_on(conn, core.append(SQLiteSql(), [item])).status == [INSERTED]
    assert _rows(tmp_path / "db", "keruta_producer_ranges") == 1


async def test_a_range_extended_commit_by_commit_still_tells_duplicates_and_conflicts(store) -> None:
    def item(seq: int, producer: str, message: str | None = None) -> Incoming:
        return Incoming("t", seq, "2026-01-02T03:04:05.000000Z", "stdout", "INFO",
                        message or f"{producer} {seq}", producer=producer)

    # "a" alone for three commits (one range, extended), then "b" in between
    # (a's task seqs jump: a new range), then "a" again.
    for seq in (1, 2, 3):
        assert (await store.append([item(seq, "a")])).status == [INSERTED]
    assert (await store.append([item(1, "b")])).status == [INSERTED]
    for seq in (4, 5):
        assert (await store.append([item(seq, "a")])).status == [INSERTED]
    again = await store.append([item(seq, "a") for seq in range(1, 6)] + [item(1, "b")])
    assert again.status == [DUPLICATE] * 6
    assert [r.seq for r in again.records] == [1, 2, 3, 5, 6, 4]
    changed = await store.append([item(2, "a", "not what a sent"), item(5, "a", "nor this")])
    assert changed.status == [CONFLICT, CONFLICT]
    assert (await store.append([item(6, "a")])).records[0].seq == 7


async def test_the_hub_merges_a_quiet_tasks_one_record_chunks(sqlite_hub_factory, tmp_path: Path) -> None:
    db = tmp_path / "quiet.db"
    hub = await sqlite_hub_factory.astart(db=f"sqlite:///{db}")
    async with hub.http() as client:
        for seq in range(1, 201):
            body = [{"message": f"line {seq}", "producer": "quiet", "seq": seq}]
            assert (await client.post(logs_path("q"), json=body)).status_code == 200
        assert [r["message"] for r in await fetch_all(client, "q")] == [f"line {n}" for n in range(1, 201)]
    await hub.astop()
    with sqlite3.connect(db) as conn:
        # A task merges every COMPACT_EVERY (64) lines, at its own offset.
        merged = conn.execute("SELECT count(*) FROM keruta_chunks WHERE seq_last <= 200 - 64").fetchone()[0]
    assert merged <= 3, merged
