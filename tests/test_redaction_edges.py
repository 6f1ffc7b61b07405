"""POST .../redact at its edges, on both stores: values that overlap each
other or the `***` they become, JSON-special and non-ASCII values, values in
metadata keys, and a log that still verifies afterwards."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from hub.redaction import redact as hub_redact
from hub.store.base import LogQuery
from hub.store.redacting import scrub
from keruta.summary import Tally
from tests import hubclient
from tests.hubclient import InProcessHubFactory, fetch_all
from tests.storedata import rec
from tests.test_verify_edges import TS, finish, send_run, summary_of, verify

hub_factory = hubclient.hub_factory  # fixture

AGENT, ADMIN = "agent-secret-1", "admin-secret-3"
TOKENS = ("--agent-token", AGENT, "--viewer-token", "viewer-secret-2", "--admin-token", ADMIN)


@pytest.mark.parametrize(
    ("text", "values", "want"),
    [
        # Two values overlapping: neither leaves a piece of itself.
        ("xabcdex", ["abc", "cde"], "x***x"),
        ("xcdeabcx", ["abc", "cde"], "x***x"),
        # Occurrences of one value overlapping.
        ("aaaaa", ["aa"], "***"),
        # A value inside another.
        ("a tok-secret-1 b", ["secret", "tok-secret-1"], "a *** b"),
        # A value that `***` holds, or that holds part of one.
        ("a*b", ["*"], "a***b"),
        ("a***b", ["*"], "a***b"),
        ("x**y", ["**"], "x***y"),
        ('say "hi"\\\u0000', ['"', "\\", "\u0000"], "say ***hi***"),
        ("pässwörd🔑 and pässwörd🔑", ["pässwörd🔑"], "*** and ***"),
        ("nothing here", ["absent"], "nothing here"),
    ],
)
def test_every_character_a_value_covers_goes(text: str, values: list[str], want: str) -> None:
    assert scrub(text, values) == want
    # Redacting what came out changes nothing more.
    assert scrub(want, values) == want


def line_records(task: str, messages: list[str], metadata: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [
        {"taskId": task, "seq": i + 1, "timestamp": TS, "source": "stdout", "level": "INFO", "message": m,
         "lineNumber": i + 1, "metadata": (metadata or [{}] * len(messages))[i]}
        for i, m in enumerate(messages)
    ]


async def redact(hub: Any, task: str, values: list[str]) -> Any:
    async with hub.http(ADMIN) as admin:
        return await admin.post(f"/api/v1/tasks/{task}/redact", json={"values": values})


async def test_overlapping_special_and_unicode_values_go_and_the_log_still_verifies(
    hub_factory: InProcessHubFactory,
) -> None:
    hub = await hub_factory.astart(*TOKENS)
    task = "leaky"
    values = ["abc", "cde", "*", '"q', "\\", "\u0000", "pässwörd🔑", "key-secret"]
    messages = [
        "xabcdex",
        "stars * here",
        'quote "quoted" and back\\slash',
        "nul \u0000 inside",
        "unicode pässwörd🔑!",
        "clean line",
        "a line in JSON: {\"token\": \"abc\"}",
    ]
    metadata = [{}, {}, {}, {}, {}, {"key-secret": "in a key", "list": ["cde", 1]}, {}]
    recs = line_records(task, messages, metadata)
    async with hubclient.ws_connect(hub.ws_url, AGENT) as ws:
        await send_run(ws, task, "run-1", recs)
        await finish(ws, task, "run-1", summary_of(recs))
    await verify(hub, task, until="complete", token=ADMIN)
    resp = await redact(hub, task, values)
    assert resp.status_code == 200, resp.text
    assert resp.json()["redactedRecords"] == 7
    async with hub.http(ADMIN) as client:
        stored = await fetch_all(client, task)
    lines = [r for r in stored if r.get("kind") is None]
    assert [r["message"] for r in lines] == [
        "x***x",
        "stars *** here",
        'quote ***uoted" and back***slash',
        "nul *** inside",
        "unicode ***!",
        "clean line",
        'a line in JSON: {"token": "***"}',
    ]
    assert lines[5]["metadata"] == {"***": "in a key", "list": ["***", 1]}
    (audit,) = [r for r in stored if r.get("kind") == "redaction"]
    assert "pässwörd🔑" not in str(audit) and "key-secret" not in str(audit)
    answer = await verify(hub, task, token=ADMIN)
    assert answer["verdict"] == "complete", answer
    # Again: nothing is left to redact, `***` included (the value "*" is in it).
    again = await redact(hub, task, values)
    assert again.status_code == 200 and again.json()["redactedRecords"] == 0, again.text
    assert (await verify(hub, task, token=ADMIN))["verdict"] == "complete"


async def test_redacting_a_task_that_does_not_exist_is_404_and_makes_none(hub_factory: InProcessHubFactory) -> None:
    hub = await hub_factory.astart(*TOKENS)
    resp = await redact(hub, "no-such-task", ["x"])
    assert resp.status_code == 404 and resp.json()["error"] == "NOT_FOUND"
    async with hub.http(ADMIN) as client:
        assert (await client.get("/api/v1/tasks/no-such-task")).status_code == 404


async def test_a_value_in_every_record_of_a_big_task(hub_factory: InProcessHubFactory) -> None:
    """Every record of a 20,000-line task changes: each step rewrites a few
    chunks, live viewers are told in bounded frames, the log verifies."""
    hub = await hub_factory.astart(*TOKENS)
    task = "everywhere"
    recs = line_records(task, [f"line {i} with SECRET inside" for i in range(1, 20_001)])
    async with hubclient.ws_connect(hub.ws_url, AGENT) as ws, hubclient.ws_connect(hub.ws_url, ADMIN) as viewer:
        await viewer.subscribe(task)
        for start in range(0, len(recs), 1000):
            await ws.send({"type": "logs", "taskId": task, "producer": "run-1", "records": recs[start:start + 1000]})
        await ws.wait_ack(task, 20_000)
        await finish(ws, task, "run-1", summary_of(recs))
        with trio.fail_after(60):
            resp = await redact(hub, task, ["SECRET"])
        assert resp.json()["redactedRecords"] == 20_000
        assert resp.json()["seq"] == 20_001
        told: list[int] = []
        # The redaction's record, as each step left it: appended by the first,
        # sent again (same seq) as each later one adds to it.
        counts: list[int] = []
        steps = 0
        with trio.fail_after(hubclient.PATIENCE):
            while len(told) < 20_000 or counts[-1:] != [20_000]:
                frame = await viewer.recv()
                if frame["type"] == "redacted":
                    told += frame["seqs"]
                    steps += 1
                elif frame["type"] == "logs":
                    for r in frame["records"]:
                        if r.get("kind") == "redaction":
                            assert r["seq"] == 20_001
                            counts.append(r["metadata"]["redaction"]["records"])
        assert sorted(told) == list(range(1, 20_001))
        # One `redacted` frame and one of the record per step.
        assert len(counts) == steps and counts == sorted(counts)
    async with hub.http(ADMIN) as client:
        stored = await fetch_all(client, task)
    assert all("SECRET" not in r["message"] for r in stored)
    assert (await verify(hub, task, token=ADMIN))["verdict"] == "complete"


async def test_a_value_found_in_the_hubs_own_records_leaves_them_as_they_are(store) -> None:  # type: ignore[no-untyped-def]
    """A cap's gap and a redaction's record hold digests in hex and the words
    verify reads (`gap`, `accounts`): a value that happens to occur there
    (a hex-ish token, a short word) must not break them, or the log stops
    verifying. They never hold a producer's text, so they are left alone."""
    sent = [rec(p, f"line {p:06d} " + "x" * 92, producer="a", at=p) for p in range(1, 2001)]
    tally = Tally()
    for p, r in enumerate(sent, 1):
        tally.add(p, r.source, None, False, 0, r.message)
    await store.append(sent)
    while (step := await store.cap_step("t1", 60_000)) is not None and step.more:
        pass
    await store.set_state("t1", "succeeded", 0, "a", tally.summary(len(sent)))
    assert (await store.verify("t1")).verdict == "complete"
    (gap,) = [r for r in (await store.query(LogQuery(task_id="t1", size=10_000))).content if r.kind == "gap"]
    hex_piece = gap.metadata["gap"]["accounts"]["a"]["digest"].split(":")[1][:6]
    await hub_redact(store, "t1", [hex_piece, "accounts", "line 000001 "])
    await hub_redact(store, "t1", ["redaction", "records"])
    records = (await store.query(LogQuery(task_id="t1", size=10_000))).content
    assert [r.metadata for r in records if r.kind == "gap"] == [gap.metadata]
    assert records[0].message.startswith("***")
    assert (await store.verify("t1")).verdict == "complete"
