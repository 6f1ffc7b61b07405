"""Hostile clients against the ingest budget held by WebSocket messages still
arriving (hub/ws/stream_socket.py StreamWebSocket._read_more, hub/ws_frames.py
ClientFrames / FrameTracker, hub/ingest_budget.py take_partial /
release_partial).

Past PARTIAL_FREE (16 KiB) of a message, a connection is read on only once the
rest its frame header announces is taken from half of the hub-wide ingest
budget; the credit comes back when the message completes (or turns OVERSIZED,
or the connection ends); a message holding credit must be whole within
--body-timeout or the connection is closed 1008.

Real in-process hubs, real sockets, raw frames. Every attack checks the
attacker's answer, that keruta_ingest_queue_bytes returns to 0, and that an
honest client is served.
"""

from __future__ import annotations

from typing import Any

import orjson
import trio

from tests import hubclient
from tests.hubclient import logs_frame, make_record, parse_metrics
from tests.test_listener import RawClient
from tests.test_listener_hostile import (
    CLOSE_POLICY,
    MAX_MESSAGE,
    all_given_back,
    assert_closed_with,
    assert_no_handler_crash,
    assert_serves,
    close_payload,
    frame,
    open_raw,
    reset,
    stored,
    wait_no_connections,
)

sqlite_hub_factory = hubclient.sqlite_hub_factory

KiB = 1024
MiB = 1024 * KiB


async def metrics(hub: Any) -> dict[str, float]:
    async with hub.http() as http:
        return parse_metrics((await http.get("/metrics")).text)


async def ingest_bytes(hub: Any) -> float:
    return (await metrics(hub))["keruta_ingest_queue_bytes"]


async def wait_ingest(hub: Any, pred: Any, seconds: float = 10.0) -> float:
    """Polls keruta_ingest_queue_bytes until `pred(value)`; the value."""
    with trio.fail_after(seconds):
        while True:
            value = await ingest_bytes(hub)
            if pred(value):
                return value
            await trio.sleep(0.02)


def big_logs(task: str, first: int, n: int, width: int) -> bytes:
    return logs_frame(task, [make_record(task, s, f"{s} " + "m" * width) for s in range(first, first + n)]).encode()


def fragments(payload: bytes, pieces: int) -> list[bytes]:
    """`payload` as a text message in `pieces` frames (a first, continuations, a final)."""
    step = -(-len(payload) // pieces)
    parts = [payload[i : i + step] for i in range(0, len(payload), step)]
    out = []
    for i, part in enumerate(parts):
        out.append(frame(part, opcode=0x1 if i == 0 else 0x0, fin=i == len(parts) - 1))
    return out


async def wait_ack(client: RawClient, task: str, seq: int, seconds: float = 20.0) -> None:
    """Reads replies until the ack of `seq` (pongs and pings skipped)."""
    with trio.fail_after(seconds):
        while True:
            opcode, data = await client.frame()
            if opcode != 0x1:
                assert opcode in (0x9, 0xA), (opcode, data)
                continue
            reply = orjson.loads(data)
            assert reply["type"] == "ack", reply
            if reply["taskId"] == task and reply["seq"] >= seq:
                return


# --- fragmented messages holding credit across fragments -------------------------------


async def test_two_fragmented_messages_each_needing_more_credit_end_by_the_body_timeout(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """Two connections each hold credit for a fragmented message and each
    needs more for its next fragment than the share has left: neither can
    ever get it from the other. The body timeout ends both (1008), others are
    served meanwhile, and the budget comes back to 0."""
    hub = await sqlite_hub_factory.astart("--body-timeout", "1", "--ingest-queue-bytes", str(256 * KiB))
    a, _ = await open_raw(hub)
    b, _ = await open_raw(hub)
    first = b'{"type":"ping","pad":"' + b"x" * (50 * KiB)
    for c in (a, b):
        await c.send(frame(first, fin=False))
    # Each holds ~34 KiB of the 128 KiB share.
    await wait_ingest(hub, lambda v: v >= 60 * KiB)
    second = frame(b"y" * (100 * KiB), opcode=0x0, fin=False)
    for c in (a, b):
        # The header and a little: each now needs ~100 KiB more, 168 KiB > 128 KiB.
        await c.send(second[: 20 * KiB])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(assert_serves, hub)
        with trio.fail_after(15):
            frames_a = await assert_closed_with(a, CLOSE_POLICY)
            frames_b = await assert_closed_with(b, CLOSE_POLICY)
    for f in (frames_a, frames_b):
        assert b"not completed within 1 s" in f[-1][1], f
    await all_given_back(hub)


async def test_a_fragmented_message_whose_headers_come_byte_by_byte_is_stored(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """A ~200 KiB logs message in 5 fragments, every frame header (and the
    first frame's, in the fast path's 8-byte length form too) dribbled one
    byte at a time: FrameTracker / ClientFrames follow it, the message is
    acked and stored, and the credit is back."""
    hub = await sqlite_hub_factory.astart("--body-timeout", "10")
    task = "dribbled-headers"
    payload = big_logs(task, 1, 200, 1000)
    client, _ = await open_raw(hub)
    with trio.fail_after(30):
        for part in fragments(payload, 5):
            head_len = 2 + (2 if part[1] & 0x7F == 126 else 8 if part[1] & 0x7F == 127 else 0) + 4
            for i in range(head_len):
                await client.send(part[i : i + 1])
                await trio.sleep(0.005)
            await client.send(part[head_len:])
        await wait_ack(client, task, 200)
    # And one whole 200 KiB frame (the fast path) with its header byte by byte.
    whole = frame(big_logs(task, 201, 200, 1000))
    assert whole[1] & 0x7F == 127
    with trio.fail_after(30):
        for i in range(14):
            await client.send(whole[i : i + 1])
            await trio.sleep(0.005)
        await client.send(whole[14:])
        await wait_ack(client, task, 400)
    assert [r["seq"] for r in await stored(hub, task)] == list(range(1, 401))
    await wait_ingest(hub, lambda v: v == 0)
    await assert_serves(hub)
    assert_no_handler_crash(hub)


async def test_control_frames_inside_a_large_fragmented_message(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """Pings and pongs between the fragments of a ~300 KiB message holding
    credit are answered (pings) or dropped (pongs) and the message still
    arrives whole; a close between the fragments of the next one ends the
    connection with its code echoed, nothing of it stored, the credit back."""
    hub = await sqlite_hub_factory.astart("--ingest-queue-bytes", str(1 * MiB))
    task = "controls-inside"
    client, _ = await open_raw(hub)
    parts = fragments(big_logs(task, 1, 300, 1000), 6)
    with trio.fail_after(30):
        for i, part in enumerate(parts):
            await client.send(part)
            if i < len(parts) - 1:
                await client.send(frame(b"p%d" % i, opcode=0x9) + frame(b"unsolicited", opcode=0xA))
                opcode, data = await client.frame()
                assert (opcode, data) == (0xA, b"p%d" % i)
        await wait_ack(client, task, 300)
        # The next message: two fragments of ~300 KiB's worth, then a close.
        nxt = fragments(big_logs(task, 301, 300, 1000), 6)
        await client.send(nxt[0] + nxt[1][: len(nxt[1]) // 2])
        await wait_ingest(hub, lambda v: v > 0)
        await client.send(nxt[1][len(nxt[1]) // 2 :] + frame(close_payload(1000), opcode=0x8))
    await assert_closed_with(client, 1000)
    await wait_no_connections(hub)
    assert await ingest_bytes(hub) == 0
    assert [r["seq"] for r in await stored(hub, task)] == list(range(1, 301))
    await assert_serves(hub)
    assert_no_handler_crash(hub)


# --- messages that become OVERSIZED ------------------------------------------------------


async def test_a_fragmented_message_that_becomes_oversized_gives_its_credit_back(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """Fragments of 1 MiB past the message limit: TOO_LARGE once, the credit
    is back while the connection carries on, the rest is dropped, and the
    same connection's next message is served."""
    hub = await sqlite_hub_factory.astart()
    client, _ = await open_raw(hub)
    chunk = b" " * MiB
    n = MAX_MESSAGE // MiB + 2
    with trio.fail_after(30):
        await client.send(frame(b'{"type":"ping","pad":"', fin=False, mask=b"\0\0\0\0"))
        for _ in range(n):
            await client.send(frame(chunk, opcode=0x0, fin=False, mask=b"\0\0\0\0"))
        error = await client.json()
        assert (error["type"], error["code"]) == ("error", "TOO_LARGE"), error
        # Still mid-message (never finished), yet holding no credit.
        await wait_ingest(hub, lambda v: v == 0)
        await client.send(frame(chunk, opcode=0x0, fin=False, mask=b"\0\0\0\0"))
        await client.send(frame(b'"}', opcode=0x0))
        await client.send(frame(b'{"type":"ping"}'))
        assert await client.json() == {"type": "pong"}
        task = "after-oversized"
        await client.send(frame(big_logs(task, 1, 100, 1000)))
        await wait_ack(client, task, 100)
    await wait_ingest(hub, lambda v: v == 0)
    await assert_serves(hub)
    assert_no_handler_crash(hub)


async def test_two_frames_claiming_2_63_bytes_on_a_small_budget_both_get_too_large(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """Two connections each claim 2**63-1 bytes with a 1 MiB budget (a 512 KiB
    share): the first holds its capped claim alone, the second waits unread
    until the first turns OVERSIZED and gives it back; both are told
    TOO_LARGE, then reset; the budget returns to 0 and others are served."""
    hub = await sqlite_hub_factory.astart("--ingest-queue-bytes", str(1 * MiB))
    head = b"\x81\xff" + (2**63 - 1).to_bytes(8, "big") + b"\0\0\0\0"
    chunk = b" " * (256 * KiB)
    clients = [(await open_raw(hub))[0] for _ in range(2)]
    errors: list[dict[str, Any]] = []

    async def claim(client: RawClient) -> None:
        async def pour() -> None:
            try:
                await client.send(head)
                while True:
                    await client.send(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pour)
            errors.append(await client.json())
            nursery.cancel_scope.cancel()

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            for c in clients:
                nursery.start_soon(claim, c)
    assert [(e["type"], e["code"]) for e in errors] == [("error", "TOO_LARGE")] * 2, errors
    await wait_ingest(hub, lambda v: v == 0)
    for c in clients:
        await reset(c)
    await all_given_back(hub)


# --- resets ----------------------------------------------------------------------------


async def test_a_reset_while_holding_credit_gives_it_back_before_the_body_timeout(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart("--body-timeout", "60")
    client, _ = await open_raw(hub)
    await client.send(frame(b'{"type":"ping","pad":"' + b"x" * (300 * KiB), length=1 * MiB)[: 200 * KiB])
    await wait_ingest(hub, lambda v: v > 0)
    await reset(client)
    # Long before the 60 s body timeout.
    await wait_ingest(hub, lambda v: v == 0, seconds=10)
    await wait_no_connections(hub, 10)
    await assert_serves(hub)
    assert_no_handler_crash(hub)


async def test_a_reset_while_waiting_for_credit_frees_everything(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """A holder takes most of the share; a second connection holds credit for
    a fragmented message and resets while waiting for more; a third waits for
    its first credit (unread) and resets. Once the holder's message ends, nothing is
    held, no connection is left, others are served."""
    hub = await sqlite_hub_factory.astart("--body-timeout", "3", "--ingest-queue-bytes", str(512 * KiB))
    task = "holder"
    holder, _ = await open_raw(hub)
    whole = frame(big_logs(task, 1, 200, 1000))  # ~200 KiB, the share is 256 KiB
    await holder.send(whole[: 40 * KiB])
    held = await wait_ingest(hub, lambda v: v > 0)
    frag, _ = await open_raw(hub)
    await frag.send(frame(b'{"type":"ping","pad":"' + b"q" * (30 * KiB), fin=False))
    await wait_ingest(hub, lambda v: v > held)
    await frag.send(frame(b"q" * (200 * KiB), opcode=0x0, fin=False)[: 20 * KiB])
    waiter, _ = await open_raw(hub)
    await waiter.send(frame(b"z" * (200 * KiB))[: 60 * KiB])
    await trio.sleep(0.2)
    await reset(waiter)
    await reset(frag)
    await holder.send(whole[40 * KiB :])
    await wait_ack(holder, task, 200)
    await holder.stream.aclose()
    await wait_ingest(hub, lambda v: v == 0)
    await wait_no_connections(hub, 10)
    await assert_serves(hub)
    assert [r["seq"] for r in await stored(hub, task)] == list(range(1, 201))
    assert_no_handler_crash(hub)


# --- honest clients under pressure -------------------------------------------------------


async def test_many_connections_each_sending_a_100k_frame_slowly_are_all_stored(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """40 connections each send a ~100 KiB logs frame in 10 pieces over ~1 s,
    against a 2 MiB budget (a 1 MiB share: about a dozen hold credit at once):
    honest within --body-timeout, so every one is acked and stored, none cut."""
    hub = await sqlite_hub_factory.astart("--body-timeout", "5", "--ingest-queue-bytes", str(2 * MiB))
    n = 40
    done: list[str] = []

    async def one(i: int) -> None:
        task = f"slow-{i:02d}"
        data = frame(big_logs(task, 1, 100, 1000))
        client, _ = await open_raw(hub)
        try:
            step = -(-len(data) // 10)
            for at in range(0, len(data), step):
                await client.send(data[at : at + step])
                await trio.sleep(0.1)
            await wait_ack(client, task, 100, seconds=30)
            done.append(task)
        finally:
            await client.stream.aclose()

    with trio.fail_after(45):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    assert len(done) == n
    for i in range(n):
        assert [r["seq"] for r in await stored(hub, f"slow-{i:02d}")] == list(range(1, 101))
    await wait_ingest(hub, lambda v: v == 0)
    m = await metrics(hub)
    # The budget, plus one message still arriving that went alone.
    assert m["keruta_ingest_queue_bytes_peak"] <= 2 * MiB + 110 * KiB, m
    assert_no_handler_crash(hub)


TINY = 1024


async def _tiny_budget_run(hub: Any) -> list[int]:
    """4 connections each send 3 whole ~200 KiB frames at once against a
    1 KiB budget; every frame acked; the largest frame's size on the wire."""
    sizes: list[int] = []

    async def one(i: int) -> None:
        task = f"tiny-{i}"
        client, _ = await open_raw(hub)
        try:
            for f in range(3):
                data = frame(big_logs(task, f * 200 + 1, 200, 1000))
                sizes.append(len(data))
                await client.send(data)
            await wait_ack(client, task, 600, seconds=40)
        finally:
            await client.stream.aclose()

    with trio.fail_after(50):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
    for i in range(4):
        assert [r["seq"] for r in await stored(hub, f"tiny-{i}")] == list(range(1, 601))
    await wait_ingest(hub, lambda v: v == 0)
    return sizes


async def test_a_tiny_budget_with_200k_frames_still_progresses(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart("--ingest-queue-bytes", str(TINY))
    await _tiny_budget_run(hub)
    await assert_serves(hub)
    assert_no_handler_crash(hub)


async def test_a_tiny_budget_holds_at_most_one_alone_holder(
    sqlite_hub_factory: hubclient.InProcessHubFactory,
) -> None:
    """With a 1 KiB budget every ~230 KiB frame goes alone: a whole frame
    waiting for its task's rate tokens holds the budget, and a message still
    arriving on another connection must then wait, not hold credit beside it
    (the bound is the budget plus one alone-holder)."""
    hub = await sqlite_hub_factory.astart("--ingest-queue-bytes", str(TINY), "--rate-limit", "100", "--rate-burst", "200")
    task = "throttled"
    first = frame(big_logs(task, 1, 200, 1000))
    second = frame(big_logs(task, 201, 200, 1000))
    writer, _ = await open_raw(hub)
    await writer.send(first)
    await wait_ack(writer, task, 200)
    await writer.send(second)  # ~2 s of tokens to wait for, holding its budget
    held = await wait_ingest(hub, lambda v: v >= len(second) - 1024)
    other = "arriving"
    arriving = frame(big_logs(other, 1, 200, 1000))
    late, _ = await open_raw(hub)
    await late.send(arriving[: 100 * KiB])
    with trio.move_on_after(0.5):
        await wait_ingest(hub, lambda v: v > held + 32 * KiB)
    await late.send(arriving[100 * KiB :])
    await wait_ack(writer, task, 400)
    await wait_ack(late, other, 200)
    await wait_ingest(hub, lambda v: v == 0)
    peak = (await metrics(hub))["keruta_ingest_queue_bytes_peak"]
    assert peak <= TINY + max(len(first), len(second), len(arriving)), peak
