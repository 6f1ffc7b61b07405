#!/usr/bin/env python3
"""What a one-record `logs` frame costs a server before keruta stores it,
and with keruta's store: the floors under the fleet's "hub CPU per frame"
(bench/fleet.py).

    python bench/fleet.py --server hypercorn-floor --producers 1000 --rate 5 --viewers 0
    python bench/fleet.py --server trio-floor --producers 1000 --rate 5 --viewers 0
    python bench/fleet.py --server trio-store-floor --producers 1000 --rate 5 --viewers 0

bench/fleet.py starts this file (`--kind`, `--port-file`) in place of the
hub and drives it with the same load generators. For every text frame the
server decodes the JSON (orjson, as the hub does) and answers at once with
the `ack` the hub would send for it (the frame's last record's seq): no
validation, no store, no commit, no viewers. So its CPU per frame is what
reading a frame, decoding it and writing its answer cost on that stack,
the least any hub on it spends (the first two kinds):

- `hypercorn`: hypercorn's Trio worker with keruta's patches
  (hub/hypercorn_patches.py: its frame parser, the frame taken in
  hypercorn's read task) and the hub's WebSocket settings, serving a bare
  ASGI app (tests/support.py's `websocket_app`) that answers through ASGI's
  `send`.
- `trio`: `trio.serve_tcp`, one task per connection: the hub's handshake code,
  frames parsed by hub/ws_frames.py, each read's answers in one `send_all`.
  No hypercorn, no ASGI: what a WebSocket endpoint written on Trio alone
  would reach.
- `trio-store`: the `trio` server that also stores what it acks, as the hub
  must: each frame decoded and checked by the hub's own decoder
  (hub/ingest.py); one task commits whatever is waiting, paced as the hub's
  writer paces its commits (hub/actors/pacing.py), with keruta's SQLite
  store (the identity rule's rows, the chunks; its chunk merges too), while
  another syncs each commit (the next commit goes on meanwhile, as with the
  hub's syncer) and then writes its frames' acks straight to their sockets.
  No viewers, no REST, no per-connection bounds, no outage handling: the
  least a hub on this stack that keeps the contract's store spends a frame.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bare_server  # noqa: E402
from bare_server import KINDS  # noqa: E402

_PATHS = frozenset(["/api/v1/ws"])


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


async def _handshake(stream: Any) -> bytes | None:
    """Reads the upgrade request and accepts it, with the hub's own handshake
    code (hub/ws_handshake.py); what came after it, None at EOF or for a
    request that is no WebSocket handshake of ours."""
    from hub.ws_handshake import Upgrade, accept_response, head_end, upgrade_of

    buf = b""
    while (end := head_end(buf)) < 0:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    upgrade = upgrade_of(buf[:end], _PATHS)
    if not isinstance(upgrade, Upgrade):
        return None
    await stream.send_all(accept_response(upgrade, None))
    return buf[end:]


async def _trio_handler(stream: Any) -> None:
    from hub.ws_frames import ClientFrames, Ping, pong_frame, server_frame

    data = await _handshake(stream)
    if data is None:
        return
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


class _Committer:
    """trio-store's writer and syncer, as the hub has them: group commits of
    whatever the connections decoded meanwhile; while one commit's fsync is
    under way the next commits; each frame acked once its commit is synced."""

    def __init__(self, db: str) -> None:
        import trio

        from hub.actors.pacing import CommitPacing
        from hub.config import HubConfig
        from hub.store import open_store_from_url

        self.store = open_store_from_url(db)
        self.pacing = CommitPacing(HubConfig().write_pace)
        self.waiting: list[tuple[int, list[Any], bytes]] = []
        self.wake = trio.Event()
        self.committed: list[tuple[int, list[Any], bytes]] = []
        self.sync_due = trio.Event()
        self.upkeep_due = trio.Event()

    def submit(self, fd: int, items: list[Any], ack: bytes) -> None:
        self.waiting.append((fd, items, ack))
        self.wake.set()

    async def run(self) -> None:
        import trio

        await self.store.open()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sync)
            nursery.start_soon(self._upkeep)
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                await trio.sleep_until(self.pacing.earliest(trio.current_time()))
                batch, self.waiting = self.waiting, []
                self.pacing.started(trio.current_time())
                result = await self.store.append([item for _, items, _ in batch for item in items])
                self.committed += batch
                self.sync_due.set()
                if result.compact:
                    await self.store.compact(result.compact)
                self.pacing.ended(waiting=bool(self.waiting))

    async def _sync(self) -> None:
        import trio

        while True:
            await self.sync_due.wait()
            self.sync_due = trio.Event()
            batch, self.committed = self.committed, []
            await self.store.sync()
            for fd, _, ack in batch:
                # Non-blocking, as the hub writes its inline acks: a small ack to an idle socket goes whole.
                if os.write(fd, ack) != len(ack):
                    raise RuntimeError("the floor writes each ack whole or not at all")
            self.upkeep_due.set()

    async def _upkeep(self) -> None:
        import trio

        while True:
            await self.upkeep_due.wait()
            self.upkeep_due = trio.Event()
            await self.store.upkeep()


_committer: _Committer | None = None


async def _trio_store_handler(stream: Any) -> None:
    from hub.config import HubConfig
    from hub.ingest import RowsFrame, decode_frame
    from hub.ws_frames import ClientFrames, Ping, pong_frame, server_frame

    assert _committer is not None, "serve() makes it"
    limits = HubConfig().limits
    data = await _handshake(stream)
    if data is None:
        return
    frames = ClientFrames()
    fd = stream.socket.fileno()
    while True:
        if data:
            messages, rest = frames.feed(data)
            if rest is not None:
                return
            for m in messages:
                if isinstance(m, Ping):
                    await stream.send_all(pong_frame(m.payload))
                    continue
                frame = decode_frame(m, limits)
                if not isinstance(frame, RowsFrame):
                    return  # the floor takes well-formed logs frames only
                _committer.submit(fd, list(frame.items), server_frame(ack_for(m).decode()))
        data = await stream.receive_some(65536)
        if not data:
            return


def serve(kind: str, port_file: str) -> None:
    if kind != "trio-store":
        bare_server.serve(kind, port_file, _trio_handler, _hypercorn_body)
        return
    import trio

    global _committer
    # Beside the port file: in the run's own temp dir (bench/fleet.py).
    _committer = _Committer(f"sqlite:///{Path(port_file).resolve().parent / 'floor.db'}")

    async def main() -> None:
        assert _committer is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_committer.run)
            nursery.start_soon(bare_server.serve_trio, port_file, _trio_store_handler)

    trio.run(main)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=(*KINDS, "trio-store"), required=True)
    ap.add_argument("--port-file", required=True)
    a = ap.parse_args()
    serve(a.kind, a.port_file)


if __name__ == "__main__":
    main()
