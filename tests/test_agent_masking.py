"""Masking in the agent: the live stream masker, and capture end to end in-process."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.capture import Mirror, Recorder, capture
from agent.livemask import LiveMasker
from agent.spool import Spool
from keruta.masking import Masker


def collapse(data: bytes) -> bytes:
    """Touching masks may come out as one *** or several; compare them as one."""
    return re.sub(rb"(\*\*\*)+", b"***", data)


def feed_all(masker: LiveMasker, chunks: list[bytes]) -> bytes:
    return b"".join(masker.feed(c) for c in chunks) + masker.flush()


def test_nothing_is_held_without_a_possible_secret() -> None:
    live = LiveMasker(Masker(["hunter22-long-secret"]))
    assert live.feed(b"done\n") == b"done\n"
    assert live.held == 0


def test_only_a_possible_secret_prefix_is_held() -> None:
    live = LiveMasker(Masker(["hunter22"]))
    assert live.feed(b"password: hun") == b"password: "
    assert live.held == 3
    assert live.feed(b"ter22!\n") == b"***!\n"
    assert live.feed(b"hunt") == b""
    assert live.feed(b"ing\n") == b"hunting\n"


def test_secret_straddling_reads_byte_by_byte() -> None:
    live = LiveMasker(Masker(["s3cr3t-value"]))
    data = b"a s3cr3t-value b s3cr3t-valu c\n"
    out = feed_all(live, [bytes([b]) for b in data])
    assert out == b"a *** b s3cr3t-valu c\n"


def test_no_masker_passes_everything() -> None:
    live = LiveMasker(Masker([]))
    assert live.feed(b"abc") == b"abc" and live.flush() == b""


secrets_st = st.lists(st.text(alphabet="abcx€", min_size=1, max_size=6), min_size=1, max_size=3)


@settings(max_examples=300, deadline=None)
@given(
    secrets=secrets_st,
    parts=st.lists(st.sampled_from(["a", "b", "c", "x", "€", "\n", " ", "abc", "xx"]), max_size=60),
    cuts=st.lists(st.integers(1, 7), max_size=30),
)
def test_live_masking_equals_masking_the_whole(
    secrets: list[str], parts: list[str], cuts: list[int]
) -> None:
    masker = Masker(secrets)
    data = "".join(parts).encode()
    chunks = []
    pos = 0
    for c in cuts:
        chunks.append(data[pos : pos + c])
        pos += c
    chunks.append(data[pos:])
    out = feed_all(LiveMasker(masker), chunks)
    assert collapse(out) == collapse(masker.mask_bytes(data))


async def test_capture_masks_lines_spool_and_mirror(tmp_path: Path) -> None:
    """A secret split over two reads of the pipe is masked in the records, in
    the spool files, and in the mirrored bytes, which otherwise equal the input."""
    secret = "tok-0123456789"
    masker = Masker.from_env({"API_TOKEN": secret})
    spool = Spool.open(tmp_path, "t", hub_url="http://h")
    recorder = Recorder(spool, "t", metadata={"processId": 42})
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
        nursery.start_soon(
            capture, receive, "stdout", recorder, LiveMasker(masker), ListMirror(1, print)
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
