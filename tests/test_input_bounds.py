"""Input at and past its bounds (timestamps, nesting, integers, task ids,
flags, frames without task ids): a 4xx or an error frame, never a 500, a dead
connection or someone else's failure."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from agent.spool.spool import Spool
from keruta.frames import FrameError, LogsFrame
from keruta.limits import INT64_MAX, MAX_SEQ
from keruta.records import valid_task_id
from keruta.timefmt import UTC, canonical_ts, format_ts
from keruta.wire import decode_client_frame
from tests import hubclient
from tests.hubclient import TestHub, Ws, assert_error, fetch_all, logs_path, make_record
from tests.support import python_m

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures

TASK = "bad-input"
# Every answer here is immediate: a short hang guard keeps a failing run short.
WAIT = 10.0
OVERFLOWING_TIMES = ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00")


def wire_record(n: int, **changes: Any) -> dict[str, Any]:
    wire = hubclient.encode_record(make_record(TASK, n))
    wire.update(changes)
    return wire


def logs(records: list[dict[str, Any]], task_id: str = TASK) -> dict[str, Any]:
    return {"type": "logs", "taskId": task_id, "records": records}


def as_text(frame: Any) -> str | bytes:
    # The stdlib encoder, not orjson: it writes integers beyond 64 bits.
    return frame if isinstance(frame, str | bytes) else json.dumps(frame)


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def refused(ws: Ws, frame: Any, code: str, mentions: str) -> None:
    """`frame` gets an error frame naming `mentions`, and the same connection
    answers a ping afterwards."""
    with trio.fail_after(WAIT):
        await ws.conn.send_message(as_text(frame))
        reply = await ws.recv_type("error")
        assert reply["code"] == code, reply
        assert mentions in reply["message"], reply
        await ws.send({"type": "ping"})
        assert await ws.recv_type("pong") == {"type": "pong"}


async def post(hub: TestHub, body: Any, task_id: str = TASK) -> Any:
    async with hub.http() as client:
        return await client.post(logs_path(task_id), content=as_text(body),
                                 headers={"content-type": "application/json"})


def assert_hub_healthy(hub: TestHub) -> None:
    assert hub.alive
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


# --- timestamps that overflow -------------------------------------------------


@pytest.mark.parametrize("moment", OVERFLOWING_TIMES)
def test_overflowing_offsets_are_value_errors(moment: str) -> None:
    with pytest.raises(ValueError, match="outside"):
        canonical_ts(moment)


@pytest.mark.parametrize("digits", range(7))
@pytest.mark.parametrize(
    "moment", ["2026-11-28T12:00:00", "0001-01-01T00:00:00", "9999-12-31T23:59:59", "2024-02-29T07:08:09"]
)
def test_a_utc_time_with_fewer_fractional_digits_is_only_padded(moment: str, digits: int) -> None:
    text = moment + ("." + "123456"[:digits] if digits else "") + "Z"
    assert canonical_ts(text) == format_ts(dt.datetime.fromisoformat(text))


@pytest.mark.parametrize("moment", ["2026-13-01T00:00:00.000Z", "2026-02-30T00:00:00Z", "2026-11-28T12:00:60.5Z"])
def test_an_impossible_utc_time_is_refused_whatever_its_digits(moment: str) -> None:
    with pytest.raises(ValueError):
        canonical_ts(moment)


async def test_overflowing_timestamps_are_400_and_error_frames(hub: TestHub) -> None:
    async with hub.http() as client:
        for moment in OVERFLOWING_TIMES:
            for name in ("from", "to"):
                resp = await client.get(logs_path(TASK), params={name: moment})
                assert_error(resp, 400, "INVALID_PARAMETER", name)
            resp = await client.delete(logs_path(TASK), params={"before": moment})
            assert_error(resp, 400, "INVALID_PARAMETER", "before")
            resp = await client.post(logs_path(TASK), json={"message": "m", "timestamp": moment})
            assert_error(resp, 400, "INVALID_REQUEST", "timestamp")
    async with hub.ws() as ws:
        for moment in OVERFLOWING_TIMES:
            await refused(ws, logs([wire_record(1, timestamp=moment)]), "INVALID_MESSAGE_FORMAT",
                          "records[0].timestamp")
            await refused(ws, {"type": "log", **wire_record(1, timestamp=moment)}, "INVALID_MESSAGE_FORMAT",
                          "timestamp")
    async with hub.http() as client:
        assert await fetch_all(client, TASK) == []
    assert_hub_healthy(hub)


# --- nesting ------------------------------------------------------------------


async def test_deeply_nested_metadata_is_refused_by_name(hub: TestHub) -> None:
    for depth in (40, 300):
        resp = await post(hub, {"message": "m", "metadata": nested(depth)})
        assert_error(resp, 400, "INVALID_REQUEST", "metadata")
        resp = await post(hub, [{"message": "ok"}, {"message": "m", "metadata": nested(depth)}])
        assert_error(resp, 400, "INVALID_REQUEST", "[1].metadata")
    async with hub.ws() as ws:
        for depth in (40, 300):
            await refused(ws, logs([wire_record(1), wire_record(2, metadata=nested(depth))]),
                          "INVALID_MESSAGE_FORMAT", "records[1].metadata")
        # Nesting that every frame the hub sends can still carry is fine.
        await ws.send(logs([wire_record(1, metadata=nested(32))]))
        with trio.fail_after(WAIT):
            await ws.wait_ack(TASK, 1)
    async with hub.http() as client:
        stored = await fetch_all(client, TASK)
    assert [r["seq"] for r in stored] == [1] and stored[0]["metadata"] == nested(32)
    assert_hub_healthy(hub)


# --- integers -----------------------------------------------------------------


async def test_query_integers_beyond_int64_are_400(hub: TestHub) -> None:
    async with hub.http() as client:
        for name, value in (("afterSeq", 2**63), ("afterSeq", 2**64 + 5), ("page", 2**63), ("size", 2**63)):
            resp = await client.get(logs_path(TASK), params={name: value})
            assert_error(resp, 400, "INVALID_PARAMETER", name)
        resp = await client.get(logs_path(TASK), params={"afterSeq": INT64_MAX})
        assert resp.status_code == 200 and resp.json()["content"] == []
    assert_hub_healthy(hub)


@pytest.mark.parametrize(
    ("field", "value"),
    [("seq", 2**63), ("seq", 2**62 + 1), ("seq", MAX_SEQ + 1), ("lineNumber", 2**63), ("lineNumber", MAX_SEQ + 1)],
)
async def test_seq_beyond_max_seq_is_refused(hub: TestHub, field: str, value: int) -> None:
    resp = await post(hub, {"message": "m", field: value})
    assert_error(resp, 400, "INVALID_REQUEST", field)
    async with hub.ws() as ws:
        await refused(ws, logs([wire_record(1, **{field: value})]), "INVALID_MESSAGE_FORMAT", f"records[0].{field}")
    async with hub.http() as client:
        assert await fetch_all(client, TASK) == []
    assert_hub_healthy(hub)


async def test_other_integer_fields_are_bounded(hub: TestHub) -> None:
    async with hub.ws() as ws:
        for code in (2**31, -(2**31) - 1, 2**63):
            await refused(ws, {"type": "status", "taskId": TASK, "state": "failed", "exitCode": code},
                          "INVALID_MESSAGE_FORMAT", "exitCode")
        for seq in (MAX_SEQ + 1, 2**63, 2**64):
            await refused(ws, {"type": "subscribe", "taskId": TASK, "fromSeq": seq}, "INVALID_MESSAGE_FORMAT",
                          "fromSeq")
        await ws.send({"type": "status", "taskId": TASK, "state": "failed", "exitCode": -(2**31)})
        await ws.send({"type": "ping"})
        with trio.fail_after(WAIT):
            await ws.recv_type("pong")
    async with hub.http() as client:
        for _ in range(100):
            resp = await client.get(f"/api/v1/tasks/{TASK}")
            if resp.status_code == 200:
                break
            await trio.sleep(0.05)
        assert resp.json()["exitCode"] == -(2**31)
    assert_hub_healthy(hub)


async def test_a_top_producer_seq_never_becomes_a_task_seq(hub: TestHub) -> None:
    # The anonymous producer's first record is its seq 1: the top seq is
    # refused (SEQ_GAP), and the task's seqs stay the hub's own, from 1.
    assert (await post(hub, {"message": "top", "seq": MAX_SEQ})).status_code == 409
    assert (await post(hub, {"message": "after"})).status_code == 200
    async with hub.http() as client:
        assert [r["seq"] for r in await fetch_all(client, TASK)] == [1]
        raw = await client.get(logs_path(TASK, "/raw"))
    assert raw.text == "after\n"
    assert_hub_healthy(hub)


async def test_a_bad_integer_never_fails_another_producers_commit(hub_factory: Any) -> None:
    # The writer waits for company, so both producers' records share one commit.
    hub = await hub_factory.astart("--write-flush-interval", "0.3")
    async with hub.ws() as good, hub.ws() as bad:
        await bad.send(logs([wire_record(1, seq=2**63, taskId="bad-producer")], "bad-producer"))
        await bad.send(logs([wire_record(2, lineNumber=2**63, taskId="bad-producer")], "bad-producer"))
        await good.send(hubclient.logs_frame("good-producer", [make_record("good-producer", s) for s in (1, 2, 3)]))
        with trio.fail_after(WAIT):
            await good.wait_ack("good-producer", 3)
            for field in ("seq", "lineNumber"):
                error = await bad.recv_type("error")
                assert error["code"] == "INVALID_MESSAGE_FORMAT" and field in error["message"], error
    async with hub.http() as client:
        assert [r["seq"] for r in await fetch_all(client, "good-producer")] == [1, 2, 3]
    assert_hub_healthy(hub)


# --- old timestamps -----------------------------------------------------------


def test_years_before_1000_have_four_digits() -> None:
    assert format_ts(dt.datetime(999, 6, 1, 2, 3, 4, 5, tzinfo=UTC)) == "0999-06-01T02:03:04.000005Z"
    assert format_ts(dt.datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01T00:00:00.000000Z"
    assert canonical_ts("0999-06-01T00:00:00+00:00") == "0999-06-01T00:00:00.000000Z"
    moments = ["0999-12-31T23:59:59Z", "1000-01-01T00:00:00Z", "0012-01-01T00:00:00Z", "2026-01-01T00:00:00Z"]
    assert sorted(canonical_ts(m) for m in moments) == [canonical_ts(m) for m in sorted(moments)]


async def test_old_timestamps_keep_time_order_in_queries(hub: TestHub) -> None:
    body = [
        {"message": "ancient", "timestamp": "0999-06-01T00:00:00Z"},
        {"message": "recent", "timestamp": "2026-06-01T00:00:00Z"},
    ]
    assert (await post(hub, body)).status_code == 200
    async with hub.http() as client:
        old = await fetch_all(client, TASK, to="1000-01-01T00:00:00Z")
        assert [r["message"] for r in old] == ["ancient"]
        assert old[0]["timestamp"] == "0999-06-01T00:00:00.000000Z"
        new = await fetch_all(client, TASK, **{"from": "1000-01-01T00:00:00Z"})
        assert [r["message"] for r in new] == ["recent"]
        stats = (await client.get(logs_path(TASK, "/stats"))).json()
        assert stats["timeRange"] == {"start": "0999-06-01T00:00:00.000000Z", "end": "2026-06-01T00:00:00.000000Z"}
        resp = await client.delete(logs_path(TASK), params={"before": "1000-01-01T00:00:00Z"})
        assert resp.json() == {"deletedCount": 1}
    assert_hub_healthy(hub)


# --- task ids "." and ".." ----------------------------------------------------


def test_dot_task_ids_are_invalid() -> None:
    assert not valid_task_id(".") and not valid_task_id("..")
    assert valid_task_id("...") and valid_task_id(".hidden") and valid_task_id("a..b")


async def test_dot_task_ids_are_refused_by_the_hub(hub: TestHub) -> None:
    async with hub.http() as client:
        for bad in ("%2E", "%2E%2E"):
            for method, suffix in (("POST", "/logs"), ("GET", "/logs"), ("GET", "/logs/stats"),
                                   ("GET", "/logs/raw"), ("DELETE", "/logs"), ("GET", "")):
                resp = await client.request(method, f"/api/v1/tasks/{bad}{suffix}",
                                            json={"message": "x"} if method == "POST" else None)
                assert_error(resp, 400, "INVALID_TASK_ID")
    async with hub.ws() as ws:
        for bad in (".", ".."):
            await refused(ws, logs([], bad), "INVALID_MESSAGE_FORMAT", "taskId")
            await refused(ws, {"type": "log", **wire_record(1, taskId=bad)}, "INVALID_MESSAGE_FORMAT", "taskId")
            await refused(ws, {"type": "status", "taskId": bad, "state": "running"}, "INVALID_MESSAGE_FORMAT",
                          "taskId")
            await refused(ws, {"type": "subscribe", "taskId": bad}, "INVALID_MESSAGE_FORMAT", "taskId")
    async with hub.http() as client:
        assert (await client.get("/api/v1/tasks")).json()["tasks"] == []
    assert_hub_healthy(hub)


@pytest.mark.parametrize("bad", [".", ".."])
def test_agent_refuses_dot_task_ids(tmp_path: Path, bad: str) -> None:
    spool = tmp_path / "spool"
    for args, env in (
        (["run", "--task-id", bad, "--spool-dir", str(spool), "--", "true"], {}),
        (["run", "--spool-dir", str(spool), "--", "true"], {"KERUTA_TASK_ID": bad}),
        (["tail", bad, "--no-follow"], {}),
    ):
        proc = subprocess.run(
            python_m("agent", *args), capture_output=True, text=True, timeout=60,
            env={**os.environ, "KERUTA_HUB_URL": "http://127.0.0.1:9", **env},
        )
        assert proc.returncode == 2, proc
        assert "'.' or '..'" in proc.stderr, proc.stderr
    assert not spool.exists() or list(spool.iterdir()) == []
    assert not (tmp_path / "task.json").exists()


@pytest.mark.parametrize("bad", [".", "..", "", "a/b", "../x"])
def test_spool_refuses_a_task_id_that_is_not_a_directory_name(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "spool"
    with pytest.raises(ValueError, match="spool directory"):
        Spool.open(root, bad)
    assert list(tmp_path.iterdir()) == []


# --- a connection serves on after a refused frame -----------------------------


async def test_the_connection_serves_on_after_every_refused_frame(hub: TestHub) -> None:
    cases: list[tuple[Any, str]] = [
        (logs([wire_record(1, timestamp=OVERFLOWING_TIMES[0])]), "timestamp"),
        (logs([wire_record(1, metadata=nested(300))]), "metadata"),
        (logs([wire_record(1, seq=2**63)]), "seq"),
        (logs([wire_record(1, seq=2**64)]), "seq"),
        (logs([wire_record(1, lineNumber=-(2**63) - 1)]), "lineNumber"),
        ({"type": "status", "taskId": TASK, "state": "failed", "exitCode": 2**70}, "exitCode"),
        ({"type": "subscribe", "taskId": TASK, "fromSeq": 2**63}, "fromSeq"),
        ({"type": "subscribe", "taskId": TASK, "source": 5}, "source"),
        (logs([], ".."), "taskId"),
        ("[" * 2000 + "]" * 2000, "JSON"),
        ('{"type": "ping", "x": ' + "[" * 600 + "]" * 600 + "}", ""),
        (json.dumps(logs([wire_record(1)])).replace('"metadata": {}', '"metadata": {"n": 1e400}'), "JSON"),
        # Quart hands an empty binary message to the app as None.
        (b"", "JSON"),
        (b"\xff\xfe", "JSON"),
    ]
    async with hub.ws() as ws:
        for frame, mentions in cases:
            with trio.fail_after(WAIT):
                await ws.conn.send_message(as_text(frame))
                reply = await ws.recv()
                if reply["type"] != "pong":  # a ping with odd extra fields is still a ping
                    assert reply["type"] == "error" and mentions in reply["message"], (frame, reply)
                await ws.send({"type": "ping"})
                assert (await ws.recv_type("pong"))["type"] == "pong"
        await ws.send(hubclient.logs_frame(TASK, [make_record(TASK, 1)]))
        with trio.fail_after(WAIT):
            await ws.wait_ack(TASK, 1)
    assert_hub_healthy(hub)


# --- numbers given at start ---------------------------------------------------


HUB_BAD_FLAGS = [
    ("--rate-limit", "-1"), ("--rate-limit", "nan"), ("--rate-burst", "0"), ("--rate-burst", "-5"),
    ("--subscriber-queue", "0"), ("--max-page-size", "0"), ("--max-page-size", str(2**40)),
    ("--write-batch-size", "-1"), ("--write-flush-interval", "-0.5"), ("--retention-interval", "0"),
    ("--retention-days", "-1"), ("--port", "-1"), ("--port", "70000"),
]


@pytest.mark.parametrize(("flag", "value"), HUB_BAD_FLAGS)
def test_hub_refuses_bad_numbers_at_start(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from hub.cli import main

    with pytest.raises(SystemExit) as exited:
        main([f"{flag}={value}", "--db", "sqlite:///unused.db"])
    assert exited.value.code == 2
    assert flag in capsys.readouterr().err


def test_hub_rate_limit_zero_still_means_off() -> None:
    from hub.cli import build_parser, check_config, config_from_args

    args = build_parser().parse_args(["--rate-limit", "0"])
    assert args.rate_limit == 0 and check_config(config_from_args(args)) is None


def test_hub_process_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hub", "--port", "0", "--db", f"sqlite:///{tmp_path / 'h.db'}", "--rate-burst", "-3"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc
    assert "--rate-burst" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


AGENT_BAD_FLAGS = [
    ("--rate-limit", "0"), ("--rate-limit", "-2"), ("--rate-limit", "inf"), ("--batch-size", "0"),
    ("--flush-interval", "-1"), ("--flush-interval", "nan"), ("--drain-timeout", "-1"),
    ("--spool-max-bytes", "0"),
]


@pytest.mark.parametrize(("flag", "value"), AGENT_BAD_FLAGS)
def test_agent_refuses_bad_numbers_at_start(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["run", f"{flag}={value}", "--spool-dir", str(tmp_path), "--", "true"])
    assert exited.value.code == 2
    assert flag in capsys.readouterr().err


def test_agent_tail_from_seq_is_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["tail", "t", "--from-seq", str(2**63)])
    assert exited.value.code == 2
    assert "--from-seq" in capsys.readouterr().err


# --- records take their frame's task id ---------------------------------------


def test_records_take_the_frames_task_id() -> None:
    record = wire_record(1)
    del record["taskId"]
    frame = decode_client_frame(orjson.dumps(logs([record, wire_record(2)])))
    assert isinstance(frame, LogsFrame)
    assert [r.task_id for r in frame.records] == [TASK, TASK]
    with pytest.raises(FrameError, match=r"records\[1\]\.taskId"):
        decode_client_frame(orjson.dumps(logs([record, wire_record(2, taskId="other")])))


async def test_logs_frame_without_record_task_ids_is_stored(hub: TestHub) -> None:
    records = []
    for seq in (1, 2, 3):
        record = wire_record(seq)
        del record["taskId"]
        records.append(record)
    async with hub.ws() as ws:
        await ws.send(logs(records))
        with trio.fail_after(WAIT):
            await ws.wait_ack(TASK, 3)
        await refused(ws, logs([records[0], wire_record(4, taskId="other")]), "INVALID_MESSAGE_FORMAT",
                      "records[1].taskId")
    async with hub.http() as client:
        stored = await fetch_all(client, TASK)
    assert [(r["seq"], r["taskId"]) for r in stored] == [(1, TASK), (2, TASK), (3, TASK)]
    assert (await hub_task_ids(hub)) == [TASK]


async def hub_task_ids(hub: TestHub) -> list[str]:
    async with hub.http() as client:
        return [t["taskId"] for t in (await client.get("/api/v1/tasks")).json()["tasks"]]


# --- the OpenAPI document names every field -----------------------------------


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _undocumented(spec: dict[str, Any], schema: dict[str, Any], value: Any, where: str) -> list[str]:
    """Fields of `value` its schema does not name, and required fields it lacks."""
    schema = _resolve(spec, schema)
    out: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        out += [f"{where}.{k} is not in the schema" for k in value if k not in props]
        out += [f"{where}.{k} is required but missing" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                out += _undocumented(spec, props[k], v, f"{where}.{k}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += _undocumented(spec, schema["items"], v, f"{where}[{i}]")
    return out


async def test_openapi_names_every_field_the_hub_answers(hub: TestHub) -> None:
    async with hub.ws() as ws:
        await ws.send(hubclient.logs_frame(TASK, [make_record(TASK, 1, metadata={"processId": 7})]))
        await ws.send({"type": "status", "taskId": TASK, "state": "failed", "exitCode": 3})
        with trio.fail_after(WAIT):
            await ws.wait_ack(TASK, 1)
    async with hub.http() as client:
        spec = (await client.get("/openapi.json")).json()
        paths = spec["paths"]

        def ok_schema(path: str, method: str = "get") -> dict[str, Any]:
            return paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]

        answers = [
            ("/api/v1/tasks/{taskId}/logs", (await client.get(logs_path(TASK))).json()),
            ("/api/v1/tasks/{taskId}/logs/stats", (await client.get(logs_path(TASK, "/stats"))).json()),
            ("/api/v1/tasks", (await client.get("/api/v1/tasks")).json()),
            ("/api/v1/tasks/{taskId}", (await client.get(f"/api/v1/tasks/{TASK}")).json()),
            ("/healthz", (await client.get("/healthz")).json()),
        ]
        problems: list[str] = []
        for path, body in answers:
            problems += _undocumented(spec, ok_schema(path), body, path)
        error = (await client.get("/api/v1/tasks/nope")).json()
        problems += _undocumented(spec, paths["/api/v1/tasks/{taskId}"]["get"]["responses"]["404"]["content"]
                                  ["application/json"]["schema"], error, "404")
        for path, ops in paths.items():
            for method, op in ops.items():
                if method == "parameters":
                    continue
                for status in op["responses"]:
                    if status.startswith("4") or status.startswith("5"):
                        schema = _resolve(spec, op["responses"][status]["content"]["application/json"]["schema"])
                        if set(schema.get("required", [])) != {"error", "message"}:
                            problems.append(f"{method} {path} {status}: not the Error schema")
        post_codes = set(paths["/api/v1/tasks/{taskId}/logs"]["post"]["responses"])
        missing = {"400", "401", "403", "409", "413", "429", "503"} - post_codes
        if missing:
            problems.append(f"POST logs does not document {sorted(missing)}")
    assert not problems, "\n".join(problems)
