"""Hostile clients against the hub's own WebSocket listener (hub/listener.py,
hub/ws_handshake.py, hub/ws/stream_socket.py, hub/ws_frames.py): byte-level
attacks on a real in-process hub over real sockets.

Every attack checks two things: the hub's answer to the attacker (a 4xx, an
RFC 6455 close code, a contract error frame, or backpressure: never a hang or
unbounded buffering), and that the hub keeps serving everyone else: a fresh,
well-behaved client still connects, sends a `logs` frame and gets its `ack`.
What the hub holds meanwhile is measured with tracemalloc (the hub runs in
this process).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import socket
import struct
import tracemalloc
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import trio

from hub.ws_frames import unmask
from keruta.limits import DEFAULT_LIMITS
from tests import hubclient
from tests.hubclient import fetch_all, logs_frame, make_record, parse_metrics
from tests.test_listener import KEY, RawClient, handshake, open_raw

sqlite_hub_factory = hubclient.sqlite_hub_factory

# What hub/server.py gives the listener as its message bound.
MAX_FRAME = DEFAULT_LIMITS.max_frame_bytes
MAX_MESSAGE = MAX_FRAME + 1024
AGENT = "agent-secret-token"

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008


# --- frames and raw clients ---------------------------------------------------------


def frame(
    payload: bytes, opcode: int = 0x1, *, fin: bool = True, rsv: int = 0, masked: bool = True,
    length: int | None = None, mask: bytes | None = None,
) -> bytes:
    """A client frame, byte by byte: `length` overrides the header's length
    (the payload sent is still `payload`), `rsv` sets RSV1..3 (bits 4..6)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mask_bit | n))
    elif n < 65536:
        head = bytes((b0, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mask_bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4) if mask is None else mask
    return head + key + unmask(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


_probes = itertools.count(1)


async def until_closed(client: RawClient, seconds: float = 5.0) -> tuple[list[tuple[int, bytes]], str]:
    """Every frame the hub sends until it ends the TCP connection; and how it ended."""
    frames: list[tuple[int, bytes]] = []
    with trio.fail_after(seconds):
        while True:
            try:
                frames.append(await client.frame())
            except EOFError:
                return frames, "eof"
            except trio.BrokenResourceError:
                return frames, "reset"


def close_codes(frames: list[tuple[int, bytes]]) -> list[int | None]:
    """The close frames' codes (None: a close with no status code)."""
    return [int.from_bytes(payload[:2], "big") if payload else None for opcode, payload in frames if opcode == 0x8]


def texts(frames: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
    return [orjson.loads(payload) for opcode, payload in frames if opcode == 0x1]


async def assert_closed_with(client: RawClient, code: int | None) -> list[tuple[int, bytes]]:
    """The hub fails the connection: one close frame with `code`, then the TCP connection ends."""
    frames, _how = await until_closed(client)
    assert close_codes(frames) == [code], frames
    return frames


async def assert_serves(hub: Any, token: str | None = None) -> None:
    """A fresh, well-behaved client connects, sends a `logs` frame and gets its ack."""
    task = f"probe-{next(_probes)}"
    extra = b"Authorization: Bearer " + token.encode() + b"\r\n" if token else b""
    with trio.fail_after(10):
        client, head = await open_raw(hub, handshake(extra=extra))
        try:
            assert head.startswith(b"HTTP/1.1 101 "), head
            await client.send(frame(logs_frame(task, [make_record(task, 1)]).encode()))
            reply = await client.json()
            assert (reply["type"], reply["taskId"], reply["seq"]) == ("ack", task, 1), reply
        finally:
            await client.stream.aclose()


def assert_no_handler_crash(hub: Any) -> None:
    log = hub.stderr_text
    assert "handler failed" not in log and "Traceback" not in log, log


async def connections(hub: Any) -> float:
    async with hub.http() as http:
        return parse_metrics((await http.get("/metrics")).text)["keruta_websocket_connections"]


async def wait_no_connections(hub: Any, seconds: float = 5.0) -> None:
    with trio.fail_after(seconds):
        while await connections(hub):
            await trio.sleep(0.02)


async def stored(hub: Any, task: str, token: str | None = None) -> list[dict[str, Any]]:
    async with hub.http(token) as http:
        return await fetch_all(http, task)


async def open_socket(hub: Any, rcvbuf: int | None = None) -> RawClient:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", hub.port))
    return RawClient(trio.SocketStream(sock))


async def reset(client: RawClient) -> None:
    """Close with SO_LINGER 0: the kernel sends an RST, not a FIN."""
    client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.stream.aclose()


@contextlib.contextmanager
def memory_growth() -> Iterator[dict[str, int]]:
    """The bytes this process (the in-process hub with it) allocated in the
    block and still holds at its end: `["bytes"]`, set on exit."""
    tracemalloc.start()
    grown: dict[str, int] = {}
    try:
        before = tracemalloc.take_snapshot()
        yield grown
        after = tracemalloc.take_snapshot()
        grown["bytes"] = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    finally:
        tracemalloc.stop()


async def read_http_answer(client: RawClient, seconds: float = 10.0) -> bytes:
    """The hub's answer's head, or b"" if it ended the connection without one."""
    with trio.fail_after(seconds):
        try:
            return await client.head()
        except (EOFError, trio.BrokenResourceError):
            return b""


# --- 1. request heads that never end ------------------------------------------------


async def test_a_megabyte_of_headers_is_refused_not_buffered(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    client = await open_socket(hub)
    head = handshake().removesuffix(b"\r\n")  # the blank line never comes
    junk = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(1024))

    async def flood() -> None:
        try:
            await client.send(head + junk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the hub closed on it: that is the point

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        answer = await read_http_answer(client)
        nursery.cancel_scope.cancel()
    # Never upgraded; if answered at all, with a 4xx (hypercorn's 431 / 400).
    assert not answer.startswith(b"HTTP/1.1 101"), answer
    assert answer == b"" or answer.split(b" ")[1][:1] == b"4", answer
    if answer:
        with trio.fail_after(10):
            try:
                while await client.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
    await client.stream.aclose()
    await assert_serves(hub)


async def test_a_slowloris_head_is_dropped_and_others_are_served(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    slow = [await open_socket(hub) for _ in range(10)]
    ended: list[float] = []
    start = trio.current_time()

    async def dribble(client: RawClient) -> None:
        try:
            await client.send(b"GET /api/v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
            for i in itertools.count():
                await client.send(b"X-Slow-%d: x\r\n" % i)
                with trio.move_on_after(0.2):
                    if not await client.stream.receive_some(1024):
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        ended.append(trio.current_time() - start)

    # hypercorn's keep_alive_timeout (5 s) bounds the whole head, however it trickles.
    with trio.fail_after(12):
        async with trio.open_nursery() as nursery:
            for client in slow:
                nursery.start_soon(dribble, client)
            await trio.sleep(0.3)
            await assert_serves(hub)  # while they dribble
    assert len(ended) == 10 and max(ended) < 8.0, ended
    for client in slow:
        await client.stream.aclose()
    await assert_serves(hub)


# --- 2. frames that RFC 6455 says fail the connection -------------------------------


async def test_an_unmasked_frame_fails_the_connection(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    # After a masked frame, so the fast path has already been taken once.
    await client.send(frame(b'{"type":"ping"}'))
    assert await client.json() == {"type": "pong"}
    await client.send(frame(b'{"type":"ping"}', masked=False))
    frames = await assert_closed_with(client, CLOSE_PROTOCOL_ERROR)
    assert not texts(frames), frames  # the unmasked ping was not answered
    await assert_serves(hub)
    assert_no_handler_crash(hub)


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(frame(b"x", rsv=0b100), id="rsv1"),
        pytest.param(frame(b"x", rsv=0b010), id="rsv2"),
        pytest.param(frame(b"x", rsv=0b001), id="rsv3"),
        pytest.param(frame(b"x", opcode=0x3), id="reserved-data-opcode"),
        pytest.param(frame(b"x", opcode=0xB), id="reserved-control-opcode"),
        pytest.param(frame(b'"}', opcode=0x0), id="continuation-without-start"),
        pytest.param(frame(b"p" * 126, opcode=0x9), id="ping-over-125-bytes"),
        pytest.param(frame(b"p", opcode=0x9, fin=False), id="fragmented-ping"),
        pytest.param(frame(b"c", opcode=0x8, fin=False), id="fragmented-close"),
        pytest.param(b"\x81\xfe\x00\x05" + b"\0\0\0\0" + b'"abc"', id="non-minimal-16-bit-length"),
        pytest.param(b"\x81\xff" + (5).to_bytes(8, "big") + b"\0\0\0\0" + b'"abc"', id="non-minimal-64-bit-length"),
        pytest.param(b"\x81\xff" + (2**63).to_bytes(8, "big") + b"\0\0\0\0", id="64-bit-length-msb-set"),
        pytest.param(b"\x81\xff" + (2**64 - 1).to_bytes(8, "big") + b"\0\0\0\0", id="64-bit-length-2**64-1"),
        pytest.param(frame(b'{"type":', fin=False) + frame(b'{"type":"ping"}'), id="new-message-inside-a-fragmented-one"),
    ],
)
async def test_a_protocol_violation_closes_with_1002(sqlite_hub_factory: hubclient.InProcessHubFactory, attack: bytes) -> None:
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    await client.send(attack)
    frames = await assert_closed_with(client, CLOSE_PROTOCOL_ERROR)
    assert not texts(frames), frames
    await assert_serves(hub)
    assert_no_handler_crash(hub)


# --- 3. lengths past the limit ------------------------------------------------------


async def test_a_frame_claiming_2_63_bytes_is_answered_at_the_limit_and_dropped(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """A text frame whose header claims 2**63-1 bytes never ends: the hub
    says TOO_LARGE once more than its limit has come, not at the frame's end,
    and holds nothing of what keeps coming."""
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    await client.send(b"\x81\xff" + (2**63 - 1).to_bytes(8, "big") + b"\0\0\0\0")
    chunk = b" " * (1024 * 1024)  # valid UTF-8 under a zero mask
    with trio.fail_after(20):
        for _ in range(MAX_MESSAGE // len(chunk) + 1):
            await client.send(chunk)
        error = await client.json()
        assert (error["type"], error["code"]) == ("error", "TOO_LARGE"), error
        with memory_growth() as grown:
            for _ in range(8):
                await client.send(chunk)
            # Answered by the hub's own pings' peer: a sync point once all of it was read.
            await assert_serves(hub)
            await trio.sleep(0.2)
    assert grown["bytes"] < 2 * 1024 * 1024, grown
    await reset(client)
    await wait_no_connections(hub)
    await assert_serves(hub)


@pytest.mark.parametrize(
    "size",
    [pytest.param(MAX_FRAME + 1, id="max_frame_bytes+1"), pytest.param(MAX_MESSAGE + 1, id="max_message+1")],
)
async def test_one_frame_just_over_the_limit_is_too_large_and_the_connection_carries_on(
    sqlite_hub_factory: hubclient.InProcessHubFactory, size: int
) -> None:
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    body = b'{"type":"ping","pad":"'
    payload = body + b"x" * (size - len(body) - 2) + b'"}'
    assert len(payload) == size
    with trio.fail_after(30):
        await client.send(frame(payload, mask=b"\0\0\0\0"))
        error = await client.json()
        assert (error["type"], error["code"]) == ("error", "TOO_LARGE"), error
        await client.send(frame(b'{"type":"ping"}'))
        assert await client.json() == {"type": "pong"}
    await assert_serves(hub)


@pytest.mark.parametrize("part", [pytest.param(b"", id="empty"), pytest.param(b" ", id="one-byte")])
async def test_a_message_in_many_tiny_fragments_holds_about_its_size(
    sqlite_hub_factory: hubclient.InProcessHubFactory, part: bytes
) -> None:
    """Empty continuation frames count nothing against the message limit, and
    one-byte ones one byte: 50,000 of them must not cost the hub a list entry
    (or an object) each while the message is open, and the message still
    arrives whole."""
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    n = 50_000
    tiny = frame(part, opcode=0x0, fin=False, mask=b"\0\0\0\0")
    with trio.fail_after(60):
        with memory_growth() as grown:
            await client.send(frame(b"{", fin=False) + tiny * n)
            await client.send(frame(b"fed", opcode=0x9))  # answered once everything before it was fed
            assert await client.frame() == (0xA, b"fed")
        # JSON allows the spaces: the whole message is a ping.
        await client.send(frame(b'"type":"ping"}', opcode=0x0))
        assert await client.json() == {"type": "pong"}
    # The message's own bytes (n at most) and a little; the list of 50,000
    # parts the hub kept before was 400 KB.
    assert grown["bytes"] < n + 150_000, grown
    await reset(client)
    await assert_serves(hub)


# --- 4. fragments ---------------------------------------------------------------------


async def test_a_fragmented_message_that_never_ends_holds_nothing_else_up(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    with trio.fail_after(10):
        await client.send(frame(b'{"type":"ping","pad":"', fin=False))
        # Control frames may come between fragments: answered while the message waits.
        await client.send(frame(b"still here", opcode=0x9))
        assert await client.frame() == (0xA, b"still here")
    await assert_serves(hub)
    # The client vanishes mid-message: the hub lets the connection go.
    await reset(client)
    await wait_no_connections(hub)
    await assert_serves(hub)


async def ingest_bytes(hub: Any) -> float:
    async with hub.http() as http:
        return parse_metrics((await http.get("/metrics")).text)["keruta_ingest_queue_bytes"]


async def all_given_back(hub: Any) -> None:
    """Every connection gone, the ingest budget all back, others served, no handler crashed."""
    await wait_no_connections(hub)
    assert await ingest_bytes(hub) == 0
    await assert_serves(hub)
    assert_no_handler_crash(hub)


async def test_a_message_stalled_while_it_holds_ingest_budget_is_cut_and_the_budget_comes_back(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """Past a small share of its own, a message still arriving is read only
    with bytes of the hub-wide ingest budget; a client that then stops
    sending mid-message would hold them for ever: it gets --body-timeout to
    finish, then a 1008 close, and the budget is back."""
    hub = await sqlite_hub_factory.astart("--body-timeout", "1", "--ingest-queue-bytes", str(1 << 20))
    client, _ = await open_raw(hub)
    payload = b'{"type":"ping","pad":"' + b"x" * (200 * 1024)
    head = frame(payload, length=1 << 20)
    await client.send(head[: len(head)])  # 200 KiB of a 1 MiB frame, then nothing
    with trio.fail_after(5):
        while not await ingest_bytes(hub):
            await trio.sleep(0.02)
    await assert_serves(hub)  # the rest of the budget serves the others meanwhile
    frames = await assert_closed_with(client, CLOSE_POLICY)
    assert b"not completed within 1 s" in frames[-1][1], frames
    await all_given_back(hub)


async def test_large_messages_streamed_for_longer_than_the_body_timeout_are_not_cut(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """The --body-timeout is each message's: 40 frames of ~200 KiB, sent
    as one stream in pieces that straddle frame boundaries for ~2-3 s
    with --body-timeout 1, are all stored."""
    hub = await sqlite_hub_factory.astart("--body-timeout", "1")
    task = "streamed"
    per, frames_n = 200, 40
    stream = b"".join(
        frame(logs_frame(task, [make_record(task, f * per + i, "m" * 1000) for i in range(1, per + 1)]).encode())
        for f in range(frames_n)
    )
    client, _ = await open_raw(hub)
    piece = 50 * 1024

    async def send() -> None:
        for at in range(0, len(stream), piece):
            await client.send(stream[at : at + piece])
            await trio.sleep(0.02)

    acked = 0
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while acked < per * frames_n:
                opcode, data = await client.frame()
                assert opcode in (0x1, 0x9), (opcode, data)
                if opcode == 0x1:
                    reply = orjson.loads(data)
                    assert reply["type"] == "ack", reply
                    acked = reply["seq"]
    assert len(await stored(hub, task)) == per * frames_n
    assert_no_handler_crash(hub)


# --- 5. UTF-8 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(frame(b'{"type":"ping","x":"\xff"}'), id="0xff"),
        pytest.param(frame(b'{"type":"ping","x":"\xc0\xaf"}'), id="overlong"),
        pytest.param(frame(b'{"type":"ping","x":"\xed\xa0\x80"}'), id="surrogate"),
        pytest.param(frame(b'{"type":"ping","x":"\xf4\x90\x80\x80"}'), id="above-u10ffff"),
        pytest.param(frame(b'{"type":"ping","x":"\xe2\x82', fin=False) + frame(b'"}', opcode=0x0), id="truncated-across-fragments"),
        pytest.param(frame(b'{"type":"ping"}\xe2\x82', fin=False) + frame(b"", opcode=0x0), id="truncated-at-message-end"),
        # Failed at once, not when the message ends (it never does here).
        pytest.param(frame(b'{"type":"ping","x":"\xff', fin=False), id="invalid-in-an-unfinished-fragment"),
    ],
)
async def test_invalid_utf8_in_text_closes_with_1007(sqlite_hub_factory: hubclient.InProcessHubFactory, attack: bytes) -> None:
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    await client.send(attack)
    frames = await assert_closed_with(client, CLOSE_INVALID_DATA)
    assert not texts(frames), frames
    await assert_serves(hub)
    assert_no_handler_crash(hub)


async def test_a_character_split_across_fragments_is_valid_utf8(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    euro = "€".encode()
    with trio.fail_after(10):
        await client.send(frame(b'{"type":"ping","x":"' + euro[:1], fin=False))
        await client.send(frame(euro[1:2], opcode=0x0, fin=False))
        await client.send(frame(euro[2:] + b'"}', opcode=0x0))
        assert await client.json() == {"type": "pong"}


# --- 6. ping flood --------------------------------------------------------------------


async def test_a_ping_flood_is_backpressured_not_queued(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    """Thousands of 125-byte pings, no pong read: the hub must stop reading once
    its pongs fill the socket (nothing queued in the hub), serve the others
    meanwhile, and answer every ping once the client reads."""
    hub = await sqlite_hub_factory.astart()
    client = await open_socket(hub, rcvbuf=4096)
    await client.send(handshake())
    assert (await client.head()).startswith(b"HTTP/1.1 101 ")
    ping = frame(b"p" * 125, opcode=0x9, mask=b"\0\0\0\0")
    batch = ping * 500
    sent = 0
    sock = client.stream.socket
    with trio.fail_after(60):
        while True:
            with trio.move_on_after(0.5) as stalled:
                sent += await sock.send(batch[sent % len(batch) :])
            if stalled.cancelled_caught:
                break
            # Were pongs queued in the hub instead of the socket, it would read for ever.
            assert sent < 256 * 1024 * 1024, f"the hub read {sent} bytes of pings it could not answer"
        pings = -(-sent // len(ping))
        assert pings > 1000, pings
        # The flooder holds its own connection only.
        await assert_serves(hub)

        # Now read: every ping is answered with its pong, none dropped.
        rest = ping[sent % len(ping) :] if sent % len(ping) else b""
        received = bytearray()
        pongs = 0

        async def finish() -> None:
            if rest:
                await client.send(rest)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish)
            pos = 0
            while pongs < pings:
                data = await client.stream.receive_some(1024 * 1024)
                assert data, f"EOF after {pongs} of {pings} pongs"
                received += data
                while len(received) - pos >= 2:
                    opcode, n = received[pos] & 0x0F, received[pos + 1] & 0x7F
                    if len(received) - pos < 2 + n:
                        break
                    if opcode == 0xA:
                        assert n == 125, n
                        pongs += 1
                    pos += 2 + n
                del received[:pos]
                pos = 0
    assert pongs == pings
    await client.send(frame(b'{"type":"ping"}'))
    assert await client.json() == {"type": "pong"}
    await assert_serves(hub)


# --- 7. half-close and reset --------------------------------------------------------


async def test_logs_then_half_close_stores_the_records_and_the_hub_closes(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    task = "half-closed"
    await client.send(frame(logs_frame(task, [make_record(task, 1), make_record(task, 2)]).encode()))
    await client.stream.send_eof()  # SHUT_WR: the hub reads EOF, we can still read
    # The hub takes EOF as the client gone: it ends the connection promptly (an
    # ack may or may not make it out first; the agent resends unacked records).
    frames, _how = await until_closed(client)
    for reply in texts(frames):
        assert reply["type"] == "ack" and reply["taskId"] == task, reply
    await assert_serves(hub)  # its ack comes after the half-closed client's commit
    assert [r["seq"] for r in await stored(hub, task)] == [1, 2]
    await wait_no_connections(hub)


async def test_logs_then_a_close_frame_stores_the_records_and_echoes_the_close(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    task = "closed-politely"
    await client.send(
        frame(logs_frame(task, [make_record(task, 1)]).encode()) + frame(close_payload(1000, b"bye"), opcode=0x8)
    )
    frames, _how = await until_closed(client)
    assert close_codes(frames) == [1000], frames
    await assert_serves(hub)
    assert [r["seq"] for r in await stored(hub, task)] == [1]


async def test_a_reset_mid_frame_stores_nothing_and_frees_the_connection(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart()
    task = "reset-mid-frame"
    whole = frame(logs_frame(task, [make_record(task, 1)]).encode())
    for cut in (1, 7, len(whole) // 2, len(whole) - 1):
        client, _ = await open_raw(hub)
        await client.send(whole[:cut])
        await trio.sleep(0.05)
        await reset(client)
    await wait_no_connections(hub)
    await assert_serves(hub)
    assert await stored(hub, task) == []
    assert_no_handler_crash(hub)


# --- 8. close frames ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "answer"),
    [
        pytest.param(b"\x03", CLOSE_PROTOCOL_ERROR, id="one-byte-payload"),
        pytest.param(close_payload(999), CLOSE_PROTOCOL_ERROR, id="code-999"),
        pytest.param(close_payload(0), CLOSE_PROTOCOL_ERROR, id="code-0"),
        pytest.param(close_payload(1004), CLOSE_PROTOCOL_ERROR, id="code-1004-reserved"),
        pytest.param(close_payload(1005), CLOSE_PROTOCOL_ERROR, id="code-1005-local-only"),
        pytest.param(close_payload(1006), CLOSE_PROTOCOL_ERROR, id="code-1006-local-only"),
        pytest.param(close_payload(1015), CLOSE_PROTOCOL_ERROR, id="code-1015-local-only"),
        pytest.param(close_payload(2999), CLOSE_PROTOCOL_ERROR, id="code-2999-reserved"),
        pytest.param(close_payload(5000), CLOSE_PROTOCOL_ERROR, id="code-5000"),
        pytest.param(close_payload(65535), CLOSE_PROTOCOL_ERROR, id="code-65535"),
        pytest.param(close_payload(1000, b"\xff\xfe"), CLOSE_INVALID_DATA, id="reason-not-utf8"),
        pytest.param(close_payload(4000, b"app"), 4000, id="valid-4000-echoed"),
        # RFC 6455 5.5.1: a close with no status is echoed with none.
        pytest.param(b"", None, id="empty-echoed-empty"),
    ],
)
async def test_a_bad_close_frame_is_answered_with_its_code(
    sqlite_hub_factory: hubclient.InProcessHubFactory, payload: bytes, answer: int | None
) -> None:
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    await client.send(frame(payload, opcode=0x8))
    await assert_closed_with(client, answer)
    await assert_serves(hub)
    assert_no_handler_crash(hub)


# --- 9. handshakes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(handshake(version=b"8"), id="version-8"),
        pytest.param(handshake(version=b"13, 8"), id="version-list"),
        pytest.param(handshake(version=b"99999999999999999999"), id="version-huge"),
        pytest.param(handshake().replace(b"Sec-WebSocket-Key: " + KEY + b"\r\n", b""), id="no-key"),
        pytest.param(handshake().replace(b"Host: 127.0.0.1\r\n", b""), id="no-host"),
        pytest.param(handshake().replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\r\nHost: evil.example\r\n"), id="two-hosts"),
        pytest.param(handshake().replace(b"Upgrade: websocket", b"Upgrade: websocket\x00"), id="nul-in-header"),
    ],
)
async def test_a_malformed_handshake_gets_a_4xx(sqlite_hub_factory: hubclient.InProcessHubFactory, request_: bytes) -> None:
    hub = await sqlite_hub_factory.astart()
    client, head = await open_raw(hub, request_)
    status = head.split(b" ")[1]
    assert status[:1] == b"4", head
    await client.stream.aclose()
    await assert_serves(hub)
    assert_no_handler_crash(hub)


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(handshake(version=b"8"), id="version-8"),
        pytest.param(handshake().replace(b"Sec-WebSocket-Key: " + KEY + b"\r\n", b""), id="no-key"),
    ],
)
async def test_a_refused_handshake_is_closed_as_its_answer_says(
    sqlite_hub_factory: hubclient.InProcessHubFactory, request_: bytes
) -> None:
    """A handshake for the hub's path that it cannot accept is refused with
    `Connection: close`, and the hub does close it (hypercorn, which once
    answered these, left the connection open for as long as the client liked)."""
    hub = await sqlite_hub_factory.astart()
    client, head = await open_raw(hub, request_)
    assert head.split(b" ")[1][:1] == b"4" and b"connection: close" in head.lower(), head
    # "connection: close": the hub closes it (hypercorn's keep-alive timeout is 5 s; allow 7).
    with trio.fail_after(7):
        while await client.stream.receive_some(1024):
            pass


async def test_a_refused_handshake_on_a_kept_alive_connection_closes_it_too(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """A bad handshake after another request on the same connection is
    hypercorn's to answer (hypercorn patch 7): its "connection: close" holds."""
    hub = await sqlite_hub_factory.astart()
    client, head = await open_raw(hub, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    await client.body(head)
    await client.send(handshake(version=b"8"))
    answer = await read_http_answer(client)
    assert answer.split(b" ")[1][:1] == b"4" and b"connection: close" in answer.lower(), answer
    with trio.fail_after(7):
        while await client.stream.receive_some(1024):
            pass
    await assert_serves(hub)


async def test_a_wrong_websocket_version_is_told_which_version_to_use(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """RFC 6455 4.4: a server that does not speak the requested version
    answers with a Sec-WebSocket-Version header naming the ones it does."""
    hub = await sqlite_hub_factory.astart()
    _client, head = await open_raw(hub, handshake(version=b"8"))
    assert head.split(b" ")[1][:1] == b"4", head
    assert b"sec-websocket-version: 13" in head.lower(), head


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"Sec-WebSocket-Protocol: keruta, caf\xe9\r\n", id="subprotocol"),
        pytest.param(b"Connection: Upgrade, \xff\r\n", id="connection"),
    ],
)
async def test_a_non_ascii_handshake_header_gets_an_answer(
    sqlite_hub_factory: hubclient.InProcessHubFactory, header: bytes
) -> None:
    """h11 lets bytes 0x80-0xFF through in a header's value: a 400, not a
    traceback in the log and a connection dropped without an answer."""
    hub = await sqlite_hub_factory.astart()
    client = await open_socket(hub)
    await client.send(handshake(extra=header))
    answer = await read_http_answer(client)
    await assert_serves(hub)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert_no_handler_crash(hub)


async def _assert_refused(client: RawClient, head: bytes, code: str) -> None:
    """Accepted, told why in one error frame, closed 1008; once we answer the
    close, the hub ends the TCP connection."""
    assert head.startswith(b"HTTP/1.1 101 "), head
    frames: list[tuple[int, bytes]] = []
    with trio.fail_after(10):
        while not frames or frames[-1][0] != 0x8:
            frames.append(await client.frame())
    await client.send(frame(close_payload(CLOSE_POLICY), opcode=0x8))
    more, _how = await until_closed(client, 1.0)
    frames += more
    errors = texts(frames)
    assert [(e["type"], e["code"]) for e in errors] == [("error", code)], frames
    assert close_codes(frames) == [CLOSE_POLICY], frames


@pytest.mark.parametrize(
    "origin",
    [b"http://evil.example", b"null", b"http://127.0.0.1.evil.example", b"http://127.0.0.1:99999", b"file://", b"http://127.0.0.1/x"],
)
async def test_a_foreign_origin_is_refused_and_its_frames_are_not_read(
    sqlite_hub_factory: hubclient.InProcessHubFactory, origin: bytes
) -> None:
    hub = await sqlite_hub_factory.astart()
    task = "from-evil"
    request_ = handshake(extra=b"Origin: " + origin + b"\r\n") + frame(logs_frame(task, [make_record(task, 1)]).encode())
    client, head = await open_raw(hub, request_)
    await _assert_refused(client, head, "FORBIDDEN_ORIGIN")
    await assert_serves(hub)
    assert await stored(hub, task) == []


@pytest.mark.parametrize("host", [b"evil.example", b"127.0.0.1.evil.example", b"localhost@evil.example", b"[::1", b"evil.example#@127.0.0.1"])
async def test_a_foreign_host_is_refused_by_a_hub_without_tokens(
    sqlite_hub_factory: hubclient.InProcessHubFactory, host: bytes
) -> None:
    hub = await sqlite_hub_factory.astart()
    task = "rebound"
    request_ = handshake().replace(b"Host: 127.0.0.1", b"Host: " + host) + frame(logs_frame(task, [make_record(task, 1)]).encode())
    client, head = await open_raw(hub, request_)
    if head.startswith(b"HTTP/1.1 4"):
        pass  # not even read as HTTP (h11 refuses the Host): refused all the same
    else:
        await _assert_refused(client, head, "FORBIDDEN_HOST")
    await assert_serves(hub)
    assert await stored(hub, task) == []


def _bearer(token: str) -> bytes:
    return b"bearer." + base64.urlsafe_b64encode(token.encode()).rstrip(b"=")


async def test_wrong_tokens_are_refused_and_their_frames_not_stored(sqlite_hub_factory: hubclient.InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart("--agent-token", AGENT)
    task = "unauthorized"
    attempts = [
        ("/api/v1/ws", b""),
        ("/api/v1/ws", b"Authorization: Bearer wrong\r\n"),
        ("/api/v1/ws", b"Authorization: Bearer " + AGENT.encode() + b"x\r\n"),
        ("/api/v1/ws", b"Authorization: Basic " + base64.b64encode(AGENT.encode()) + b"\r\n"),
        ("/api/v1/ws", b"Authorization: Bearer\r\n"),
        ("/api/v1/ws?token=wrong", b""),
        ("/api/v1/ws?token=", b""),
        ("/api/v1/ws", b"Sec-WebSocket-Protocol: keruta, bearer.!!!not-base64!!!\r\n"),
        ("/api/v1/ws", b"Sec-WebSocket-Protocol: keruta, bearer.\r\n"),
        ("/api/v1/ws", b"Sec-WebSocket-Protocol: keruta, " + _bearer("wrong") + b"\r\n"),
        ("/api/v1/ws", b"Sec-WebSocket-Protocol: keruta, bearer." + base64.urlsafe_b64encode(b"\xff\xfe").rstrip(b"=") + b"\r\n"),
    ]
    for path, extra in attempts:
        request_ = handshake(path, extra=extra) + frame(logs_frame(task, [make_record(task, 1)]).encode())
        client, head = await open_raw(hub, request_)
        await _assert_refused(client, head, "UNAUTHORIZED")
    # The right token, as the subprotocol a browser would use, is let in.
    client, head = await open_raw(hub, handshake(extra=b"Sec-WebSocket-Protocol: keruta, " + _bearer(AGENT) + b"\r\n"))
    assert head.startswith(b"HTTP/1.1 101 ") and b"Sec-WebSocket-Protocol: keruta\r\n" in head, head
    await client.send(frame(b'{"type":"ping"}'))
    assert await client.json() == {"type": "pong"}
    await assert_serves(hub, AGENT)
    assert await stored(hub, task, AGENT) == []
    assert_no_handler_crash(hub)
