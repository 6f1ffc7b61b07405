"""Logs you can verify (CONTRACT.md, Guarantee 7): an agent's final status
carries a summary of what it sent, and GET .../verify holds the stored log to
it: complete, incomplete (what is missing), or unverified."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from hub.answers import answer_json
from hub.store import chunk
from hub.store.verify import COMPLETE, INCOMPLETE, UNVERIFIED, Verification
from keruta import digest
from keruta.summary import Summary, Tally
from tests import hubclient
from tests.agentclient import agent, agent_env, free_port, run_args

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures

TS = "2026-01-01T00:00:00.000001Z"


# -- the digest of plain lines, batched ---------------------------------------------


@given(
    st.integers(1, 2**40),
    st.sampled_from(["stdout", "stderr", "agent"]),
    st.integers(0, 2**31),
    st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=40), max_size=20),
)
def test_block_sum_is_the_sum_of_the_leaves(first: int, source: str, line: int, texts: list[str]) -> None:
    raws = [t.encode() for t in texts]
    want = sum(digest.leaf(first + i, source, None, False, line + i, t) for i, t in enumerate(texts))
    assert digest.block_sum(first, source, line, raws) % 2**512 == want % 2**512
    one_by_one, batched = Tally(), Tally()
    for i, t in enumerate(texts):
        one_by_one.add(first + i, source, None, False, line + i, t)
    batched.add_lines(first, source, line, raws)
    assert batched == one_by_one


# -- the rule, as a plain function ----------------------------------------------------


def _records(n: int, first_seq: int = 1) -> list[dict[str, Any]]:
    return [
        {"seq": first_seq + i, "source": "stdout" if i % 3 else "stderr", "kind": None, "partial": False,
         "line": i + 1, "message": f"line {i + 1} é", "metadata": None}
        for i in range(n)
    ]


def _summary(records: list[dict[str, Any]], pseq_of: dict[int, int] | None = None) -> Summary:
    tally = Tally()
    for r in records:
        pseq = (pseq_of or {}).get(r["seq"], r["seq"])
        tally.add(pseq, r["source"], r["kind"], r["partial"], r["line"], r["message"])
    return tally.summary(tally.records)


def _verify(
    stored: list[dict[str, Any]], summaries: list[tuple[str, Summary | None]],
    ranges: list[tuple[str, int, int, int]],
) -> Any:
    check = Verification("t", summaries, ranges)
    for r in stored:
        check.add(r["seq"], r["source"], r["kind"], r["partial"], r["line"], r["message"], r["metadata"])
    return check.result()


def _account(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a hub-made gap says per producer for `records` it dropped (seq == pseq)."""
    tally = Tally()
    for r in records:
        tally.add(r["seq"], r["source"], r["kind"], r["partial"], r["line"], r["message"])
    return tally.to_json()


def test_every_record_stored_is_complete() -> None:
    sent = _records(10)
    result = _verify(sent, [("run", _summary(sent))], [("run", 1, 10, 1)])
    assert result.verdict == COMPLETE
    (run,) = result.producers
    assert (run.verdict, run.digest_ok, run.missing) == (COMPLETE, True, [])
    assert run.stored.records == 10 and run.records == 10
    assert result.message == "complete: 10 lines, digest ok"


def test_a_record_missing_is_named_by_producer_and_task_seq() -> None:
    sent = _records(10)
    # The run's seqs 1..10 stored at task seqs 101..110 (a REST line came first).
    stored = [{**r, "seq": r["seq"] + 100} for r in sent if r["seq"] not in (4, 5)]
    result = _verify(stored, [("run", _summary(sent))], [("run", 1, 10, 101)])
    assert result.verdict == INCOMPLETE
    (run,) = result.producers
    assert not run.digest_ok
    assert [(m.from_pseq, m.to_pseq, m.from_seq, m.to_seq) for m in run.missing] == [(4, 5, 104, 105)]
    assert "seqs 4-5 missing (task seqs 104-105)" in result.message


def test_a_changed_record_is_a_digest_mismatch() -> None:
    sent = _records(10)
    stored = [dict(r) for r in sent]
    stored[6]["message"] = stored[6]["message"].replace("7", "8")
    result = _verify(stored, [("run", _summary(sent))], [("run", 1, 10, 1)])
    (run,) = result.producers
    assert result.verdict == INCOMPLETE and run.digest_ok is False and run.missing == []
    assert "digest mismatch" in result.message


def test_records_moved_or_doubled_are_a_mismatch_though_counts_agree() -> None:
    sent = _records(4)
    swapped = [sent[1], sent[0], sent[2], sent[3]]
    stored = [{**r, "seq": i + 1} for i, r in enumerate(swapped)]
    assert _verify(stored, [("run", _summary(sent))], [("run", 1, 4, 1)]).verdict == INCOMPLETE


def test_a_hub_made_gap_with_accounts_keeps_the_log_complete() -> None:
    sent = _records(10)
    dropped = sent[3:7]
    gap = {"seq": 11, "source": "agent", "kind": "gap", "partial": False, "line": 0,
           "message": "4 lines not kept: task over its cap",
           "metadata": {"gap": {"reason": "cap", "lines": 4, "bytes": 1, "fromSeq": 4, "toSeq": 7,
                                "accounts": {"run": _account(dropped)}}}}
    stored = [r for r in sent if r not in dropped] + [gap]
    ranges = [("run", 1, 10, 1), ("~hub", 1, 1, 11)]
    result = _verify(stored, [("run", _summary(sent))], ranges)
    assert result.verdict == COMPLETE, result
    (run,) = result.producers
    assert run.accounted.records == 4 and run.stored.records == 6
    # The same gap accounting for one record too few is not.
    wrong = {**gap, "metadata": {"gap": {**gap["metadata"]["gap"], "accounts": {"run": _account(dropped[1:])}}}}
    stored = [r for r in sent if r not in dropped] + [wrong]
    result = _verify(stored, [("run", _summary(sent))], ranges)
    assert result.verdict == INCOMPLETE
    assert [(m.from_pseq, m.to_pseq) for m in result.producers[0].missing] == []  # inside the gap's seqs


def test_a_redaction_with_accounts_keeps_the_log_complete() -> None:
    sent = _records(5)
    stored = [dict(r) for r in sent]
    old, new = stored[2]["message"], "line 3 ***"
    stored[2]["message"] = new
    old_leaf = digest.leaf(3, stored[2]["source"], None, False, 3, old)
    new_leaf = digest.leaf(3, stored[2]["source"], None, False, 3, new)
    source = stored[2]["source"]
    redaction = {"seq": 6, "source": "agent", "kind": "redaction", "partial": False, "line": 0,
                 "message": "1 records redacted by admin", "metadata": {"redaction": {
                     "records": 1, "by": "admin", "at": TS, "accounts": {"run": {
                         "bytes": {source: len(old.encode()) - len(new.encode())},
                         "digest": digest.to_text(digest.sub(old_leaf, new_leaf))}}}}}
    ranges = [("run", 1, 5, 1), ("~hub", 1, 1, 6)]
    assert _verify(stored + [redaction], [("run", _summary(sent))], ranges).verdict == COMPLETE
    assert _verify(stored, [("run", _summary(sent))], ranges[:1]).verdict == INCOMPLETE


def test_no_summary_yet_is_unverified() -> None:
    sent = _records(3)
    assert _verify(sent, [("run", None)], [("run", 1, 3, 1)]).verdict == UNVERIFIED
    # REST producers never send one: a task of them alone stays unverified.
    assert _verify(sent, [("~rest", None)], [("~rest", 1, 3, 1)]).verdict == UNVERIFIED
    # One run done, the next still running: not complete yet.
    first, second = sent[:2], sent[2:]
    summaries = [("a", _summary(first)), ("b", None)]
    result = _verify(sent, summaries, [("a", 1, 2, 1), ("b", 1, 1, 3)])
    assert result.verdict == UNVERIFIED
    assert [p.verdict for p in result.producers] == [COMPLETE, UNVERIFIED]
    del second


def test_the_answer_is_the_documented_json() -> None:
    sent = _records(2)
    body = answer_json(_verify(sent, [("run", _summary(sent))], [("run", 1, 2, 1)]))
    assert set(body) == {"taskId", "verdict", "message", "producers"}
    assert set(body["producers"][0]) == {
        "producer", "verdict", "records", "lines", "bytes", "stored", "accounted", "missing", "digestOk",
    }


# -- against a real hub and a real agent, on both stores ------------------------------


def _db(db: str, sqlite_sql: str, pg_sql: str, *args: Any) -> list[Any]:
    """Run one statement straight on the hub's database, behind its back."""
    if db.startswith("sqlite://"):
        conn = sqlite3.connect(db.removeprefix("sqlite:///"), timeout=30)
        try:
            with conn:
                return conn.execute(sqlite_sql, args).fetchall()
        finally:
            conn.close()

    import asyncpg

    async def run() -> list[Any]:
        conn = await asyncpg.connect(db)
        try:
            return list(await conn.fetch(pg_sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


async def db(hub: Any, sqlite_sql: str, pg_sql: str, *args: Any) -> list[Any]:
    return await trio.to_thread.run_sync(lambda: _db(hub.db, sqlite_sql, pg_sql, *args))


async def verify(hub: Any, task_id: str) -> dict[str, Any]:
    async with hub.http() as client:
        resp = await client.get(f"/api/v1/tasks/{task_id}/verify")
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]


LINES = 2000
COMMAND = [
    sys.executable, "-c",
    f"import sys\nfor i in range({LINES}):\n print(f'line {{i}} \\u00e9 ' + 'x' * (i % 50))\n"
    "print('warning: on stderr', file=sys.stderr)",
]


async def tail(hub: Any, task_id: str, *extra: str) -> tuple[int, str, str]:
    """`keruta-agent tail`: its exit status, stdout and stderr."""
    done = await trio.run_process(
        [sys.executable, "-m", "agent", "tail", "--hub", hub.url, task_id, *extra],
        check=False, capture_stdout=True, capture_stderr=True, env=agent_env(),
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def run_task(hub: Any, task_id: str, tmp_path: Path, *extra: str) -> None:
    args = run_args(hub.url, task_id, tmp_path / "spool", "--quiet", *extra)
    async with agent(args + COMMAND) as a:
        assert await a.wait() == 0, a.stderr_text


async def test_a_normal_run_is_complete(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    await run_task(hub, "v-1", tmp_path)
    assert (await hubclient.task_state(hub, "v-1"))["verdict"] == "unverified"  # not computed yet
    # Asked several times at once: one verification, the same answer for each.
    answers: list[dict[str, Any]] = []

    async def ask() -> None:
        answers.append(await verify(hub, "v-1"))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
    answer = answers[0]
    assert answers == [answer] * 3
    assert answer["verdict"] == "complete", answer
    (run,) = answer["producers"]
    assert run["records"] == LINES + 1 and run["lines"] == {"stdout": LINES, "stderr": 1}
    assert run["stored"]["records"] == LINES + 1 and run["digestOk"] is True
    assert answer["message"] == f"complete: {LINES + 1:,} lines, digest ok"
    # The task answer carries the verdict last computed.
    assert (await hubclient.task_state(hub, "v-1"))["verdict"] == "complete"
    async with hub.http() as client:
        listed = (await client.get("/api/v1/tasks")).json()["tasks"]
        assert [t["verdict"] for t in listed if t["taskId"] == "v-1"] == ["complete"]
        assert (await client.get("/api/v1/tasks/nobody/verify")).status_code == 404
        assert (await client.get("/api/v1/tasks/a,b/verify")).status_code == 400
    # `tail` ends with the verdict; --verify passes a complete log.
    code, _, err = await tail(hub, "v-1", "--verify")
    assert code == 0 and err.splitlines()[-1] == f"keruta-agent tail: complete: {LINES + 1:,} lines, digest ok"
    # Records deleted through the hub: the verdict kept is cleared, not left to say "complete".
    async with hub.http() as client:
        assert (await client.delete("/api/v1/tasks/v-1/logs")).status_code == 200
    assert (await hubclient.task_state(hub, "v-1"))["verdict"] == "unverified"
    assert (await verify(hub, "v-1"))["verdict"] == "incomplete"


async def test_a_chunk_deleted_behind_the_hubs_back_is_named(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    await run_task(hub, "v-2", tmp_path)
    chunks = await db(
        hub,
        "SELECT seq_first, seq_last FROM keruta_chunks WHERE task_id = ? ORDER BY seq_last",
        "SELECT seq_first, seq_last FROM keruta_chunks WHERE task_id = $1 ORDER BY seq_last",
        "v-2",
    )
    assert len(chunks) >= 3, chunks
    first, last = chunks[1][0], chunks[1][1]
    await db(
        hub,
        "DELETE FROM keruta_chunks WHERE task_id = ? AND seq_last = ?",
        "DELETE FROM keruta_chunks WHERE task_id = $1 AND seq_last = $2",
        "v-2", last,
    )
    answer = await verify(hub, "v-2")
    assert answer["verdict"] == "incomplete"
    (run,) = answer["producers"]
    # One run from seq 1: its seqs are the task's.
    assert run["missing"] == [{"fromPseq": first, "toPseq": last, "fromSeq": first, "toSeq": last}]
    assert run["stored"]["records"] == LINES + 1 - (last - first + 1)
    assert f"seqs {first:,}-{last:,} missing (task seqs {first:,}-{last:,})" in answer["message"]
    assert (await hubclient.task_state(hub, "v-2"))["verdict"] == "incomplete"
    code, _, err = await tail(hub, "v-2", "--no-follow")
    assert code == 0 and "keruta-agent tail: incomplete: " in err
    code, _, err = await tail(hub, "v-2", "--no-follow", "--verify")
    assert code == 3, err


async def test_a_record_changed_in_the_database_is_a_digest_mismatch(
    hub: hubclient.InProcessHub, tmp_path: Path
) -> None:
    await run_task(hub, "v-3", tmp_path)
    (row,) = await db(
        hub,
        "SELECT seq_last, lines FROM keruta_chunks WHERE task_id = ? ORDER BY seq_last LIMIT 1",
        "SELECT seq_last, lines FROM keruta_chunks WHERE task_id = $1 ORDER BY seq_last LIMIT 1",
        "v-3",
    )
    lines = orjson.loads(chunk.lines_json(bytes(row[1])))
    lines["m"][5] = lines["m"][5].replace("line", "LINE")
    changed = chunk.pack(orjson.dumps(lines))
    await db(
        hub,
        "UPDATE keruta_chunks SET lines = ? WHERE task_id = ? AND seq_last = ?",
        "UPDATE keruta_chunks SET lines = $1 WHERE task_id = $2 AND seq_last = $3",
        changed, "v-3", row[0],
    )
    answer = await verify(hub, "v-3")
    (run,) = answer["producers"]
    assert answer["verdict"] == "incomplete" and run["digestOk"] is False and run["missing"] == []
    assert run["stored"]["records"] == LINES + 1
    assert answer["message"].endswith("digest mismatch")


async def test_unverified_while_running_and_for_rest_producers(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    async with hub.http() as client:
        resp = await client.post("/api/v1/tasks/v-4/logs", json={"level": "INFO", "message": "by REST"})
        assert resp.status_code in (200, 201), resp.text
    answer = await verify(hub, "v-4")
    assert answer["verdict"] == "unverified" and answer["producers"][0]["verdict"] == "unverified"
    args = run_args(hub.url, "v-5", tmp_path / "spool", "--quiet")
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    async with agent(args + command) as a:
        with trio.fail_after(30):
            while not await hubclient.stored(hub, "v-5"):
                await trio.sleep(0.05)
        answer = await verify(hub, "v-5")
        assert answer["verdict"] == "unverified", answer
        assert answer["message"].startswith("unverified")
        a.process.kill()


async def test_an_honest_spool_gap_is_complete(hub_factory: hubclient.InProcessHubFactory, tmp_path: Path) -> None:
    """The spool filled while the hub was away: the agent's own gap record is
    one of its records, and the log is complete."""
    spool = tmp_path / "spool"
    port = free_port()
    args = run_args(
        f"http://127.0.0.1:{port}", "v-6", spool,
        "--spool-max-bytes", str(64 * 1024), "--drain-timeout", "0.3", "--quiet",
    )
    async with agent(args + COMMAND) as a:
        assert await a.wait() == 0
    assert "DROPPING" in a.stderr_text
    hub = hub_factory.make()
    hub.port = port
    await hub.astart()
    async with agent(["flush", "--spool-dir", str(spool)]) as f:
        assert await f.wait() == 0
    answer = await verify(hub, "v-6")
    assert answer["verdict"] == "complete", answer
    records = await hubclient.stored(hub, "v-6")
    assert [r.get("kind") for r in records].count("gap") == 1
    assert answer["producers"][0]["records"] == len(records) < LINES
    # `tail` shows the gap as a row of its own.
    code, out, err = await tail(hub, "v-6", "--verify")
    (gap,) = [r for r in records if r.get("kind") == "gap"]
    assert code == 0 and f"\n--- {gap['message']} ---\n" in out
    assert "not kept: the agent's spool was full ---" in out


_STORE_OWN = """
import sys, orjson, trio, trio_asyncio
from hub.store import open_store_from_url
from hub.store.base import Incoming

async def main():
    async with trio_asyncio.open_loop():
        store = open_store_from_url(sys.argv[1])
        await store.open()
        try:
            await store.append([Incoming(**orjson.loads(sys.argv[2]))])
        finally:
            await store.close()

trio.run(main)
"""


async def store_own_record(db: str, fields: dict[str, Any]) -> None:
    """Append a record as the hub appends its own (a producer may not send a
    gap with accounts), from another process, beside the running hub."""
    await trio.run_process([sys.executable, "-c", _STORE_OWN, db, orjson.dumps(fields).decode()], env=agent_env())


async def test_a_hub_made_gap_accounts_for_what_it_dropped(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """What a cap drops is deleted and one hub-made gap record stands for it,
    with the dropped records' counts and digest: the log is still complete."""
    await run_task(hub, "v-7", tmp_path)
    records = await hubclient.stored(hub, "v-7")
    chunks = await db(
        hub,
        "SELECT seq_first, seq_last FROM keruta_chunks WHERE task_id = ? ORDER BY seq_last",
        "SELECT seq_first, seq_last FROM keruta_chunks WHERE task_id = $1 ORDER BY seq_last",
        "v-7",
    )
    first, last = chunks[1][0], chunks[1][1]
    dropped = [r for r in records if first <= r["seq"] <= last]
    await db(
        hub,
        "DELETE FROM keruta_chunks WHERE task_id = ? AND seq_last = ?",
        "DELETE FROM keruta_chunks WHERE task_id = $1 AND seq_last = $2",
        "v-7", last,
    )
    account = Tally()
    for r in dropped:
        # One run from seq 1: its producer seqs are the task's.
        account.add(r["seq"], r["source"], r.get("kind"), r.get("partial", False), r["lineNumber"], r["message"])
    producer = (await verify(hub, "v-7"))["producers"][0]["producer"]
    gap = {
        "reason": "cap", "lines": len(dropped), "bytes": sum(account.bytes.values()),
        "fromSeq": first, "toSeq": last, "accounts": {producer: account.to_json()},
    }
    # Stored through the store, as the hub stores its own records (a producer
    # may not send a gap with accounts): numbered under a producer of its own.
    await store_own_record(hub.db, {
        "task_id": "v-7", "seq": 1, "timestamp": TS, "source": "agent", "level": "WARN",
        "message": f"{len(dropped):,} lines not kept: task over its cap", "metadata": {"gap": gap},
        "producer": "~verify-test", "kind": "gap",
    })
    answer = await verify(hub, "v-7")
    assert answer["verdict"] == "complete", answer
    runs = {p["producer"]: p for p in answer["producers"]}
    run = runs.pop(producer)
    assert run["accounted"]["records"] == len(dropped) and run["missing"] == []
    assert run["stored"]["records"] == LINES + 1 - len(dropped)
    ((made, hub_run),) = runs.items()
    assert made.startswith("~") and hub_run["verdict"] == "unverified"
    # Without it, the same log is incomplete.
    await db(
        hub,
        "DELETE FROM keruta_chunks WHERE task_id = ? AND seq_first > ?",
        "DELETE FROM keruta_chunks WHERE task_id = $1 AND seq_first > $2",
        "v-7", LINES + 1,
    )
    assert (await verify(hub, "v-7"))["verdict"] == "incomplete"


# -- the agent's summary outlives the agent -------------------------------------------


def _spooled_tally(spool: Any) -> Tally:
    """The summary of what the spool gives the uplink to send."""
    tally = Tally()
    for seq, payload in spool.read(1, 10**9, 10**12):
        tally.add_record(seq, orjson.loads(payload))
    return tally


async def _flush_after_death(again: Any, root: Path, whole: Any) -> None:
    """What a `flush` adds to a dead agent's spool (its "agent stopped"
    record, the final state) counts in the summary, which reads back the same."""
    from agent.pipeline.recorder import Recorder
    from agent.spool.spool import Spool

    Recorder(again, "t").write_agent("the agent stopped")
    await again.set_final("failed", None)
    final = again.summary()
    assert final is not None and final.records == whole.records + 1
    again.close()
    assert Spool.open(root, "t", create=False).summary() == final


async def test_the_summary_survives_the_agent_and_its_acked_segments(tmp_path: Path) -> None:
    """What was written, acknowledged and deleted, and what is still spooled,
    are all in the summary a later `flush` reads back from the spool."""
    from agent.pipeline.linesplit import Block, Line
    from agent.pipeline.recorder import Recorder
    from agent.spool.spool import Spool

    spool = Spool.open(tmp_path, "t", hub_url="http://hub", max_bytes=1 << 20, segment_bytes=4096)
    recorder = Recorder(spool, "t")
    number = 1
    for i in range(40):
        block = Block.of([b"plain %d %d" % (i, k) for k in range(30)])
        recorder.write("stdout", [(block, number), (Line(f"ERROR {i} \u00e9"), number + 30)])
        number += 31
        recorder.write("stderr", [(Line("part", partial=True), i + 1)])
        recorder.write_agent(f"agent line {i}")
    whole = spool.summary()
    assert whole is not None and whole.records == spool.last_seq == 40 * 33
    assert _spooled_tally(spool).summary(spool.last_seq) == whole
    spool.release(spool.last_seq // 2)  # the hub stored half: those segments go at the sync
    await spool.sync()
    assert spool.segments[0].first_seq > 1
    spool.close()  # the agent dies: no final state

    again = Spool.open(tmp_path, "t", create=False)
    assert again.summary() == whole
    await _flush_after_death(again, tmp_path, whole)


def _write_rounds(spool: Any, rounds: int) -> None:
    """Plain lines (Blocks), a level line, a partial line and an agent line per round."""
    from agent.pipeline.linesplit import Block, Line
    from agent.pipeline.recorder import Recorder

    recorder = Recorder(spool, "t")
    number = 1
    for i in range(rounds):
        block = Block.of([b"plain %d %d" % (i, k) for k in range(30)])
        recorder.write("stdout", [(block, number), (Line(f"ERROR {i} \u00e9"), number + 30)])
        number += 31
        recorder.write("stderr", [(Line("part", partial=True), i + 1)])
        recorder.write_agent(f"agent line {i}")


async def test_each_record_is_counted_once_however_often_it_is_read(tmp_path: Path) -> None:
    """The spool tallies a record when it is read to be sent, or when the
    summary is asked for: a run whose hub was down throughout leaves its
    records untallied (and its final state without a summary) for `flush`;
    records read in pieces, read again (a resend), released, or sent by an
    earlier process whose ack watermark outran summary.json, all count once."""
    from agent.spool.spool import Spool

    down = Spool.open(tmp_path / "down", "t", hub_url="http://hub", max_bytes=1 << 20, segment_bytes=4096)
    _write_rounds(down, 40)
    await down.set_final("failed", 1)
    assert "summary" not in down.meta["final"], "nothing was read: nothing is tallied yet"
    down.close()
    down = Spool.open(tmp_path / "down", "t", create=False)
    whole = down.summary()
    assert whole is not None and whole.records == down.last_seq == 40 * 33
    assert _spooled_tally(down).summary(down.last_seq) == whole
    down.close()

    spool = Spool.open(tmp_path / "up", "t", hub_url="http://hub", max_bytes=1 << 20, segment_bytes=4096)
    _write_rounds(spool, 40)
    spool.read(1, 100, 1 << 20)
    spool.read(50, 10, 1 << 20)
    spool.read(1, 300, 1 << 20)  # a reconnect sends them again
    spool.release(200)
    await spool.sync()  # summary.json, then the segments it covers go
    assert spool.segments[0].first_seq > 1
    spool.release(700)
    spool.save_watermark()  # not durable, and without summary.json: it lags behind
    spool.close()  # the agent dies

    again = Spool.open(tmp_path / "up", "t", create=False)
    assert again.acked_seq == 700
    assert seqs_of(again.read(701, 100, 1 << 20)) == list(range(701, 801))
    assert again.summary() == whole
    await _flush_after_death(again, tmp_path / "up", whole)


async def test_a_record_lost_from_the_spool_leaves_the_summary_unknown(tmp_path: Path) -> None:
    """A corrupt frame's records cannot be tallied: the run's summary is not
    known (the hub calls the log unverified), rather than short."""
    from agent.spool.spool import Spool

    spool = Spool.open(tmp_path, "t", hub_url="http://hub", max_bytes=1 << 20, segment_bytes=4096)
    _write_rounds(spool, 10)
    spool.close()
    segment = sorted((tmp_path / "t").glob("*.seg"))[0]
    data = bytearray(segment.read_bytes())
    data[100] ^= 0xFF
    segment.write_bytes(bytes(data))
    again = Spool.open(tmp_path, "t", create=False)
    assert len(again.read(1, 1000, 1 << 20)) < again.last_seq
    assert again.summary() is None
    again.close()


def seqs_of(records: list[tuple[int, bytes]]) -> list[int]:
    return [seq for seq, _ in records]


async def test_a_killed_agent_flushed_later_is_complete(hub: hubclient.InProcessHub, tmp_path: Path) -> None:
    """The agent is SIGKILLed mid-run after the hub stored part of its
    records; `flush` delivers the rest with the summary it recovers from the
    spool, and the log verifies."""
    import signal

    spool = tmp_path / "spool"
    args = run_args(hub.url, "v-8", spool, "--quiet", "--spool-max-bytes", str(256 * 1024))
    command = [
        sys.executable, "-c",
        "import time\nfor i in range(3000): print(f'line {i} ' + 'y' * 40)\n"
        "print('done', flush=True)\ntime.sleep(60)",
    ]
    async with agent(args + command) as a:
        with trio.fail_after(60):
            while len(await hubclient.stored(hub, "v-8")) < 3001:
                await trio.sleep(0.1)
        a.signal(signal.SIGKILL)
        await a.wait()
    async with agent(["flush", "--spool-dir", str(spool)]) as f:
        assert await f.wait() == 0, f.stderr_text
    answer = await verify(hub, "v-8")
    assert answer["verdict"] == "complete", answer
    assert answer["producers"][0]["records"] == 3002  # with flush's "the agent stopped" record


@given(st.lists(st.tuples(
    st.integers(1, 2**40), st.sampled_from(["stdout", "stderr", "agent"]), st.integers(0, 2**31),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
), max_size=20))
def test_plain_sum_is_the_sum_of_the_leaves(records: list[tuple[int, str, int, str]]) -> None:
    want = sum(digest.leaf(p, s, None, False, n, m) for p, s, n, m in records)
    got = digest.plain_sum([r[0] for r in records], [r[1] for r in records], [r[2] for r in records], [r[3] for r in records])
    assert got % 2**512 == want % 2**512


def test_a_chunk_of_plain_lines_checks_as_its_records_one_by_one() -> None:
    """The hub's fast path over a stored chunk gives what record-by-record does."""
    from hub.store import chunk
    from keruta.records import trusted_record

    sent = _records(30)
    stored = [
        trusted_record("t", r["seq"] + 5, TS, r["source"], "INFO", r["message"], r["line"], {}, False, None, None)
        for r in sent
    ]
    row = chunk.encode(stored)
    fast = Verification("t", [("run", _summary(sent))], [("run", 1, 30, 6)])
    fast.add_chunk((row.seq_first, row.seq_last, row.n, row.ts_first, row.ts_last, row.tally, row.lines, row.body))
    slow = _verify([{**r, "seq": r["seq"] + 5} for r in sent], [("run", _summary(sent))], [("run", 1, 30, 6)])
    assert fast.result() == slow and slow.verdict == COMPLETE


def test_a_bad_summary_is_refused_naming_its_field() -> None:
    from keruta.frames import FrameError
    from keruta.wire import decode_client_frame

    good = Tally().summary(0).to_json()
    for field, bad in (("records", -1), ("lines", {"nowhere": 1}), ("bytes", {"stdout": "1"}), ("digest", "md5:00")):
        frame = {"type": "status", "taskId": "t", "state": "succeeded", "producer": "p", "summary": {**good, field: bad}}
        with pytest.raises(FrameError) as refused:
            decode_client_frame(orjson.dumps(frame).decode())
        assert refused.value.code == "INVALID_MESSAGE_FORMAT" and f"summary.{field}" in refused.value.message
