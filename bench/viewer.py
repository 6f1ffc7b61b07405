#!/usr/bin/env python3
"""WebSocket viewers for the benchmark, in their own process, written with the
`websockets` package's sans-I/O client protocol on asyncio (a client keruta
does not use itself: the project speaks trio-websocket / wsproto).

    viewer.py --url ws://127.0.0.1:P/api/v1/ws --proto keruta --task T
              --viewers K --expect N [--mode lat] [--stall S] --ready F --out F

--proto keruta: sends {"type":"subscribe","taskId":T}, is ready on
  `subscribed`, counts the records of `logs` (and `log`) frames except the
  agent's own (source "agent"), and checks task seqs: a seq at or below the
  last one seen is a duplicate, a jump is a gap.
--proto raw: one text message per line (websocketd); ready on the handshake;
  checks the line numbers the producer writes the same way.
--stall S: S more connections that subscribe and then never read (their
  socket buffers fill; the server has to cope); they are not waited for.

Receive times are taken once per socket read (time.time_ns, the machine's
clock, so the orchestrator can merge processes). The process ends when every
counting viewer has N lines, or on --timeout, or after --idle s without
progress; it writes one JSON result to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
from functools import partial
from typing import Any

from common import write_json
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri
from wsclient import WsClient

LAT_RE = re.compile(rb"LAT (\d+) (\d+) ")


class Viewer(WsClient):
    def __init__(self, idx: int, a: argparse.Namespace, stalled: bool, on_ready: Any) -> None:
        super().__init__(a.url)
        self.idx = idx
        self.a = a
        self.stalled = stalled
        self.on_ready = on_ready
        self.ready = False
        self.done = asyncio.get_running_loop().create_future()
        self.count = 0
        self.last = 0 if a.proto == "keruta" else -1  # last seq / line number seen
        self.dups = 0
        self.gaps = 0
        self.frames = 0
        self.agent_records = 0
        self.t_first: int | None = None
        self.t_last: int | None = None
        self.lat_us: list[float] = []
        self.error: str | None = None
        self.end: str | None = None

    # -- plumbing -------------------------------------------------------------
    def connection_lost(self, exc: Exception | None) -> None:
        self.finish("connection-lost" if self.count < self.a.expect else "complete")

    def finish(self, why: str) -> None:
        if self.end is None:
            self.end = why
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def mark_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.on_ready()
            if self.stalled and self.transport is not None:
                self.transport.pause_reading()  # never read again

    # -- receiving --------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        t = time.time_ns()
        for ev in self.ws.events_received():
            if isinstance(ev, Response):
                if ev.status_code != 101:
                    self.error = f"handshake status {ev.status_code}"
                    self.finish("handshake-failed")
                    return
                if self.a.proto == "keruta":
                    self.ws.send_text(
                        json.dumps({"type": "subscribe", "taskId": self.a.task}).encode()
                    )
                else:
                    self.mark_ready()
                continue
            if not isinstance(ev, Frame) or ev.opcode not in (Opcode.TEXT, Opcode.BINARY):
                continue  # ping/pong/close: ClientProtocol answers them
            if self.a.proto == "keruta":
                self.keruta_frame(bytes(ev.data), t)
            else:
                self.raw_line(bytes(ev.data), t)
            if self.done.done():
                return
        self.flush()
        if self.ws.handshake_exc is not None and self.error is None:
            self.error = f"handshake: {self.ws.handshake_exc}"[:200]
            self.finish("handshake-failed")

    def got_line(self, t: int, line: bytes) -> None:
        self.count += 1
        if self.t_first is None:
            self.t_first = t
        self.t_last = t
        if self.a.mode == "lat":
            m = LAT_RE.match(line)
            if m:
                self.lat_us.append((t - int(m.group(2))) / 1000.0)
        if self.count >= self.a.expect:
            self.finish("complete")

    def check_seq(self, seq: int) -> bool:
        """False for a duplicate (not counted)."""
        if seq <= self.last:
            self.dups += 1
            return False
        if seq != self.last + 1:
            self.gaps += seq - self.last - 1
        self.last = seq
        return True

    def raw_line(self, payload: bytes, t: int) -> None:
        if self.a.mode == "lat":
            m = LAT_RE.match(payload)
            num = int(m.group(1)) if m else None
        else:
            num = int(payload[:9]) if payload[:9].isdigit() else None
        if num is None:
            return  # not a producer line
        if self.check_seq(num):
            self.got_line(t, payload)

    def keruta_frame(self, payload: bytes, t: int) -> None:
        try:
            m = json.loads(payload)
            typ = m.get("type")
        except (ValueError, AttributeError):
            return
        if typ == "logs":
            recs = m.get("records") or ()
        elif typ == "log":
            recs = (m,)
        elif typ == "subscribed":
            self.mark_ready()
            return
        elif typ == "error":
            self.error = f"hub error {m.get('code')}: {m.get('message')}"[:200]
            self.finish("hub-error")
            return
        else:
            return
        self.frames += 1
        for r in recs:
            seq = r.get("seq")
            if isinstance(seq, int) and not self.check_seq(seq):
                continue
            if r.get("source") == "agent":
                self.agent_records += 1
                continue
            self.got_line(t, r.get("message", "").encode())
            if self.done.done():
                return

    def result(self) -> dict[str, Any]:
        return {
            "idx": self.idx,
            "stalled": self.stalled,
            "count": self.count,
            "t_first": self.t_first,
            "t_last": self.t_last,
            "dups": self.dups,
            "gaps": self.gaps,
            "frames": self.frames,
            "agent_records": self.agent_records,
            "end": self.end,
            "error": self.error,
            "lat_us": self.lat_us,
        }


def _same(v: Viewer) -> Viewer:
    return v


async def run(a: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    wsuri = parse_uri(a.url)
    ready = 0

    def on_ready() -> None:
        nonlocal ready
        ready += 1

    viewers: list[Viewer] = []
    failed: list[dict[str, Any]] = []
    total = a.viewers + a.stall

    async def open_one(i: int) -> None:
        v = Viewer(i, a, i >= a.viewers, on_ready)
        try:
            await asyncio.wait_for(
                loop.create_connection(partial(_same, v), wsuri.host, wsuri.port), 15
            )
            viewers.append(v)
        except (TimeoutError, OSError) as e:
            failed.append({"idx": i, "count": 0, "end": "connect-failed", "error": repr(e)[:200]})

    # 20 at a time: all viewers start close together (websocketd starts a
    # producer per connection) without a stampede on the server's accept queue
    for b in range(0, total, 20):
        await asyncio.gather(*(open_one(i) for i in range(b, min(b + 20, total))))
    deadline = time.monotonic() + a.timeout
    while ready < len(viewers) and time.monotonic() < deadline:
        if all(v.done.done() for v in viewers):
            break
        await asyncio.sleep(0.01)
    if a.ready:
        with open(a.ready + ".tmp", "w") as f:
            f.write(f"{ready} {len(failed)}")
        os.replace(a.ready + ".tmp", a.ready)
    counting = [v for v in viewers if not v.stalled]
    last_total, last_change = -1, time.monotonic()
    while not all(v.done.done() for v in counting):
        now = time.monotonic()
        tot = sum(v.count for v in counting)
        if tot != last_total:
            last_total, last_change = tot, now
        idle = a.idle if tot else a.start_idle
        if now > deadline or now - last_change > idle:
            for v in counting:
                v.finish("timeout" if now > deadline else "idle")
            break
        await asyncio.sleep(0.05)
    for v in viewers:
        v.finish(v.end or "stopped")
    await asyncio.sleep(0.05)
    return {"viewers": [v.result() for v in viewers] + failed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--proto", choices=["keruta", "raw"], required=True)
    ap.add_argument("--task")
    ap.add_argument("--viewers", type=int, default=1)
    ap.add_argument("--stall", type=int, default=0)
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--mode", choices=["tput", "lat"], default="tput")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--idle", type=float, default=15.0)
    ap.add_argument("--start-idle", type=float, default=60.0)
    ap.add_argument("--ready")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not a.url.startswith(("ws://127.0.0.1:", "ws://localhost:")):
        ap.error("loopback only")
    if a.proto == "keruta" and not a.task:
        ap.error("--proto keruta needs --task")
    res = asyncio.run(run(a))
    write_json(a.out, res)


if __name__ == "__main__":
    main()
