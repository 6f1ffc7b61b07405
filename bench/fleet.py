#!/usr/bin/env python3
"""A fleet against one hub: many producer connections, each sending small frames.

    python bench/fleet.py --producers 1000 --rate 5 --viewers 50 --viewer-tasks 10 --seconds 20
    python bench/fleet.py --producers 1000 --mode agent --rate 20    # shaped as keruta-agent sends
    python bench/fleet.py --producers 5000 --rate 0 --seconds 5      # connected and idle

Starts a hub (SQLite in a temp dir, or --db), --gens load generator
processes (this file, `--role gen`) sharing the producers, and one viewer
process (`--role view`). Each producer has its own WebSocket connection,
producer id and task (--tasks: fewer tasks are shared round-robin).

--mode flat: every producer sends a one-record `logs` frame --rate times a
  second (evenly spaced, random phase), whatever is in flight.
--mode agent: lines arrive --rate times a second per producer and go as
  keruta-agent sends them: agent/link/batcher.py's Batcher with the agent's
  settings (eager_frames=2, flush_interval 0.2 s, 500 records a frame), told
  by each ack whether the hub is behind (its `backlog`).

Reports frames/s offered and taken (acknowledged), ack latency p50/p99 (a
line's send -> the first ack covering its producer seq; in agent mode also
`line_p50/p99_ms`, from a line's arrival, its wait in the batcher included),
lines lost or
doubled per viewer (task seqs) and in the store (each task's totalLogs
against the lines its producers sent, every line acknowledged), the hub's
peak RSS (VmHWM) and its CPU per frame: utime + stime of the hub process
from the first send to the last ack, divided by the frames acknowledged.
Load generators and viewers use the `websockets` sans-I/O protocol on
asyncio (a client keruta does not use itself).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from wsclient import WsClient  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
TS = "2026-11-28T12:00:00.000Z"


def task_name(run: str, i: int) -> str:
    return f"fleet-{run}-{i:05d}"


def producer_name(run: str, i: int) -> str:
    return f"p-{run}-{i:05d}"


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process, its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# --- the WebSocket plumbing (websockets' sans-I/O client on asyncio) ----------------

class Conn(WsClient):
    """One WebSocket connection; `on_text(payload)` per text frame."""

    def __init__(self, url: str, on_open: Any, on_text: Any) -> None:
        super().__init__(url)
        self.on_open = on_open
        self.on_text = on_text
        self.open = False
        self.lost = False

    def send_text(self, text: str) -> None:
        self.ws.send_text(text.encode())
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Frame, Opcode
        from websockets.http11 import Response

        self.ws.receive_data(data)
        for ev in self.ws.events_received():
            if isinstance(ev, Response):
                if ev.status_code == 101:
                    self.open = True
                    self.on_open()
                continue
            if isinstance(ev, Frame) and ev.opcode is Opcode.TEXT:
                self.on_text(bytes(ev.data))
        self.flush()


async def open_all(url: str, conns: list[Conn], batch: int = 50) -> None:
    from websockets.uri import parse_uri

    loop = asyncio.get_running_loop()
    u = parse_uri(url)

    async def one(c: Conn) -> None:
        for attempt in range(5):
            try:
                await asyncio.wait_for(loop.create_connection(lambda: c, u.host, u.port), 30)
                return
            except (TimeoutError, OSError):
                await asyncio.sleep(0.2 * (attempt + 1))
        raise RuntimeError("could not connect")

    for b in range(0, len(conns), batch):
        await asyncio.gather(*(one(c) for c in conns[b : b + batch]))
    deadline = time.monotonic() + 60
    while not all(c.open for c in conns):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sum(not c.open for c in conns)} handshakes did not finish")
        await asyncio.sleep(0.01)


async def wait_file(path: str) -> None:
    while not os.path.exists(path):
        await asyncio.sleep(0.005)


def write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


# --- a load generator ---------------------------------------------------------------

class Producer:
    def __init__(self, a: argparse.Namespace, index: int, pad: str) -> None:
        self.a = a
        self.task = task_name(a.run, index % a.tasks)
        self.producer = producer_name(a.run, index)
        self.pad = pad
        self.conn = Conn(a.url, lambda: None, self.on_text)
        self.seq = 0  # the last seq made (a line exists)
        self.sent_seq = 0  # the last seq sent
        self.acked = 0
        self.sent_at: dict[int, float] = {}
        self.latencies: list[float] = []
        # agent mode: when each line arrived (it may wait in the batcher
        # before its frame goes), and arrival -> ack.
        self.made_at: dict[int, float] = {}
        self.line_latencies: list[float] = []
        self.frames = 0
        self.errors: list[str] = []
        self.batcher: Any = None
        # agent mode: each unacknowledged frame's last seq and bytes.
        self.in_flight: list[tuple[int, int]] = []
        self.wake: Any = None
        self.backlogs: list[int] = []

    def record(self, seq: int) -> dict[str, Any]:
        return {"taskId": self.task, "seq": seq, "timestamp": TS, "source": "stdout", "level": "INFO",
                "message": f"{seq:09d} {self.pad}", "lineNumber": seq, "metadata": {}}

    def send_through(self, last: int) -> int:
        recs = [self.record(s) for s in range(self.sent_seq + 1, last + 1)]
        now = time.perf_counter()
        for s in range(self.sent_seq + 1, last + 1):
            self.sent_at[s] = now
        self.sent_seq = last
        text = json.dumps({"type": "logs", "taskId": self.task, "producer": self.producer, "records": recs})
        self.conn.send_text(text)
        self.frames += 1
        return len(text)

    def on_text(self, payload: bytes) -> None:
        m = json.loads(payload)
        typ = m.get("type")
        if typ == "ack":
            seq = int(m.get("seq", 0))
            if "backlog" in m:
                self.backlogs.append(int(m["backlog"]))
            if self.batcher is not None:
                self.batcher.hub_says(behind="backlog" in m)
            if seq <= self.acked:
                return
            now = time.perf_counter()
            for s in range(self.acked + 1, seq + 1):
                t = self.sent_at.pop(s, None)
                if t is not None:
                    self.latencies.append(now - t)
                made = self.made_at.pop(s, None)
                if made is not None:
                    self.line_latencies.append(now - made)
            self.acked = seq
            if self.batcher is not None:
                frames = nbytes = 0
                while self.in_flight and self.in_flight[0][0] <= seq:
                    frames += 1
                    nbytes += self.in_flight.pop(0)[1]
                if frames:
                    self.batcher.acked(frames, nbytes, time.monotonic())
                    self.batcher.set_pending(self.seq - self.sent_seq, time.monotonic())
                    if self.wake is not None:
                        self.wake.set(self)
        elif typ == "error":
            self.errors.append(f"{m.get('code')}: {str(m.get('message'))[:120]}")


class AgentFleet:
    """--mode agent: each producer's lines arrive `rate` times a second and go
    as the agent's Batcher decides. One heap of wake-ups for all of this
    process's producers (a task and a timer per producer per line cost the
    generator as much CPU as the hub spends), woken early by an ack."""

    def __init__(self, producers: list[Producer], rate: float, stop_at: float) -> None:
        from agent.link.batcher import Batcher

        self.producers = producers
        self.interval = 1.0 / rate
        self.stop_at = stop_at
        self.heap: list[tuple[float, int]] = []
        # Each producer's one wake-up in the heap (an entry that differs is stale).
        self.due: list[float] = []
        self.next_line: list[float] = []
        self.wake = asyncio.Event()
        now = time.monotonic()
        for i, p in enumerate(producers):
            p.batcher = Batcher(500, 0.2, 4 << 20, eager_frames=2)
            p.wake = self
            self.next_line.append(now + random.random() * self.interval)
            self.due.append(self.next_line[i])
            self.heap.append((self.next_line[i], i))
        heapq.heapify(self.heap)
        self.index = {id(p): i for i, p in enumerate(producers)}

    def set(self, p: Producer) -> None:
        """An ack moved `p`'s window: decide again now."""
        self.schedule(self.index[id(p)], time.monotonic())
        self.wake.set()

    def schedule(self, i: int, when: float) -> None:
        if when < self.due[i]:
            self.due[i] = when
            heapq.heappush(self.heap, (when, i))

    def step(self, i: int, now: float) -> None:
        from agent.link.batcher import Send

        p = self.producers[i]
        made = self.next_line[i]
        while made <= now and made < self.stop_at:
            p.seq += 1
            p.made_at[p.seq] = time.perf_counter() - (now - made)
            p.batcher.added(1, made)
            made += self.interval
        self.next_line[i] = made
        while True:
            d = p.batcher.decide(now)
            if not isinstance(d, Send):
                break
            last = p.sent_seq + d.count
            nbytes = p.send_through(last)
            p.batcher.sent(d.count, now, nbytes)
            p.in_flight.append((last, nbytes))
        # A new line matters only when nothing waits (it may go at once);
        # otherwise the batcher's own time, or an ack, comes first.
        wake = made if made < self.stop_at and (p.batcher.pending == 0 or d.until is None) else None
        if d.until is not None:
            wake = d.until if wake is None else min(wake, d.until)
        if wake is not None:
            self.schedule(i, wake)

    def done(self) -> bool:
        return time.monotonic() >= self.stop_at and all(p.batcher.pending == 0 for p in self.producers)

    async def run(self) -> None:
        while not self.done():
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                when, i = heapq.heappop(self.heap)
                if when == self.due[i]:
                    self.due[i] = math.inf
                    self.step(i, now)
            until = self.heap[0][0] if self.heap else now + 0.05
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.0, min(until, now + 0.05) - time.monotonic()))
            except TimeoutError:
                pass


async def gen(a: argparse.Namespace) -> dict[str, Any]:
    pad = "x" * max(0, a.record_bytes - 10)
    producers = [Producer(a, i, pad) for i in range(a.first, a.first + a.count)]
    await open_all(a.url, [p.conn for p in producers])
    write_json(a.ready, {"connected": len(producers)})
    await wait_file(a.go)
    start = json.loads(Path(a.go).read_text())["start"]
    await asyncio.sleep(max(0.0, start - time.time()))
    t0 = time.monotonic()
    stop_at = t0 + a.seconds
    if a.rate > 0 and a.mode == "agent":
        await AgentFleet(producers, a.rate, stop_at).run()
    elif a.rate > 0:
        interval = 1.0 / a.rate
        heap = [(t0 + random.random() * interval, i) for i in range(len(producers))]
        heapq.heapify(heap)
        late = 0.0
        while heap:
            due, i = heap[0]
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            late = max(late, now - due)
            heapq.heappop(heap)
            p = producers[i]
            p.seq += 1
            p.send_through(p.seq)
            if due + interval < stop_at:
                heapq.heappush(heap, (due + interval, i))
    else:
        await asyncio.sleep(a.seconds)
    sent_end = time.monotonic()
    # Drain: wait for every line's ack.
    deadline = time.monotonic() + a.drain
    while any(p.acked < p.seq for p in producers) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    done = time.monotonic()
    lat = [x for p in producers for x in p.latencies]
    line_lat = [x for p in producers for x in p.line_latencies]
    return {
        "producers": len(producers),
        "send_s": sent_end - t0,
        "drain_s": done - sent_end,
        "end_time": time.time(),
        "frames": sum(p.frames for p in producers),
        "lines": sum(p.seq for p in producers),
        "acked": sum(p.acked for p in producers),
        "unacked": sum(p.seq - p.acked for p in producers),
        "lost_connections": sum(p.conn.lost for p in producers),
        "errors": [e for p in producers for e in p.errors][:10],
        "error_count": sum(len(p.errors) for p in producers),
        "lat_p50": percentile(lat, 0.5),
        "lat_p99": percentile(lat, 0.99),
        "lat_max": max(lat) if lat else None,
        "lat_sample": random.sample(lat, min(len(lat), 20000)),
        "line_lat_sample": random.sample(line_lat, min(len(line_lat), 20000)),
        "per_task": {t: n for t, n in _per_task(producers).items()},
        "backlog_max": max((b for p in producers for b in p.backlogs), default=None),
    }


def _per_task(producers: list[Producer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in producers:
        out[p.task] = out.get(p.task, 0) + p.seq
    return out


# --- viewers ------------------------------------------------------------------------

class Viewer:
    def __init__(self, url: str, task: str) -> None:
        self.task = task
        self.conn = Conn(url, self.on_open, self.on_text)
        self.subscribed = False
        self.last = 0
        self.count = 0
        self.dups = 0
        self.gaps = 0
        self.error: str | None = None

    def on_open(self) -> None:
        self.conn.send_text(json.dumps({"type": "subscribe", "taskId": self.task, "fromSeq": 1}))

    def on_text(self, payload: bytes) -> None:
        m = json.loads(payload)
        typ = m.get("type")
        if typ == "subscribed":
            self.subscribed = True
        elif typ == "logs":
            for r in m.get("records") or ():
                seq = r.get("seq")
                if seq <= self.last:
                    self.dups += 1
                    continue
                self.gaps += seq - self.last - 1
                self.last = seq
                self.count += 1
        elif typ == "error":
            self.error = f"{m.get('code')}: {m.get('message')}"[:200]


async def view(a: argparse.Namespace) -> dict[str, Any]:
    viewers = [Viewer(a.url, task_name(a.run, i % a.viewer_tasks)) for i in range(a.viewers)]
    await open_all(a.url, [v.conn for v in viewers])
    while not all(v.subscribed for v in viewers):
        await asyncio.sleep(0.01)
    write_json(a.ready, {"subscribed": len(viewers)})
    await wait_file(a.stop)
    expected = json.loads(Path(a.stop).read_text())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(v.count < expected.get(v.task, 0) for v in viewers):
        await asyncio.sleep(0.05)
    return {"viewers": [
        {"task": v.task, "count": v.count, "expected": expected.get(v.task, 0), "dups": v.dups, "gaps": v.gaps,
         "error": v.error, "lost_connection": v.conn.lost}
        for v in viewers
    ]}


# --- the orchestrator ---------------------------------------------------------------

def stored_counts(url: str, tasks: list[str]) -> dict[str, int]:
    out = {}
    for t in tasks:
        with urllib.request.urlopen(f"{url}/api/v1/tasks/{t}/logs/stats", timeout=30) as r:
            out[t] = int(json.loads(r.read())["totalLogs"])
    return out


def wait_path(path: Path, timeout: float, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise RuntimeError(f"a helper process ended with {p.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)


class FloorProcess:
    """bench/frame_floor.py in place of the hub (`--server KIND-floor`)."""

    def __init__(self, kind: str, tmp: Path) -> None:
        port_file = tmp / "floor.port"
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, str(HERE / "frame_floor.py"), "--kind", kind, "--port-file", str(port_file)])
        wait_path(port_file, 30, [self.proc])
        time.sleep(0.05)  # written, then read whole
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
        self.ws_url = self.url.replace("http://", "ws://") + "/api/v1/ws"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def orchestrate(a: argparse.Namespace) -> dict[str, Any]:
    from tests.support import HubProcess

    run = a.run or f"{random.randrange(1 << 24):06x}"
    tmp = Path(tempfile.mkdtemp(prefix="fleet-"))
    db = a.db or f"sqlite:///{tmp / 'keruta.db'}"
    floor = a.server != "hub"
    hub: Any = FloorProcess(a.server.removesuffix("-floor"), tmp) if floor else HubProcess(db, *a.hub_arg).start()
    assert hub.proc is not None
    pid = hub.proc.pid
    procs: list[subprocess.Popen[bytes]] = []
    rss_peak = [0]
    sampling = threading.Event()

    def sample_rss() -> None:
        while not sampling.is_set():
            try:
                rss_peak[0] = max(rss_peak[0], status_kib(pid, "VmRSS"))
            except OSError:
                return
            time.sleep(0.1)

    try:
        rss_start = status_kib(pid, "VmRSS")
        common = ["--url", hub.ws_url, "--run", run, "--tasks", str(a.tasks or a.producers),
                  "--seconds", str(a.seconds), "--rate", str(a.rate), "--record-bytes", str(a.record_bytes),
                  "--mode", a.mode, "--drain", str(a.drain), "--viewers", str(a.viewers),
                  "--viewer-tasks", str(a.viewer_tasks)]
        go = tmp / "go"
        stop = tmp / "stop"
        viewer = None
        if a.viewers:
            viewer = subprocess.Popen([sys.executable, __file__, "--role", "view", *common, "--ready",
                                       str(tmp / "view.ready"), "--stop", str(stop), "--out", str(tmp / "view.json")])
            procs.append(viewer)
            wait_path(tmp / "view.ready", 120, procs)
        per = -(-a.producers // a.gens)
        gens = []
        for g in range(a.gens):
            first = g * per
            count = min(per, a.producers - first)
            if count <= 0:
                break
            gens.append(subprocess.Popen([
                sys.executable, __file__, "--role", "gen", *common, "--first", str(first), "--count", str(count),
                "--ready", str(tmp / f"gen{g}.ready"), "--go", str(go), "--out", str(tmp / f"gen{g}.json")]))
        procs.extend(gens)
        for g in range(len(gens)):
            wait_path(tmp / f"gen{g}.ready", 300, procs)
        rss_connected = status_kib(pid, "VmRSS")
        threading.Thread(target=sample_rss, daemon=True).start()
        spy = None
        if a.pyspy:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "-o", a.pyspy, "--pid", str(pid),
                 "-r", "100", "-f", a.pyspy_format, *(["--gil"] if a.pyspy_gil else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        start = time.time() + 0.5
        write_json(str(go), {"start": start})
        time.sleep(max(0.0, start - time.time()))
        user0, sys0 = cpu_times(pid)
        cpu0 = user0 + sys0
        began = time.monotonic()
        for p in gens:
            p.wait(a.seconds + a.drain + 120)
        user1, sys1 = cpu_times(pid)
        cpu1 = user1 + sys1
        wall = time.monotonic() - began
        sampling.set()
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        results = [json.loads((tmp / f"gen{g}.json").read_text()) for g in range(len(gens))]
        per_task: dict[str, int] = {}
        for r in results:
            for t, n in r["per_task"].items():
                per_task[t] = per_task.get(t, 0) + n
        seen = None
        if viewer is not None:
            write_json(str(stop), per_task)
            viewer.wait(60)
            seen = json.loads((tmp / "view.json").read_text())["viewers"]
        stored = stored_counts(hub.url, sorted(per_task)) if a.rate > 0 and not floor else {}
        db_bytes = None
        if a.db is None and a.rate > 0 and not floor:
            # What a fleet's small commits cost on disk: the hub gone, the WAL
            # checkpointed into the file.
            hub.stop()
            with sqlite3.connect(tmp / "keruta.db") as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db_bytes = (tmp / "keruta.db").stat().st_size
        lat = [x for r in results for x in r["lat_sample"]]
        line_lat = [x for r in results for x in r["line_lat_sample"]]
        frames = sum(r["frames"] for r in results)
        lines = sum(r["lines"] for r in results)
        acked = sum(r["acked"] for r in results)
        send_s = max((r["send_s"] for r in results), default=0.0)
        out = {
            "mode": a.mode, "producers": a.producers, "rate": a.rate, "record_bytes": a.record_bytes,
            "viewers": a.viewers, "viewer_tasks": a.viewer_tasks, "seconds": a.seconds, "gens": len(gens),
            "frames": frames, "lines": lines, "acked_lines": acked,
            "frames_offered_per_s": round(frames / send_s, 1) if send_s else 0,
            "lines_taken_per_s": round(acked / wall, 1) if wall else 0,
            "wall_s": round(wall, 2),
            "ack_p50_ms": None if not lat else round(1000 * (percentile(lat, 0.5) or 0), 1),
            "ack_p99_ms": None if not lat else round(1000 * (percentile(lat, 0.99) or 0), 1),
            "ack_max_ms": None if not lat else round(1000 * max(lat), 1),
            # agent mode: a line's arrival -> its ack (the batcher's wait included)
            "line_p50_ms": None if not line_lat else round(1000 * (percentile(line_lat, 0.5) or 0), 1),
            "line_p99_ms": None if not line_lat else round(1000 * (percentile(line_lat, 0.99) or 0), 1),
            "hub_cpu_s": round(cpu1 - cpu0, 2),
            "hub_cpu_system_share": round((sys1 - sys0) / (cpu1 - cpu0), 2) if cpu1 > cpu0 else None,
            "hub_cpu_us_per_frame": round((cpu1 - cpu0) / frames * 1e6, 1) if frames else None,
            "hub_cpu_us_per_line": round((cpu1 - cpu0) / lines * 1e6, 1) if lines else None,
            "hub_rss_start_mb": round(rss_start / 1024, 1),
            "hub_rss_connected_mb": round(rss_connected / 1024, 1),
            "hub_rss_peak_mb": round(max(rss_peak[0], rss_connected) / 1024, 1),
            "unacked_lines": sum(r["unacked"] for r in results),
            "client_errors": sum(r["error_count"] for r in results),
            "error_sample": [e for r in results for e in r["errors"]][:5],
            "lost_connections": sum(r["lost_connections"] for r in results),
            "backlog_max": max((r["backlog_max"] for r in results if r["backlog_max"] is not None), default=None),
            "store_missing": sum(max(0, n - stored.get(t, 0)) for t, n in per_task.items()) if stored else None,
            "store_extra": sum(max(0, stored.get(t, 0) - n) for t, n in per_task.items()) if stored else None,
            "viewer_lost": None if seen is None else sum(max(0, v["expected"] - v["count"]) for v in seen),
            "viewer_doubled": None if seen is None else sum(v["dups"] for v in seen),
            "viewer_gaps": None if seen is None else sum(v["gaps"] for v in seen),
            "viewer_errors": None if seen is None else [v["error"] for v in seen if v["error"]][:3],
            "db_bytes_per_line": round(db_bytes / acked, 1) if db_bytes and acked else None,
            "load": round(os.getloadavg()[0], 2),
        }
        return out
    finally:
        sampling.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        hub.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["main", "gen", "view"], default="main")
    ap.add_argument("--producers", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=0, help="tasks the producers share (default: one each)")
    ap.add_argument("--rate", type=float, default=5.0, help="frames (flat) or lines (agent) a second per producer")
    ap.add_argument("--record-bytes", type=int, default=100)
    ap.add_argument("--viewers", type=int, default=50)
    ap.add_argument("--viewer-tasks", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--mode", choices=["flat", "agent"], default="flat")
    ap.add_argument("--gens", type=int, default=0, help="load generator processes (default: one per 500 producers)")
    ap.add_argument("--drain", type=float, default=60.0, help="seconds to wait for the last acks")
    ap.add_argument("--server", choices=("hub", "hypercorn-floor", "trio-floor", "trio-store-floor"), default="hub",
                    help="what the fleet talks to: the hub, or bench/frame_floor.py (decode and ack; trio-store-floor"
                         " also commits and syncs with keruta's store)")
    ap.add_argument("--db", help="the hub's --db (default: SQLite in a temp dir)")
    ap.add_argument("--hub-arg", action="append", default=[], help="an extra hub argument (repeatable)")
    ap.add_argument("--pyspy", help="record a py-spy profile of the hub to this file")
    ap.add_argument("--pyspy-format", default="flamegraph")
    ap.add_argument("--pyspy-gil", action="store_true", help="sample only the thread holding the GIL")
    ap.add_argument("--out", help="also write the JSON result here")
    # internal (gen / view processes)
    ap.add_argument("--url")
    ap.add_argument("--run", default="")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--ready")
    ap.add_argument("--go")
    ap.add_argument("--stop")
    a = ap.parse_args()
    if a.role == "gen":
        write_json(a.out, asyncio.run(gen(a)))
        return
    if a.role == "view":
        write_json(a.out, asyncio.run(view(a)))
        return
    if a.gens <= 0:
        a.gens = max(1, -(-a.producers // 500))
    a.viewer_tasks = max(1, min(a.viewer_tasks, a.tasks or a.producers))
    result = orchestrate(a)
    print(json.dumps(result))
    if a.out:
        write_json(a.out, result)


if __name__ == "__main__":
    main()
