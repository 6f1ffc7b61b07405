"""The harness the scenarios run on: starting hubs, agents, websocketd and viewers, adding figures."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    clean_env,
    cpu_seconds,
    figure,
    free_port,
    http_get,
    json_line,
    median,
    peak_rss_mib,
    start,
    stop,
    wait_file,
    wait_healthz,
    wait_with_rusage,
)
from tools import (  # noqa: E402
    LATENCY_FLOOR,
    PRODUCER,
    PY,
    SIZES,
    VIEWER,
    Missing,
    delivery,
    describe,
    ensure_websocketd,
    git_commit,
    psql,
    summarize,
    wait_port,
    which_bin,
)


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.reps = 1 if args.quick else args.reps
        self.date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.commit = git_commit()
        self.figures: list[dict[str, Any]] = []
        # The viewer processes' CPU seconds in the last keruta_stream (None: one did not end).
        self.viewer_cpu_s: float | None = None
        self.root = Path(tempfile.mkdtemp(prefix="keruta-bench-"))
        bindir = Path(PY).parent
        self.hub_bin = which_bin("keruta-hub", bindir)
        self.agent_bin = which_bin("keruta-agent", bindir)
        self.websocketd = shutil.which("websocketd")
        self.wsd_missing = None if self.websocketd else ensure_websocketd()
        if self.wsd_missing is None:
            self.websocketd = shutil.which("websocketd")
        self.pg_dsn = args.pg_dsn or os.environ.get("KERUTA_TEST_PG_DSN")
        self.env = clean_env()
        self.rows_small = args.rows if args.rows is not None else self.size("query_rows")
        self.rows_big = args.big_rows if args.big_rows is not None else self.size("big_rows")

    def size(self, key: str) -> int:
        quick, full = SIZES[key]
        return quick if self.quick else full

    def add(
        self, name: str, value: float | None, unit: str, params: dict[str, Any], **kw: Any
    ) -> None:
        fig = figure(name, value, unit, params, date=self.date, commit=self.commit, **kw)
        self.figures.append(fig)
        print(json_line(fig), flush=True)

    def tmp(self, label: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=label + "-", dir=self.root))
        return d

    # -- one keruta stream: hub + viewers + agent running the producer ------------
    def keruta_stream(
        self,
        db: str,
        viewers: int,
        lines: int,
        *,
        lat: bool = False,
        stall: int = 0,
        timeout: float = 300.0,
        producer_args: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        d = self.tmp("keruta")
        port = free_port()
        hub = agent = None
        vprocs: list[tuple[subprocess.Popen[bytes], str, str]] = []
        try:
            hub = start(
                [self.hub_bin, "--host", "127.0.0.1", "--port", str(port), "--db", db],
                str(d / "hub.log"),
                env=self.env,
                cwd=d,
            )
            if not wait_healthz(port, hub):
                raise RuntimeError(f"keruta-hub not healthy within 30 s (see {d}/hub.log)")
            task = "bench-" + secrets.token_hex(4)
            url = f"ws://127.0.0.1:{port}/api/v1/ws"
            vprocs = self.start_viewers(d, url, "keruta", viewers, lines, lat, stall, task, timeout)
            prod = [PY, PRODUCER, "--lines", str(lines), *producer_args]
            if lat:
                # the agent is connected before the first line: latency is the
                # line's way, not the agent's start-up
                prod += ["--interval-ms", "10", "--start-delay", "1"]
            began = time.monotonic()
            began_wall = time.time()
            agent = start(
                [
                    self.agent_bin,
                    "run",
                    "--hub",
                    f"http://127.0.0.1:{port}",
                    "--task-id",
                    task,
                    "--quiet",
                    "--spool-dir",
                    str(d / "spool"),
                    "--drain-timeout",
                    str(int(timeout)),
                    "--",
                    *prod,
                ],
                str(d / "agent.log"),
                env=self.env,
                cwd=d,
            )
            results = self.wait_viewers(vprocs, timeout)
            agent_rss = peak_rss_mib(agent.pid)
            # The agent's CPU with its command's: what the workload cost the machine's side of the agent.
            agent_cpu = wait_with_rusage(agent, max(5.0, timeout - (time.monotonic() - began)))
            agent_rc = agent.poll()
            status, body = http_get(port, f"/api/v1/tasks/{task}/logs/stats")
            stored = json.loads(body).get("logCounts", {}).get("stdout") if status == 200 else None
            hub_rss = peak_rss_mib(hub.pid)
            hub_cpu = cpu_seconds(hub.pid)
        finally:
            for p, _, _ in vprocs:
                stop(p)
            stop(agent)
            stop(hub, grace=15)
        res = summarize(results, lines)
        res.update(
            hub_rss=hub_rss, agent_rss=agent_rss, stored=stored, agent_rc=agent_rc,
            hub_cpu_s=hub_cpu, agent_cpu_s=agent_cpu, viewer_cpu_s=self.viewer_cpu_s,
        )
        if res.get("last") is not None:
            # the whole way, agent start-up included: a check on the first->last rate
            res["start_to_last_s"] = res["last"] - began_wall
        if stored != lines:
            res["problem"] = "; ".join(
                filter(None, [res.get("problem"), f"hub stored {stored} of {lines} lines"])
            )
        return res

    def websocketd_stream(
        self, viewers: int, lines: int, *, lat: bool = False, timeout: float = 300.0
    ) -> dict[str, Any]:
        if not self.websocketd:
            raise Missing(f"websocketd not installed ({self.wsd_missing})")
        d = self.tmp("websocketd")
        port = free_port()
        prod = [PY, PRODUCER, "--lines", str(lines)]
        if lat:
            prod += ["--interval-ms", "10"]
        wsd = None
        vprocs: list[tuple[subprocess.Popen[bytes], str, str]] = []
        try:
            # websocketd runs one producer per connection: its fan-out is K
            # copies of the command, not K viewers of one stream
            wsd = start(
                [
                    self.websocketd,
                    "--address=127.0.0.1",
                    f"--port={port}",
                    "--loglevel=fatal",
                    "--",
                    *prod,
                ],
                str(d / "websocketd.log"),
                cwd=d,
            )
            if not wait_port(port, wsd):
                raise RuntimeError("websocketd did not listen within 20 s")
            vprocs = self.start_viewers(
                d, f"ws://127.0.0.1:{port}/", "raw", viewers, lines, lat, 0, None, timeout
            )
            results = self.wait_viewers(vprocs, timeout)
            rss = peak_rss_mib(wsd.pid)
        finally:
            for p, _, _ in vprocs:
                stop(p)
            stop(wsd)
        res = summarize(results, lines)
        res["server_rss"] = rss
        return res

    def latency_floor_stream(self, lines: int, *, timeout: float = 300.0) -> dict[str, Any]:
        """One latency run through bench/latency_floor.py's relay and hub,
        the producer and viewer as keruta's latency run has them."""
        d = self.tmp("latency-floor")
        port_file = d / "port"
        server = relay = None
        vprocs: list[tuple[subprocess.Popen[bytes], str, str]] = []
        try:
            server = start(
                [PY, LATENCY_FLOOR, "hub", "--port-file", str(port_file), "--db", str(d / "floor.db")],
                str(d / "hub.log"),
                cwd=d,
            )
            if not wait_file(str(port_file), server, 20) or not port_file.read_text().strip():
                raise RuntimeError(f"the latency floor's hub did not listen within 20 s (see {d}/hub.log)")
            port = int(port_file.read_text())
            vprocs = self.start_viewers(d, f"ws://127.0.0.1:{port}/", "raw", 1, lines, True, 0, None, timeout)
            prod = [PY, PRODUCER, "--lines", str(lines), "--interval-ms", "10", "--start-delay", "1"]
            relay = start([PY, LATENCY_FLOOR, "relay", "--port", str(port), "--", *prod], str(d / "relay.log"), cwd=d)
            results = self.wait_viewers(vprocs, timeout)
        finally:
            for p, _, _ in vprocs:
                stop(p)
            stop(relay)
            stop(server)
        return summarize(results, lines)

    def start_viewers(
        self,
        d: Path,
        url: str,
        proto: str,
        viewers: int,
        lines: int,
        lat: bool,
        stall: int,
        task: str | None,
        timeout: float,
    ) -> list[tuple[subprocess.Popen[bytes], str, str]]:
        nprocs = 1 if viewers == 1 else 2  # 2 cores: split fan-out viewers over 2 processes
        out = []
        for i in range(nprocs):
            k = viewers // nprocs + (1 if i < viewers % nprocs else 0)
            ready, res = str(d / f"viewer{i}.ready"), str(d / f"viewer{i}.json")
            cmd = [
                PY,
                VIEWER,
                "--url",
                url,
                "--proto",
                proto,
                "--viewers",
                str(k),
                "--expect",
                str(lines),
                "--timeout",
                str(timeout),
                "--ready",
                ready,
                "--out",
                res,
            ]
            if task:
                cmd += ["--task", task]
            if lat:
                cmd += ["--mode", "lat"]
            if stall and i == 0:
                cmd += ["--stall", str(stall)]
            out.append((start(cmd, str(d / f"viewer{i}.log")), ready, res))
        for p, ready, _ in out:
            if not wait_file(ready, p, 60):
                raise RuntimeError("viewers not ready within 60 s")
            with open(ready) as f:
                ok, failed = (int(x) for x in f.read().split())
            if failed:
                raise RuntimeError(f"{failed} viewers could not connect")
        return out

    def wait_viewers(
        self, vprocs: list[tuple[subprocess.Popen[bytes], str, str]], timeout: float
    ) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout + 30
        results: list[dict[str, Any]] = []
        self.viewer_cpu_s = 0.0
        for p, _, res in vprocs:
            cpu = wait_with_rusage(p, max(1.0, end - time.monotonic()))
            if cpu is None:
                stop(p)
                self.viewer_cpu_s = None
            elif self.viewer_cpu_s is not None:
                self.viewer_cpu_s += cpu
            try:
                with open(res) as f:
                    results.extend(json.load(f)["viewers"])
            except (OSError, ValueError) as e:
                raise RuntimeError(f"a viewer process left no result ({e})") from e
        return results

    # -- PostgreSQL: a fresh database per use ------------------------------------
    @contextlib.contextmanager
    def pg_database(self) -> Iterator[str]:
        if not self.pg_dsn:
            raise Missing("no PostgreSQL: set KERUTA_TEST_PG_DSN or pass --pg-dsn")
        name = "keruta_bench_" + secrets.token_hex(4)
        psql(self.pg_dsn, f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(self.pg_dsn)._replace(path="/" + name))
        finally:
            psql(self.pg_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # -- scenarios -----------------------------------------------------------------
    def reps_of(self, fn: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
        return [fn() for _ in range(self.reps)]

    # -- helpers -------------------------------------------------------------------
    def guarded(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Reps of one measurement; {'reps': [...], 'error': why any failed}."""
        reps, errors = [], []
        for _ in range(self.reps):
            try:
                reps.append(fn())
            except Exception as e:  # noqa: BLE001 - reported as a missing figure
                errors.append(describe(e))
        problems = [r["problem"] for r in reps if r.get("problem")]
        return {
            "reps": reps,
            "error": "; ".join(errors) or None,
            "problem": "; ".join(problems) or None,
        }

    def add_rate(
        self,
        name: str,
        res: dict[str, Any],
        params: dict[str, Any],
        hub: bool = False,
        key: str | None = None,
    ) -> float | None:
        value = median([r.get("rate") for r in res["reps"]])
        p = dict(params, **delivery(res))
        if hub:
            rss = median([r.get("hub_rss") for r in res["reps"]])
            if rss is not None:
                p["hub_peak_rss_mib"] = round(rss, 1)
            span = median([r.get("start_to_last_s") for r in res["reps"]])
            if span is not None:
                p["agent_start_to_last_line_s"] = round(span, 2)
        missing = res.get("error") or (
            "no rate (too few lines received)" if value is None else None
        )
        self.add(name, value, "lines/s", p, missing=missing, key=key)
        return value
