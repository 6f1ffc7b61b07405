"""Bad input gets a clear 4xx or `error` frame, never a 500, and changes nothing else.

Each test sends a whole catalogue of bad input to one hub and reports every
case that went wrong at once, then checks the hub still serves everyone.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import trio
from trio_websocket import ConnectionClosed, DisconnectionTimeout

from tests import hubclient
from tests.hubclient import (
    PATIENCE,
    TestHub,
    fetch_all,
    logs_frame,
    logs_path,
    make_record,
)

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures

TASK = "bad-input"
BIG_LINE = "x" * (64 * 1024 + 1)
BIG_METADATA = {"blob": "m" * (4 * 1024)}
# Hang guard per request: every case here should be answered at once.
ANSWER_TIMEOUT = 5.0


DROP = object()  # a field to leave out


def record(n: int = 1, **changes: Any) -> dict[str, Any]:
    """A valid wire record (seq n) with `changes` applied."""
    wire = hubclient.encode_record(make_record(TASK, n))
    wire.update(changes)
    return {k: v for k, v in wire.items() if v is not DROP}

# (what, body, status, code, a text the error message must contain)
BAD_POSTS: list[tuple[str, Any, int, str, str | None]] = [
    ("missing message", {}, 400, "INVALID_REQUEST", "message"),
    ("message not a string", {"message": 5}, 400, "INVALID_REQUEST", "message"),
    ("a JSON number", 42, 400, "INVALID_REQUEST", None),
    ("a JSON string", "hello", 400, "INVALID_REQUEST", None),
    ("null", None, 400, "INVALID_REQUEST", None),
    (
        "4th item's seq a string",
        [{"message": "a"}, {"message": "b"}, {"message": "c"}, {"message": "d", "seq": "3"}],
        400,
        "INVALID_REQUEST",
        "[3].seq",
    ),
    ("seq 0", {"message": "x", "seq": 0}, 400, "INVALID_REQUEST", "seq"),
    ("seq negative", {"message": "x", "seq": -4}, 400, "INVALID_REQUEST", "seq"),
    ("seq a float", {"message": "x", "seq": 1.5}, 400, "INVALID_REQUEST", "seq"),
    ("unknown source", {"message": "x", "source": "nope"}, 400, "INVALID_REQUEST", "source"),
    ("unknown level", {"message": "x", "level": "LOUD"}, 400, "INVALID_REQUEST", "level"),
    ("lineNumber a string", {"message": "x", "lineNumber": "1"}, 400, "INVALID_REQUEST", "lineNumber"),
    ("metadata a string", {"message": "x", "metadata": "str"}, 400, "INVALID_REQUEST", "metadata"),
    ("timestamp not a time", {"message": "x", "timestamp": "yesterday"}, 400, "INVALID_REQUEST", "timestamp"),
    ("timestamp a number", {"message": "x", "timestamp": 1700000000}, 400, "INVALID_REQUEST", "timestamp"),
    ("partial a string", {"message": "x", "partial": "yes"}, 400, "INVALID_REQUEST", "partial"),
    ("an array holding a number", [{"message": "a"}, 7], 400, "INVALID_REQUEST", "[1]"),
    ("line over 64 KiB", {"message": BIG_LINE}, 413, "TOO_LARGE", "message"),
    ("metadata over 4 KiB", {"message": "x", "metadata": BIG_METADATA}, 413, "TOO_LARGE", "metadata"),
    ("1001 items", [{"message": f"m{i}"} for i in range(1001)], 413, "TOO_LARGE", None),
    ("body over 4 MiB", [{"message": "y" * 60_000} for _ in range(80)], 413, "TOO_LARGE", None),
]

BAD_PARAMS: list[tuple[dict[str, Any], str]] = [
    ({"page": -1}, "page"),
    ({"page": "x"}, "page"),
    ({"size": 0}, "size"),
    ({"size": 1001}, "size"),
    ({"size": "x"}, "size"),
    ({"size": -5}, "size"),
    ({"from": "not-a-time"}, "from"),
    ({"to": "2025-13-45T99:00:00Z"}, "to"),
    ({"afterSeq": -1}, "afterSeq"),
    ({"afterSeq": "x"}, "afterSeq"),
    ({"source": "nope"}, "source"),
    ({"level": "LOUD"}, "level"),
]


def check(failures: list[str], what: str, resp: Any, status: int, code: str, mentions: str | None) -> None:
    try:
        hubclient.assert_error(resp, status, code, mentions)
    except AssertionError as exc:
        failures.append(f"{what}: {exc}".splitlines()[0])
    except ValueError:
        failures.append(f"{what}: {resp.status_code} with a body that is not JSON: {resp.text[:200]!r}")
    if resp.status_code >= 500:
        failures.append(f"{what}: got a {resp.status_code}")


async def test_rest_bad_input(hub: TestHub) -> None:
    failures: list[str] = []
    previous = "nothing"

    async def send(what: str, method: str, url: str, **kwargs: Any) -> Any:
        """The answer, or None (and a failure) when the hub never answers."""
        nonlocal previous
        try:
            return await client.request(method, url, **kwargs)
        except httpx.TimeoutException:
            failures.append(f"{what}: no answer within {ANSWER_TIMEOUT}s (the request before it on "
                            f"this keep-alive connection: {previous})")
            return None
        finally:
            previous = what

    async def expect(what: str, method: str, url: str, status: int, code: str, mentions: str | None,
                     **kwargs: Any) -> None:
        resp = await send(what, method, url, **kwargs)
        if resp is not None:
            check(failures, what, resp, status, code, mentions)

    async with hub.http(timeout=ANSWER_TIMEOUT) as client:
        json_type = {"content-type": "application/json"}
        await expect("non-JSON body", "POST", logs_path(TASK), 400, "INVALID_REQUEST", None,
                     content=b"not json{", headers=json_type)
        await expect("binary body", "POST", logs_path(TASK), 400, "INVALID_REQUEST", None,
                     content=b"\xff\xfe\x00garbage")
        for what, body, status, code, mentions in BAD_POSTS:
            await expect(f"POST {what}", "POST", logs_path(TASK), status, code, mentions,
                         content=orjson.dumps(body), headers=json_type)

        for bad_id in ("bad!id", "a" * 129, "with%20space", "%C3%A9t%C3%A9"):
            for method, suffix in (("POST", "/logs"), ("GET", "/logs"), ("GET", "/logs/stats"),
                                   ("GET", "/logs/raw"), ("DELETE", "/logs"), ("GET", "")):
                url = f"/api/v1/tasks/{bad_id}{suffix}"
                await expect(f"{method} {url[:60]}", method, url, 400, "INVALID_TASK_ID", None,
                             json={"message": "x"} if method == "POST" else None)

        for params, name in BAD_PARAMS:
            await expect(f"GET logs {params}", "GET", logs_path(TASK), 400, "INVALID_PARAMETER", name,
                         params=params)
        await expect("DELETE before=garbage", "DELETE", logs_path(TASK), 400, "INVALID_PARAMETER", "before",
                     params={"before": "last tuesday"})

        await expect("GET unknown task", "GET", "/api/v1/tasks/unknown", 404, "NOT_FOUND", None)
        await expect("stats of unknown task", "GET", logs_path("unknown", "/stats"), 404, "NOT_FOUND", None)
        for method, url in (("GET", "/api/v1/nothing-here"), ("PUT", logs_path(TASK)), ("PATCH", "/api/v1/tasks")):
            resp = await send(f"{method} {url}", method, url)
            if resp is not None and not 400 <= resp.status_code < 500:
                failures.append(f"{method} {url}: expected a 4xx, got {resp.status_code}")

        assert not failures, "bad REST input not answered as the contract says:\n" + "\n".join(failures)

        # Nothing of it was stored, and the hub serves on.
        assert await fetch_all(client, TASK) == []
        assert hub.alive
        assert (await client.get("/healthz")).status_code == 200
        resp = await client.post(logs_path(TASK), json={"message": "fine", "seq": 1})
        assert resp.status_code == 200, resp.text
        assert [r["message"] for r in await fetch_all(client, TASK)] == ["fine"]
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


def logs_raw(records: list[dict[str, Any]], task_id: str = TASK) -> dict[str, Any]:
    return {"type": "logs", "taskId": task_id, "records": records}


# (what, frame as text or JSON-able, code, a text the error message must contain)
BAD_FRAMES: list[tuple[str, Any, str, str | None]] = [
    ("not JSON", "this is not json", "INVALID_MESSAGE_FORMAT", None),
    ("a JSON array", "[1, 2]", "INVALID_MESSAGE_FORMAT", None),
    ("a JSON string", '"ping"', "INVALID_MESSAGE_FORMAT", None),
    ("no type", {"taskId": TASK}, "INVALID_MESSAGE_FORMAT", "type"),
    ("unknown type", {"type": "bogus"}, "INVALID_MESSAGE_FORMAT", "type"),
    ("type not a string", {"type": 5}, "INVALID_MESSAGE_FORMAT", "type"),
    ("logs: bad taskId", logs_raw([], "bad id!"), "INVALID_MESSAGE_FORMAT", "taskId"),
    ("logs: taskId too long", logs_raw([], "a" * 129), "INVALID_MESSAGE_FORMAT", "taskId"),
    ("logs: no taskId", {"type": "logs", "records": []}, "INVALID_MESSAGE_FORMAT", "taskId"),
    ("logs: records not a list", {"type": "logs", "taskId": TASK, "records": "nope"}, "INVALID_MESSAGE_FORMAT", "records"),
    ("logs: seq a string", logs_raw([record(1, seq="1")]), "INVALID_MESSAGE_FORMAT", "records[0].seq"),
    ("logs: seq 0", logs_raw([record(1), record(2, seq=0)]), "INVALID_MESSAGE_FORMAT", "records[1].seq"),
    ("logs: unknown source", logs_raw([record(1), record(2, source="nope")]), "INVALID_MESSAGE_FORMAT", "records[1].source"),
    ("logs: unknown level", logs_raw([record(1, level="LOUD")]), "INVALID_MESSAGE_FORMAT", "records[0].level"),
    ("logs: message missing", logs_raw([record(1, message=DROP)]), "INVALID_MESSAGE_FORMAT", "records[0].message"),
    ("logs: message a number", logs_raw([record(1, message=3)]), "INVALID_MESSAGE_FORMAT", "records[0].message"),
    ("logs: metadata a list", logs_raw([record(1, metadata=[1])]), "INVALID_MESSAGE_FORMAT", "records[0].metadata"),
    ("logs: timestamp not a time", logs_raw([record(1, timestamp="yesterday")]), "INVALID_MESSAGE_FORMAT", "timestamp"),
    ("logs: record of another task", logs_raw([record(1, taskId="other")]), "INVALID_MESSAGE_FORMAT", "records[0].taskId"),
    ("log: message missing", {"type": "log", **record(1, message=DROP)}, "INVALID_MESSAGE_FORMAT", "message"),
    ("log: bad taskId", {"type": "log", **record(1, taskId="no/slash")}, "INVALID_MESSAGE_FORMAT", "taskId"),
    ("status: unknown state", {"type": "status", "taskId": TASK, "state": "weird"}, "INVALID_MESSAGE_FORMAT", "state"),
    ("status: exitCode a string", {"type": "status", "taskId": TASK, "state": "failed", "exitCode": "1"}, "INVALID_MESSAGE_FORMAT", "exitCode"),
    ("subscribe: bad taskId", {"type": "subscribe", "taskId": ""}, "INVALID_MESSAGE_FORMAT", "taskId"),
    ("subscribe: fromSeq -1", {"type": "subscribe", "taskId": TASK, "fromSeq": -1}, "INVALID_MESSAGE_FORMAT", "fromSeq"),
    ("subscribe: fromSeq a string", {"type": "subscribe", "taskId": TASK, "fromSeq": "x"}, "INVALID_MESSAGE_FORMAT", "fromSeq"),
    ("subscribe: unknown source", {"type": "subscribe", "taskId": TASK, "source": "nope"}, "INVALID_MESSAGE_FORMAT", "source"),
    ("subscribe: unknown level", {"type": "subscribe", "taskId": TASK, "level": "LOUD"}, "INVALID_MESSAGE_FORMAT", "level"),
    ("unsubscribe: no taskId", {"type": "unsubscribe"}, "INVALID_MESSAGE_FORMAT", "taskId"),
    ("logs: line over 64 KiB", logs_raw([record(1), record(2, message=BIG_LINE)]), "TOO_LARGE", "records[1].message"),
    ("log: line over 64 KiB", {"type": "log", **record(1, message=BIG_LINE)}, "TOO_LARGE", "message"),
    ("logs: metadata over 4 KiB", logs_raw([record(1, metadata=BIG_METADATA)]), "TOO_LARGE", "metadata"),
    ("logs: 1001 records", logs_raw([record(s) for s in range(1, 1002)]), "TOO_LARGE", "records"),
    ("frame over 4 MiB", logs_raw([record(s, message="z" * 60_000) for s in range(1, 75)]), "TOO_LARGE", None),
]


async def test_ws_bad_frames_get_error_frames_and_the_connection_carries_on(hub: TestHub) -> None:
    failures: list[str] = []
    async with hub.ws() as ws, hub.ws() as bystander:
        await bystander.subscribe(TASK, from_seq=1)
        for what, frame, code, mentions in BAD_FRAMES:
            await ws.send(frame if isinstance(frame, str) else orjson.dumps(frame).decode())
            with trio.fail_after(PATIENCE):
                try:
                    reply = await ws.recv()
                except ConnectionClosed as exc:
                    raise AssertionError(f"after {what!r} the hub closed the connection: {exc.reason}") from None
            if reply.get("type") != "error":
                failures.append(f"{what}: expected an error frame, got {reply}")
                continue
            if reply.get("code") != code:
                failures.append(f"{what}: expected code {code}, got {reply}")
            if mentions is not None and mentions not in reply.get("message", ""):
                failures.append(f"{what}: the message should name {mentions!r}: {reply.get('message')!r}")

        # The same connection still works, and so does everyone else's.
        with trio.fail_after(PATIENCE):
            await ws.send({"type": "ping"})
            assert await ws.recv() == {"type": "pong"}
            await ws.send(logs_frame(TASK, [make_record(TASK, s) for s in (1, 2, 3)]))
            await ws.wait_ack(TASK, 3)
            got = [r["seq"] for f in [await bystander.recv_type("logs")] for r in f["records"]]
            while got[-1] < 3:
                got += [r["seq"] for r in (await bystander.recv_type("logs"))["records"]]
        assert got == [1, 2, 3], "bad frames leaked records to a subscriber"

    assert not failures, "bad frames not answered as the contract says:\n" + "\n".join(failures)
    async with hub.http() as client:
        # Only the good frame's records were stored.
        assert [r["seq"] for r in await fetch_all(client, TASK)] == [1, 2, 3]
        assert (await client.get("/api/v1/tasks/other")).status_code == 404
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


async def test_frame_beyond_what_the_server_reads_closes_only_that_connection(hub: TestHub) -> None:
    """A frame so large the hub will not even read it may cost the sender its connection,
    never the hub: others carry on, and the refused connection really ends."""
    huge = logs_frame(TASK, [make_record(TASK, s, "q" * 60_000) for s in range(1, 200)])  # ~12 MB
    async with hub.ws() as other:
        outcome = "nothing"
        with trio.move_on_after(15) as stuck:
            try:
                async with hub.ws(disconnect_timeout=5) as ws:
                    try:
                        await ws.send(huge)
                        reply = await ws.recv()
                        outcome = f"frame {reply}"
                        assert reply["type"] == "error" and reply["code"] == "TOO_LARGE", reply
                    except ConnectionClosed as exc:
                        outcome = f"close {exc.reason}"
                        assert exc.reason is not None and exc.reason.code == 1009, exc.reason
            except DisconnectionTimeout:
                stuck.cancel()
        assert not stuck.cancelled_caught, (
            f"after {outcome} the connection was never torn down: the closing handshake did not "
            "finish and the hub kept the TCP connection open"
        )
        with trio.fail_after(PATIENCE):
            await other.send({"type": "ping"})
            assert await other.recv() == {"type": "pong"}
    async with hub.http() as client:
        assert await fetch_all(client, TASK) == []


async def test_keep_alive_connection_survives_rejected_posts(hub: TestHub) -> None:
    """A client reusing its connection after a rejected POST gets its next answer.

    The hub may answer before reading the body (bad task id, body too large);
    it must then still read or close, never leave the connection stuck.
    """
    rejected = [
        ("POST to a bad task id", "/api/v1/tasks/bad!id/logs", orjson.dumps({"message": "x"})),
        ("POST of a line over 64 KiB", logs_path(TASK), orjson.dumps({"message": BIG_LINE})),
        ("POST of a body over 4 MiB", logs_path(TASK), orjson.dumps([{"message": "y" * 60_000}] * 80)),
    ]
    stuck: list[str] = []
    async with hub.http(timeout=ANSWER_TIMEOUT) as client:
        for what, url, body in rejected:
            for attempt in range(5):
                resp = await client.post(url, content=body, headers={"content-type": "application/json"})
                assert 400 <= resp.status_code < 500, resp.text
                try:
                    follow_up = await client.get("/healthz")
                    assert follow_up.status_code == 200
                except httpx.TimeoutException:
                    stuck.append(f"after {what} (attempt {attempt + 1}) the next request got no answer")
                    break
    assert not stuck, "\n".join(stuck)
