"""An acknowledged SQLite append survives SIGKILL of the process that made it."""

from __future__ import annotations

import subprocess
import sys

import trio

from hub.store.sqlite import SQLiteStore
from tests.storedata import all_seqs

_KILLED_WRITER = """
import sys, trio
from hub.store.base import Incoming
from hub.store.sqlite import SQLiteStore

async def main():
    store = SQLiteStore(sys.argv[1])
    await store.open()
    seq = 0
    while True:
        batch = [Incoming("t1", seq + i, "2026-01-01T00:00:00.000000Z", "stdout", "INFO", "x" * 100)
                 for i in range(1, 51)]
        result = await store.append(batch)
        seq += 50
        print(result.durable["t1"], flush=True)

trio.run(main)
"""


async def test_sqlite_acknowledged_appends_survive_sigkill(tmp_path):
    path = tmp_path / "k.db"
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE
    )
    acked = 0
    buffer = b""
    try:
        assert proc.stdout is not None
        with trio.fail_after(60):
            while acked < 2000:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the writer died"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if lines:
                    acked = int(lines[-1])
    finally:
        proc.kill()  # SIGKILL, in the middle of later appends
        await proc.wait()
    store = SQLiteStore(path)
    await store.open()
    try:
        durable = await store.durable_seq("t1")
        assert durable >= acked
        assert durable % 50 == 0  # whole batches only
        assert await all_seqs(store) == list(range(1, durable + 1))
        assert (await store.stats("t1")).total_logs == durable
    finally:
        await store.close()
