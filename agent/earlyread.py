"""The command's pipes read from the moment it starts, while the agent is
still starting (importing Trio and the pipeline, opening the spool): one
thread per pipe reads into memory until the capture takes the pipe over.

Without it a pipe's 1 MiB fills in milliseconds and a fast command waits on
the agent's start-up. What is read is bounded (`limit` bytes a pipe): past
that the thread stops reading and the full pipe holds the command back, as
it would without the thread. Each chunk keeps the time it was read, which
its lines' records carry.

Imported before the command starts: the standard library only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import threading
import time

# One read: a whole pipe (agent/process.py PIPE_BYTES).
READ_BYTES = 1 << 20
# Most bytes read ahead of the capture, the command's pipes together (one
# read more at most). The agent's start-up after the command's is about
# 0.1 s (more on a busy machine), in which a command writing 200 MB/s
# writes 20 MB; past this it waits for the capture.
LIMIT_BYTES = 32 << 20
# After a read that found little, the pause before the next: a read woken by
# every line a command writes costs it a wakeup a line (the reader's and its
# own); the pipe holds what comes meanwhile.
PAUSE = 0.001


def little(fd: int, most: int) -> int:
    """Below how many bytes a read of pipe `fd` (asking for `most`) found
    little: half of what it could have found. 0 for what is not a pipe
    (a pty's master reads at most a few KiB at a time: it never pauses)."""
    try:
        capacity = fcntl.fcntl(fd, getattr(fcntl, "F_GETPIPE_SZ", 1032))
    except OSError:
        return 0
    return min(capacity, most) // 2


class Budget:
    """What the early readers of one command may still read, in bytes."""

    def __init__(self, nbytes: int = LIMIT_BYTES) -> None:
        self.left = nbytes
        self._lock = threading.Lock()

    def spend(self, nbytes: int) -> None:
        with self._lock:
            self.left -= nbytes


class EarlyReader:
    """Reads pipe `fd` (non-blocking) in a thread until `take`, while
    `budget` lasts."""

    def __init__(self, fd: int, budget: Budget) -> None:
        self.fd = fd
        self.budget = budget
        # (time.time() of the read, bytes read), in order.
        self.chunks: list[tuple[float, bytes]] = []
        # The pipe ended (every writer closed it) while the thread read it.
        self.ended = False
        self._little = little(fd, READ_BYTES)
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._read, name=f"early-read-{fd}", daemon=True
        )
        self._thread.start()

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        poller.register(self.fd, select.POLLIN)
        while self.budget.left > 0:
            ready = poller.poll()
            if any(fd == self._stop_r for fd, _ in ready):
                return
            try:
                data = os.read(self.fd, READ_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                # A pty's master reads EIO once the command's side is closed:
                # that is its end. Any other error: the capture meets it again.
                self.ended = exc.errno == errno.EIO
                return
            if not data:
                self.ended = True
                return
            self.chunks.append((time.time(), data))
            self.budget.spend(len(data))
            if len(data) < self._little:
                time.sleep(PAUSE)
        # Spent: the pipe waits for the capture.

    def take(self) -> tuple[list[tuple[float, bytes]], bool]:
        """Stop the thread; what it read and whether the pipe ended. The
        caller reads the pipe from here on. Once only."""
        thread = self._thread
        assert thread is not None, "taken already"
        self._thread = None
        os.write(self._stop_w, b"x")
        thread.join()
        os.close(self._stop_r)
        os.close(self._stop_w)
        chunks, self.chunks = self.chunks, []
        return chunks, self.ended
