"""The capture actor's output and the delivery's input (agent/pipeline/capture.py,
agent/pipeline/delivery.py); the whole pipeline runs in test_agent_e2e.py."""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing

from agent.pipeline.capture import Mirror, capture
from agent.pipeline.delivery import Delivery
from agent.pipeline.linesplit import each_line
from agent.pipeline.messages import Finished, LineBatch, RecordBatch
from agent.run import RunSettings
from agent.spool.spool import Spool
from keruta.masking import Masker


async def test_capture_actor_sends_one_batch_per_read_and_closes_its_end() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    out, inbox = trio.open_memory_channel[object](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(capture, receive, "stderr", out, Masker.from_env({}).stream(), None)
        await send.send_all(b"".join(b"line %d\n" % i for i in range(1, 101)) + b"tail")
        await trio.testing.wait_all_tasks_blocked()
        await send.aclose()
        got = [m async for m in inbox]  # ends: capture closed its send end
    assert all(isinstance(m, LineBatch) and m.source == "stderr" for m in got)
    assert len(got) == 2, "the 100 lines of one read travel as one batch; the unterminated tail at EOF"
    lines = [(line.text, n) for m in got for line, n in each_line(m.lines)]  # type: ignore[attr-defined]
    assert lines == [(f"line {i}", i) for i in range(1, 101)] + [("tail", 101)]


def test_mirror_writes_files_and_devnull_directly_and_pipes_through_a_thread(tmp_path: Path) -> None:
    with open(tmp_path / "out", "wb") as f:
        assert Mirror(f.fileno(), print).direct
    with open(os.devnull, "wb") as f:
        assert Mirror(f.fileno(), print).direct
    r, w = os.pipe()
    try:
        assert not Mirror(w, print).direct
    finally:
        os.close(r)
        os.close(w)


async def test_delivery_hands_its_uplink_what_was_offered_before_and_after_it_loaded(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "t", hub_url="http://127.0.0.1:9")
    settings = RunSettings(command=["true"], hub_url="http://127.0.0.1:9", task_id="t", spool_root=tmp_path)
    delivery = Delivery(settings, spool, lambda _m: None)
    # Offered while the uplink's modules still load: kept for it.
    await delivery.offer(RecordBatch(1, 7))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(delivery.run)
        with trio.fail_after(30):
            while delivery.uplink is None:
                await trio.sleep(0.01)
        assert delivery.uplink.protocol.available == 7
        await delivery.offer(RecordBatch(8, 9))
        await delivery.offer(Finished("succeeded", 0))
        assert delivery.uplink.protocol.available == 9
        assert delivery.uplink.protocol.final == ("succeeded", 0)
        nursery.cancel_scope.cancel()
    spool.close()


async def test_capture_shows_a_line_only_after_the_recorder_spooled_it(tmp_path: Path) -> None:
    """A line on the user's screen must never be one a SIGKILL of the agent loses."""
    send, receive = trio.testing.memory_stream_one_way_pair()
    out, inbox = trio.open_memory_channel[object](16)
    with open(tmp_path / "mirror", "wb") as shown:
        mirror = Mirror(shown.fileno(), print)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(capture, receive, "stdout", out, Masker.from_env({}).stream(), mirror)
            await send.send_all(b"seen only once stored\n")
            batch = await inbox.receive()
            await trio.testing.wait_all_tasks_blocked()
            assert isinstance(batch, LineBatch) and batch.spooled is not None
            assert (tmp_path / "mirror").read_bytes() == b"", "shown before it was spooled"
            batch.spooled.set()  # what the recorder does after Spool.append
            await trio.testing.wait_all_tasks_blocked()
            assert (tmp_path / "mirror").read_bytes() == b"seen only once stored\n"
            await send.aclose()
            async for _ in inbox:
                pass
