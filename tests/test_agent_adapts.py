"""A chatty producer against a slow hub, on the autojump clock: the uplink's
sans-IO core (agent/link/protocol.py) sends fewer, fuller frames while the
hub's acks say it is behind, and every line still goes at once while it is not."""

from __future__ import annotations

import orjson
import trio
import trio.testing

from agent.link.framing import fill_gaps
from agent.link.protocol import ReadRecords, SendFrame, UplinkProtocol
from hub.messages import WriteOutcome
from hub.ws.acks import BEHIND_BYTES, Replies
from keruta.frames import AckFrame
from keruta.recordjson import encode_line
from keruta.wire import decode_hub_frame

TS = "2026-01-01T00:00:00.000000Z"
PRODUCER = "0b5f6a9e-0000-4000-8000-000000000002"


async def run_producer(*, lines_per_second: float, seconds: float, round_trip: float, backlog: int | None) -> tuple[int, int]:
    """Lines arrive at a rate; frames go as the protocol decides; the hub
    acks each frame after `round_trip`, with `backlog` on its acks. Returns
    (frames sent, lines acknowledged)."""
    p = UplinkProtocol("t", PRODUCER, batch_size=500, flush_interval=0.2, eager_frames=2)
    p.on_connected(trio.current_time())
    frames = 0
    wake = trio.Event()
    lines = int(lines_per_second * seconds)

    async def hub_acks(seq: int) -> None:
        nonlocal wake
        await trio.sleep(round_trip)
        p.on_frame(AckFrame("t", seq, PRODUCER, backlog), trio.current_time())
        wake.set()

    async with trio.open_nursery() as nursery:

        async def lines_arrive() -> None:
            nonlocal wake
            for n in range(1, lines + 1):
                await trio.sleep(1 / lines_per_second)
                p.records_available(n, trio.current_time())
                wake.set()

        nursery.start_soon(lines_arrive)
        while p.acked < lines:
            now = trio.current_time()
            action = p.next_frame(now)
            if isinstance(action, ReadRecords):
                records = [
                    (s, encode_line("t", s, TS, "stdout", "INFO", f"line {s}", s, {}, False))
                    for s in range(action.start, action.start + action.count)
                ]
                data = p.logs_frame(fill_gaps("t", action.start, records, action.count, p.available), now)
                assert data is not None
                frames += 1
                nursery.start_soon(hub_acks, orjson.loads(data)["records"][-1]["seq"])
                continue
            if isinstance(action, SendFrame):
                continue  # the run's status: not a logs frame
            wake = trio.Event()
            with trio.move_on_at(action.until if action.until is not None else now + 60):
                await wake.wait()
    return frames, p.acked


async def test_a_chatty_producer_sends_fewer_frames_while_the_hub_is_behind(autojump_clock: trio.testing.MockClock) -> None:
    # 20 lines a second for 10 s, the hub answering in 50 ms and not behind: a frame a line.
    frames, acked = await run_producer(lines_per_second=20, seconds=10, round_trip=0.05, backlog=None)
    assert acked == 200
    assert frames == 200, "a line goes at once while the hub keeps up"
    # The same producer while the hub is behind (acks carry a backlog) and answers in 0.3 s.
    frames, acked = await run_producer(lines_per_second=20, seconds=10, round_trip=0.3, backlog=4 << 20)
    assert acked == 200, "nothing is lost"
    assert frames <= 40, f"{frames} frames: about one per round trip, not one a line"


async def test_without_the_hub_saying_it_is_behind_a_slow_hub_gets_the_usual_batches(autojump_clock: trio.testing.MockClock) -> None:
    frames, acked = await run_producer(lines_per_second=20, seconds=10, round_trip=0.3, backlog=None)
    assert acked == 200
    behind, _ = await run_producer(lines_per_second=20, seconds=10, round_trip=0.3, backlog=4 << 20)
    assert behind < frames, (behind, frames)


def test_an_ack_says_the_hub_is_behind_only_past_its_threshold() -> None:

    replies = Replies()
    replies.on_written(WriteOutcome(producers={("t", PRODUCER): 3}))
    keeping_up = replies.next_frame(backlog=BEHIND_BYTES - 1)
    assert keeping_up is not None and "backlog" not in keeping_up, "acks stay as they were while the hub keeps up"
    replies.on_written(WriteOutcome(producers={("t", PRODUCER): 4}))
    behind = replies.next_frame(backlog=BEHIND_BYTES)
    assert behind is not None
    assert decode_hub_frame(behind) == AckFrame("t", 4, PRODUCER, BEHIND_BYTES)
