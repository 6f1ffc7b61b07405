"""The spool on a real directory: append, read back, release, recover."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from agent.pipeline.encoding import LineRun
from agent.pipeline.linesplit import Block
from agent.pipeline.spool_sync import sync_every
from agent.spool.lock import SpoolLocked
from agent.spool.root import spooled_tasks
from agent.spool.segment import HEADER, encode_frame
from agent.spool.spool import Spool


def payload(seq: int, size: int = 20) -> bytes:
    return orjson.dumps({"seq": seq, "message": "x" * size})


def fill(spool: Spool, first: int, last: int, size: int = 20) -> None:
    """Append in calls of 10 records, as capture appends one read's lines at a time."""
    for start in range(first, last + 1, 10):
        stop = min(start + 9, last)
        spool.append([(s, payload(s, size)) for s in range(start, stop + 1)])


def seqs(records: list[tuple[int, bytes]]) -> list[int]:
    return [s for s, _ in records]


def open_spool(root: Path, warnings: list[str] | None = None, **kwargs: object) -> Spool:
    return Spool.open(
        root,
        "task-1",
        hub_url="http://hub:1",
        warn=(warnings if warnings is not None else []).append,
        **kwargs,
    )  # type: ignore[arg-type]


def test_append_and_read_back(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    fill(spool, 1, 10)
    assert spool.last_seq == 10 and spool.unacked == 10
    assert seqs(spool.read(1, 100, 1 << 20)) == list(range(1, 11))
    assert seqs(spool.read(4, 3, 1 << 20)) == [4, 5, 6]
    assert spool.read(4, 1, 1 << 20)[0][1] == payload(4)
    assert spool.read(11, 10, 1 << 20) == []
    spool.close()


def test_byte_budget_of_a_read_keeps_at_least_one_record(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    fill(spool, 1, 5, size=100)
    assert len(spool.read(1, 100, 250)) == 2
    assert len(spool.read(1, 100, 10)) == 1
    spool.close()


def test_reads_come_from_the_files_once_the_memory_cache_is_small(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, cache_bytes=100, segment_bytes=4096, max_bytes=1 << 20)
    fill(spool, 1, 500)
    assert len(list(tmp_path.glob("task-1/*.seg"))) > 1
    got = []
    cursor = 1
    while cursor <= 500:
        batch = spool.read(cursor, 37, 1 << 20)
        got += batch
        cursor = batch[-1][0] + 1
    assert seqs(got) == list(range(1, 501))
    assert all(p == payload(s) for s, p in got)
    spool.close()


def test_out_of_order_append_is_refused(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    fill(spool, 1, 3)
    with pytest.raises(ValueError):
        spool.append([(5, payload(5))])
    spool.close()


async def test_release_deletes_acknowledged_segments_once_the_watermark_is_durable(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, segment_bytes=4096, max_bytes=1 << 20)
    fill(spool, 1, 400)
    before = spool.used_bytes
    segments = len(spool.segments)
    spool.release(200)
    assert spool.acked_seq == 200
    # Not before the watermark is fsynced, which the next sync does off the event loop.
    assert len(spool.segments) == segments
    await spool.sync()
    assert int((tmp_path / "task-1" / "acked").read_text()) == 200
    assert len(spool.segments) < segments and spool.used_bytes < before
    assert seqs(spool.read(201, 1000, 1 << 20)) == list(range(201, 401))
    spool.release(400)
    await spool.sync()
    assert spool.used_bytes == 0 or len(spool.segments) <= 1
    spool.save_watermark()
    spool.close()
    again = open_spool(tmp_path)
    assert again.acked_seq == 400 and again.last_seq == 400 and again.unacked == 0
    again.close()


def test_reopen_continues_after_the_last_record(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    fill(spool, 1, 7)
    spool.release(3)
    spool.save_watermark()
    spool.close()
    again = open_spool(tmp_path)
    assert (again.acked_seq, again.last_seq) == (3, 7)
    assert seqs(again.read(4, 100, 1 << 20)) == [4, 5, 6, 7]
    fill(again, 8, 9)
    assert seqs(again.read(4, 100, 1 << 20)) == [4, 5, 6, 7, 8, 9]
    again.close()


def test_torn_tail_is_cut_off_with_a_warning(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    fill(spool, 1, 5)
    spool.close()
    seg = next(tmp_path.glob("task-1/*.seg"))
    # A crash in the middle of writing record 6: half a frame at the end.
    frame = encode_frame(6, payload(6))
    with seg.open("ab") as f:
        f.write(frame[: len(frame) // 2])
    warnings: list[str] = []
    again = open_spool(tmp_path, warnings)
    assert again.last_seq == 5
    assert any("torn" in w for w in warnings)
    fill(again, 6, 7)
    assert seqs(again.read(1, 100, 1 << 20)) == [1, 2, 3, 4, 5, 6, 7]
    again.close()
    # And the repaired file reads cleanly from disk too.
    third = open_spool(tmp_path, [], cache_bytes=0)
    assert seqs(third.read(1, 100, 1 << 20)) == [1, 2, 3, 4, 5, 6, 7]
    third.close()


def test_torn_header_only(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    fill(spool, 1, 2)
    spool.close()
    seg = next(tmp_path.glob("task-1/*.seg"))
    with seg.open("ab") as f:
        f.write(encode_frame(3, payload(3))[:5])
    again = open_spool(tmp_path)
    assert again.last_seq == 2
    again.close()


def test_corrupt_record_in_the_middle_is_skipped(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    fill(spool, 1, 6)
    spool.close()
    seg = next(tmp_path.glob("task-1/*.seg"))
    data = bytearray(seg.read_bytes())
    frame_len = len(encode_frame(1, payload(1)))
    data[2 * frame_len + HEADER.size + 3] ^= 0xFF  # a bit flip inside record 3's payload
    seg.write_bytes(bytes(data))
    warnings: list[str] = []
    again = open_spool(tmp_path, warnings, cache_bytes=0)
    assert any("corrupt" in w for w in warnings)
    assert again.last_seq == 6
    assert seqs(again.read(1, 100, 1 << 20)) == [1, 2, 4, 5, 6]
    again.close()


def test_corrupt_length_field_does_not_hide_later_records(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    fill(spool, 1, 6)
    spool.close()
    seg = next(tmp_path.glob("task-1/*.seg"))
    data = bytearray(seg.read_bytes())
    frame_len = len(encode_frame(1, payload(1)))
    data[frame_len + 10 : frame_len + 14] = b"\x7f\xff\xff\xff"  # record 2 claims ~2 GiB
    seg.write_bytes(bytes(data))
    again = open_spool(tmp_path, [], cache_bytes=0)
    assert seqs(again.read(1, 100, 1 << 20)) == [1, 3, 4, 5, 6]
    again.close()


def test_garbage_file_never_crashes_opening(tmp_path: Path) -> None:
    (tmp_path / "task-1").mkdir()
    (tmp_path / "task-1" / "00000000000000000001.seg").write_bytes(b"\xab" * 1000 + b"K" * 10)
    (tmp_path / "task-1" / "acked").write_text("not a number")
    (tmp_path / "task-1" / "task.json").write_text("{broken")
    warnings: list[str] = []
    spool = open_spool(tmp_path, warnings)
    assert spool.last_seq == 0 and spool.read(1, 10, 1000) == []
    assert spool.meta["taskId"] == "task-1"
    fill(spool, 1, 2)
    assert seqs(spool.read(1, 10, 1000)) == [1, 2]
    spool.close()


async def test_budget(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, max_bytes=10_000)
    frame = spool.frame_size(len(payload(1)))
    # The budget covers the whole directory: task.json and the producer file are in it from the start.
    meta = sum((tmp_path / "task-1" / name).stat().st_size for name in ("task.json", "producer"))
    assert spool.used_bytes == meta
    assert spool.has_room(10_000 - meta) and not spool.has_room(10_001 - meta)
    n = (10_000 - meta) // frame
    fill(spool, 1, n)
    assert not spool.has_room(frame)
    spool.release(n)
    await spool.sync()
    assert spool.has_room(frame)
    spool.close()


def test_one_process_per_task(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    with pytest.raises(SpoolLocked):
        open_spool(tmp_path)
    spool.close()
    open_spool(tmp_path).close()


async def test_final_state_and_listing(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    await spool.set_final("failed", 3)
    spool.close()
    assert spooled_tasks(tmp_path) == ["task-1"]
    again = open_spool(tmp_path)
    final = again.meta["final"]
    assert final == {"state": "failed", "exitCode": 3, "lastSeq": 0, "summary": final["summary"]}
    assert final["summary"]["records"] == 0
    assert again.meta["hubUrl"] == "http://hub:1"
    await again.mark_final_delivered()
    again.remove()
    assert spooled_tasks(tmp_path) == []
    assert not (tmp_path / "task-1").exists()


async def test_sync_fsyncs_in_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A spy around the real fsync: which files, from which thread.
    fsynced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsynced.append((os.readlink(f"/proc/self/fd/{fd}"), threading.get_ident()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    warnings: list[str] = []
    spool = open_spool(tmp_path, warnings, segment_bytes=4096, max_bytes=1 << 20)
    fill(spool, 1, 300)  # several segments, some retired
    segments = {str(p) for p in (tmp_path / "task-1").glob("*.seg")}
    assert len(segments) > 1
    open_fds = len(os.listdir("/proc/self/fd"))
    fsynced.clear()  # task.json's, on opening
    await spool.sync()
    # Every segment written since the last sync (retired ones too) and the
    # directory holding their names, none on the event loop's thread.
    assert {path for path, _ in fsynced} == segments | {str(tmp_path / "task-1")}
    assert threading.get_ident() not in {thread for _, thread in fsynced}
    synced_fds = len(os.listdir("/proc/self/fd"))
    assert synced_fds < open_fds  # the retired segments' dup'ed fds are closed
    fsynced.clear()
    await spool.sync()  # nothing new: a no-op
    assert fsynced == []
    fill(spool, 301, 302)
    await spool.sync()
    assert {path for path, _ in fsynced} == {
        str(spool.segments[-1].path),
        str(tmp_path / "task-1"),
    }
    assert len(os.listdir("/proc/self/fd")) == synced_fds  # nothing leaks
    assert warnings == []
    spool.close()


async def test_a_filled_segment_is_synced_without_waiting_for_the_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsynced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    spool = open_spool(tmp_path, segment_bytes=4096, max_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        # A tick that never comes during the test: only a retired segment syncs.
        nursery.start_soon(sync_every, spool, 3600.0)
        await trio.testing.wait_all_tasks_blocked()
        fill(spool, 1, 300)  # several segments, the first ones retired
        first = str(min((tmp_path / "task-1").glob("*.seg")))
        with trio.fail_after(60):  # hang guard
            while first not in fsynced:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    spool.close()


def test_flush_side_open_needs_a_complete_spool(tmp_path: Path) -> None:
    """A directory its agent is removing (no task.json any more) is not a task."""
    (tmp_path / "task-1").mkdir()
    (tmp_path / "task-1" / "lock").touch()
    with pytest.raises(FileNotFoundError):
        Spool.open(tmp_path, "task-1", create=False)
    with pytest.raises(FileNotFoundError):
        Spool.open(tmp_path, "task-2", create=False)
    assert not (tmp_path / "task-2").exists()
    assert not (tmp_path / "task-1" / "task.json").exists()


def test_agent_spool_run_frames_read_back_like_single_ones(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    fill(spool, 1, 3)
    # 600 records: three run frames (RUN_RECORDS = 256), then single frames again.
    spool.append_run(4, [payload(s) for s in range(4, 604)])
    fill(spool, 604, 605)
    spool.close()
    again = open_spool(tmp_path, [], cache_bytes=0)
    assert again.last_seq == 605
    assert again.read(1, 1000, 1 << 30) == [(s, payload(s)) for s in range(1, 606)]
    assert seqs(again.read(300, 5, 1 << 30)) == [300, 301, 302, 303, 304]
    again.close()


async def test_agent_spool_a_damaged_end_after_the_run_finished_keeps_its_seqs(tmp_path: Path) -> None:
    """Issue 17: the final state records the last seq, so a corrupt last frame
    cut off on reopening leaves its seqs used (sent as "lost" records), not
    silently gone, and never given to other records."""
    spool = open_spool(tmp_path)
    fill(spool, 1, 6)
    await spool.set_final("succeeded", 0)
    spool.close()
    seg = next(tmp_path.glob("task-1/*.seg"))
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF  # a bit flip inside the last record
    seg.write_bytes(bytes(data))
    warnings: list[str] = []
    again = open_spool(tmp_path, warnings, cache_bytes=0)
    assert again.last_seq == 6
    assert any("6-6 were lost" in w for w in warnings)
    assert seqs(again.read(1, 100, 1 << 20)) == [1, 2, 3, 4, 5]
    again.close()


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20, 8 << 20])
def test_agent_spool_reads_every_kind_of_frame_within_its_limits(tmp_path: Path, cache_bytes: int) -> None:
    """Single, run and lines frames (agent/pipeline/encoding.py LineRun), read
    from the files or the cache: the records from a seq, at most max_records,
    payloads within max_bytes but always one."""
    spool = open_spool(tmp_path, cache_bytes=cache_bytes)
    fill(spool, 1, 3)
    spool.append_run(4, [payload(s, size=s % 50) for s in range(4, 604)])
    run = LineRun("task-1", "2026-01-01T00:00:00.000000Z", "stdout", 1, {}, Block.of([b"l%d" % i for i in range(900)]))
    spool.append_records(604, [run, payload(1504)])
    everything = spool.read(1, 10_000, 1 << 30)
    assert seqs(everything) == list(range(1, 1505))
    assert everything[603:1503] == list(zip(range(604, 1504), run.records(604), strict=True))
    for from_seq, most, max_bytes in [(1, 5, 1 << 30), (500, 300, 1 << 30), (600, 50, 2000), (1400, 1000, 1), (603, 10, 1), (259, 10, 1), (1503, 9, 9)]:
        got = spool.read(from_seq, most, max_bytes)
        want: list[tuple[int, bytes]] = []
        for seq, data in everything[from_seq - 1 :]:
            if len(want) == most or (want and sum(len(p) for _, p in want) + len(data) > max_bytes):
                break
            want.append((seq, data))
        assert got == want, (from_seq, most, max_bytes)
    spool.close()
