#!/usr/bin/env python3
"""The floor under "latency at 100 lines/s": a line's way with keruta's
hops and its one durable step, and nothing else.

    python bench/latency_floor.py hub --port-file F --db PATH
    python bench/latency_floor.py relay --port P -- CMD ...

bench/run.py's latency scenario starts both beside keruta and websocketd,
the same producer writing a line every 10 ms and the same viewer reading:

- `relay` (the agent's place): a Trio process that starts CMD, reads its
  stdout pipe and sends what it reads over one TCP connection. No line
  splitting, no spool, no rate limit, no WebSocket framing.
- `hub`: a Trio server. Each line from the relay is committed to SQLite
  (WAL, one INSERT and COMMIT, synchronous=OFF, no fsync at all) in a
  worker thread by the hub's own hop (hub/store/thread_hop.py), as the hub
  commits before a viewer sees a line (house rule: nothing that can block
  on the event loop); then it goes to every WebSocket viewer as one text
  frame. No JSON, no seqs, no acks, no subscribe.

So it is the least a Python design on the card's stack spends on a line
that must be committed before it is shown: three process crossings (command
-> relay -> hub -> viewer) and a worker-thread round trip. websocketd makes
two crossings and stores nothing.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RELAY_HELLO = b"RELAY\n"


def _open_db(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("CREATE TABLE IF NOT EXISTS lines (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    return conn


def _commit(conn: sqlite3.Connection, line: bytes) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO lines (body) VALUES (?)", (line,))
    conn.execute("COMMIT")


def hub(port_file: str, db: str) -> None:
    import trio

    from hub.store.thread_hop import run_in_thread
    from hub.ws_frames import server_frame
    from hub.ws_handshake import Upgrade, accept_response, head_end, upgrade_of

    conn = _open_db(db)
    viewers: set[Any] = set()

    async def relay(stream: Any, data: bytes) -> None:
        buffer = data
        while True:
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                await run_in_thread(_commit, conn, line)
                frame = server_frame(line.decode())
                for viewer in list(viewers):
                    try:
                        await viewer.send_all(frame)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        viewers.discard(viewer)
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data

    async def viewer(stream: Any, head: bytes) -> None:
        upgrade = upgrade_of(head, frozenset(["/"]))
        if not isinstance(upgrade, Upgrade):
            return  # not a handshake, or one upgrade_of refuses (the floor answers neither)
        await stream.send_all(accept_response(upgrade, None))
        viewers.add(stream)
        try:
            # Read what the viewer sends (nothing that needs an answer) until it leaves.
            while await stream.receive_some(65536):
                pass
        finally:
            viewers.discard(stream)

    async def handler(stream: Any) -> None:
        buffer = b""
        while True:
            if buffer.startswith(RELAY_HELLO):
                await relay(stream, buffer[len(RELAY_HELLO) :])
                return
            end = head_end(buffer)
            if end > 0:
                await viewer(stream, buffer[:end])
                return
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            Path(port_file).write_text(str(listeners[0].socket.getsockname()[1]))

    trio.run(main)


def relay(port: int, command: list[str]) -> int:
    import trio

    async def main() -> int:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(RELAY_HELLO)
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
        assert process.stdout is not None
        async with stream:
            while data := await process.stdout.receive_some(65536):
                await stream.send_all(data)
        return await process.wait()

    return trio.run(main)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    h = sub.add_parser("hub")
    h.add_argument("--port-file", required=True)
    h.add_argument("--db", required=True)
    r = sub.add_parser("relay")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("command", nargs="+")
    a = ap.parse_args()
    if a.role == "hub":
        hub(a.port_file, a.db)
        return 0
    return relay(a.port, a.command)


if __name__ == "__main__":
    sys.exit(main())
