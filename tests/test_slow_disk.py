"""A hub on a slow disk: the event loop never waits for an fsync.

A disk whose fsync takes most of a second (a busy network volume, a dying
SSD) must slow acknowledgements, which wait for the disk, but nothing else:
viewers, pings and health checks are served by the event loop, so no fsync
may run on its thread, neither SQLite's own (a checkpoint, a WAL header)
nor the store's. The hub runs with a shim preloaded (LD_PRELOAD, compiled
here) that makes every fsync and fdatasync of the process slow and notes
which thread asked for it: the loop is the process's main thread.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from tests.hubclient import PATIENCE, batch_frames, make_record, ws_connect
from tests.support import HubProcess, sqlite_url

# Every fsync of the hub process takes this long.
SLOW_SYNC_MS = 600

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Note the call (which thread: the main one runs the event loop), then
   wait SLOW_SYNC_MS before letting the real call through. */
static void slow(const char *what) {
    const char *log = getenv("SLOW_SYNC_LOG");
    const char *ms = getenv("SLOW_SYNC_MS");
    if (log) {
        char line[64];
        int main_thread = syscall(SYS_gettid) == getpid();
        int n = snprintf(line, sizeof line, "%s %s\n", what, main_thread ? "main" : "worker");
        int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (fd >= 0) {
            if (write(fd, line, n) < 0) {}
            close(fd);
        }
    }
    if (ms) {
        long t = atol(ms);
        struct timespec d = {t / 1000, (t % 1000) * 1000000L};
        while (nanosleep(&d, &d) != 0) {}
    }
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow("fsync");
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow("fdatasync");
    return real(fd);
}
"""


@pytest.fixture(scope="module")
def slow_sync_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the slow-fsync shim")
    where = tmp_path_factory.mktemp("shim")
    (where / "slowsync.c").write_text(SHIM)
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-o", str(where / "slowsync.so"), str(where / "slowsync.c"), "-ldl"],
        check=True,
    )
    return where / "slowsync.so"


def sync_calls(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [(what, thread) for what, thread in (line.split() for line in log.read_text().splitlines())]


async def test_a_slow_fsync_never_stops_the_event_loop(tmp_path: Path, slow_sync_shim: Path) -> None:
    """Small batches stream in (16 records of 3 KB a frame, each its own
    commit) while another connection pings the hub. The batches are enough
    WAL for SQLite's old automatic checkpoint (1000 pages) to have run in one
    of their commits, an fsync of the WAL and one of the database each.
    Every record is acknowledged, so the disk was synced, but never from the
    loop's thread, and no pong waits as long as one fsync; a clean shutdown
    (the last connection's close checkpoints) keeps off the loop too."""
    log = tmp_path / "syncs.log"
    env = {"LD_PRELOAD": str(slow_sync_shim), "SLOW_SYNC_LOG": str(log), "SLOW_SYNC_MS": str(SLOW_SYNC_MS)}
    # A preload takes effect only when an interpreter starts: a hub process.
    hub = HubProcess(sqlite_url(tmp_path / "slow.db"), env=env)
    await trio.to_thread.run_sync(hub.start)
    task, total, per_frame = "slow-disk", 2_400, 16
    message = "x" * 3_000
    frames = list(
        batch_frames(task, 1, total, per_frame, make=lambda t, s: make_record(t, s, message))
    )
    pongs: list[float] = []
    done = trio.Event()
    try:
        started_with = len(sync_calls(log))

        async def ping_until_done() -> None:
            async with ws_connect(hub.ws_url) as viewer:
                while not done.is_set():
                    start = trio.current_time()
                    await viewer.conn.ping()
                    pongs.append(trio.current_time() - start)
                    await trio.sleep(0.02)

        with trio.fail_after(PATIENCE):
            async with ws_connect(hub.ws_url) as producer, trio.open_nursery() as nursery:
                nursery.start_soon(ping_until_done)
                for frame in frames:
                    await producer.send(frame)
                    await trio.sleep(0.015)  # one frame a commit: small, as a quiet agent's
                await producer.wait_ack(task, total)
                done.set()
        running = sync_calls(log)[started_with:]
    finally:
        code = await trio.to_thread.run_sync(hub.terminate)
    at_close = sync_calls(log)[started_with + len(running) :]

    assert code == 0, hub.output
    assert running, "no fsync while records were acknowledged: the shim did not take"
    on_loop = [call for call in running + at_close if call[1] == "main"]
    worst = max(pongs)
    print(f"{len(running)} fsyncs while streaming, {len(at_close)} at close; "
          f"{len(pongs)} pings, slowest pong {worst * 1000:.0f} ms")
    assert not on_loop, f"{len(on_loop)} fsyncs ran on the event loop's thread: {on_loop}"
    # Not a speed target: a loop that waited on even one fsync would be this late.
    assert worst < SLOW_SYNC_MS / 1000 / 2, f"a pong waited {worst * 1000:.0f} ms"

