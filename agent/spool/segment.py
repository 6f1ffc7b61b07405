"""Spool segment files: the frame format, reading it back, and recovery.

A segment is a sequence of frames ``MAGIC(2) | seq(8) | length(4) | crc32(4) |
payload``, payload being the record's wire JSON, crc32 covering seq and
payload. A run frame (BATCH_MAGIC, same header) holds the records
`seq`, `seq + 1`, ... (up to RUN_RECORDS) of one recorder write, their JSON
joined by ``\n`` (which JSON never holds unescaped): one checksum and one
header per 256 lines instead of per line, where they would be most of the
spool's cost.
A lines frame (LINES_MAGIC, same header) holds up to RUN_LINES_BYTES of plain
lines of one read as they were read, after one line of JSON with what their
records share (agent/pipeline/encoding.py `LineRun`): their records are
encoded when read back, so spooling a line is a split, a checksum and a write.
A run or lines frame that does not check out is lost as a whole. Reading checks every frame; a torn tail (a crash mid-write) is cut
off by `recover`, and a corrupt frame is skipped with a warning by searching
forward for the next valid one, so damage never turns into a crash loop.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from agent.pipeline.encoding import LineRun

MAGIC = b"\xabK"
BATCH_MAGIC = b"\xabR"
LINES_MAGIC = b"\xabL"
HEADER = struct.Struct(">2sQII")  # magic, seq, payload length, crc32(seq + payload)
# A record's JSON is at most a 64 KiB line escaped (up to 6x) plus fields;
# a run frame is cut before it would pass RUN_BYTES.
MAX_PAYLOAD = 8 * 1024 * 1024
RUN_BYTES = 1024 * 1024
# Records in one run frame at most: a frame that does not check out loses
# them all (each is then sent as a "lost" record), so not a whole read's.
RUN_RECORDS = 256
# Bytes of plain lines in one lines frame at most (a longer line goes alone):
# about 200 lines of 80 bytes.
RUN_LINES_BYTES = 16 * 1024
READ_CHUNK = 1024 * 1024
SEGMENT_SUFFIX = ".seg"

Warn = Callable[[str], None]


def encode_frame(seq: int, payload: bytes) -> bytes:
    seq_bytes = seq.to_bytes(8, "big")
    crc = zlib.crc32(payload, zlib.crc32(seq_bytes))
    return HEADER.pack(MAGIC, seq, len(payload), crc) + payload


def encode_run(first_seq: int, payloads: list[bytes]) -> tuple[bytes, bytes]:
    """One run frame for the records `first_seq`, `first_seq + 1`, ...: its
    header and its payload (written together with writev, not copied into one).
    The payloads hold no raw newline (the caller's promise: checking it here
    cost as much as the checksum)."""
    data = b"\n".join(payloads)
    crc = zlib.crc32(data, zlib.crc32(first_seq.to_bytes(8, "big")))
    return HEADER.pack(BATCH_MAGIC, first_seq, len(data), crc), data


def encode_lines(first_seq: int, run: LineRun) -> tuple[bytes, bytes, bytes]:
    """One lines frame for `run` (at most RUN_RECORDS lines), seqs from
    `first_seq`: its header, the run's head line and its lines, for writev."""
    head = run.head() + b"\n"
    data = run.block.data
    crc = zlib.crc32(data, zlib.crc32(head, zlib.crc32(first_seq.to_bytes(8, "big"))))
    return HEADER.pack(LINES_MAGIC, first_seq, len(head) + len(data), crc), head, data


_MAGICS = (MAGIC, BATCH_MAGIC, LINES_MAGIC)


def _check(header_seq: int, payload: bytes, crc: int) -> bool:
    return zlib.crc32(payload, zlib.crc32(header_seq.to_bytes(8, "big"))) == crc


class Segment:
    def __init__(self, path: Path, first_seq: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.last_seq = first_seq - 1  # nothing yet
        self.size = 0
        self.fd: int | None = None  # open for appending (the active segment only)
        self.read_fd: int | None = None

    def reader_fd(self) -> int:
        if self.read_fd is None:
            self.read_fd = os.open(self.path, os.O_RDONLY)
        return self.read_fd

    def close(self) -> None:
        for fd in (self.fd, self.read_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.read_fd = None


class _Window:
    """Buffered positional reads of one file region [0, end)."""

    def __init__(self, fd: int, end: int) -> None:
        self.fd = fd
        self.end = end
        self.buf = b""
        self.at = 0

    def get(self, pos: int, n: int) -> bytes | None:
        if pos + n > self.end:
            return None
        if not (self.at <= pos and pos + n <= self.at + len(self.buf)):
            self.at = pos
            self.buf = os.pread(self.fd, min(max(n, READ_CHUNK), self.end - pos), pos)
            if len(self.buf) < n:
                return None
        i = pos - self.at
        return self.buf[i : i + n]

    def find(self, needle: bytes, start: int) -> int:
        """Position of the next `needle` at or after `start`, or `end`."""
        while start < self.end:
            chunk = self.get(start, min(READ_CHUNK, self.end - start))
            if not chunk:
                break
            i = chunk.find(needle)
            if i != -1:
                return start + i
            start += max(1, len(chunk) - len(needle) + 1)
        return self.end


def scan(
    fd: int, offset: int, end: int, warn: Warn | None = None, where: str = ""
) -> Iterator[tuple[int, int, bytes, int]]:
    """Valid records in [offset, end): (frame offset, seq, payload, next offset);
    the records of a run or lines frame are all found at the frame's offset."""
    for pos, seq, frame, nxt in scan_frames(fd, offset, end, warn, where):
        for i, record in enumerate(frame.records()):
            yield pos, seq + i, record, nxt


@attrs.frozen
class Frame:
    """A valid frame's records, as stored: `count` of them, made by `records()`."""

    magic: bytes
    first_seq: int
    payload: bytes

    @property
    def count(self) -> int:
        if self.magic == MAGIC:
            return 1
        if self.magic == BATCH_MAGIC:
            return self.payload.count(b"\n") + 1
        head, _, data = self.payload.partition(b"\n")
        return data.count(b"\n") + 1

    def records(self) -> list[bytes]:
        if self.magic == MAGIC:
            return [self.payload]
        if self.magic == BATCH_MAGIC:
            return self.payload.split(b"\n")
        return LineRun.parse(self.payload).records(self.first_seq)


def scan_frames(
    fd: int, offset: int, end: int, warn: Warn | None = None, where: str = ""
) -> Iterator[tuple[int, int, Frame, int]]:
    """Valid frames in [offset, end): (offset, first seq, frame, next offset).

    A frame that does not check out (bad magic, length or checksum, or running
    past `end`) is skipped by searching for the next MAGIC that starts a
    valid frame; a skipped run followed by a valid frame is reported through
    `warn`. A bad run at the very end is not reported here: the caller sees
    that the last frame ends before `end` (a torn tail).
    """
    window = _Window(fd, end)
    pos = offset
    bad_since: int | None = None
    while pos + HEADER.size <= end:
        header = window.get(pos, HEADER.size)
        if header is None:
            break
        magic, seq, length, crc = HEADER.unpack(header)
        if magic in _MAGICS and length <= MAX_PAYLOAD:
            payload = window.get(pos + HEADER.size, length)
            if payload is not None and _check(seq, payload, crc):
                if bad_since is not None and warn is not None:
                    warn(
                        f"spool {where}: skipped {pos - bad_since} corrupt bytes at offset {bad_since}"
                    )
                bad_since = None
                nxt = pos + HEADER.size + length
                yield pos, seq, Frame(magic, seq, payload), nxt
                pos = nxt
                continue
        if bad_since is None:
            bad_since = pos
        # Any kind of frame: the magics all start with this byte.
        pos = window.find(MAGIC[:1], pos + 1)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def writev_all(fd: int, parts: list[bytes]) -> None:
    """Write `parts` in order, in one writev(2) when the kernel takes it all."""
    if len(parts) > 512:
        write_all(fd, b"".join(parts))
        return
    done = os.writev(fd, parts)
    if done < sum(map(len, parts)):
        write_all(fd, b"".join(parts)[done:])


def write_atomically(path: Path, data: bytes, durable: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def recover(seg: Segment, warn: Warn, end_seq: int | None = None) -> None:
    """Find a segment's last seq and size; cut a torn or corrupt tail off,
    and any frame past `end_seq` (the finished run's last seq)."""
    size = seg.path.stat().st_size
    fd = os.open(seg.path, os.O_RDONLY)
    good_end = 0
    last = seg.first_seq - 1
    past_end = False
    try:
        for off, first, frame, nxt in scan_frames(fd, 0, size, warn, str(seg.path)):
            if end_seq is not None and first > end_seq:
                good_end, past_end = off, True
                break
            good_end = nxt
            last = max(last, first + frame.count - 1)
    finally:
        os.close(fd)
    seg.last_seq = last
    seg.size = size
    if good_end < size:
        if past_end:
            warn(
                f"spool {seg.path}: cut off {size - good_end} bytes written after the run ended "
                f"(its final state ends at seq {end_seq}): no line of its command"
            )
        else:
            warn(
                f"spool {seg.path}: cut off {size - good_end} bytes of a torn or corrupt "
                "record at its end (written when a previous agent stopped mid-write)"
            )
        os.truncate(seg.path, good_end)
        seg.size = good_end
