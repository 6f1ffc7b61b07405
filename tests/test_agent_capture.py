"""Recorder (seq, lineNumber, spool budget) and the uplink's frame encoding."""

from __future__ import annotations

from pathlib import Path

import orjson
from hypothesis import given
from hypothesis import strategies as st

from agent.link.framing import fill_gaps
from agent.pipeline.capture import LineNumbering
from agent.pipeline.encoding import LineEncoder, LineRun
from agent.pipeline.linesplit import Block, Line
from agent.pipeline.recorder import Recorder
from agent.spool.spool import Spool
from keruta.frames import LogsFrame
from keruta.levels import determine_level
from keruta.limits import DEFAULT_LIMITS
from keruta.recordjson import encode_line, logs_frame
from keruta.records import LogRecord
from keruta.wire import decode_client_frame, encode_bytes, record_to_wire


def encode_record(record: LogRecord) -> bytes:
    """The reference encoding `encode_line` must equal."""
    return orjson.dumps(record_to_wire(record))


def read_all(spool: Spool) -> list[dict]:
    return [orjson.loads(p) for _, p in spool.read(1, 100_000, 1 << 30)]


def test_one_seq_counter_across_sources_and_line_numbers_per_source(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "t")
    spooled: list[int] = []
    rec = Recorder(spool, "t", clock=lambda: 0.0)
    out, err = LineNumbering(), LineNumbering()
    rec.write("stdout", out.number([Line("a"), Line("b")]), "2026-01-01T00:00:00.000000Z")
    spooled.append(spool.last_seq)
    rec.write("stderr", err.number([Line("error: x")]))
    spooled.append(spool.last_seq)
    rec.write("stdout", out.number([Line("long-", True), Line("line")]))
    spooled.append(spool.last_seq)
    records = read_all(spool)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert [(r["source"], r["lineNumber"]) for r in records] == [
        ("stdout", 1),
        ("stdout", 2),
        ("stderr", 1),
        ("stdout", 3),
        ("stdout", 3),
    ]
    assert records[2]["level"] == "ERROR"
    assert records[3]["partial"] is True and "partial" not in records[4]
    assert spooled == [2, 3, 5], "each write is in the spool when it returns"
    spool.close()


def test_seq_continues_after_what_the_spool_holds(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "t")
    Recorder(spool, "t").write("stdout", [(Line("x"), 1)])
    spool.close()
    spool = Spool.open(tmp_path, "t")
    rec = Recorder(spool, "t")
    assert rec.next_seq == 2
    spool.close()


async def test_full_spool_drops_counts_and_records_the_gap(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "t", max_bytes=4096)
    said: list[str] = []
    rec = Recorder(spool, "t", say=said.append, clock=lambda: 0.0)
    numbering = LineNumbering()
    for i in range(100):
        rec.write("stdout", numbering.number([Line(f"line {i} " + "x" * 40)]))
    assert rec.dropped_total > 0
    assert any("SPOOL FULL" in s for s in said)
    kept = rec.written
    # The hub catches up: space comes back (at the sync that makes the watermark
    # durable), the next line is preceded by the gap record.
    spool.release(spool.last_seq)
    await spool.sync()
    rec.write("stdout", numbering.number([Line("after")]))
    records = read_all(spool)
    notice, after = records[-2], records[-1]
    assert (notice["source"], notice["kind"], notice["level"]) == ("agent", "gap", "WARN")
    gap = notice["metadata"]["gap"]
    assert (gap["reason"], gap["lines"]) == ("spool_full", rec.dropped_total)
    assert gap["sources"]["stdout"]["lastLine"] == 100
    assert f"{rec.dropped_total} lines (" in notice["message"]
    assert any("room again" in s for s in said)
    assert after["message"] == "after" and after["lineNumber"] == 101
    assert [r["seq"] for r in records] == list(range(records[0]["seq"], kept + 3))
    spool.close()


def test_finish_records_a_gap_even_when_still_full(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "t", max_bytes=4096)
    rec = Recorder(spool, "t", clock=lambda: 0.0)
    for i in range(100):
        rec.write("stderr", [(Line("y" * 60), i + 1)])
    rec.finish()
    last = read_all(spool)[-1]
    assert last["source"] == "agent" and last["kind"] == "gap"
    assert last["metadata"]["gap"]["lines"] == rec.dropped_total
    assert last["metadata"]["gap"]["bytes"] == 60 * rec.dropped_total
    # The budget kept room for it.
    assert spool.used_bytes <= 4096
    spool.close()


def test_logs_frame_matches_the_wire_encoder() -> None:
    records = [
        LogRecord(
            "t-1",
            1,
            "2026-01-01T00:00:00.000000Z",
            "stdout",
            "INFO",
            'héllo "q" \u0000',
            1,
            {"processId": 7},
        ),
        LogRecord(
            "t-1",
            2,
            "2026-01-01T00:00:00.000001Z",
            "stderr",
            "ERROR",
            "x" * 100,
            1,
            {},
            partial=True,
        ),
    ]
    ours = logs_frame("t-1", [encode_record(r) for r in records])
    assert ours == encode_bytes(LogsFrame("t-1", records))
    assert decode_client_frame(ours, DEFAULT_LIMITS) == LogsFrame("t-1", records)


def test_fast_line_encoding_equals_the_record_encoding() -> None:
    for partial in (False, True):
        for metadata in ({}, {"processId": 12}):
            record = LogRecord(
                "t.1:x",
                7,
                "2026-01-01T00:00:00.000001Z",
                "stderr",
                "WARN",
                'm\u00e9 "\\',
                3,
                metadata,
                partial,
            )
            fast = encode_line(
                "t.1:x",
                7,
                "2026-01-01T00:00:00.000001Z",
                "stderr",
                "WARN",
                'm\u00e9 "\\',
                3,
                metadata,
                partial,
            )
            assert fast == encode_record(record)


def test_gaps_in_what_the_spool_returns_get_placeholders() -> None:
    def rec(seq: int) -> tuple[int, bytes]:
        return seq, b'{"seq":%d}' % seq

    got = fill_gaps("t", 3, [rec(3), rec(5), rec(8)], 10, 20)
    assert [s for s, _ in got] == [3, 4, 5, 6, 7, 8]
    assert got[0] == rec(3) and got[2] == rec(5) and got[5] == rec(8)
    lost = orjson.loads(got[1][1])
    assert lost["seq"] == 4 and lost["source"] == "agent" and "lost" in lost["message"]
    # A limit applies to placeholders too; nothing at all read: fill up to last_seq.
    assert [s for s, _ in fill_gaps("t", 3, [rec(9)], 4, 20)] == [3, 4, 5, 6]
    assert [s for s, _ in fill_gaps("t", 3, [], 10, 5)] == [3, 4, 5]
    assert fill_gaps("t", 3, [rec(3), rec(4)], 10, 20) == [rec(3), rec(4)]


def test_a_failing_disk_drops_lines_instead_of_stopping(tmp_path: Path) -> None:
    """The spool's segment is /dev/full: every write fails with ENOSPC."""
    spool = Spool.open(tmp_path, "t")
    (tmp_path / "t" / "00000000000000000001.seg").symlink_to("/dev/full")
    said: list[str] = []
    rec = Recorder(spool, "t", say=said.append, clock=lambda: 0.0)
    rec.write("stdout", [(Line("a"), 1), (Line("b"), 2)])
    rec.write("stdout", [(Line("c"), 3)])
    assert rec.dropped_total == 3 and rec.written == 0 and rec.next_seq == 1
    assert any("cannot write to the spool" in s and "DROPPING" in s for s in said)
    spool.close()


@given(
    seq=st.integers(1, 2**63 - 1),
    level=st.sampled_from(["DEBUG", "INFO", "WARN", "ERROR"]),
    message=st.text(),
    line_number=st.integers(0, 2**31),
    partial=st.booleans(),
    source=st.sampled_from(["stdout", "stderr", "agent"]),
    metadata=st.sampled_from([{}, {"processId": 4242}]),
)
def test_agent_line_encoder_gives_encode_lines_bytes(
    seq: int, level: str, message: str, line_number: int, partial: bool, source: str, metadata: dict
) -> None:
    ts = "2026-01-01T00:00:00.000001Z"
    encoder = LineEncoder("t.1:\u00e9x", ts, source, metadata)
    assert encoder.encode(seq, level, message, line_number, partial) == encode_line(
        "t.1:\u00e9x", seq, ts, source, level, message, line_number, metadata, partial
    )


# Text a Block may hold (no newline, valid UTF-8), with what the encoder
# treats specially: level words in any case, escapes, quotes, backslashes,
# controls, non-ASCII (whose case-insensitive matching goes beyond ASCII), `%`.
_block_line = st.lists(
    st.sampled_from(
        ["ERROR", "error", "eRrOr", "Warning:", "deprecated", "DEBUG", "traceback", "terror",
         "debugger", "x", " ", '"', "\\", "\t", "\x1b[31m", "\x00", "%d", "%", "\u00e9",
         "\u212a", "\u0130", "\u017f", "\u2028", "\U0001f600", "fatal", "panic", "trace"]
    )
    | st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=8),
    max_size=12,
).map("".join)


@given(
    lines=st.lists(_block_line, min_size=1, max_size=40),
    seq=st.integers(1, 2**53),
    line_number=st.integers(1, 2**31),
    metadata=st.sampled_from([{}, {"processId": 4242}, {"note": "100%"}]),
)
def test_agent_block_encoding_gives_encode_lines_bytes(
    lines: list[str], seq: int, line_number: int, metadata: dict
) -> None:
    """Issue 17: a Block's records, encoded with no Python per line (levels looked
    at only where a level word or non-ASCII is), equal encode_line's, line by line."""
    ts = "2026-01-01T00:00:00.000001Z"
    block = Block.of([line.encode() for line in lines])
    got = LineEncoder("t%1", ts, "stdout", metadata).encode_block(seq, block, line_number)
    want = [
        encode_line("t%1", seq + i, ts, "stdout", determine_level(text), text, line_number + i, metadata, False)
        for i, text in enumerate(lines)
    ]
    assert got == want


@given(lines=st.lists(_block_line, min_size=1, max_size=60), most=st.integers(1, 64))
def test_agent_line_run_stored_and_split_gives_the_same_records(lines: list[str], most: int) -> None:
    """What the spool keeps of a LineRun (its head line and its lines), and the
    runs it is cut into for frames, give back the records of the whole run."""
    run = LineRun("t-1", "2026-01-01T00:00:00.000001Z", "stderr", 7, {"processId": 1},
                  Block.of([line.encode() for line in lines]))
    want = run.records(100)
    assert LineRun.parse(run.head() + b"\n" + run.block.data).records(100) == want
    parts = run.split(most)
    assert sum(part.count for part in parts) == run.count
    got: list[bytes] = []
    for part in parts:
        got += part.records(100 + len(got))
    assert got == want


async def test_agent_blocks_fill_the_spool_then_drop_as_one_gap(tmp_path: Path) -> None:
    """Plain lines spooled as read (Blocks) obey the budget like any: what does
    not fit is dropped, counted and recorded as one gap before the next line
    kept; every seq is a record, every line is kept or counted."""
    spool = Spool.open(tmp_path, "t", max_bytes=64 * 1024)
    rec = Recorder(spool, "t", clock=lambda: 0.0)
    numbering = LineNumbering()
    lines = [b"line %d " % i + b"x" * 60 for i in range(3000)]
    for start in range(0, len(lines), 300):
        rec.write("stdout", numbering.number([Block.of(lines[start : start + 300])]))
    assert rec.dropped_total > 0 and rec.written + rec.dropped_total == 3000
    assert spool.used_bytes <= spool.max_bytes
    kept = read_all(spool)
    assert [r["message"] for r in kept] == [line.decode() for line in lines[: len(kept)]]
    assert [r["lineNumber"] for r in kept] == list(range(1, len(kept) + 1))
    spool.release(spool.last_seq)
    await spool.sync()
    rec.write("stdout", numbering.number([Block.of([b"after"])]))
    notice, after = read_all(spool)[-2:]
    assert notice["kind"] == "gap" and notice["metadata"]["gap"]["lines"] == rec.dropped_total
    assert (after["message"], after["lineNumber"], after["seq"]) == ("after", 3001, notice["seq"] + 1)
    spool.close()
