"""The hub's REST surface against a real hub process and a real SQLite file."""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
import trio
from prometheus_client.parser import text_string_to_metric_families

from keruta.timefmt import format_ts
from tests import hubclient
from tests.hubclient import (
    CANONICAL_TS,
    PATIENCE,
    HubFactory,
    TestHub,
    assert_error,
    fetch_all,
    logs_frame,
    logs_path,
    make_record,
    parse_metrics,
)

TASK_KEYS = {"taskId", "state", "exitCode", "firstTimestamp", "lastTimestamp", "totalLogs"}
hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures

RECORD_KEYS = {"id", "taskId", "seq", "timestamp", "source", "level", "message", "lineNumber", "metadata", "producer"}
BASE = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def ts(second: float) -> str:
    return format_ts(BASE + dt.timedelta(seconds=second))


def item(seq: int, message: str | None = None, **fields: Any) -> dict[str, Any]:
    """A LogRequest with an explicit seq and a timestamp `seq` seconds after BASE."""
    text = f"line {seq}" if message is None else message
    return {"seq": seq, "timestamp": ts(seq), "message": text, **fields}


async def post(client: Any, task_id: str, body: Any) -> Any:
    resp = await client.post(logs_path(task_id), json=body)
    assert resp.status_code == 200, f"POST {task_id}: {resp.status_code} {resp.text[:500]}"
    return resp.json()


async def test_ws_and_rest_records_come_back_in_seq_order(hub: TestHub) -> None:
    task = "build-1"
    async with hub.ws() as ws, hub.http() as client:
        # Over the socket, the anonymous producer's seqs 1..10 in two frames.
        late = [make_record(task, s, source="stderr" if s % 2 else "stdout") for s in range(6, 11)]
        early = [make_record(task, s, metadata={"processId": 42}) for s in range(1, 6)]
        early[2] = make_record(task, 3, "a piece of a long line", partial=True)
        await ws.send(logs_frame(task, early))
        await ws.send(logs_frame(task, late))
        with trio.fail_after(PATIENCE):
            await ws.wait_ack(task, 10)
        assert ws.acked[task] == 10

        # Over REST: an array without seq gets the next seqs, then one object of
        # another producer (its seq is its own: the task's next seq is 14).
        body = await post(
            client,
            task,
            [
                {"message": "something ERROR happened"},
                {"message": "all good", "source": "stderr", "timestamp": "2024-01-02T03:04:05Z"},
                {"message": "warned", "level": "WARN", "timestamp": "2024-01-02T12:00:00.5+09:00"},
            ],
        )
        assert set(body) == {"ids", "seqs"} and body["seqs"] == [11, 12, 13] and len(set(body["ids"])) == 3
        single = await post(client, task, {"message": "explicit", "producer": "p", "seq": 1, "lineNumber": 7})
        assert set(single) == {"id", "seq"} and isinstance(single["id"], str) and single["seq"] == 14

        records = await fetch_all(client, task)

    assert [r["seq"] for r in records] == list(range(1, 15))
    for r in records:
        # lineNumber may be left out only where the producer gave none (REST posts 11-13).
        expected_keys = RECORD_KEYS | ({"partial"} if r["seq"] == 3 else set())
        if r["seq"] in (11, 12, 13):
            assert RECORD_KEYS - {"lineNumber"} <= set(r) <= expected_keys, r
            assert r.get("lineNumber") is None, r
        else:
            assert set(r) == expected_keys, r
        assert r["taskId"] == task
        assert CANONICAL_TS.fullmatch(r["timestamp"]), r["timestamp"]
    assert len({r["id"] for r in records}) == len(records)
    by_seq = {r["seq"]: r for r in records}
    assert by_seq[3]["partial"] is True and by_seq[3]["message"] == "a piece of a long line"
    assert by_seq[1]["metadata"] == {"processId": 42}
    assert by_seq[7]["source"] == "stderr" and by_seq[8]["source"] == "stdout"
    assert [by_seq[s]["id"] for s in (11, 12, 13)] == body["ids"]
    assert by_seq[14]["id"] == single["id"] and by_seq[14]["lineNumber"] == 7
    # Who wrote each: the anonymous producer over the socket and in the seq-less POST, then "p".
    assert [r["producer"] for r in records] == [""] * 13 + ["p"]
    # Missing level is detected from the text; missing source is stdout.
    assert (by_seq[11]["level"], by_seq[11]["source"]) == ("ERROR", "stdout")
    assert (by_seq[12]["level"], by_seq[12]["source"]) == ("INFO", "stderr")
    assert by_seq[13]["level"] == "WARN"
    # Timestamps come back canonical, in UTC.
    assert by_seq[12]["timestamp"] == "2024-01-02T03:04:05.000000Z"
    assert by_seq[13]["timestamp"] == "2024-01-02T03:00:00.500000Z"


async def test_paging(hub: TestHub) -> None:
    task = "paged"
    async with hub.http() as client:
        await post(client, task, [item(s) for s in range(1, 251)])
        seen: list[int] = []
        for page, length in ((0, 100), (1, 100), (2, 50), (3, 0)):
            resp = await client.get(logs_path(task), params={"page": page, "size": 100})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert set(body) >= {"content", "totalElements", "totalPages", "number", "size"}
            assert (body["totalElements"], body["totalPages"], body["number"], body["size"]) == (
                250,
                3,
                page,
                100,
            ), {k: v for k, v in body.items() if k != "content"}
            assert len(body["content"]) == length
            seen += [r["seq"] for r in body["content"]]
        assert seen == list(range(1, 251))

        # The defaults are page 0, size 100.
        body = (await client.get(logs_path(task))).json()
        assert (body["number"], body["size"], len(body["content"])) == (0, 100, 100)
        assert body["content"][0]["seq"] == 1

        body = (await client.get(logs_path(task), params={"size": 1000})).json()
        assert (body["totalElements"], body["totalPages"], len(body["content"])) == (250, 1, 250)

        body = (await client.get(logs_path(task), params={"size": 7, "page": 35})).json()
        assert body["totalPages"] == 36 and [r["seq"] for r in body["content"]] == [246, 247, 248, 249, 250]

        # A task without logs is an empty page, not an error.
        body = (await client.get(logs_path("nobody-here"))).json()
        assert (body["content"], body["totalElements"], body["totalPages"]) == ([], 0, 0)


SOURCES = ("stdout", "stderr", "agent")
LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")
SPECIAL = {
    5: "Mixed Case",
    6: "mixed case",
    7: "100% done",
    8: "1000 done",
    9: "a_b",
    10: "axb",
    11: "ab",
}


def filter_fixture() -> list[dict[str, Any]]:
    return [
        item(s, SPECIAL.get(s), source=SOURCES[s % 3], level=LEVELS[s % 4]) for s in range(1, 41)
    ]


async def test_filters_q_and_after_seq(hub: TestHub) -> None:
    task = "filtered"
    items = filter_fixture()

    async def seqs(**params: Any) -> list[int]:
        resp = await client.get(logs_path(task), params={"size": 1000, **params})
        assert resp.status_code == 200, f"{params}: {resp.text}"
        body = resp.json()
        got = [r["seq"] for r in body["content"]]
        assert body["totalElements"] == len(got), params
        return got

    def expect(pred: Any) -> list[int]:
        return [i["seq"] for i in items if pred(i)]

    async with hub.http() as client:
        await post(client, task, items)
        for source in SOURCES:
            assert await seqs(source=source) == expect(lambda i, s=source: i["source"] == s)
            assert all(r["source"] == source for r in await fetch_all(client, task, source=source))
        for level in LEVELS:
            assert await seqs(level=level) == expect(lambda i, lv=level: i["level"] == lv)

        # from/to are inclusive and accept any RFC 3339 offset.
        assert await seqs(**{"from": ts(10), "to": ts(20)}) == list(range(10, 21))
        assert await seqs(**{"from": "2025-01-01T09:00:35+09:00"}) == list(range(35, 41))
        assert await seqs(to=ts(3)) == [1, 2, 3]
        assert await seqs(**{"from": ts(20.5), "to": ts(21.5)}) == [21]

        # q: substring, case-sensitive, `%` and `_` are literal characters.
        assert await seqs(q="Mixed") == [5]
        assert await seqs(q="mixed") == [6]
        assert await seqs(q="%") == [7]
        assert await seqs(q="0% d") == [7]
        assert await seqs(q="a_b") == [9]
        assert await seqs(q="line 3") == [3, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39]
        assert await seqs(q="no such text") == []

        assert await seqs(afterSeq=30) == list(range(31, 41))
        assert await seqs(afterSeq=0) == list(range(1, 41))
        assert await seqs(afterSeq=40) == []

        combined = await seqs(source="stderr", level="ERROR", afterSeq=10, q="line")
        assert combined == expect(
            lambda i: i["source"] == "stderr" and i["level"] == "ERROR" and i["seq"] > 10 and "line" in i["message"]
        )
        assert combined  # the fixture really has such records

        # Filters and paging together: totalElements counts the filtered set.
        resp = await client.get(logs_path(task), params={"source": "stdout", "size": 5, "page": 1})
        body = resp.json()
        stdout = expect(lambda i: i["source"] == "stdout")
        assert body["totalElements"] == len(stdout)
        assert body["totalPages"] == (len(stdout) + 4) // 5
        assert [r["seq"] for r in body["content"]] == stdout[5:10]


async def test_stats(hub: TestHub) -> None:
    task = "stats"
    async with hub.http() as client:
        await post(
            client,
            task,
            [
                item(1, source="stdout", level="INFO"),
                item(2, source="stdout", level="ERROR"),
                item(3, source="stderr", level="ERROR"),
                item(4, source="stderr", level="WARN"),
                item(5, source="agent", level="INFO"),
                item(6, source="stdout", level="DEBUG"),
            ],
        )
        resp = await client.get(logs_path(task, "/stats"))
        assert resp.status_code == 200, resp.text
        stats = resp.json()
        assert stats["taskId"] == task
        assert stats["totalLogs"] == 6
        assert {k: v for k, v in stats["logCounts"].items() if v} == {"stdout": 3, "stderr": 2, "agent": 1}
        assert {k: v for k, v in stats["levelCounts"].items() if v} == {
            "INFO": 2,
            "ERROR": 2,
            "WARN": 1,
            "DEBUG": 1,
        }
        assert stats["timeRange"] == {"start": ts(1), "end": ts(6)}
        assert isinstance(stats["lastUpdated"], str) and CANONICAL_TS.fullmatch(stats["lastUpdated"])

        assert_error(await client.get(logs_path("unknown-task", "/stats")), 404, "NOT_FOUND")


async def test_delete_before_and_all(hub: TestHub) -> None:
    task = "deleting"
    async with hub.http() as client:
        await post(client, task, [item(s) for s in range(1, 11)])
        await post(client, "bystander", [item(s) for s in range(1, 4)])

        resp = await client.delete(logs_path(task), params={"before": ts(5.5)})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"deletedCount": 5}
        # A gap record says so, at the first seq deleted.
        left = await fetch_all(client, task)
        assert [r["seq"] for r in left] == [1, *range(6, 11)]
        assert left[0]["kind"] == "gap" and left[0]["metadata"]["gap"]["reason"] == "deleted"

        # Nothing older is left: deleting again removes nothing.
        resp = await client.delete(logs_path(task), params={"before": "2025-01-01T09:00:05.5+09:00"})
        assert resp.json() == {"deletedCount": 0}
        assert await fetch_all(client, task) == left

        resp = await client.delete(logs_path(task))
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"deletedCount": 6}
        assert await fetch_all(client, task) == []
        # Another task's logs are untouched.
        assert [r["seq"] for r in await fetch_all(client, "bystander")] == [1, 2, 3]


async def wait_for_state(client: Any, task_id: str, state: str) -> dict[str, Any]:
    with trio.fail_after(PATIENCE):
        while True:
            resp = await client.get(f"/api/v1/tasks/{task_id}")
            if resp.status_code == 200 and resp.json().get("state") == state:
                return resp.json()
            assert resp.status_code in (200, 404), resp.text
            await trio.sleep(0.05)


async def test_task_list_and_state(hub: TestHub) -> None:
    async with hub.http() as client, hub.ws() as ws:
        assert (await client.get("/api/v1/tasks")).json() == {"tasks": []}
        assert_error(await client.get("/api/v1/tasks/task-a"), 404, "NOT_FOUND")

        await post(client, "task-a", [item(s) for s in range(1, 5)])
        resp = await client.get("/api/v1/tasks/task-a")
        assert resp.status_code == 200, resp.text
        task_a = resp.json()
        assert {k: task_a.get(k) for k in TASK_KEYS} == {
            "taskId": "task-a",
            "state": "running",
            "exitCode": None,
            "firstTimestamp": ts(1),
            "lastTimestamp": ts(4),
            "totalLogs": 4,
        }, task_a

        await ws.send({"type": "status", "taskId": "task-b", "state": "pending"})
        await wait_for_state(client, "task-b", "pending")
        await ws.send({"type": "status", "taskId": "task-b", "state": "failed", "exitCode": 3})
        task_b = await wait_for_state(client, "task-b", "failed")
        assert task_b["exitCode"] == 3 and task_b["totalLogs"] == 0

        await ws.send({"type": "status", "taskId": "task-a", "state": "succeeded", "exitCode": 0})
        task_a = await wait_for_state(client, "task-a", "succeeded")
        assert task_a["exitCode"] == 0 and task_a["totalLogs"] == 4

        tasks = {t["taskId"]: t for t in (await client.get("/api/v1/tasks")).json()["tasks"]}
        assert set(tasks) == {"task-a", "task-b"}
        assert tasks["task-a"]["state"] == "succeeded" and tasks["task-a"]["totalLogs"] == 4
        assert tasks["task-a"]["firstTimestamp"] == ts(1) and tasks["task-a"]["lastTimestamp"] == ts(4)
        assert tasks["task-b"]["state"] == "failed" and tasks["task-b"]["exitCode"] == 3
        for t in tasks.values():
            assert TASK_KEYS <= set(t), t


async def test_raw_download(hub: TestHub) -> None:
    task = "raw"
    # Blank lines are lines too.
    messages = ["" if s % 7 == 0 else f"line {s} héllo ✓" for s in range(1, 3001)]
    async with hub.http() as client:
        # At most 1000 per array: the download is the whole log in seq order.
        for first in (1, 1001, 2001):
            await post(client, task, [item(s, messages[s - 1]) for s in range(first, first + 1000)])
        resp = await client.get(logs_path(task, "/raw"))
        assert resp.status_code == 200, resp.text[:500]
        assert resp.headers["content-type"].startswith("text/plain")
        lines = resp.text.split("\n")
        if lines[-1] == "":
            lines.pop()
        assert lines == messages


async def test_rest_post_twice_is_stored_once(hub: TestHub) -> None:
    task = "twice"
    async with hub.http() as client:
        batch = [item(1), item(2), item(3)]
        ids = (await post(client, task, batch))["ids"]
        assert (await post(client, task, batch))["ids"] == ids
        # A retried batch overlapping what is stored, and a duplicate inside one array.
        ids2 = (await post(client, task, [item(3), item(4), item(4)]))["ids"]
        assert ids2[0] == ids[2] and ids2[1] == ids2[2]
        first = await post(client, task, {"message": "only once", "seq": 5})
        again = await post(client, task, {"message": "only once", "seq": 5})
        assert first == again and first["seq"] == 5

        records = await fetch_all(client, task)
        assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
        assert {r["seq"]: r["id"] for r in records}[5] == first["id"]

    async with hub.ws() as ws, hub.http() as client:
        # The same identity and content over the socket is the same record too.
        same = {5: "only once"}
        await ws.send(
            logs_frame(
                task,
                [
                    attrs.evolve(make_record(task, s, same.get(s, f"line {s}")), line_number=None)
                    for s in range(1, 7)
                ],
            )
        )
        with trio.fail_after(PATIENCE):
            await ws.wait_ack(task, 6)
        records = await fetch_all(client, task)
        assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
        assert records[4]["id"] == first["id"]


async def test_healthz_metrics_openapi(hub: TestHub) -> None:
    async with hub.http() as client:
        resp = await client.get("/healthz")
        assert resp.status_code == 200 and resp.json()["status"] == "ok", resp.text

        resp = await client.get("/metrics")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        before = parse_metrics(resp.text)
        for name in ("keruta_records_ingested_total", "keruta_frames_received_total", "keruta_subscribers", "keruta_errors_total"):
            assert name in before, f"/metrics lacks {name}:\n{resp.text}"
        assert any(k.startswith("keruta_write_batch_seconds") for k in before), resp.text

        await post(client, "metered", [item(s) for s in range(1, 51)])
        async with hub.ws() as ws, hub.ws() as watcher:
            await watcher.subscribe("metered")
            await ws.send(logs_frame("metered", [make_record("metered", s) for s in range(51, 101)]))
            with trio.fail_after(PATIENCE):
                await ws.wait_ack("metered", 100)
            during = parse_metrics((await client.get("/metrics")).text)
        assert during["keruta_records_ingested_total"] >= before["keruta_records_ingested_total"] + 100
        assert during["keruta_frames_received_total"] >= before["keruta_frames_received_total"] + 2
        assert during["keruta_subscribers"] >= 1
        count = [v for k, v in during.items() if k.startswith("keruta_write_batch_seconds") and k.endswith("_count")]
        assert count and count[0] >= 1, during

        resp = await client.get("/openapi.json")
        assert resp.status_code == 200
        spec = resp.json()
        assert "openapi" in spec and "paths" in spec
        for path in (
            "/api/v1/tasks",
            "/api/v1/tasks/{taskId}",
            "/api/v1/tasks/{taskId}/logs",
            "/api/v1/tasks/{taskId}/logs/stats",
            "/api/v1/tasks/{taskId}/logs/raw",
            "/api/v1/ws",
            "/healthz",
            "/metrics",
            "/openapi.json",
        ):
            assert path in spec["paths"], f"/openapi.json lacks {path}: {sorted(spec['paths'])}"
        assert {"get", "post", "delete"} <= set(spec["paths"]["/api/v1/tasks/{taskId}/logs"])


async def test_rate_limit_answers_429_and_drops_nothing_silently(hub_factory: HubFactory) -> None:
    # Four records a second: the socket's six records wait 0.75 s, not 3 s.
    hub = await hub_factory.astart("--rate-limit", "4", "--rate-burst", "3")
    task = "limited"
    accepted: list[int] = []
    limited = 0
    async with hub.http() as client:
        for s in range(1, 31):
            # Without a seq: a refused POST leaves no hole in a producer's seqs
            # (a later one would be a SEQ_GAP, whatever the limiter said).
            body = {"timestamp": ts(s), "message": f"line {s}"}
            resp = await client.post(logs_path(task), json=body)
            if resp.status_code == 200:
                accepted.append(s)
            else:
                assert_error(resp, 429, "RATE_LIMITED")
                assert float(resp.headers["Retry-After"]) > 0
                limited += 1
        assert limited > 0, "30 posts at once against 4 records/s with a burst of 3 were all accepted"
        assert accepted, "the burst should have let the first posts through"
        # What was answered 200 is stored; what was answered 429 is not.
        assert [r["message"] for r in await fetch_all(client, task)] == [f"line {s}" for s in accepted]

    # Over the socket the hub slows the sender instead: every record is acked and stored.
    ws_task = "limited-ws"
    async with hub.ws() as ws:
        await ws.send(logs_frame(ws_task, [make_record(ws_task, s) for s in range(1, 7)]))
        with trio.fail_after(PATIENCE):
            await ws.wait_ack(ws_task, 6)
    async with hub.http() as client:
        assert [r["seq"] for r in await fetch_all(client, ws_task)] == [1, 2, 3, 4, 5, 6]


async def test_metrics_parse_with_prometheus_clients_own_parser(hub: TestHub) -> None:
    """/metrics is the exposition format: prometheus_client's parser reads all
    of it, with the documented names, counters, gauges and both histograms."""
    async with hub.http() as client:
        await post(client, "parsed", [item(s) for s in range(1, 11)])
        async with hub.ws() as ws:
            await ws.send(logs_frame("parsed", [make_record("parsed", s) for s in range(11, 21)]))
            with trio.fail_after(PATIENCE):
                await ws.wait_ack("parsed", 20)
            resp = await client.get("/metrics")
        await client.get("/api/v1/tasks/nonesuch")  # a 404: counted by its code
        again = (await client.get("/metrics")).text
    assert resp.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    kinds = {name: f.type for name, f in families.items()}
    for name in ("keruta_records_ingested", "keruta_records_duplicate", "keruta_frames_received",
                 "keruta_frames_sent", "keruta_slow_consumers", "keruta_store_failures", "keruta_errors"):
        assert kinds.get(name) == "counter", (name, kinds)
    for name in ("keruta_subscribers", "keruta_websocket_connections", "keruta_subscriber_queue_bytes_peak"):
        assert kinds.get(name) == "gauge", (name, kinds)
    assert kinds.get("keruta_write_batch_seconds") == "histogram", kinds
    assert kinds.get("keruta_frame_bytes") == "histogram", kinds

    def value(family: str, sample: str, **labels: str) -> float:
        return next(s.value for s in families[family].samples if s.name == sample and s.labels == labels)

    assert value("keruta_records_ingested", "keruta_records_ingested_total") >= 20
    assert value("keruta_websocket_connections", "keruta_websocket_connections") >= 1
    assert value("keruta_write_batch_seconds", "keruta_write_batch_seconds_count") >= 1
    assert value("keruta_frame_bytes", "keruta_frame_bytes_count") >= 1
    # The logs frame of ten records was more than 256 bytes.
    assert value("keruta_frame_bytes", "keruta_frame_bytes_bucket", le="256.0") < value(
        "keruta_frame_bytes", "keruta_frame_bytes_bucket", le="+Inf"
    )
    errors = {s.labels["code"]: s.value for s in next(
        f for f in text_string_to_metric_families(again) if f.name == "keruta_errors").samples
        if s.name == "keruta_errors_total"}
    assert errors.get("NOT_FOUND", 0) >= 1, errors
