"""The recorder actor (agent/pipeline/recorder.py): seqs, the spool, RecordBatches downstream."""

from __future__ import annotations

from pathlib import Path

import orjson
import trio

from agent.pipeline.linesplit import Line
from agent.pipeline.messages import AgentLine, Finished, LineBatch, RecordBatch, Started
from agent.pipeline.recorder import Recorder, record
from agent.spool.spool import Spool

TS = "2026-01-01T00:00:00.000000Z"


async def recording(inbox: trio.MemoryReceiveChannel[object], recorder: Recorder, out: trio.MemorySendChannel[object]) -> None:
    """The recorder actor, its output a channel closed once it ends (agent/run.py
    closes the throttle's channel so)."""
    with out:
        await record(inbox, recorder, out.send)  # type: ignore[arg-type]


async def test_recorder_actor_spools_batches_and_passes_seq_ranges_on(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "t", hub_url="http://h")
    to_recorder, inbox = trio.open_memory_channel[object](4)
    out, spooled = trio.open_memory_channel[object](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(recording, inbox, Recorder(spool, "t"), out)
        with to_recorder:
            await to_recorder.send(Started(4242))
            await to_recorder.send(LineBatch("stdout", TS, [(Line("a"), 1), (Line("b warning"), 2)]))
            await to_recorder.send(LineBatch("stderr", TS, [(Line("c"), 1)]))
            await to_recorder.send(AgentLine("keruta-agent: note"))
            await to_recorder.send(Finished("failed", 3))
        got = [m async for m in spooled]  # ends: the recorder closed its output
    assert got == [RecordBatch(1, 2), RecordBatch(3, 3), RecordBatch(4, 4), Finished("failed", 3)]
    assert spool.meta["final"]["state"] == "failed" and spool.meta["final"]["exitCode"] == 3
    records = [orjson.loads(p) for _, p in spool.read(1, 10, 1 << 20)]
    assert [(r["seq"], r["source"], r["message"], r["level"]) for r in records] == [
        (1, "stdout", "a", "INFO"),
        (2, "stdout", "b warning", "WARN"),
        (3, "stderr", "c", "INFO"),
        (4, "agent", "keruta-agent: note", "INFO"),
    ]
    assert all(r["metadata"] == {"processId": 4242} for r in records)
    spool.close()


async def test_recorder_actor_drops_past_the_spool_budget_and_never_blocks(tmp_path: Path) -> None:
    """A full spool drops lines (counted) instead of holding the command up;
    the gap is recorded when the run finishes."""
    spool = Spool.open(tmp_path, "t", hub_url="http://h", max_bytes=2000)
    recorder = Recorder(spool, "t")
    to_recorder, inbox = trio.open_memory_channel[object](4)
    out, spooled = trio.open_memory_channel[object](64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(recording, inbox, recorder, out)
        with to_recorder:
            for n in range(1, 51):
                await to_recorder.send(LineBatch("stdout", TS, [(Line("x" * 100), n)]))
            await to_recorder.send(Finished("succeeded", 0))
        got = [m async for m in spooled]
    assert recorder.dropped_total > 0
    last = [m for m in got if isinstance(m, RecordBatch)][-1].last_seq
    notice = orjson.loads(spool.read(last, 1, 1 << 20)[0][1])
    assert notice["source"] == "agent" and notice["kind"] == "gap"
    assert notice["metadata"]["gap"]["lines"] == recorder.dropped_total
    assert got[-1] == Finished("succeeded", 0)
    spool.close()
