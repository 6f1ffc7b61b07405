"""A request proves its token before the hub reads its body
(CONTRACT.md, the hub), and an admitted body has a deadline.

Raw sockets, so a test controls exactly which bytes of a request have been sent
when it reads the answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import trio

from tests import hubclient
from tests.hubclient import (
    PATIENCE,
    HubFactory,
    InProcessHub,
    InProcessHubFactory,
    SqliteFiles,
    TestHub,
    assert_error,
    fetch_all,
    logs_path,
)

sqlite_hub_factory = hubclient.sqlite_hub_factory  # a fixture

AGENT, VIEWER, ADMIN = "agent-secret-1", "viewer-secret-2", "admin-secret-3"
TOKENS = ("--agent-token", AGENT, "--viewer-token", VIEWER, "--admin-token", ADMIN)
BODY = 4 * 1024 * 1024  # the largest body the hub takes (max_frame_bytes)
CHUNK = 64 * 1024
# The hub's default --body-timeout: an answer sooner did not wait for the body.
BODY_TIMEOUT = 30.0
TASK = "gated"


def request_head(
    method: str, path: str, length: int, token: str | None = None, extra: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", f"Content-Length: {length}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def connect(hub: InProcessHub | TestHub) -> trio.SocketStream:
    host, port = hub.url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, closed: bool) -> None:
        self.status, self.headers, self.body, self.closed = status, headers, body, closed

    def error(self) -> str:
        payload = orjson.loads(self.body)
        assert set(payload) == {"error", "message"} and payload["message"], payload
        return str(payload["error"])


async def read_answer(stream: trio.SocketStream, *, keep_alive: bool = False) -> Answer:
    """One HTTP/1.1 answer, then (unless `keep_alive`) whether the hub closed
    the connection after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"the hub closed the connection without an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {name.strip().lower(): value.strip() for name, value in (h.split(":", 1) for h in header_lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        assert chunk, "the answer was cut short"
        rest += chunk
    closed = False
    if keep_alive:
        return Answer(status, headers, rest[:length], closed)
    try:
        closed = await stream.receive_some(65536) == b""
    except trio.BrokenResourceError:  # reset: the hub closed with our body unread
        closed = True
    return Answer(status, headers, rest[:length], closed)


async def send_ignoring_close(stream: trio.SocketStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except trio.BrokenResourceError:  # the hub already answered and closed
        pass


# --- (a) refused on the headers, before the body ------------------------------


@pytest.mark.parametrize(
    ("method", "token", "extra", "status", "code"),
    [
        ("POST", None, {}, 401, "UNAUTHORIZED"),
        ("POST", "wrong", {}, 401, "UNAUTHORIZED"),
        ("POST", VIEWER, {}, 403, "FORBIDDEN"),
        ("DELETE", None, {}, 401, "UNAUTHORIZED"),
        ("DELETE", AGENT, {}, 403, "FORBIDDEN"),
        ("POST", AGENT, {"Origin": "http://evil.example"}, 403, "FORBIDDEN_ORIGIN"),
    ],
)
async def test_a_body_without_a_valid_token_is_refused_before_it_is_read(
    sqlite_hub_factory: InProcessHubFactory, autojump_clock: trio.abc.Clock,
    method: str, token: str | None, extra: dict[str, str], status: int, code: str,
) -> None:
    hub = await sqlite_hub_factory.astart(*TOKENS)
    async with await connect(hub) as stream:
        # 4 MiB announced, 64 KiB sent, the rest never: an answer that waited
        # for the body would come only at the body deadline (virtual time here).
        started = trio.current_time()
        await send_ignoring_close(stream, request_head(method, logs_path(TASK), BODY, token, extra) + b"x" * CHUNK)
        answer = await read_answer(stream)
        waited = trio.current_time() - started
    assert (answer.status, answer.error()) == (status, code)
    assert answer.headers.get("connection") == "close" and answer.closed
    assert waited < BODY_TIMEOUT, f"the refusal waited {waited:.0f} s for a body it does not read"
    # Counted like any other refusal.
    async with hub.http(AGENT) as client:
        metrics = (await client.get("/metrics")).text
    assert re.search(rf'^keruta_errors_total\{{code="{code}"\}} 1(\.0)?$', metrics, re.M), metrics


async def test_an_open_hub_refuses_a_foreign_host_before_the_body(
    sqlite_hub_factory: InProcessHubFactory, autojump_clock: trio.abc.Clock
) -> None:
    hub = await sqlite_hub_factory.astart()
    async with await connect(hub) as stream:
        started = trio.current_time()
        head = request_head("POST", logs_path(TASK), BODY).replace(b"Host: 127.0.0.1", b"Host: rebound.example")
        await send_ignoring_close(stream, head)
        answer = await read_answer(stream)
    assert (answer.status, answer.error()) == (403, "FORBIDDEN_HOST")
    assert answer.closed and trio.current_time() - started < BODY_TIMEOUT


# --- (b) unauthenticated bodies cost the hub nothing --------------------------


@pytest.fixture
def sqlite_hub_processes(tmp_path: Path) -> Iterator[HubFactory]:
    factory = HubFactory(SqliteFiles(tmp_path))
    try:
        yield factory
    finally:
        factory.close()


def memory_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)}


@pytest.mark.slow
async def test_forty_unauthenticated_4mib_bodies_do_not_grow_the_hub(sqlite_hub_processes: HubFactory) -> None:
    # A process: its memory is what is measured.
    hub = await sqlite_hub_processes.astart(*TOKENS)
    assert hub.proc is not None
    pid = hub.proc.pid
    async with hub.http(AGENT) as client:  # warm: the paths a request takes are loaded
        assert (await client.get("/api/v1/tasks")).status_code == 200
    before = memory_kib(pid)["VmRSS"]
    piece = b"x" * CHUNK
    streams: list[trio.SocketStream] = []

    async def send_body() -> None:
        stream = await connect(hub)
        streams.append(stream)
        try:
            await stream.send_all(request_head("POST", logs_path(TASK), BODY))
            left = BODY - 1  # one byte short: the body never completes
            while left:
                await stream.send_all(piece[:left])
                left -= min(left, CHUNK)
        except trio.BrokenResourceError:  # refused and closed, as it should be
            pass

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(send_body)
        # The sockets stay open while the hub's memory is looked at (the bodies
        # sent are in the hub or in its kernel buffers by now).
        peak = before
        for _ in range(20):
            peak = max(peak, memory_kib(pid)["VmRSS"])
            await trio.sleep(0.1)
        peak = max(peak, memory_kib(pid)["VmHWM"])
        grown_mib = (peak - before) / 1024
        # The bodies would be 160 MiB.
        assert grown_mib < 20, f"40 unauthenticated 4 MiB bodies grew the hub by {grown_mib:.0f} MiB"
        # And each was told why, though it was still sending.
        with trio.fail_after(PATIENCE):
            for stream in streams:
                answer = await read_answer(stream)
                assert (answer.status, answer.error()) == (401, "UNAUTHORIZED")
    finally:
        for stream in streams:
            await stream.aclose()
    async with hub.http(AGENT) as client:
        assert (await client.get("/healthz")).status_code == 200


# --- (c) an admitted body has a deadline --------------------------------------


@pytest.mark.parametrize(("flags", "deadline"), [((), BODY_TIMEOUT), (("--body-timeout", "5"), 5.0)])
async def test_an_authenticated_body_that_stalls_is_dropped_at_the_deadline(
    sqlite_hub_factory: InProcessHubFactory, autojump_clock: trio.abc.Clock, flags: tuple[str, ...], deadline: float
) -> None:
    hub = await sqlite_hub_factory.astart(*TOKENS, *flags)
    async with await connect(hub) as stream:
        started = trio.current_time()
        await stream.send_all(request_head("POST", logs_path(TASK), 1000, AGENT) + b'{"message": "sta')
        answer = await read_answer(stream)
        waited = trio.current_time() - started
    assert (answer.status, answer.error()) == (408, "REQUEST_TIMEOUT")
    assert answer.headers.get("connection") == "close" and answer.closed
    assert deadline <= waited < deadline + 1, waited


async def test_a_body_trickled_in_is_dropped_at_the_deadline_too(
    sqlite_hub_factory: InProcessHubFactory, autojump_clock: trio.abc.Clock
) -> None:
    # The deadline is for the whole body, not between its bytes.
    hub = await sqlite_hub_factory.astart(*TOKENS, "--body-timeout", "5")
    async with await connect(hub) as stream:
        started = trio.current_time()
        await stream.send_all(request_head("POST", logs_path(TASK), 1000, AGENT))
        async with trio.open_nursery() as nursery:

            async def trickle() -> None:
                while True:
                    await trio.sleep(1)
                    await send_ignoring_close(stream, b" ")

            nursery.start_soon(trickle)
            answer = await read_answer(stream)
            nursery.cancel_scope.cancel()
        waited = trio.current_time() - started
    assert (answer.status, answer.error()) == (408, "REQUEST_TIMEOUT")
    assert answer.closed and 5 <= waited < 6, waited


# --- (d) what has a valid token still works -----------------------------------


async def test_valid_requests_with_bodies_still_work(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart(*TOKENS)
    async with hub.http(AGENT) as agent, hub.http(ADMIN) as admin, hub.http() as anon:
        # Several on one keep-alive connection, by header and by ?token=.
        for seq in (1, 2):
            assert (await agent.post(logs_path(TASK), json={"message": f"line {seq}", "seq": seq})).status_code == 200
        resp = await anon.post(logs_path(TASK), json={"message": "line 3", "seq": 3}, params={"token": AGENT})
        assert resp.status_code == 200, resp.text
        # Over the size bound: still 413.
        too_big = [{"message": "x" * 60_000, "seq": s} for s in range(4, 80)]
        assert_error(await agent.post(logs_path(TASK), json=too_big), 413, "TOO_LARGE")

        # A body that arrives after its head, in pieces, is read whole.
        line = orjson.dumps({"message": "line 4", "seq": 4})
        async with await connect(hub) as stream:
            await stream.send_all(request_head("POST", logs_path(TASK), len(line), AGENT))
            await trio.sleep(0.05)
            await stream.send_all(line[:5])
            await trio.sleep(0.05)
            await stream.send_all(line[5:])
            answer = await read_answer(stream, keep_alive=True)
        assert answer.status == 200, answer.body

        assert [r["message"] for r in await fetch_all(agent, TASK)] == ["line 1", "line 2", "line 3", "line 4"]
        resp = await admin.request("DELETE", logs_path(TASK), content=b"{}", headers={"Content-Type": "application/json"})
        assert resp.status_code == 200 and resp.json() == {"deletedCount": 4}, resp.text


async def test_an_open_hub_takes_bodies_without_a_token(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    async with hub.http() as client:
        assert (await client.post(logs_path(TASK), json={"message": "open", "seq": 1})).status_code == 200
        assert [r["message"] for r in await fetch_all(client, TASK)] == ["open"]
