#!/usr/bin/env python3
"""What a one-record `logs` frame costs a server before keruta stores it:
the floor under the fleet's "hub CPU per frame" (bench/fleet.py).

    python bench/fleet.py --server hypercorn-floor --producers 1000 --rate 5 --viewers 0
    python bench/fleet.py --server trio-floor --producers 1000 --rate 5 --viewers 0

bench/fleet.py starts this file (`--kind`, `--port-file`) in place of the
hub and drives it with the same load generators. For every text frame the
server decodes the JSON (orjson, as the hub does) and answers at once with
the `ack` the hub would send for it (the frame's last record's seq): no
validation, no store, no commit, no viewers. So its CPU per frame is what
reading a frame, decoding it and writing its answer cost on that stack,
the least any hub on it spends:

- `hypercorn`: hypercorn's Trio worker with keruta's patches
  (hub/hypercorn_patches.py: its frame parser, the frame taken in
  hypercorn's read task) and the hub's WebSocket settings, serving a bare
  ASGI app (tests/support.py's `websocket_app`) that answers through ASGI's
  `send`.
- `trio`: `trio.serve_tcp`, one task per connection: the handshake by hand,
  frames parsed by hub/ws_frames.py, each read's answers in one `send_all`.
  No hypercorn, no ASGI: what a WebSocket endpoint written on Trio alone
  would reach.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bare_server  # noqa: E402
from bare_server import KINDS  # noqa: E402

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ack_for(text: str | bytes) -> bytes:
    """The hub's ack for a `logs` frame (its last record's seq), as JSON."""
    import orjson

    frame = orjson.loads(text)
    return orjson.dumps(
        {"type": "ack", "taskId": frame["taskId"], "producer": frame["producer"], "seq": frame["records"][-1]["seq"]}
    )


async def _hypercorn_body(receive: Any, send: Any, _link: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        await send({"type": "websocket.send", "text": ack_for(message.get("text") or message["bytes"]).decode()})


async def _trio_handler(stream: Any) -> None:
    from hub.ws_frames import ClientFrames, Ping, pong_frame, server_frame

    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
    head, _, data = buf.partition(b"\r\n\r\n")
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    frames = ClientFrames()
    while True:
        if data:
            messages, rest = frames.feed(data)
            if rest is not None:
                return  # a close or a frame the fast path leaves to wsproto: the floor stops there
            out = [pong_frame(m.payload) if isinstance(m, Ping) else server_frame(ack_for(m).decode()) for m in messages]
            if out:
                await stream.send_all(b"".join(out))
        data = await stream.receive_some(65536)
        if not data:
            return


def serve(kind: str, port_file: str) -> None:
    bare_server.serve(kind, port_file, _trio_handler, _hypercorn_body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=KINDS, required=True)
    ap.add_argument("--port-file", required=True)
    a = ap.parse_args()
    serve(a.kind, a.port_file)


if __name__ == "__main__":
    main()
