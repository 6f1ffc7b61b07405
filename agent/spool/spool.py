"""The durable local spool: every record is written here before it is sent,
and kept until the hub has acknowledged it.

Layout, one directory per task under the spool root::

    ROOT/TASK_ID/task.json      taskId, hub URL, producer id, final state once known
    ROOT/TASK_ID/producer       the producer id again, written once: a damaged task.json
                                gets it back (a new id would have the hub store it all twice)
    ROOT/TASK_ID/acked          the ack watermark: every seq <= it is stored by the hub
    ROOT/TASK_ID/summary.json   the summary (keruta/summary.py) of records 1..`through`,
                                saved before any segment is deleted
    ROOT/TASK_ID/lock           held (flock) by the one process using this spool; the
                                lock is the inode linked there now (see spoollock.py)
    ROOT/TASK_ID/SEQ.seg        segments, named by their first seq, append-only

Segments hold checksummed frames (agent/spool/segment.py): a torn tail is cut off
when the spool is opened, a corrupt frame is skipped with a warning. Segments
whose records are all acknowledged are deleted. The lock: agent/spool/lock.py.

The spool keeps the producer's summary of every record it was given (counts
and digest, keruta/summary.py; the final `status` frame carries it). Its
records are tallied when they are read to be sent, not when they are
appended: hashing a record costs more than capturing and spooling it, and
the command waits on the appends (with the hub down a whole run, the
hashing is left to `flush`). `summary()` reads and tallies what was never
read. The tally is always of records 1..N, each counted once: it grows
only from its own end, N + 1. It must outlive the agent as the records do,
for `flush` to send it: before segments are deleted, the tally so far goes
to summary.json (durably, like the watermark), and only the segments it
covers may go; reopening takes it up from there. The final state in
task.json holds the whole summary when it was complete by then.
The disk budget (`max_bytes`, `used_bytes`) counts every file of the directory:
segments with their frame headers, task.json and `acked`.

The seqs are the producer's own (docs/identity.md): `producer` in task.json
names this spool's run to the hub, which gives each record its task seq. So
that a seq is never used twice for different lines, the `acked` file is made
durable before any segment it covers is deleted: on reopen the highest seq is
the larger of it and the segments' last.

Writes are plain `write(2)` calls, so a record survives the agent being
killed as soon as `append` returns; `sync` (called on a timer by the agent)
fsyncs what was written since, which covers a machine crash up to that
interval.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import trio

from agent.pipeline.encoding import LineRun
from agent.spool.lock import lock_directory, task_directory
from agent.spool.meta import PRODUCER_FILE, kept_producer, read_meta
from agent.spool.recent import RecentRecords, take
from agent.spool.segment import (
    BATCH_MAGIC,
    HEADER,
    MAGIC,
    RUN_BYTES,
    RUN_LINES_BYTES,
    RUN_RECORDS,
    SEGMENT_SUFFIX,
    Frame,
    Segment,
    Warn,
    encode_frame,
    encode_lines,
    encode_run,
    recover,
    scan_frames,
    write_atomically,
    writev_all,
)
from keruta.limits import INT64_MAX
from keruta.records import SOURCES
from keruta.summary import Summary, Tally


class Spool:
    """One task's spool, owned by one process (an flock on `lock`)."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 16 << 20,
        cache_bytes: int = 8 << 20,
        warn: Warn | None = None,
    ) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        # Small limits (tests) get small segments so that release frees space.
        self.segment_bytes = max(4096, min(segment_bytes, max_bytes // 8))
        self.cache_bytes = cache_bytes
        self.warn: Warn = warn or (lambda _m: None)
        self.segments: list[Segment] = []
        self.acked_seq = 0
        self.last_seq = 0
        self.meta: dict[str, Any] = {}
        self._recent = RecentRecords(cache_bytes)
        self._cursor: tuple[Segment, int, int] | None = None  # segment, offset, next seq
        self._unsynced: list[int] = []  # dup'ed fds written since the last sync
        self._dirty = False
        # Set when a segment written since the last sync is retired.
        self._retired = trio.Event()
        self._saved_ack = 0
        # The highest acked seq whose watermark is on disk and fsynced: only
        # segments at or below it may be deleted (the watermark must outlive
        # them: it is all that remembers their seqs were used).
        self._durable_ack = 0
        self._meta_lock = trio.Lock()
        self._lock_fd: int | None = None
        self._used = 0  # bytes in segment files
        self._small: dict[str, int] = {}  # task.json, acked, summary.json: their sizes
        # The summary of records 1.._tallied (tallied when read to be sent, or
        # by `summary`); None when it cannot be known (a spool written before
        # summaries, whose deleted records were not counted; a record lost).
        self.tally: Tally | None = Tally()
        self._tallied = 0
        self._tally_saved = 0  # the last seq summary.json covers

    # --- opening ------------------------------------------------------------

    @classmethod
    def open(
        cls,
        root: Path,
        task_id: str,
        *,
        hub_url: str | None = None,
        create: bool = True,
        lock_fd: int | None = None,
        **kwargs: Any,
    ) -> Spool:
        """Open (`create`: or make) a task's spool and lock it for this process.

        `lock_fd`: the directory's lock, taken already (agent/launch.py); the
        spool owns it from here on, and closes it when opening fails.
        Without `create` (flush), a directory that is not a complete spool --
        e.g. one its agent is removing right now -- is FileNotFoundError.
        """
        try:
            directory = task_directory(root, task_id)
        except ValueError:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        spool = cls(directory, **kwargs)
        spool._lock_fd = lock_directory(directory, create) if lock_fd is None else lock_fd
        try:
            if not create and not (directory / "task.json").exists():
                raise FileNotFoundError(f"{directory} holds no spooled task")
            spool._load(task_id, hub_url)
        except BaseException:
            spool.close()
            raise
        return spool

    def _load(self, task_id: str, hub_url: str | None) -> None:
        self.meta, changed = read_meta(self.dir / "task.json", task_id, hub_url, self.warn)
        for name in ("task.json", "acked", SUMMARY_FILE, PRODUCER_FILE):
            try:
                self._small[name] = (self.dir / name).stat().st_size
            except OSError:
                pass
        if changed:
            # At open, before the run's tasks start: nothing waits on this thread yet.
            self._write_meta()
        if kept_producer(self.dir / PRODUCER_FILE) != self.meta["producer"]:
            try:
                write_atomically(self.dir / PRODUCER_FILE, self.meta["producer"].encode(), durable=True)
                self._small[PRODUCER_FILE] = len(self.meta["producer"])
            except OSError as exc:
                self.warn(f"spool {self.dir}: cannot save {PRODUCER_FILE}: {exc}")
        try:
            self.acked_seq = int((self.dir / "acked").read_text().strip() or 0)
        except FileNotFoundError:
            self.acked_seq = 0
        except (ValueError, OSError) as exc:
            self.warn(f"spool {self.dir}: unreadable ack watermark ({exc}); resending everything")
            self.acked_seq = 0
        self._saved_ack = self.acked_seq
        self._durable_ack = self.acked_seq
        self.last_seq = self.acked_seq
        final = self.meta.get("final")
        final_last = final.get("lastSeq") if isinstance(final, dict) else None
        # A run that continues a spool clears its final state first (`resume`):
        # frames past a final state's last seq are not its run's.
        end = final_last if isinstance(final_last, int) else None
        for path in sorted(self.dir.glob("*" + SEGMENT_SUFFIX)):
            try:
                first = int(path.stem)
            except ValueError:
                continue
            if end is not None and first > end:
                self.warn(f"spool {path}: written after the run ended (its final state ends at seq {end}); removed")
                path.unlink(missing_ok=True)
                continue
            seg = Segment(path, first)
            recover(seg, self.warn, end)
            self.segments.append(seg)
        for seg in self.segments:
            self.last_seq = max(self.last_seq, seg.last_seq)
            self._used += seg.size
        if isinstance(final_last, int) and final_last > self.last_seq:
            # A corrupt or torn tail was cut off after the run had finished:
            # these seqs were used, and are sent as "lost" records, not reused.
            self.warn(
                f"spool {self.dir}: records {self.last_seq + 1}-{final_last} were lost "
                "(a corrupt end of the spool); the hub gets a record saying so for each"
            )
            self.last_seq = final_last
        self.tally = self._recover_tally(final)
        self._delete_acked_segments()

    def _recover_tally(self, final: Any) -> Tally | None:
        """The tally an earlier process left: the final state's (of every
        record), or summary.json's (of records 1..`through`; the rest are
        still in the segments, tallied as they are read). Sets `_tallied`."""
        if isinstance(final, dict) and isinstance(final.get("summary"), dict):
            try:
                tally = Tally.from_json(final["summary"])
            except (KeyError, TypeError, ValueError):
                pass
            else:
                # Of records 1..N, N being its count.
                self._tallied = tally.records
                return tally
        through, tally = 0, Tally()
        try:
            saved = orjson.loads((self.dir / SUMMARY_FILE).read_bytes())
            through, tally = saved["through"], Tally.from_json(saved)
        except FileNotFoundError:
            pass
        except (orjson.JSONDecodeError, OSError, KeyError, TypeError, ValueError) as exc:
            self.warn(f"spool {self.dir}: unreadable {SUMMARY_FILE} ({exc}); the run's summary is unknown")
            return None
        self._tally_saved = self._tallied = through
        return tally

    def _tally_to(self, seq: int) -> None:
        """Tally the records from `_tallied + 1` through `seq` at least
        (whole runs or frames: perhaps further), from the cache or else the
        segments; the tally becomes unknown if one of them cannot be read."""
        if self.tally is None or self._tallied >= seq:
            return
        if not self._recent.holds(self._tallied + 1):
            for first, frame in self._read_files(self._tallied + 1):
                # False: a corrupt frame was skipped, its records are not known.
                if first + frame.count > self._tallied + 1 and not self._tally_stored(first, frame):
                    break
                if self._tallied >= seq or self._recent.holds(self._tallied + 1):
                    break
        tally = self.tally
        if tally is None:
            return
        try:
            for first, records in self._recent.runs_from(self._tallied + 1):
                if self._tallied >= seq:
                    break
                if first > self._tallied + 1:
                    break
                self._tallied = _tally_run(tally, first, records, self._tallied + 1)
        except (KeyError, TypeError, ValueError):
            # Not a record's JSON (only tests write such): no summary can be given.
            self.tally = None
            return
        if self._tallied < seq:
            self.tally = None

    def _tally_stored(self, first: int, frame: Frame) -> bool:
        """Tally a frame read from a segment if it continues the tally (True:
        the tally holds its records now)."""
        if self.tally is None or not first <= self._tallied + 1 < first + frame.count:
            return False
        try:
            _tally_frame(self.tally, first, frame, self._tallied + 1)
        except (KeyError, TypeError, ValueError):
            self.tally = None
            return False
        self._tallied = first + frame.count - 1
        return True

    # --- writing ------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """The bytes in the spool's directory: its segments, task.json and
        the ack watermark. What `max_bytes` bounds."""
        return self._used + sum(self._small.values())

    def frame_size(self, payload_len: int) -> int:
        return HEADER.size + payload_len

    def has_room(self, nbytes: int) -> bool:
        return self.used_bytes + nbytes <= self.max_bytes

    def append(self, entries: list[tuple[int, bytes]]) -> None:
        """Write records, a frame each; their seqs must continue `last_seq` one by one."""
        if not entries:
            return
        expected = self.last_seq + 1
        parts = []
        for seq, payload in entries:
            if seq != expected:
                raise ValueError(f"spool append out of order: seq {seq}, expected {expected}")
            expected += 1
            parts.append(encode_frame(seq, payload))
        self._write([b"".join(parts)], entries[0][0], entries[-1][0])
        self._recent.append(entries)

    def append_run(self, first_seq: int, payloads: list[bytes]) -> None:
        """`append_records` of encoded records only."""
        self.append_records(first_seq, list(payloads))

    def append_records(self, first_seq: int, pieces: list[bytes | LineRun]) -> None:
        """Write the records `first_seq`, `first_seq + 1`, ... (continuing
        `last_seq`) in one writev(2): each piece is one record's JSON or a
        LineRun of plain lines (their records encoded when read back). The
        recorder's path, with no Python per line: consecutive records go in
        run frames of at most RUN_RECORDS, lines in lines frames of at most
        RUN_LINES_BYTES (or one longer line). A record's
        JSON must not hold a raw newline (JSON never does; a run frame
        separates its records with it)."""
        if not pieces:
            return
        if first_seq != self.last_seq + 1:
            raise ValueError(f"spool append out of order: seq {first_seq}, expected {self.last_seq + 1}")
        parts: list[bytes] = []
        recent: list[tuple[int, list[bytes] | LineRun]] = []
        seq = first_seq
        i = 0
        while i < len(pieces):
            piece = pieces[i]
            if isinstance(piece, LineRun):
                for run in piece.split(RUN_LINES_BYTES):
                    parts += encode_lines(seq, run)
                    recent.append((seq, run))
                    seq += run.count
                i += 1
                continue
            end = i
            while end < len(pieces) and not isinstance(pieces[end], LineRun):
                end += 1
            payloads = cast(list[bytes], pieces[i:end])
            parts += self._run_frames(seq, payloads)
            recent.append((seq, payloads))
            seq += len(payloads)
            i = end
        self._write(parts, first_seq, seq - 1)
        for start, records in recent:
            self._recent.append_run(start, records)

    @staticmethod
    def _run_frames(first_seq: int, payloads: list[bytes]) -> list[bytes]:
        parts: list[bytes] = []
        for start in range(0, len(payloads), RUN_RECORDS):
            chunk = payloads[start : start + RUN_RECORDS]
            if sum(map(len, chunk)) <= RUN_BYTES:
                parts += encode_run(first_seq + start, chunk)
                continue
            # Long lines: cut where RUN_BYTES is reached.
            begin, size = 0, 0
            for i, payload in enumerate(chunk):
                if i > begin and size + len(payload) > RUN_BYTES:
                    parts += encode_run(first_seq + start + begin, chunk[begin:i])
                    begin, size = i, 0
                size += len(payload) + 1
            parts += encode_run(first_seq + start + begin, chunk[begin:])
        return parts

    def lines_size(self, run: LineRun) -> int:
        """At least what `append_records` takes on disk for `run`."""
        # A cut leaves at least RUN_LINES_BYTES in every other frame.
        frames = 2 * -(-len(run.block.data) // RUN_LINES_BYTES) + 1
        return len(run.block.data) + frames * (HEADER.size + len(run.head()) + 8)

    def _write(self, parts: list[bytes], first_seq: int, last_seq: int) -> None:
        size = sum(map(len, parts))
        seg = self._active(size, first_seq)
        assert seg.fd is not None
        try:
            writev_all(seg.fd, parts)
        except OSError:
            # Leave no half frame behind (e.g. the disk filled up mid-write).
            try:
                os.ftruncate(seg.fd, seg.size)
            except OSError:
                pass
            raise
        seg.size += size
        self._used += size
        seg.last_seq = last_seq
        self.last_seq = last_seq
        self._dirty = True

    def _active(self, incoming: int, first_seq: int) -> Segment:
        seg = self.segments[-1] if self.segments else None
        if seg is not None and seg.fd is None:
            seg.fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
        if seg is None or (seg.size and seg.size + incoming > self.segment_bytes):
            if seg is not None:
                self._retire(seg)
            path = self.dir / f"{first_seq:020d}{SEGMENT_SUFFIX}"
            seg = Segment(path, first_seq)
            seg.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.segments.append(seg)
            self._dirty = True
        return seg

    def _retire(self, seg: Segment) -> None:
        """Stop appending to `seg`; it still gets fsynced at the next sync."""
        if seg.fd is not None:
            if self._dirty:
                self._unsynced.append(os.dup(seg.fd))
                self._retired.set()
            os.close(seg.fd)
            seg.fd = None

    def resume(self) -> None:
        """A new run continues this spool (the earlier run's lines are not all
        delivered): the earlier run's final state goes, durably, before this
        run appends, so its lines are not taken for bytes written past a run's
        end, and a run that dies is not reported with the earlier run's end.
        The tally that final state held is kept in summary.json. At open,
        before the run's tasks start."""
        if self.meta.get("final") is None:
            return
        if self.tally is not None and self._tally_saved != self._tallied:
            tally = orjson.dumps({"through": self._tallied, **self.tally.to_json()})
            try:
                write_atomically(self.dir / SUMMARY_FILE, tally, durable=True)
            except OSError as exc:
                self.warn(f"spool {self.dir}: cannot save the summary: {exc}")
            else:
                self._small[SUMMARY_FILE] = len(tally)
                self._tally_saved = self._tallied
        self.meta["final"] = None
        data = orjson.dumps(self.meta)
        write_atomically(self.dir / "task.json", data, durable=True)
        self._small["task.json"] = len(data)

    async def set_final(self, state: str, exit_code: int | None) -> None:
        # With the last seq: a reopened spool whose tail was damaged still
        # knows how many records it held, and sends a "lost" record for each.
        self.meta["final"] = {"state": state, "exitCode": exit_code, "lastSeq": self.last_seq}
        # Only when every record is tallied already (this is the command's
        # end, no time to hash what was not sent); else reopening takes the
        # tally up from summary.json and the segments.
        if self.tally is not None and self._tallied == self.last_seq:
            self.meta["final"]["summary"] = self.tally.to_json()
        await self._save_meta()

    def summary(self) -> Summary | None:
        """The summary of every record given to the spool (None: not known),
        tallying those not read yet."""
        self._tally_to(self.last_seq)
        return None if self.tally is None else self.tally.summary(self.last_seq)

    async def mark_final_delivered(self) -> None:
        if self.meta.get("final") is not None:
            self.meta["final"]["delivered"] = True
            await self._save_meta()

    async def _save_meta(self) -> None:
        """task.json, fsynced before it replaces the old one (it names the
        producer: a torn one would make a resend look new), in a worker thread."""
        async with self._meta_lock:
            await trio.to_thread.run_sync(self._write_meta)

    def _write_meta(self) -> None:
        data = orjson.dumps(self.meta)
        try:
            write_atomically(self.dir / "task.json", data, durable=True)
        except OSError as exc:
            self.warn(f"spool {self.dir}: cannot save task.json: {exc}")
        else:
            self._small["task.json"] = len(data)

    async def segment_retired(self) -> None:
        """Wait until a segment with writes not yet fsynced is no longer
        appended to: syncing it then, rather than at the next tick, leaves a
        fast command's end (`sync` after its last line) less to wait for."""
        await self._retired.wait()

    async def sync(self) -> None:
        """fsync what was written since the last call, and make the ack
        watermark durable, in a worker thread; then delete the segments the
        durable watermark covers."""
        acked = self.acked_seq
        if acked > self._durable_ack:
            # The summary so far goes with the watermark: once the segments are
            # gone it is all that remembers what they held. Encoded here, where
            # the tally changes; written in the worker thread.
            through = self._tallied
            tally = None
            if self.tally is not None and self._tally_saved != through:
                tally = orjson.dumps({"through": through, **self.tally.to_json()})
            if await trio.to_thread.run_sync(self._persist_progress, acked, tally):
                self._small["acked"] = len(f"{acked}\n")
                self._saved_ack = acked
                if tally is not None:
                    self._small[SUMMARY_FILE] = len(tally)
                    self._tally_saved = through
                self._durable_ack = max(self._durable_ack, acked)
                self._delete_acked_segments()
        if not self._dirty:
            return
        fds = self._unsynced
        self._unsynced = []
        self._dirty = False
        if self._retired.is_set():
            self._retired = trio.Event()
        try:
            if self.segments and self.segments[-1].fd is not None:
                fds.append(os.dup(self.segments[-1].fd))
            fds.append(os.open(self.dir, os.O_RDONLY))  # new segment names
        except OSError as exc:
            self.warn(f"spool {self.dir}: cannot fsync: {exc}")

        def work() -> None:
            for fd in fds:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    self.warn(f"spool {self.dir}: fsync failed: {exc}")
                finally:
                    os.close(fd)

        await trio.to_thread.run_sync(work)

    # --- acknowledging --------------------------------------------------------

    @property
    def unacked(self) -> int:
        return max(0, self.last_seq - self.acked_seq)

    def release(self, seq: int) -> None:
        """The hub has stored every record up to `seq`."""
        if seq <= self.acked_seq:
            return
        self.acked_seq = min(seq, self.last_seq) if seq > self.last_seq else seq
        # What the hub stored was sent, and so is tallied already, unless an
        # earlier process sent it: then it is tallied now, while the cache may
        # still hold it (a segment goes only once the tally covers it).
        self._tally_to(self.acked_seq)
        self._recent.release(self.acked_seq)
        # The segments go at the next sync, once the watermark is durable:
        # its fsync does not run here, on the event loop.

    @property
    def producer(self) -> str:
        producer = self.meta["producer"]
        assert isinstance(producer, str), "agent.spool.meta gives every spool a producer"
        return producer

    def _delete_acked_segments(self) -> None:
        keep = []
        # Only what the durable watermark covers, and, while the summary is
        # known, what summary.json already counts (it alone will remember them).
        limit = self._durable_ack if self.tally is None else min(self._durable_ack, self._tally_saved)
        for i, seg in enumerate(self.segments):
            is_active = i == len(self.segments) - 1
            done = seg.last_seq <= limit
            # The active segment goes too once it is worth it: a fresh one starts
            # at the next append.
            if done and (not is_active or seg.size >= self.segment_bytes // 4 or seg.size == 0):
                if self._cursor is not None and self._cursor[0] is seg:
                    self._cursor = None
                self._used -= seg.size
                seg.close()
                try:
                    seg.path.unlink()
                except FileNotFoundError:
                    pass
            else:
                keep.append(seg)
        self.segments = keep

    def _persist_progress(self, acked: int, tally: bytes | None) -> bool:
        """Write the summary so far (if given) and the ack watermark `acked`,
        each fsynced, and fsync the directory (in a worker thread); False if
        that failed."""
        try:
            if tally is not None:
                write_atomically(self.dir / SUMMARY_FILE, tally, durable=True)
        except OSError as exc:
            self.warn(f"spool {self.dir}: cannot save the summary: {exc}")
            return False
        try:
            write_atomically(self.dir / "acked", f"{acked}\n".encode(), durable=True)
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.warn(f"spool {self.dir}: cannot save the ack watermark: {exc}")
            return False
        return True

    def save_watermark(self) -> None:
        """Persist the ack watermark (not fsynced: a stale one only means resending)."""
        if self.acked_seq != self._saved_ack:
            try:
                data = f"{self.acked_seq}\n".encode()
                write_atomically(self.dir / "acked", data)
            except OSError as exc:
                self.warn(f"spool {self.dir}: cannot save the ack watermark: {exc}")
                return
            self._small["acked"] = len(data)
            self._saved_ack = self.acked_seq

    # --- reading --------------------------------------------------------------

    def read(self, from_seq: int, max_records: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Up to `max_records` records with seq >= `from_seq`, in order, whose
        payloads total at most `max_bytes` (but always at least one record)."""
        out: list[tuple[int, bytes]] = []
        if from_seq > self.last_seq or max_records <= 0:
            return out
        total = 0
        recent = self._recent.read(from_seq, max_records, max_bytes)
        if recent is not None:
            out = recent
        else:
            for first, frame in self._read_files(from_seq):
                if first + frame.count <= from_seq:
                    continue
                # Tallied in the same pass (below: whatever this did not).
                self._tally_stored(first, frame)
                total, full = take(out, first, frame.records(), from_seq, max_records, max_bytes, total)
                if full:
                    break
        if out:
            # What is read is sent: the summary counts it now (once: the
            # tally only grows from its end).
            self._tally_to(out[-1][0])
        return out

    def _read_files(self, from_seq: int) -> Iterator[tuple[int, Frame]]:
        cursor = self._cursor
        start_index = 0
        offset = 0
        if cursor is not None and cursor[2] <= from_seq and cursor[0] in self.segments:
            start_index = self.segments.index(cursor[0])
            offset = cursor[1]
        else:
            for i, seg in enumerate(self.segments):
                if seg.first_seq <= from_seq:
                    start_index = i
        for seg in self.segments[start_index:]:
            if seg.last_seq < from_seq:
                offset = 0
                continue
            fd = seg.reader_fd()
            for off, first, frame, _nxt in scan_frames(fd, offset, seg.size, self.warn, str(seg.path)):
                # A read from `first` on starts at this frame.
                self._cursor = (seg, off, first)
                yield first, frame
            offset = 0

    # --- closing --------------------------------------------------------------

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        for fd in self._unsynced:
            os.close(fd)
        self._unsynced = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        """Delete the task's directory (everything delivered).

        Everything but `lock` goes while we hold it, then `lock` itself, still
        held: from then on another process may create a new `lock` and own a
        new spool here, so nothing else is unlinked after it; the directory
        goes only if it is still empty.
        """
        # task.json first: without it the directory is no longer a task to flush.
        (self.dir / "task.json").unlink(missing_ok=True)
        for seg in self.segments:
            seg.close()
            seg.path.unlink(missing_ok=True)
        self.segments = []
        self._used = 0
        self._small = {}
        for name in (
            "acked", "acked.tmp", "task.json", "task.json.tmp", SUMMARY_FILE, SUMMARY_FILE + ".tmp",
            PRODUCER_FILE, PRODUCER_FILE + ".tmp",
        ):
            (self.dir / name).unlink(missing_ok=True)
        (self.dir / "lock").unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                self.warn(f"spool {self.dir}: could not remove the directory: {exc}")
            # Not empty: another run of the task has started here; it is its spool now.
        finally:
            self.close()


SUMMARY_FILE = "summary.json"


def _largest_summary() -> int:
    big = INT64_MAX
    counts = dict.fromkeys(SOURCES, big)
    return len(orjson.dumps({"through": big, **Tally(big, counts, dict(counts), 0).to_json()}))


# The most a summary takes, in summary.json or in task.json's final state.
SUMMARY_ROOM = _largest_summary()


def _tally_run(tally: Tally, first: int, records: list[bytes] | LineRun, from_seq: int) -> int:
    """Add the records `first`, `first + 1`, ... from `from_seq` on; the last seq."""
    if isinstance(records, LineRun):
        lines = records.block.lines
        skip = from_seq - first
        tally.add_lines(from_seq, records.source, records.first_line + skip, lines[skip:] if skip else lines)
        return first + len(lines) - 1
    for seq, payload in enumerate(records[from_seq - first :], from_seq):
        tally.add_record(seq, orjson.loads(payload))
    return first + len(records) - 1


def _tally_frame(tally: Tally, first: int, frame: Frame, from_seq: int) -> None:
    """Add a stored frame's records from `from_seq` on."""
    if frame.magic in (MAGIC, BATCH_MAGIC):
        _tally_run(tally, first, frame.records(), from_seq)
    else:
        _tally_run(tally, first, LineRun.parse(frame.payload), from_seq)
