"""Masking in the agent: capture end to end in-process (the stream masker
itself is tested in test_masking.py)."""

from __future__ import annotations

from pathlib import Path

import orjson
import trio
import trio.testing

from agent.pipeline.capture import Mirror, capture
from agent.pipeline.messages import Started
from agent.pipeline.recorder import Recorder, record
from agent.spool.spool import Spool
from keruta.masking import Masker


async def test_capture_masks_lines_spool_and_mirror(tmp_path: Path) -> None:
    """A secret split over two reads of the pipe is masked in the records, in
    the spool files, and in the mirrored bytes, which otherwise equal the input."""
    secret = "tok-0123456789"
    masker = Masker.from_env({"API_TOKEN": secret})
    spool = Spool.open(tmp_path, "t", hub_url="http://h")
    recorder = Recorder(spool, "t")
    to_recorder, recorder_inbox = trio.open_memory_channel[object](16)
    spooled, spooled_inbox = trio.open_memory_channel[object](16)
    send, receive = trio.testing.memory_stream_one_way_pair()
    mirrored: list[bytes] = []

    class ListMirror(Mirror):
        async def write(self, data: bytes) -> None:
            mirrored.append(data)

    chunks = [
        b"first line\nuse tok-01234",
        b"56789 now\n",
        b"last " + secret.encode()[:5],
        b"no newline",
    ]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(record, recorder_inbox, recorder, spooled.send)
        await to_recorder.send(Started(42))
        nursery.start_soon(
            capture, receive, "stdout", to_recorder, masker.stream(), ListMirror(1, print)
        )
        for chunk in chunks:
            await send.send_all(chunk)
            await trio.testing.wait_all_tasks_blocked()
        await send.aclose()
    spool.close()

    expected = b"".join(chunks).replace(secret.encode(), b"***")
    assert b"".join(mirrored) == expected
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("t/*"))
    assert secret.encode() not in raw
    again = Spool.open(tmp_path, "t", cache_bytes=0)
    records = [orjson.loads(p) for _, p in again.read(1, 100, 1 << 20)]
    again.close()
    assert [r["message"] for r in records] == ["first line", "use *** now", "last tok-0no newline"]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert [r["lineNumber"] for r in records] == [1, 2, 3]
    assert all(r["metadata"] == {"processId": 42} and r["source"] == "stdout" for r in records)
