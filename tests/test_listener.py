"""hub/listener.py and hub/ws/stream_socket.py: the hub's port serves
/api/v1/ws's WebSocket on Trio itself and hands everything else to hypercorn.

The handshake's reading (hub/ws_handshake.py) is tested as plain functions;
the rest against an in-process hub on a real socket, with a raw client that
writes the frames byte by byte, so what is on the wire is what is tested.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import pytest
import trio

from hub.ws_handshake import MAX_HEAD_BYTES, Refusal, Upgrade, accept_response, head_end, upgrade_of
from tests import hubclient
from tests.hubclient import logs_frame, make_record, parse_metrics

sqlite_hub_factory = hubclient.sqlite_hub_factory
PATHS = frozenset({"/api/v1/ws"})
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def handshake(path: str = "/api/v1/ws", *, extra: bytes = b"", method: bytes = b"GET", version: bytes = b"13") -> bytes:
    return (
        method + b" " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
        b"Sec-WebSocket-Version: " + version + b"\r\n" + extra + b"\r\n"
    )


# --- the handshake, sans-IO ------------------------------------------------------


def test_a_websocket_handshake_for_a_served_path_is_taken() -> None:
    head = handshake("/api/v1/ws?token=abc", extra=b"Sec-WebSocket-Protocol: keruta.v1, bearer.x\r\n")
    upgrade = upgrade_of(head, PATHS)
    assert upgrade is not None
    assert (upgrade.path, upgrade.query_string) == ("/api/v1/ws", b"token=abc")
    assert upgrade.subprotocols == ["keruta.v1", "bearer.x"]
    assert (b"host", b"127.0.0.1") in upgrade.headers
    # RFC 6455's own example key and answer.
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in accept_response(upgrade, None)
    assert b"Sec-WebSocket-Protocol: keruta.v1\r\n" in accept_response(upgrade, "keruta.v1")
    assert accept_response(upgrade, None).endswith(b"\r\n\r\n")
    # An empty body said out loud is no body.
    assert isinstance(upgrade_of(handshake(extra=b"Content-Length: 0\r\n"), PATHS), Upgrade)


@pytest.mark.parametrize(
    "head",
    [
        handshake("/api/v1/wsx"),
        handshake("/healthz"),
        handshake(method=b"POST"),
        handshake().replace(b"Upgrade: websocket", b"Upgrade: h2c"),
        handshake().replace(b"keep-alive, Upgrade", b"keep-alive"),
        b"GET /api/v1/ws HTTP/1.1\r\nno colon here\r\n\r\n",
        b"\x16\x03\x01 not http at all\r\n\r\n",
    ],
)
def test_anything_else_is_left_to_hypercorn(head: bytes) -> None:
    assert upgrade_of(head, PATHS) is None


@pytest.mark.parametrize(
    ("head", "status", "why"),
    [
        (handshake(version=b"8"), b"426", b"Sec-WebSocket-Version: 13\r\n"),
        (handshake(version=b"13, 8"), b"426", b"Sec-WebSocket-Version: 13\r\n"),
        (handshake().replace(b"Sec-WebSocket-Key: " + KEY + b"\r\n", b""), b"400", b"Sec-WebSocket-Key"),
        (handshake().replace(b"HTTP/1.1", b"HTTP/1.0"), b"400", b"HTTP/1.1"),
        (handshake(extra=b"Sec-WebSocket-Protocol: keruta, caf\xe9\r\n"), b"400", b"not ASCII"),
        (handshake(extra=b"Content-Length: 12\r\n"), b"400", b"no body"),
        (handshake(extra=b"Transfer-Encoding: chunked\r\n"), b"400", b"no body"),
    ],
)
def test_a_wrong_handshake_for_a_served_path_is_refused_here(head: bytes, status: bytes, why: bytes) -> None:
    # RFC 6455 4.2.2: a version the server does not speak is answered with the ones it does.
    refused = upgrade_of(head, PATHS)
    assert isinstance(refused, Refusal)
    assert refused.answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"\r\nConnection: close\r\n" in refused.answer and why in refused.answer
    head_part, _, body = refused.answer.partition(b"\r\n\r\n")
    assert b"Content-Length: " + str(len(body)).encode() + b"\r\n" in head_part + b"\r\n"


def test_the_head_ends_at_its_blank_line() -> None:
    assert head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == -1
    assert head_end(b"GET / HTTP/1.1\r\n\r\nbody") == len(b"GET / HTTP/1.1\r\n\r\n")
    # Bare LFs end lines too, as h11 reads them.
    assert head_end(b"GET / HTTP/1.1\nHost: x\n\nbody") == len(b"GET / HTTP/1.1\nHost: x\n\n")
    assert head_end(b"GET / HTTP/1.1\nHost: x\n\r\nbody") == len(b"GET / HTTP/1.1\nHost: x\n\r\n")


# --- a raw client on a real hub ---------------------------------------------------


def client_frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 * fin | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 * fin | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 * fin | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def head(self) -> bytes:
        while head_end(self.buffer) < 0:
            if not await self._more():
                raise EOFError(self.buffer)
        end = head_end(self.buffer)
        head, self.buffer = self.buffer[:end], self.buffer[end:]
        return head

    async def body(self, head: bytes) -> bytes:
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        while len(self.buffer) < length:
            if not await self._more():
                raise EOFError(self.buffer)
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body

    async def frame(self) -> tuple[int, bytes]:
        """The server's next frame: (opcode, payload); EOFError at the end."""
        while True:
            buf = self.buffer
            if len(buf) >= 2:
                n = buf[1] & 0x7F
                at = 2
                if n == 126 and len(buf) >= 4:
                    n, at = int.from_bytes(buf[2:4], "big"), 4
                elif n == 127 and len(buf) >= 10:
                    n, at = int.from_bytes(buf[2:10], "big"), 10
                if n < 126 or at > 2:
                    if len(buf) >= at + n:
                        self.buffer = buf[at + n :]
                        return buf[0] & 0x0F, buf[at : at + n]
            if not await self._more():
                raise EOFError(self.buffer)

    async def json(self) -> dict[str, Any]:
        while True:
            opcode, payload = await self.frame()
            if opcode == 0x1:
                return orjson.loads(payload)  # type: ignore[no-any-return]
            assert opcode == 0x9, (opcode, payload)  # the hub's keep-alive ping: skipped

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_json(self, frame: dict[str, Any]) -> None:
        await self.send(client_frame(orjson.dumps(frame)))


async def open_raw(hub: Any, request: bytes | None = None) -> tuple[RawClient, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", hub.port)
    client = RawClient(stream)
    await client.send(handshake() if request is None else request)
    return client, await client.head()


async def test_the_hub_answers_the_handshake_itself(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    with trio.fail_after(10):
        client, head = await open_raw(hub, handshake(extra=b"Sec-WebSocket-Protocol: keruta\r\n"))
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
        assert b"Sec-WebSocket-Protocol: keruta\r\n" in head
        # No extension is negotiated, even when offered.
        assert b"Extensions" not in head
        await client.send_json({"type": "ping"})
        assert await client.json() == {"type": "pong"}


async def test_a_frame_sent_with_the_handshake_is_read(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    with trio.fail_after(10):
        client, head = await open_raw(hub, handshake() + client_frame(b'{"type":"ping"}'))
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await client.json() == {"type": "pong"}


async def test_pings_fragments_and_a_close_follow_rfc_6455(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    with trio.fail_after(10):
        client, _ = await open_raw(hub)
        await client.send(client_frame(b"are you there", opcode=0x9))
        assert await client.frame() == (0xA, b"are you there")
        # A message in three fragments, a ping between them (wsproto's part).
        payload = logs_frame("t", [make_record("t", 1, "one")]).encode()
        await client.send(client_frame(payload[:10], fin=False))
        await client.send(client_frame(b"mid", opcode=0x9))
        await client.send(client_frame(payload[10:20], opcode=0x0, fin=False))
        await client.send(client_frame(payload[20:], opcode=0x0))
        assert await client.frame() == (0xA, b"mid")
        assert (await client.json())["type"] == "ack"
        await client.send_json({"type": "ping"})
        assert await client.json() == {"type": "pong"}
        # The client's close is answered with the same code, then the hub closes the TCP connection.
        await client.send(client_frame((1000).to_bytes(2, "big") + b"bye", opcode=0x8))
        opcode, payload = await client.frame()
        assert (opcode, payload[:2]) == (0x8, (1000).to_bytes(2, "big"))
        with pytest.raises(EOFError):
            await client.frame()


async def test_a_message_over_the_limit_is_dropped_as_it_arrives_and_answered(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart()
    chunk = b"x" * (1024 * 1024)
    with trio.fail_after(30):
        client, _ = await open_raw(hub)
        await client.send(client_frame(b'{"type":"ping","pad":"', fin=False))
        for _ in range(5):  # 5 MiB: over the 4 MiB frame limit
            await client.send(client_frame(chunk, opcode=0x0, fin=False))
        await client.send(client_frame(b'"}', opcode=0x0))
        error = await client.json()
        assert error["type"] == "error" and error["code"] == "TOO_LARGE"
        await client.send_json({"type": "ping"})
        assert await client.json() == {"type": "pong"}


async def test_a_protocol_error_is_closed_with_its_code(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    with trio.fail_after(10):
        client, _ = await open_raw(hub)
        # Unmasked: RFC 6455 says a server must close (1002).
        await client.send(b"\x81\x02{}")
        opcode, payload = await client.frame()
        assert (opcode, payload[:2]) == (0x8, (1002).to_bytes(2, "big"))


async def test_the_hub_pings_at_its_interval(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart("--ping-interval", "0.2")
    with trio.fail_after(10):
        client, _ = await open_raw(hub)
        assert await client.frame() == (0x9, b"")


async def test_a_client_that_keeps_talking_is_not_pinged(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    # Pings are for quiet sockets: one the client speaks on is known alive,
    # and a young one is not pinged before an interval has passed.
    hub = await sqlite_hub_factory.astart("--ping-interval", "1")
    with trio.fail_after(20):
        client, _ = await open_raw(hub)
        for _ in range(25):
            await client.send_json({"type": "ping"})
            assert await client.frame() == (0x1, b'{"type":"pong"}')
            await trio.sleep(0.1)
        # Quiet now: the hub's ping follows within two intervals.
        assert await client.frame() == (0x9, b"")


async def test_a_client_that_vanishes_is_let_go(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    async with hub.http() as http:
        with trio.fail_after(10):
            client, _ = await open_raw(hub)
            await client.send_json({"type": "subscribe", "taskId": "t"})
            assert (await client.json())["type"] == "subscribed"
            assert parse_metrics((await http.get("/metrics")).text)["keruta_websocket_connections"] == 1
            await client.stream.aclose()
            while parse_metrics((await http.get("/metrics")).text)["keruta_websocket_connections"]:
                await trio.sleep(0.02)


async def test_everything_else_still_goes_to_hypercorn(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    with trio.fail_after(10):
        # The endpoint without a handshake: 426, from the Quart route.
        client, head = await open_raw(hub, b"GET /api/v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 426 ")
        await client.body(head)
        # The same connection, kept alive, then upgraded: hypercorn serves that
        # WebSocket through the same endpoint.
        await client.send(handshake())
        assert (await client.head()).startswith(b"HTTP/1.1 101 ")
        await client.send_json({"type": "ping"})
        assert await client.json() == {"type": "pong"}
        # A head too long to look at is hypercorn's to answer.
        big, head = await open_raw(hub, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 ") and b"server: hypercorn" in head
        # A REST request whose body came with its head.
        body = orjson.dumps({"taskId": "t", "seq": 1, "timestamp": "2026-12-07T00:00:00Z", "message": "hi"})
        rest, head = await open_raw(
            hub,
            b"POST /api/v1/tasks/t/logs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
        )
        assert head.split(b" ")[1] in (b"200", b"201"), head


async def test_a_connection_that_sends_nothing_is_closed(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    stream = await trio.open_tcp_stream("127.0.0.1", hub.port)
    with trio.fail_after(15):  # hypercorn's keep-alive timeout (5 s) applies before the first request too
        assert await stream.receive_some(10) == b""
