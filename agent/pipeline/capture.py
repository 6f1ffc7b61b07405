"""Capture: one actor per pipe turns the command's bytes into batches of lines.

    pipe ─► StreamMasker ─┬─► mirror (the agent's own stdout/stderr)
                          └─► LineSplitter ─► LineNumbering ─► LineBatch ─► recorder

One read of the pipe makes one LineBatch; the recorder (agent/pipeline/recorder.py)
gives the lines their seqs and spools them. The pipes are trio's non-blocking
fd streams (no thread per read). What the command wrote while the agent
started was read by a thread (agent/earlyread.py): the capture takes that
over first, each chunk with the time it was read, then reads the pipe itself.
After a read that found little it pauses (earlyread.PAUSE) before the next,
so that a command writing line by line is not woken, nor the agent, for
every line.
"""

from __future__ import annotations

import collections
import datetime as dt
import errno
import os
import stat
from collections.abc import Callable, Sequence

import trio

from agent.earlyread import PAUSE, EarlyReader, little
from agent.pipeline.linesplit import Block, Line, LineSplitter
from agent.pipeline.messages import CaptureMessage, LineBatch
from keruta.limits import DEFAULT_LIMITS, Limits
from keruta.masking import StreamMasker
from keruta.timefmt import UTC, format_ts, now_ts

# One read (and so one LineBatch, one spool write) at most: large enough that
# the work per read is small beside the work per line.
READ_SIZE = 256 * 1024


class Mirror:
    """Writes the (masked) output to one of the agent's own file descriptors.

    To a pipe or a terminal the write happens in a worker thread: our stdout
    may be slow, and making fd 1 non-blocking would change it for everyone
    sharing it. A regular file or /dev/null cannot hold us up, and is written
    directly: a thread hop per read would cost more than the write.
    """

    def __init__(self, fd: int, say: Callable[[str], None]) -> None:
        self.fd = fd
        self.say = say
        self.broken = False
        self.direct = _never_blocks(fd)

    async def write(self, data: bytes) -> None:
        if self.broken or not data:
            return
        try:
            if self.direct:
                _write_all(self.fd, data)
            else:
                await trio.to_thread.run_sync(_write_all, self.fd, data)
        except OSError as exc:
            self.broken = True
            if exc.errno != errno.EPIPE:
                self.say(f"cannot mirror output to fd {self.fd} any more: {exc}")


def _never_blocks(fd: int) -> bool:
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return True
        if stat.S_ISCHR(st.st_mode):
            return st.st_rdev == os.stat(os.devnull).st_rdev
    except OSError:
        pass
    return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def receive_or_eof(stream: trio.abc.ReceiveStream) -> bytes:
    try:
        return bytes(await stream.receive_some(READ_SIZE))
    except trio.BrokenResourceError as exc:
        # A pty master reads EIO once the child side is closed: that is EOF.
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EIO:
            return b""
        raise


class PipeReads:
    """One pipe's chunks in order, each with the time it was read: what
    `early` read while the agent started, then the capture's own reads of
    `stream`. Takes the pipe over from `early` when made."""

    def __init__(self, stream: trio.abc.ReceiveStream, early: EarlyReader | None = None) -> None:
        self.stream = stream
        self.backlog: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ended = False
        self._pause = False
        fileno = getattr(stream, "fileno", None)
        self._little = little(fileno(), READ_SIZE) if fileno is not None else 0
        if early is not None:
            chunks, self.ended = early.take()
            self.backlog.extend(chunks)

    async def next(self) -> tuple[bytes, str]:
        """The next chunk and its read time; b"" at the pipe's end."""
        if self.backlog:
            at, chunk = self.backlog.popleft()
            return chunk, format_ts(dt.datetime.fromtimestamp(at, UTC))
        if self.ended:
            return b"", now_ts()
        if self._pause:
            await trio.sleep(PAUSE)
        chunk = await receive_or_eof(self.stream)
        self._pause = 0 < len(chunk) < self._little
        return chunk, now_ts()


# At the end of a capture, how long its last lines wait to be spooled before they are shown anyway.
SPOOLED_WAIT = 5.0


async def capture(
    stream: trio.abc.ReceiveStream,
    source: str,
    recorder: trio.MemorySendChannel[CaptureMessage],
    masker: StreamMasker,
    mirror: Mirror | None,
    limits: Limits = DEFAULT_LIMITS,
    on_read: Callable[[], None] | None = None,
    early: EarlyReader | None = None,
) -> None:
    """Read `stream` (after what `early` read of it) to its end; every line
    goes to the recorder, every byte (masked) to the mirror. Cancelled, it
    still records what it had buffered. Closes its send end to the recorder
    when it ends."""
    splitter = LineSplitter(limits.max_line_bytes)
    numbering = LineNumbering()
    with recorder:
        try:
            # Before the first checkpoint: the thread is stopped even if this is cancelled at once.
            reads = PipeReads(stream, early)
            while True:
                chunk, ts = await reads.next()
                if not chunk:
                    break
                if on_read is not None:
                    on_read()
                data = masker.feed(chunk)
                lines = numbering.number(splitter.feed_blocks(data))
                if mirror is None:
                    if lines:
                        await recorder.send(LineBatch(source, ts, lines))
                    continue
                if lines:
                    # Shown only once spooled: a line on the user's screen is never
                    # one that a SIGKILL of the agent could lose.
                    spooled = trio.Event()
                    await recorder.send(LineBatch(source, ts, lines, spooled))
                    await spooled.wait()
                await mirror.write(data)
        finally:
            # Also when the read was cancelled: what was buffered is recorded and shown.
            data = masker.flush()
            lines = numbering.number([*splitter.feed_blocks(data), *splitter.finish()])
            with trio.CancelScope(shield=True):
                if lines:
                    spooled = trio.Event()
                    await recorder.send(LineBatch(source, now_ts(), lines, spooled))
                    if mirror is not None:
                        # Bounded: a recorder already gone must not hold the shutdown.
                        with trio.move_on_after(SPOOLED_WAIT):
                            await spooled.wait()
                if mirror is not None and data:
                    await mirror.write(data)


class LineNumbering:
    """lineNumber per source, from 1; the pieces of one long line share it.
    A Block gets the number of its first line (the rest follow one by one)."""

    def __init__(self) -> None:
        self.current = 0
        self._open = False

    def number(self, lines: Sequence[Line | Block]) -> list[tuple[Line | Block, int]]:
        out: list[tuple[Line | Block, int]] = []
        for line in lines:
            if isinstance(line, Block):
                # Only whole lines make a Block: no piece is open before it.
                out.append((line, self.current + 1))
                self.current += line.count
                continue
            if not self._open:
                self.current += 1
            out.append((line, self.current))
            self._open = line.partial
        return out
