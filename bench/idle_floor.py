#!/usr/bin/env python3
"""What an idle connection costs a server built on the card's packages,
before any keruta code: the floor under the fleet's "5,000 idle connections"
figure (bench/fleet.py --rate 0).

    python bench/idle_floor.py --connections 5000

For each server kind, starts it in its own process, opens N connections from
this one (asyncio), waits until every one is established (a WebSocket's
handshake answered), and reports the server's RSS before and after, and the
difference per connection:

- `trio`: trio.serve_tcp, one task per connection reading its stream (the
  least any Trio server holds per connection: a task, a socket, a stream).
- `hypercorn`: hypercorn's Trio worker with keruta's patches
  (hub/hypercorn_patches.py) and the hub's WebSocket settings, serving an
  ASGI app that accepts the WebSocket and waits for its next message.

The keruta hub's own figure is bench/fleet.py's, with the same clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import bare_server  # noqa: E402
from fleet import status_kib  # noqa: E402
from wsclient import WsClient  # noqa: E402

KINDS = ("trio", "hypercorn")


async def _trio_handler(stream: Any) -> None:
    while await stream.receive_some(65536):
        pass


async def _wait_for_disconnect(receive: Any, _send: Any, _link: Any) -> None:
    while (await receive())["type"] != "websocket.disconnect":
        pass


def serve(kind: str, port_file: str) -> None:
    bare_server.serve(kind, port_file, _trio_handler, _wait_for_disconnect)


class _Idle(WsClient):
    def __init__(self, url: str, opened: asyncio.Future[None]) -> None:
        super().__init__(url)
        self.opened = opened

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        self.ws.events_received()
        if self.ws.handshake_exc is not None and not self.opened.done():
            self.opened.set_exception(self.ws.handshake_exc)
        elif not self.opened.done() and self.ws.state.name == "OPEN":
            self.opened.set_result(None)


async def connect_all(kind: str, port: int, n: int) -> list[Any]:
    loop = asyncio.get_running_loop()
    held: list[Any] = []
    for start in range(0, n, 200):
        waits = []
        for _ in range(start, min(n, start + 200)):
            if kind == "trio":
                transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
                held.append(transport)
            else:
                opened: asyncio.Future[None] = loop.create_future()
                transport, _ = await loop.create_connection(
                    lambda opened=opened: _Idle(f"ws://127.0.0.1:{port}/ws", opened), "127.0.0.1", port
                )
                held.append(transport)
                waits.append(opened)
        await asyncio.gather(*waits)
    return held


def measure(kind: str, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        server = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port-file", str(port_file)])
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the {kind} server did not start")
                time.sleep(0.05)
            port = int(port_file.read_text())
            time.sleep(0.5)
            before = status_kib(server.pid, "VmRSS")

            async def hold() -> int:
                held = await connect_all(kind, port, n)
                await asyncio.sleep(2.0)  # everything accepted and settled
                after = status_kib(server.pid, "VmRSS")
                for transport in held:
                    transport.close()
                return after

            after = asyncio.run(hold())
        finally:
            server.terminate()
            server.wait(10)
    return {
        "kind": kind,
        "connections": n,
        "rss_before_mb": round(before / 1024, 1),
        "rss_after_mb": round(after / 1024, 1),
        "kb_per_connection": round((after - before) / n, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve, a.port_file)
        return
    for kind in a.kinds.split(","):
        print(json.dumps(measure(kind, a.connections)), flush=True)


if __name__ == "__main__":
    main()
