"""agent/earlyread.py: a command's pipe read in a thread while the agent
starts, bounded by a budget, then handed over to the capture with nothing
lost, doubled or reordered. Real pipes and threads; waits have a hang guard
only."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from agent.earlyread import READ_BYTES, Budget, EarlyReader

PATIENCE = 60.0


def wait_until(condition: Callable[[], bool]) -> None:
    give_up = time.monotonic() + PATIENCE  # hang guard, not a performance claim
    while not condition():
        assert time.monotonic() < give_up
        time.sleep(0.001)


def pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)  # as agent/process.py gives it
    return r, w


def write_then_close(fd: int, data: bytes) -> threading.Thread:
    def work() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.close(fd)

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def read_to_end(fd: int) -> bytes:
    os.set_blocking(fd, True)
    out = bytearray()
    while chunk := os.read(fd, 1 << 16):
        out += chunk
    os.close(fd)
    return bytes(out)


def joined(chunks: list[tuple[float, bytes]]) -> bytes:
    return b"".join(data for _, data in chunks)


def test_a_spent_budget_stops_the_reads_and_the_rest_follows_in_order() -> None:
    # More than the budget: the thread stops, the pipe fills and holds the writer.
    data = bytes(range(256)) * (12 * 1024)  # 3 MiB
    r, w = pipe()
    writer = write_then_close(w, data)
    budget = Budget(1 << 20)
    reader = EarlyReader(r, budget)
    wait_until(lambda: budget.left <= 0)
    chunks, ended = reader.take()
    assert not ended
    early = joined(chunks)
    assert 1 << 20 <= len(early) <= (1 << 20) + READ_BYTES
    assert early + read_to_end(r) == data
    writer.join()
    # Each chunk carries the time it was read, in order.
    times = [at for at, _ in chunks]
    assert times == sorted(times)


def test_two_pipes_share_one_budget() -> None:
    data = b"x" * (3 << 20)
    pipes = [pipe() for _ in range(2)]
    writers = [write_then_close(w, data) for _, w in pipes]
    budget = Budget(1 << 20)
    readers = [EarlyReader(r, budget) for r, _ in pipes]
    wait_until(lambda: budget.left <= 0)
    taken = [reader.take() for reader in readers]
    assert sum(len(joined(chunks)) for chunks, _ in taken) <= (1 << 20) + 2 * READ_BYTES
    for (r, _), (chunks, _) in zip(pipes, taken, strict=True):
        assert joined(chunks) + read_to_end(r) == data
    for writer in writers:
        writer.join()


def test_a_pipe_that_ends_while_read_early_is_ended() -> None:
    r, w = pipe()
    os.write(w, b"one\ntwo")  # the last line without its newline
    os.close(w)
    reader = EarlyReader(r, Budget())
    wait_until(lambda: reader.ended)
    chunks, ended = reader.take()
    assert ended
    assert joined(chunks) == b"one\ntwo"
    os.close(r)


def test_taken_at_once_nothing_is_lost_or_doubled() -> None:
    # The handover in the middle of a stream: what the thread did not read
    # is still in the pipe, for the capture.
    data = b"".join(b"line %d\n" % i for i in range(200_000))
    for _ in range(20):
        r, w = pipe()
        writer = write_then_close(w, data)
        chunks, ended = EarlyReader(r, Budget()).take()
        rest = b"" if ended else read_to_end(r)
        if ended:
            os.close(r)
        assert joined(chunks) + rest == data
        writer.join()
