"""Hostile tests of the READ side: live viewers on the WebSocket, the web
viewer's page, and `keruta-agent tail` against a hostile hub.

Three parts, each on real sockets and processes:

- **Viewers against a real hub** (in-process, SQLite): absurd subscribe
  frames, tasks that do not exist, many subscriptions on one connection, a
  viewer that never reads (bounded in bytes), one that vanishes mid-burst,
  one that sends garbage, and viewers with wrong tokens or a foreign Origin.
  Each checks the hub's answer, that nothing else changed (what REST holds),
  and that the other viewers and the producer are still served.
- **The web viewer** (hub process; Chromium where installed): odd task ids in
  the page's address, its security headers, and log lines full of HTML,
  script and escape sequences that must show as text and run nothing.
- **`keruta-agent tail` against a fake hub** (`FakeHub`, a raw HTTP and
  WebSocket server in the test, real sockets; the tail is a real `python -m
  agent` process): garbage frames, non-JSON, wrong types, seqs backwards or
  repeated, an answer that never advances, a connection cut mid-frame, an
  enormous message. The tail must end with a clear message and the
  documented exit code (README "The agent": 2 when the hub is unreachable or
  refuses), never hang, never print a traceback, never print a line twice or
  out of order.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import socket
import struct
import subprocess
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from keruta.limits import MAX_SEQ
from tests import hubclient
from tests.hubclient import (
    PATIENCE,
    Ws,
    drain_until_closed,
    fetch_all,
    open_stalled_ws,
    parse_metrics,
)
from tests.inprocess import InProcessHub, InProcessHubFactory
from tests.support import HubProcess, python_m, sqlite_url, wait_for

sqlite_hub_factory = hubclient.sqlite_hub_factory  # fixture

TS = "2026-01-02T03:04:05.000000Z"
INVALID = "INVALID_MESSAGE_FORMAT"
VIEWER, AGENT = "viewer-secret-7", "agent-secret-8"


# --- talking to a real hub ------------------------------------------------------------


def rec(seq: int, message: str | None = None, **changes: Any) -> dict[str, Any]:
    """A producer's wire record (its own seq)."""
    record: dict[str, Any] = {
        "seq": seq, "timestamp": TS, "source": "stdout", "level": "INFO",
        "message": f"line {seq}" if message is None else message, "lineNumber": seq, "metadata": {},
    }
    record.update(changes)
    return record


class Producer:
    """One producer on its own connection, writing `line N` records and waiting for their acks."""

    def __init__(self, ws: Ws, task: str, name: str = "writer") -> None:
        self.ws = ws
        self.task = task
        self.name = name
        self.sent = 0

    async def write(self, count: int = 1, message: Callable[[int], str] | None = None) -> None:
        first = self.sent + 1
        self.sent += count
        records = [rec(s, message(s) if message else None) for s in range(first, self.sent + 1)]
        await self.ws.send({"type": "logs", "taskId": self.task, "producer": self.name, "records": records})
        await self.acked()

    async def acked(self) -> None:
        with trio.fail_after(PATIENCE):
            while True:
                frame = await self.ws.recv()
                assert frame["type"] == "ack", f"the producer got {frame}"
                if frame.get("producer") == self.name and frame["seq"] == self.sent:
                    return

    async def finish(self, state: str = "succeeded", exit_code: int | None = 0) -> None:
        """The run's final status; the hub answers with the status it stored."""
        await self.ws.send({"type": "status", "taskId": self.task, "producer": self.name,
                            "state": state, "exitCode": exit_code})
        with trio.fail_after(PATIENCE):
            frame = await self.ws.recv_type("status")
        assert (frame["state"], frame.get("exitCode")) == (state, exit_code), frame


async def seqs_until(ws: Ws, task: str, last: int, *, allow: tuple[str, ...] = ("status", "ack", "subscribed")) -> list[int]:
    """The seqs of `task` a subscriber gets until `last` has come; other frames of types in `allow` skipped."""
    seqs: list[int] = []
    with trio.fail_after(PATIENCE):
        while not seqs or seqs[-1] < last:
            frame = await ws.recv()
            if frame["type"] == "logs" and frame["taskId"] == task:
                seqs.extend(r["seq"] for r in frame["records"])
            elif frame["type"] == "logs" or frame["type"] not in allow:
                raise AssertionError(f"while waiting for seq {last} of {task} (have {seqs[-3:]}): {frame}")
    return seqs


async def pong(ws: Ws) -> list[dict[str, Any]]:
    """Ping and read until the pong: every frame the hub sent before it (non-writes are answered in order)."""
    await ws.send({"type": "ping"})
    frames = []
    with trio.fail_after(PATIENCE):
        while (frame := await ws.recv())["type"] != "pong":
            frames.append(frame)
    return frames


async def stored_seqs(hub: InProcessHub, task: str) -> list[int]:
    async with hub.http() as client:
        return [r["seq"] for r in await fetch_all(client, task)]


async def metric(hub: InProcessHub, name: str) -> float:
    async with hub.http() as client:
        return parse_metrics((await client.get("/metrics")).text).get(name, 0.0)


def assert_hub_clean(hub: InProcessHub) -> None:
    assert hub.alive, "the hub stopped serving"
    assert "Traceback" not in hub.stderr_text, hub.stderr_text


def with_literal(frame: dict[str, Any], literal: str) -> str:
    text = orjson.dumps(frame).decode()
    assert text.count('"@@"') == 1
    return text.replace('"@@"', literal)


# --- 1. subscribe frames a viewer should never send -----------------------------------


async def test_absurd_from_seq_is_refused_and_the_viewers_own_subscription_carries_on(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart()
    task = "watched"
    async with hub.ws() as producer_ws, hub.ws() as viewer:
        producer = Producer(producer_ws, task)
        await producer.write(3)
        await viewer.subscribe(task, from_seq=1)
        assert await seqs_until(viewer, task, 3) == [1, 2, 3]

        # fromSeq out of range or of the wrong type: one INVALID_MESSAGE_FORMAT
        # naming it, on a subscription to another task (the one held stays).
        literals = ["-1", "0", "-9223372036854775808", str(MAX_SEQ + 1), str(2**63 - 1), str(2**63),
                    str(2**64), "1e308", "1.5", "-0.0", '"5"', '"1e3"', "true", "[]", "{}",
                    '"\\u0000"', '"' + "9" * 5000 + '"']
        for literal in literals:
            await viewer.send(with_literal({"type": "subscribe", "taskId": "elsewhere", "fromSeq": "@@"}, literal))
            frames = await pong(viewer)
            errors = [f for f in frames if f["type"] == "error"]
            assert len(errors) == 1 and errors[0]["code"] == INVALID, (literal, frames)
            assert "fromSeq" in errors[0]["message"], (literal, errors)
            assert not [f for f in frames if f["type"] in ("subscribed", "logs")], (literal, frames)
        # 1.0 is the integer 1 to JSON: taken as 1 or refused, never anything else.
        await viewer.send(with_literal({"type": "subscribe", "taskId": "elsewhere", "fromSeq": "@@"}, "1.0"))
        frames = await pong(viewer)
        assert [f["type"] for f in frames] in (["subscribed"], ["subscribed", "status"], ["error"]), frames
        await viewer.send({"type": "unsubscribe", "taskId": "elsewhere"})
        # Past what a double holds: not JSON the hub reads, refused all the same.
        for literal in ("1e400", "1" + "0" * 400, "NaN", "Infinity"):
            await viewer.send(with_literal({"type": "subscribe", "taskId": "elsewhere", "fromSeq": "@@"}, literal))
            frames = await pong(viewer)
            assert [f["code"] for f in frames if f["type"] == "error"] == [INVALID], (literal, frames)

        # None of it touched the subscription held: live records once each, in order.
        await producer.write(2)
        assert await seqs_until(viewer, task, 5) == [4, 5]
        # A fromSeq at the edge is taken: nothing below it, nothing at all yet.
        await viewer.subscribe("elsewhere", from_seq=MAX_SEQ)
        await viewer.subscribe("elsewhere-null", **{"fromSeq": None})  # type: ignore[arg-type]
        await producer.write(1)
        assert await seqs_until(viewer, task, 6) == [6]
        assert not [f for f in await pong(viewer) if f["type"] == "logs"]
    assert await stored_seqs(hub, task) == [1, 2, 3, 4, 5, 6]
    assert await stored_seqs(hub, "elsewhere") == []
    assert_hub_clean(hub)


BAD_TASK_IDS = ["", "..", ".", "../etc", "a/b", "a%2Fb", "%2e%2e", "é", "タスク", "a b", "a\u0000b", "a\nb",
                "x" * 129, "<script>", "a\\b", "\u202etxt"]


async def test_subscribing_to_odd_or_unknown_tasks(sqlite_hub_factory: InProcessHubFactory) -> None:
    """A bad task id is an error frame naming taskId; an unknown task is
    subscribed and gets its records, from seq 1, once it starts."""
    hub = await sqlite_hub_factory.astart()
    async with hub.ws() as viewer, hub.ws() as producer_ws:
        for task_id in BAD_TASK_IDS:
            for kind in ("subscribe", "unsubscribe"):
                await viewer.send({"type": kind, "taskId": task_id})
                frames = await pong(viewer)
                assert [(f["type"], f.get("code")) for f in frames] == [("error", INVALID)], (kind, task_id, frames)
                assert "taskId" in frames[0]["message"], frames
        # Unsubscribing from what it never subscribed to is a no-op.
        await viewer.send({"type": "unsubscribe", "taskId": "never"})
        assert await pong(viewer) == []

        # Not there yet, with and without fromSeq: subscribed, quiet, then live from seq 1.
        longest = "z" * 128
        await viewer.subscribe("ghost")
        await viewer.subscribe(longest, from_seq=1)
        assert [f for f in await pong(viewer) if f["type"] != "status"] == []
        ghost = Producer(producer_ws, "ghost")
        await ghost.write(3)
        assert await seqs_until(viewer, "ghost", 3) == [1, 2, 3]
        await ghost.finish("failed", 4)
        with trio.fail_after(PATIENCE):
            status = await viewer.recv_type("status")
        assert (status["taskId"], status["state"], status.get("exitCode")) == ("ghost", "failed", 4)
        longer = Producer(producer_ws, longest, "w2")
        await longer.write(2)
        assert await seqs_until(viewer, longest, 2) == [1, 2]
    assert await stored_seqs(hub, "ghost") == [1, 2, 3]
    async with hub.http() as client:
        tasks = {t["taskId"] for t in (await client.get("/api/v1/tasks")).json()["tasks"]}
    assert tasks == {"ghost", longest}, "a refused subscribe created a task"
    assert_hub_clean(hub)


async def test_many_subscriptions_on_one_connection_each_get_their_own_records(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    most = 8
    hub = await sqlite_hub_factory.astart("--max-subscriptions", str(most))
    tasks = [f"many-{i}" for i in range(most)]
    async with hub.ws() as viewer, hub.ws() as producer_ws, hub.ws() as other_viewer:
        for i, task in enumerate(tasks):
            await viewer.subscribe(task, from_seq=1, **({"source": "stdout"} if i % 2 else {}))
        for attempt in range(3):  # past the cap: refused each time, the connection carries on
            await viewer.send({"type": "subscribe", "taskId": f"one-too-many-{attempt}", "fromSeq": 1})
            frames = await pong(viewer)
            assert [(f["type"], f.get("code")) for f in frames] == [("error", "TOO_MANY_SUBSCRIPTIONS")], frames
        # Re-subscribing to a held task replaces it (no cap hit), unsubscribing frees a place.
        await viewer.subscribe(tasks[0], from_seq=1)
        await viewer.send({"type": "unsubscribe", "taskId": tasks[-1]})
        await viewer.subscribe("late", from_seq=1)
        await other_viewer.subscribe(tasks[-1], from_seq=1)

        producers = {task: Producer(producer_ws, task, f"p-{task}") for task in [*tasks, "late", "one-too-many-0"]}
        for p in producers.values():
            await p.write(2)
        got: dict[str, list[int]] = {}
        with trio.fail_after(PATIENCE):
            while sum(len(v) for v in got.values()) < 2 * most:
                frame = await viewer.recv()
                if frame["type"] == "logs":
                    got.setdefault(frame["taskId"], []).extend(r["seq"] for r in frame["records"])
        assert got == {task: [1, 2] for task in [*tasks[:-1], "late"]}, got
        assert await seqs_until(other_viewer, tasks[-1], 2) == [1, 2]
        assert not [f for f in await pong(viewer) if f["type"] == "logs"], "records of a task no longer watched"
        assert await metric(hub, "keruta_subscribers") == most + 1
    assert_hub_clean(hub)


# --- 2. viewers that misbehave -------------------------------------------------------


async def test_a_viewer_that_never_reads_is_bounded_in_bytes_and_others_are_served(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    """Only the byte bound can catch it here (the frame bound is far off): big
    lines, one per commit, to a viewer that reads nothing."""
    queue_bytes = 256 * 1024
    hub = await sqlite_hub_factory.astart("--subscriber-queue", "100000", "--subscriber-queue-bytes", str(queue_bytes))
    task = "firehose"
    line = 60 * 1024
    count = 240  # ~14 MiB: more than any socket buffers hold
    async with hub.ws() as producer_ws, hub.ws() as fast, open_stalled_ws(hub.ws_url) as stalled:
        await stalled.subscribe(task, from_seq=1)
        await fast.subscribe(task, from_seq=1)
        producer = Producer(producer_ws, task)
        seen: list[int] = []

        async def follow() -> None:
            seen.extend(await seqs_until(fast, task, count))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            with trio.fail_after(PATIENCE):
                for _ in range(count):
                    await producer.write(1, lambda s: f"{s:08d}" + "x" * line)
        assert seen == list(range(1, count + 1)), "the fast viewer missed or doubled lines"

        # The stalled one, read at last: some records, then SLOW_CONSUMER with where to resume, then 1013.
        with trio.fail_after(PATIENCE):
            frames, code = await drain_until_closed(stalled)
        errors = [f for f in frames if f["type"] == "error"]
        assert [e["code"] for e in errors] == ["SLOW_CONSUMER"], errors
        got = [r["seq"] for f in frames if f["type"] == "logs" for r in f["records"]]
        assert got == list(range(1, len(got) + 1)) and len(got) < count, got[-5:]
        assert errors[0]["resumeFrom"] == len(got) + 1, (errors[0], len(got))
        assert code == 1013
    # Resuming where it was told misses and doubles nothing.
    async with hub.ws() as again:
        await again.subscribe(task, from_seq=errors[0]["resumeFrom"])
        assert await seqs_until(again, task, count) == list(range(len(got) + 1, count + 1))
    assert await stored_seqs(hub, task) == list(range(1, count + 1))
    assert_hub_clean(hub)


async def test_a_viewer_that_vanishes_mid_burst_frees_its_subscription(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    task = "burst"
    parts = urllib.parse.urlsplit(hub.ws_url)
    async with hub.ws() as producer_ws, hub.ws() as steady:
        await steady.subscribe(task, from_seq=1)
        producer = Producer(producer_ws, task)
        await producer.write(50)
        for _ in range(4):
            # A raw client: handshake, subscribe, read a little, then a reset (SO_LINGER 0).
            sock = socket.create_connection((parts.hostname, parts.port))
            sock.settimeout(PATIENCE)
            key = base64.b64encode(os.urandom(16))
            sock.sendall(
                b"GET /api/v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
                + client_frame(orjson.dumps({"type": "subscribe", "taskId": task, "fromSeq": 1}))
            )
            await trio.to_thread.run_sync(sock.recv, 4096)
            await producer.write(200, lambda s: f"burst {s} " + "y" * 500)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        await producer.write(5)
        assert await seqs_until(steady, task, producer.sent) == list(range(1, producer.sent + 1))
        # Every vanished viewer's subscription is gone (the next ping finds one that went silently).
        with trio.fail_after(PATIENCE):
            while await metric(hub, "keruta_subscribers") != 1:
                await trio.sleep(0.05)
    assert await stored_seqs(hub, task) == list(range(1, producer.sent + 1))
    assert_hub_clean(hub)
    assert "connection failed" not in hub.stderr_text


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_viewers_own_garbage_costs_it_nothing_and_writes_nothing(sqlite_hub_factory: InProcessHubFactory) -> None:
    """A subscribed viewer sends garbage, huge and forbidden frames: each gets
    its error, its subscription keeps delivering, nothing is stored."""
    hub = await sqlite_hub_factory.astart("--viewer-token", VIEWER, "--agent-token", AGENT)
    task = "noisy"
    async with hub.ws(AGENT) as producer_ws, hub.ws(VIEWER) as viewer, hub.ws(VIEWER) as quiet:
        producer = Producer(producer_ws, task)
        await producer.write(2)
        await viewer.subscribe(task, from_seq=1)
        await quiet.subscribe(task, from_seq=1)
        assert await seqs_until(viewer, task, 2) == [1, 2]
        attacks: list[tuple[Any, str]] = [
            ("not json at all", INVALID),
            ("{", INVALID),
            ("[]", INVALID),
            ("null", INVALID),
            ('{"type": "subscribe"}', INVALID),
            ('{"type": "logs"}', INVALID),
            ('{"type": "nope", "taskId": "noisy"}', INVALID),
            ('{"type": ["subscribe"], "taskId": "noisy"}', INVALID),
            ('{"type": "subscribe", "taskId": "noisy", "source": "<b>"}', INVALID),
            ('{"type": "subscribe", "taskId": "noisy", "level": "ERRORS"}', INVALID),
            (b"\x00\xff binary", INVALID),
            ("x" * (5 * 1024 * 1024), "TOO_LARGE"),
            # The viewer token may read only.
            (orjson.dumps({"type": "logs", "taskId": task, "producer": "evil", "records": [rec(1, "injected")]}).decode(), "FORBIDDEN"),
            (orjson.dumps({"type": "status", "taskId": task, "state": "failed", "exitCode": 9}).decode(), "FORBIDDEN"),
        ]
        for attack, code in attacks:
            await viewer.conn.send_message(attack)
            frames = [f for f in await pong(viewer) if f["type"] != "status"]
            if code == "FORBIDDEN" and not frames:
                # A write is answered in the order of writes, not of pings: it may come after the pong.
                with trio.fail_after(PATIENCE):
                    frames = [await viewer.recv_type("error", skip=("status",))]
            assert [(f["type"], f.get("code")) for f in frames] == [("error", code)], (str(attack)[:60], frames)
        await producer.write(3)
        assert await seqs_until(viewer, task, 5) == [3, 4, 5]
        assert await seqs_until(quiet, task, 5) == [1, 2, 3, 4, 5]
    async with hub.http(VIEWER) as client:
        records = await fetch_all(client, task)
        state = (await client.get(f"/api/v1/tasks/{task}")).json()["state"]
    assert [(r["seq"], r["message"]) for r in records] == [(s, f"line {s}") for s in range(1, 6)]
    assert state == "running" or state is None or state == "unknown", state
    assert_hub_clean(hub)


async def test_viewers_with_wrong_tokens_or_a_foreign_origin_see_nothing(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart("--viewer-token", VIEWER, "--agent-token", AGENT)
    task = "secret-task"
    own_origin = hub.url
    async with hub.ws(AGENT) as producer_ws, hub.ws(VIEWER) as legit:
        producer = Producer(producer_ws, task)
        await producer.write(3, lambda s: f"secret line {s}")
        await legit.subscribe(task, from_seq=1)
        attempts: list[tuple[str, dict[str, Any], str]] = [
            ("no token", {}, "UNAUTHORIZED"),
            ("wrong bearer", {"extra_headers": [(b"Authorization", b"Bearer nope")]}, "UNAUTHORIZED"),
            ("viewer token + 1 char", {"extra_headers": [(b"Authorization", f"Bearer {VIEWER}x".encode())]}, "UNAUTHORIZED"),
            ("wrong subprotocol token", {"subprotocols": ["keruta", bearer("nope")]}, "UNAUTHORIZED"),
            ("subprotocol garbage", {"subprotocols": ["keruta", "bearer.%%%"]}, "UNAUTHORIZED"),
            ("foreign origin, right token", {"subprotocols": ["keruta", bearer(VIEWER)],
                                             "extra_headers": [(b"Origin", b"http://evil.example")]}, "FORBIDDEN_ORIGIN"),
            ("null origin, right token", {"extra_headers": [(b"Origin", b"null"),
                                                            (b"Authorization", f"Bearer {VIEWER}".encode())]}, "FORBIDDEN_ORIGIN"),
            ("look-alike origin", {"extra_headers": [(b"Origin", (own_origin + ".evil.example").encode()),
                                                     (b"Authorization", f"Bearer {VIEWER}".encode())]}, "FORBIDDEN_ORIGIN"),
        ]
        for what, kwargs, code in attempts:
            with trio.fail_after(PATIENCE):
                async with open_websocket_url(hub.ws_url, max_message_size=hubclient.MAX_WS_MESSAGE, **kwargs) as conn:
                    with suppress(ConnectionClosed):
                        await conn.send_message(orjson.dumps({"type": "subscribe", "taskId": task, "fromSeq": 1}).decode())
                    ws = Ws(conn)
                    frames, close = await drain_until_closed(ws)
            assert [(f["type"], f.get("code")) for f in frames] == [("error", code)], (what, frames)
            assert close == 1008, (what, close)
        # `?token=` in a URL, the query a browser can set, and the hub's own origin.
        for what, url, kwargs in [
            ("query token", hub.ws_url + "?" + urllib.parse.urlencode({"token": VIEWER}), {}),
            ("own origin + subprotocol", hub.ws_url, {"subprotocols": ["keruta", bearer(VIEWER)],
                                                      "extra_headers": [(b"Origin", own_origin.encode())]}),
        ]:
            async with open_websocket_url(url, **kwargs) as conn:
                ws = Ws(conn)
                await ws.subscribe(task, from_seq=1)
                assert await seqs_until(ws, task, 3) == [1, 2, 3], what
        # Meanwhile the one viewer with the right token saw everything, once.
        await producer.write(1, lambda s: f"secret line {s}")
        assert await seqs_until(legit, task, 4) == [1, 2, 3, 4]
    # A refused viewer's REST reads are refused too; a foreign Origin may GET but gets no CORS grant.
    async with hub.http() as anon, hub.http(VIEWER) as viewer:
        assert (await anon.get(f"/api/v1/tasks/{task}/logs")).status_code == 401
        assert (await anon.get(f"/api/v1/tasks/{task}/logs/raw")).status_code == 401
        resp = await viewer.get(f"/api/v1/tasks/{task}/logs", headers={"Origin": "http://evil.example"})
        assert resp.status_code == 200
        assert not [h for h in resp.headers if h.lower().startswith("access-control-")], resp.headers
    assert await stored_seqs_as(hub, task) == [1, 2, 3, 4]
    assert_hub_clean(hub)


def bearer(token: str) -> str:
    return "bearer." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


async def stored_seqs_as(hub: InProcessHub, task: str) -> list[int]:
    async with hub.http(VIEWER) as client:
        return [r["seq"] for r in await fetch_all(client, task)]


# --- 3. `keruta-agent tail` against a hostile hub -------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TAIL_DEADLINE = 30.0  # hang guard for one tail process


class RawWs:
    """The hub's end of a WebSocket, frame by frame, so it can send what no library would."""

    def __init__(self, stream: trio.SocketStream, buffered: bytes) -> None:
        self.stream = stream
        self.buf = bytearray(buffered)

    @staticmethod
    def frame(payload: bytes, opcode: int = 1, fin: bool = True, length: int | None = None) -> bytes:
        n = len(payload) if length is None else length
        head = bytes([(0x80 if fin else 0) | opcode])
        if n < 126:
            head += bytes([n])
        elif n < 65536:
            head += bytes([126]) + n.to_bytes(2, "big")
        else:
            head += bytes([127]) + n.to_bytes(8, "big")
        return head + payload

    async def send(self, frame: Any) -> None:
        """A dict as JSON, a str as a text frame, bytes as they are (raw wire bytes)."""
        if isinstance(frame, dict):
            frame = orjson.dumps(frame).decode()
        if isinstance(frame, str):
            frame = self.frame(frame.encode())
        await self.stream.send_all(frame)

    async def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the tail hung up")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def recv(self) -> dict[str, Any]:
        """The client's next text frame as JSON (its pings and pongs skipped)."""
        while True:
            b0, b1 = await self._need(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self._need(2), "big")
            elif n == 127:
                n = int.from_bytes(await self._need(8), "big")
            mask = await self._need(4) if b1 & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(await self._need(n)))
            if b0 & 0x0F == 1:
                return orjson.loads(payload)  # type: ignore[no-any-return]
            if b0 & 0x0F == 8:
                raise EOFError("the tail closed")
            if b0 & 0x0F == 9:  # its ping: pong
                await self.stream.send_all(self.frame(payload, opcode=10))

    async def close(self, code: int = 1000) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(self.frame(code.to_bytes(2, "big"), opcode=8))


Rest = Callable[[str, dict[str, str]], Awaitable[tuple[int, Any]]]
Script = Callable[[RawWs, int], Awaitable[None]]


class FakeHub:
    """An HTTP + WebSocket server on a real loopback port that plays a hub
    as `rest` and `ws_script` say: `rest(path, query)` answers (status, body:
    a dict/list as JSON, bytes as they are, or a callable that writes the
    body to the stream itself); `ws_script(ws, n)` plays the n-th WebSocket
    connection (from 0). When the script returns, the hub answers the
    tail's close and hangs up, as a hub does; with `never_close` it reads
    nothing more and keeps the connection open until the test ends."""

    def __init__(self, rest: Rest, ws_script: Script, never_close: bool = False) -> None:
        self.rest = rest
        self.ws_script = ws_script
        self.never_close = never_close
        self.requests: list[str] = []
        self.subscribes: list[dict[str, Any]] = []
        self.connections = 0
        self.url = ""

    async def start(self, nursery: trio.Nursery) -> FakeHub:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1"))
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        return self

    async def _serve(self, stream: trio.SocketStream) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            head = bytearray()
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(65536)
                if not data:
                    return
                head += data
            raw_head, _, rest = bytes(head).partition(b"\r\n\r\n")
            lines = raw_head.decode("latin-1").split("\r\n")
            target = lines[0].split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            self.requests.append(target)
            if headers.get("upgrade", "").lower() == "websocket":
                await self._websocket(stream, headers, rest)
            else:
                await self._http(stream, target)
            await trio.sleep_forever()  # a hub that never_close, or a stream already closed

    async def _http(self, stream: trio.SocketStream, target: str) -> None:
        parts = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(parts.query))
        status, body = await self.rest(parts.path, query)
        if callable(body):
            await stream.send_all(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n".encode())
            await body(stream)
            await stream.aclose()
            return
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        await stream.send_all(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n".encode() + data
        )
        await stream.aclose()

    async def _websocket(self, stream: trio.SocketStream, headers: dict[str, str], rest: bytes) -> None:
        accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + WS_GUID).digest())
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        ws = RawWs(stream, rest)
        n = self.connections
        self.connections += 1
        self.subscribes.append(await ws.recv())
        await self.ws_script(ws, n)
        if self.never_close:
            return
        with suppress(EOFError):
            while True:
                await ws.recv()
        await ws.close()
        await stream.aclose()


def wire(n: int, message: str | None = None, task: str = "t", **changes: Any) -> dict[str, Any]:
    """Record `n` as a hub sends it, with `changes`."""
    record = {"taskId": task, "seq": n, "timestamp": TS, "source": "stdout", "level": "INFO",
              "message": f"line {n}" if message is None else message, "lineNumber": n, "metadata": {},
              "id": f"id-{n}", "producer": "p"}
    record.update(changes)
    return record


def logs_of(*seqs: int, task: str = "t") -> dict[str, Any]:
    return {"type": "logs", "taskId": task, "records": [wire(s, task=task) for s in seqs]}


def status(state: str = "succeeded", exit_code: Any = 0, task: str = "t") -> dict[str, Any]:
    frame = {"type": "status", "taskId": task, "state": state}
    return frame if exit_code is None else {**frame, "exitCode": exit_code}


def task_rest(state: str = "running", exit_code: int | None = None, pages: dict[int, Any] | None = None) -> Rest:
    """REST answers of a well-behaved hub for task `t` in `state`; `pages` maps afterSeq to a /logs answer."""

    async def rest(path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v1/tasks/t":
            return 200, {"taskId": "t", "state": state, "exitCode": exit_code}
        if path == "/api/v1/tasks/t/verify":
            return 200, {"taskId": "t", "verdict": "complete", "message": "complete: fake"}
        if path == "/api/v1/tasks/t/logs":
            return 200, (pages or {}).get(int(query.get("afterSeq", "0")), {"content": []})
        return 404, {"error": "NOT_FOUND", "message": "no"}

    return rest


def tail_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}
    env["NO_COLOR"] = "1"
    return env


async def run_tail(hub: FakeHub, *args: str, deadline: float = TAIL_DEADLINE) -> subprocess.CompletedProcess[bytes]:
    """`keruta-agent tail t --hub HUB ARGS` to its end; a tail still running
    after `deadline` is killed and fails the test with what it printed."""
    argv = python_m("agent", "tail", "t", "--hub", hub.url, *args)
    out, err = bytearray(), bytearray()

    async def pump(stream: Any, into: bytearray) -> None:
        async for chunk in stream:
            into += chunk

    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tail_env()
    )
    try:
        async with trio.open_nursery() as pumps:
            pumps.start_soon(pump, proc.stdout, out)
            pumps.start_soon(pump, proc.stderr, err)
            with trio.move_on_after(deadline) as waited:
                await proc.wait()
            if waited.cancelled_caught:
                proc.kill()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
    result = subprocess.CompletedProcess(argv, proc.returncode, bytes(out), bytes(err))
    assert not waited.cancelled_caught, f"the tail hung for {deadline} s: {result}; the hub saw {hub.requests[:20]}"
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    return result


def lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    return result.stdout.decode().splitlines()


async def quiet(_ws: RawWs, _n: int) -> None:
    pass


@pytest.fixture
async def nursery() -> Any:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


NOT_A_PAGE = [
    ("not JSON", b"<html>502 Bad Gateway</html>"),
    ("a JSON list", [1, 2, 3]),
    ("a JSON string", "content"),
    ("content not a list", {"content": "line 1"}),
    ("a record that is not an object", {"content": [1]}),
    ("a seq that is a string", {"content": [wire(1, seq="1")]}),
    ("a seq of zero", {"content": [wire(1, seq=0)]}),
    ("a message that is a number", {"content": [wire(1, message=5)]}),
    ("a record without a message", {"content": [{k: v for k, v in wire(1).items() if k != "message"}]}),
    ("truncated JSON", b'{"content": [{"seq": 1, "mess'),
]


@pytest.mark.parametrize(("what", "page"), NOT_A_PAGE, ids=[w for w, _ in NOT_A_PAGE])
async def test_tail_no_follow_on_a_hub_answering_garbage_exits_2_without_a_traceback(
    nursery: trio.Nursery, what: str, page: Any
) -> None:
    hub = await FakeHub(task_rest("succeeded", 0, {0: page}), quiet).start(nursery)
    result = await run_tail(hub, "--no-follow")
    assert result.returncode == 2, (what, result)
    assert result.stdout == b"", (what, result.stdout)
    err = result.stderr.decode()
    assert err.startswith("keruta-agent tail: ") and hub.url in err, (what, err)


async def test_tail_no_follow_on_pages_that_go_backwards_or_repeat_prints_each_line_once_in_order(
    nursery: trio.Nursery,
) -> None:
    pages = {
        0: {"content": [wire(1), wire(2), wire(3)]},
        3: {"content": [wire(2), wire(3), wire(4), wire(4), wire(3), wire(5)]},
        5: {"content": [wire(5), wire(7)]},  # 6 filtered out, say
        7: {"content": []},
    }
    hub = await FakeHub(task_rest("succeeded", 0, pages), quiet).start(nursery)
    result = await run_tail(hub, "--no-follow")
    assert lines(result) == ["line 1", "line 2", "line 3", "line 4", "line 5", "line 7"]
    assert result.returncode == 0, result


async def test_tail_no_follow_on_a_hub_that_ignores_the_cursor_ends(nursery: trio.Nursery) -> None:
    """The same page whatever afterSeq says: printed once, and the tail ends
    (it must not ask for the same page for ever)."""
    same = {"content": [wire(1), wire(2)]}

    async def rest(path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v1/tasks/t/logs":
            return 200, same
        return await task_rest("succeeded", 0)(path, query)

    hub = await FakeHub(rest, quiet).start(nursery)
    result = await run_tail(hub, "--no-follow", deadline=15)
    assert lines(result) == ["line 1", "line 2"]
    assert result.returncode in (0, 2), result
    assert sum(r.startswith("/api/v1/tasks/t/logs") for r in hub.requests) <= 3, hub.requests[:10]


async def test_tail_no_follow_on_an_enormous_answer_gives_up_clearly(nursery: trio.Nursery) -> None:
    async def endless(stream: trio.SocketStream) -> None:
        await stream.send_all(b'{"content": [')
        chunk = orjson.dumps(wire(1, "z" * 60_000)) + b","
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for _ in range(100 * 1024 * 1024 // len(chunk)):
                await stream.send_all(chunk)

    async def rest(path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v1/tasks/t/logs":
            return 200, endless
        return await task_rest("succeeded", 0)(path, query)

    hub = await FakeHub(rest, quiet).start(nursery)
    result = await run_tail(hub, "--no-follow")
    assert result.returncode == 2 and result.stdout == b"", result
    assert "too large" in result.stderr.decode(), result.stderr


async def test_tail_follow_skips_garbage_frames_and_prints_each_line_once_in_order(nursery: trio.Nursery) -> None:
    async def script(ws: RawWs, n: int) -> None:
        assert n == 0
        for frame in [
            "not json", "{", "[]", "null", '"logs"', {"type": "bogus"},
            {"type": "logs", "taskId": "t", "records": "nope"},
            {"type": "logs", "taskId": "t", "records": [{"seq": "1"}]},
            {"type": "logs", "taskId": "t", "records": [wire(1, seq=-4)]},
            {"type": "status", "taskId": "t", "state": "exploded", "exitCode": 3},
            {"type": "status", "taskId": "t", "state": "failed", "exitCode": "3"},
            logs_of(1, 2),
            logs_of(1, 2),                       # repeated
            logs_of(9, task="other"),            # another task's
            RawWs.frame(b"\x00\x01\x02binary", opcode=2),
            logs_of(2, 3, 1, 4),                 # backwards inside a frame
            {"type": "error", "code": "STORE_ERROR", "message": "\x1b]0;pwned\x07"},
            {"type": "pong"},
            logs_of(3, 5),
            status("failed", 7, task="other"),   # another task's end
            status("running", None),
            status("failed", 7),
        ]:
            await ws.send(frame)

    hub = await FakeHub(task_rest(), script).start(nursery)
    result = await run_tail(hub)
    assert lines(result) == ["line 1", "line 2", "line 3", "line 4", "line 5"]
    assert result.returncode == 7, result
    assert hub.subscribes == [{"type": "subscribe", "taskId": "t", "fromSeq": 1}]


async def test_tail_follow_resumes_after_a_connection_cut_mid_frame(nursery: trio.Nursery) -> None:
    async def script(ws: RawWs, n: int) -> None:
        if n == 0:
            await ws.send(logs_of(1, 2, 3))
            whole = RawWs.frame(orjson.dumps(logs_of(4, 5)))
            await ws.send(whole[: len(whole) // 2])  # half a frame, then the connection goes
            await ws.stream.aclose()
            return
        if n == 1:
            await ws.send(logs_of(1, 2, 3, 4))  # resent from before where it was asked
            # A frame that claims more bytes than ever come.
            await ws.send(RawWs.frame(b'{"type":"logs"', length=1000))
            await ws.stream.aclose()
            return
        await ws.send(logs_of(5, 6))
        await ws.send(status("succeeded", 0))

    hub = await FakeHub(task_rest(), script).start(nursery)
    result = await run_tail(hub)
    assert lines(result) == [f"line {s}" for s in range(1, 7)]
    assert result.returncode == 0, result
    assert [s["fromSeq"] for s in hub.subscribes] == [1, 4, 5]
    assert "connection lost" in result.stderr.decode(), result.stderr


async def test_tail_follow_after_an_enormous_message_reconnects_and_resumes(nursery: trio.Nursery) -> None:
    big = 70 * 1024 * 1024  # past the tail's 64 MiB message limit

    async def script(ws: RawWs, n: int) -> None:
        if n == 0:
            await ws.send(logs_of(1))
            await ws.send(RawWs.frame(b'{"type":"logs","taskId":"t","records":[],"x":"' + b"z" * big + b'"}'))
            return
        await ws.send(logs_of(1, 2))
        await ws.send(status("succeeded", 0))

    hub = await FakeHub(task_rest(), script).start(nursery)
    result = await run_tail(hub)
    assert lines(result) == ["line 1", "line 2"]
    assert result.returncode == 0, result
    assert [s["fromSeq"] for s in hub.subscribes] == [1, 2]


async def test_tail_ends_even_when_the_hub_never_closes_the_connection(nursery: trio.Nursery) -> None:
    """The task ends, but the hub never answers the close handshake nor
    hangs up: the tail must still exit with the task's code, soon."""

    async def script(ws: RawWs, n: int) -> None:
        await ws.send(logs_of(1, 2))
        await ws.send(status("failed", 5))

    hub = await FakeHub(task_rest(), script, never_close=True).start(nursery)
    result = await run_tail(hub, deadline=15)
    assert lines(result) == ["line 1", "line 2"]
    assert result.returncode == 5, result
    assert hub.connections == 1, "the tail subscribed again after the task had ended"


async def test_tail_leaves_a_hub_that_closes_but_never_hangs_up(nursery: trio.Nursery) -> None:
    """A close frame, then the TCP connection left open: the tail goes on (a
    new connection) instead of waiting for ever for the hub to hang up."""

    async def script(ws: RawWs, n: int) -> None:
        if n == 0:
            await ws.send(logs_of(1))
            await ws.close(1011)
            return
        await ws.send(logs_of(2))
        await ws.send(status("succeeded", 0))

    hub = await FakeHub(task_rest(), script, never_close=True).start(nursery)
    result = await run_tail(hub, deadline=15)
    assert lines(result) == ["line 1", "line 2"]
    assert result.returncode == 0, result
    assert [s["fromSeq"] for s in hub.subscribes] == [1, 2]


@pytest.mark.parametrize(("state", "code", "expected"), [
    ("failed", 256, 1), ("failed", 512, 1), ("failed", -1, 1), ("failed", 2**31 - 1, 1),
    ("succeeded", 256, 0), ("failed", 0, 0), ("failed", 3, 3), ("succeeded", None, 0), ("failed", None, 1),
])
async def test_tail_exit_status_never_says_success_for_a_failed_task(
    nursery: trio.Nursery, state: str, code: int | None, expected: int
) -> None:
    """An exit code outside 0..255 would be cut to its low byte by the OS:
    256 would read as success. A failed task never exits 0 unless its code was 0."""

    async def script(ws: RawWs, n: int) -> None:
        await ws.send(logs_of(1))
        await ws.send(status(state, code))

    hub = await FakeHub(task_rest(), script).start(nursery)
    result = await run_tail(hub)
    assert lines(result) == ["line 1"]
    assert result.returncode == expected, (state, code, result)


async def test_tail_follow_on_a_seq_past_the_largest_gives_up_clearly(nursery: trio.Nursery) -> None:
    """A record at a seq no task reaches, then a cut: the resubscription
    cannot say where to resume; the tail must end with a message, not a traceback."""

    async def script(ws: RawWs, n: int) -> None:
        if n == 0:
            await ws.send(logs_of(1))
            await ws.send({"type": "logs", "taskId": "t", "records": [wire(2**63 - 1)]})  # not a seq: skipped
            await ws.send({"type": "logs", "taskId": "t", "records": [wire(MAX_SEQ)]})
            await ws.stream.aclose()
            return
        await ws.send(status("succeeded", 0))

    hub = await FakeHub(task_rest(), script).start(nursery)
    result = await run_tail(hub)
    assert lines(result) == ["line 1", f"line {MAX_SEQ}"]
    assert result.returncode == 2, result
    assert "past" in result.stderr.decode(), result.stderr
    assert len(hub.subscribes) == 1, hub.subscribes


async def test_tail_follow_on_a_hub_that_says_slow_consumer_forever_backs_off(nursery: trio.Nursery) -> None:
    """A hub (or a proxy) that answers every subscription with SLOW_CONSUMER and
    no progress: the tail retries, but with a backoff, not in a tight loop."""
    stamps: list[float] = []

    async def script(ws: RawWs, n: int) -> None:
        stamps.append(time.monotonic())
        if n < 4:
            await ws.send({"type": "error", "code": "SLOW_CONSUMER", "message": "slow", "resumeFrom": 1})
            await ws.close(1013)
            await ws.stream.aclose()
            return
        await ws.send(logs_of(1))
        await ws.send(status("succeeded", 0))

    hub = await FakeHub(task_rest(), script).start(nursery)
    result = await run_tail(hub)
    assert lines(result) == ["line 1"]
    assert result.returncode == 0, result
    assert hub.connections == 5
    # Four refusals in a row: at least the backoff's first steps between them.
    assert stamps[-1] - stamps[0] >= 1.0, [round(b - a, 3) for a, b in zip(stamps, stamps[1:], strict=False)]


async def test_tail_gives_up_on_a_hub_that_refuses_the_token(nursery: trio.Nursery) -> None:
    async def rest(path: str, query: dict[str, str]) -> tuple[int, Any]:
        return 401, {"error": "UNAUTHORIZED", "message": "bad token"}

    async def script(ws: RawWs, n: int) -> None:
        await ws.send({"type": "error", "code": "UNAUTHORIZED", "message": "bad token"})
        await ws.close(1008)
        await ws.stream.aclose()

    hub = await FakeHub(rest, script).start(nursery)
    for args in (["--no-follow"], []):
        result = await run_tail(hub, "--token", "wrong", *args)
        assert result.returncode == 2 and result.stdout == b"", (args, result)
        assert "401" in result.stderr.decode() or "UNAUTHORIZED" in result.stderr.decode(), result.stderr
    # Following with a REST side that lets it through: the WebSocket's refusal ends it too.
    hub.rest = task_rest()
    result = await run_tail(hub, "--token", "wrong")
    assert result.returncode == 2 and "UNAUTHORIZED" in result.stderr.decode(), result


# --- 4. the web viewer's page ---------------------------------------------------------


ODD_PAGE_IDS = ["..", ".", "%2e%2e", "a%2Fb", "%C3%A9", "%E2%80%AE", "a%00b", "a%20b", "x" * 129, "%3Cscript%3E",
                "a%252Fb", "a;b", "a%0D%0ASet-Cookie:%20x=1"]


async def test_viewer_pages_for_odd_task_ids_and_their_headers(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    parts = urllib.parse.urlsplit(hub.url)
    async with hub.http() as client:
        good = await client.get("/tasks/" + "x" * 128)
        assert good.status_code == 200
        page = good.text
        for path in ("/", "/tasks/a.b:c-d_e", "/static/viewer.js", "/static/ansi.js", "/static/viewer.css"):
            resp = await client.get(path, headers={"Origin": "http://evil.example"})
            assert resp.status_code == 200, path
            csp = resp.headers["content-security-policy"]
            for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'",
                              "base-uri 'none'", "form-action 'none'"):
                assert directive in csp, (path, csp)
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
            assert resp.headers["x-content-type-options"] == "nosniff", path
            assert resp.headers["referrer-policy"] == "no-referrer", path
            assert not [h for h in resp.headers if h.lower().startswith("access-control-")], path
        # The page is the same whatever the id; the id is never written into it.
        assert (await client.get("/tasks/a.b:c-d_e")).text == page
        # The API's answers carry the client's text too: a browser must not sniff them into HTML.
        await client.post("/api/v1/tasks/sniff/logs", json={"message": "<html><script>alert(1)</script>"})
        for path in ("/api/v1/tasks/sniff/logs/raw", "/api/v1/tasks/sniff/logs", "/api/v1/tasks/nope/logs/raw"):
            resp = await client.get(path)
            assert resp.headers["x-content-type-options"] == "nosniff", (path, resp.status_code)

    # Odd ids, sent as raw bytes (no client normalising `..` or `%2F` on the way): a
    # 4xx JSON error, never the page, never a header made from the id.
    for odd in ODD_PAGE_IDS:
        with trio.fail_after(PATIENCE):
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
            async with stream:
                await stream.send_all(f"GET /tasks/{odd} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                answer = bytearray()
                while chunk := await stream.receive_some(65536):
                    answer += chunk
        head, _, body = bytes(answer).partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n")[0]
        assert status_line.split(b" ")[1] in (b"400", b"404"), (odd, head)
        assert b"set-cookie" not in head.lower(), (odd, head)
        assert orjson.loads(body)["error"] in ("INVALID_TASK_ID", "NOT_FOUND"), (odd, body)
        assert b"<script" not in body.lower()
    assert_hub_clean(hub)


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

# Lines that would run script or make links if the viewer ever put them in the DOM as HTML.
HOSTILE_LINES = [
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=2</script>",
    "\x1b[31mred\x1b[0m \x1b]8;;javascript:window.__pwned=3\x1b\\click\x1b]8;;\x1b\\ done",
    '\x1b[38;2;1;2;3;"onmouseover=window.__pwned=4 x\x1b[0m</span><b>bold?</b>',
    "\x1b]0;new title\x07<a href=javascript:window.__pwned=5>a</a>",
    "&lt;entity&gt; &amp; \u202eright-to-left",
]
# What the viewer should show for them: the text, escape sequences dropped.
SHOWN = [
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=2</script>",
    "red click done",
    # `"` is a CSI intermediate and `o` its final byte: the sequence ends there, as in a terminal.
    'nmouseover=window.__pwned=4 x</span><b>bold?</b>',
    "<a href=javascript:window.__pwned=5>a</a>",
    "&lt;entity&gt; &amp; \u202eright-to-left",
]


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--window-size=1280,800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.mark.browser
def test_hostile_log_lines_show_as_text_and_run_nothing(chromium: Any, tmp_path: Path) -> None:
    hub = HubProcess(sqlite_url(tmp_path / "viewer.db")).start()
    try:
        task = "html-1"
        records = [{"message": m, "producer": "w", "seq": i} for i, m in enumerate(HOSTILE_LINES, 1)]
        resp = httpx.post(f"{hub.url}/api/v1/tasks/{task}/logs", json=records, timeout=30)
        assert resp.status_code == 200, resp.text
        chromium.get(f"{hub.url}/tasks/{task}")

        def shown() -> list[str] | None:
            texts = chromium.execute_script(
                "return [...document.querySelectorAll('#rows .row .m')].map((m) => m.textContent)")
            return texts if len(texts) >= len(SHOWN) else None

        assert wait_for(shown, "the hostile lines") == SHOWN
        # A live one too, through the WebSocket.
        live = {"message": "<img src=y onerror=\"window.__pwned=6\">live", "producer": "w", "seq": len(HOSTILE_LINES) + 1}
        assert httpx.post(f"{hub.url}/api/v1/tasks/{task}/logs", json=live, timeout=30).status_code == 200
        wait_for(lambda: (shown() or [""])[-1] == live["message"], "the live line")
        found = chromium.execute_script("""
            const rows = document.getElementById('rows');
            return {pwned: window.__pwned === undefined ? null : window.__pwned,
                    title: document.title,
                    elements: [...rows.querySelectorAll('img, script, b, iframe, object, embed, svg')].length,
                    links: [...rows.querySelectorAll('a')].map((a) => a.getAttribute('href'))
                             .filter((h) => !/^#L\\d+$/.test(h)),
                    handlers: [...rows.querySelectorAll('*')].flatMap((e) => [...e.attributes])
                             .filter((a) => a.name.startsWith('on')).length};""")
        assert found == {"pwned": None, "title": found["title"], "elements": 0, "links": [], "handlers": 0}, found
        assert "new title" not in found["title"], found
        # The raw log, opened in the browser: shown as text or downloaded, never a page that runs.
        chromium.get("about:blank")
        chromium.get(f"{hub.url}/api/v1/tasks/{task}/logs/raw")
        if chromium.current_url.endswith("/logs/raw"):
            raw = chromium.execute_script(
                "return {pwned: window.__pwned === undefined ? null : window.__pwned,"
                " tags: document.querySelectorAll('img, script, a').length, text: document.body.innerText}")
            assert raw["pwned"] is None and raw["tags"] == 0, raw
            assert "<script>window.__pwned=2</script>" in raw["text"], raw
    finally:
        hub.stop()
