#!/usr/bin/env python3
"""keruta's benchmark suite: real processes on loopback, websocketd as the reference.

    python bench/run.py            # full: the sizes of issue 8, medians of 3 reps
    python bench/run.py --quick    # one rep, smaller sizes, under 5 minutes
    python bench/run.py --only e2e,latency --pg-dsn postgresql://...   # a subset

Prints a Markdown table and one JSON object per figure (name, value, unit,
parameters, date, commit); writes both to bench/results/ (gitignored) or
--results-dir. A figure that cannot be measured is reported as missing with
the reason; the run goes on. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    check_delivery,
    children,
    clean_env,
    figure,
    format_table,
    free_port,
    http_get,
    json_line,
    median,
    peak_rss_mib,
    percentile,
    rate,
    ratio,
    start,
    stop,
    wait_file,
    wait_healthz,
)

PY = sys.executable
PRODUCER = str(HERE / "producer.py")
VIEWER = str(HERE / "viewer.py")
INGEST = str(HERE / "ingest.py")
STORE_BENCH = str(HERE / "store_bench.py")

SIZES = {
    # name: (quick, full)
    "e2e_lines": (200_000, 1_000_000),
    "fan10_lines": (50_000, 200_000),
    "fan100_lines": (5_000, 20_000),
    "lat_lines": (300, 500),
    "agent_mem_lines": (500_000, 2_000_000),
    "stall_lines": (100_000, 200_000),
    "ingest_lines": (50_000, 100_000),
    "query_rows": (200_000, 1_000_000),
}
SCENARIOS = ["e2e", "fanout", "latency", "memory", "ingest", "store"]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.reps = 1 if args.quick else args.reps
        self.date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.commit = git_commit()
        self.figures: list[dict[str, Any]] = []
        self.root = Path(tempfile.mkdtemp(prefix="keruta-bench-"))
        bindir = Path(PY).parent
        self.hub_bin = _which("keruta-hub", bindir)
        self.agent_bin = _which("keruta-agent", bindir)
        self.websocketd = shutil.which("websocketd")
        self.wsd_missing = None if self.websocketd else ensure_websocketd()
        if self.wsd_missing is None:
            self.websocketd = shutil.which("websocketd")
        self.pg_dsn = args.pg_dsn or os.environ.get("KERUTA_TEST_PG_DSN")
        self.env = clean_env()

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
            prod = [PY, PRODUCER, "--lines", str(lines)]
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
            try:
                agent.wait(max(5.0, timeout - (time.monotonic() - began)))
            except subprocess.TimeoutExpired:
                pass
            agent_rc = agent.poll()
            status, body = http_get(port, f"/api/v1/tasks/{task}/logs/stats")
            stored = json.loads(body).get("logCounts", {}).get("stdout") if status == 200 else None
            hub_rss = peak_rss_mib(hub.pid)
        finally:
            for p, _, _ in vprocs:
                stop(p)
            stop(agent)
            stop(hub, grace=15)
        res = summarize(results, lines)
        res.update(hub_rss=hub_rss, agent_rss=agent_rss, stored=stored, agent_rc=agent_rc)
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
        for p, _, res in vprocs:
            try:
                p.wait(max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop(p)
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

    def scenario_e2e(self) -> None:
        n = self.size("e2e_lines")
        params = {"lines": n, "bytes_per_line": 80, "viewers": 1, "reps": self.reps}
        timeout = 60 + n / 2000
        wsd = self.guarded(lambda: self.websocketd_stream(1, n, timeout=timeout))
        wsd_rate = self.add_rate("websocketd 1 viewer, live only", wsd, params)
        self.wsd_1viewer = wsd_rate
        for store in ("sqlite", "pg"):
            label = "SQLite" if store == "sqlite" else "PostgreSQL"

            def one(store: str = store) -> dict[str, Any]:
                if store == "sqlite":
                    return self.keruta_stream(
                        f"sqlite:///{self.tmp('db')}/keruta.db", 1, n, timeout=timeout
                    )
                with self.pg_database() as url:
                    return self.keruta_stream(url, 1, n, timeout=timeout)

            res = self.guarded(one)
            k = self.add_rate(
                f"keruta end to end, persisted in {label}, 1 viewer", res, params, hub=True
            )
            self.add(
                "ratio keruta/websocketd" + f" ({label}, 1 viewer)",
                ratio(k, wsd_rate),
                "x",
                params,
                missing=_why(res, wsd),
            )

    def scenario_fanout(self) -> None:
        for viewers, key in ((10, "fan10_lines"), (100, "fan100_lines")):
            n = self.size(key)
            params = {
                "viewers": viewers,
                "lines_per_viewer": n,
                "client_procs": 2,
                "reps": self.reps,
            }
            timeout = 60 + viewers * n / 5000
            wsd = self.guarded(partial(self.websocketd_stream, viewers, n, timeout=timeout))
            w = self.add_rate(
                f"websocketd {viewers} viewers aggregate (one producer per viewer)", wsd, params
            )
            res = self.guarded(
                lambda v=viewers, n=n, t=timeout: self.keruta_stream(  # type: ignore[misc]
                    f"sqlite:///{self.tmp('db')}/keruta.db", v, n, timeout=t
                )
            )
            k = self.add_rate(
                f"keruta {viewers} viewers aggregate (one task, SQLite)", res, params, hub=True
            )
            self.add(
                f"ratio keruta/websocketd ({viewers} viewers)",
                ratio(k, w),
                "x",
                params,
                missing=_why(res, wsd),
            )

    def scenario_latency(self) -> None:
        n = self.size("lat_lines")
        params = {"lines": n, "interval_ms": 10, "reps": self.reps}
        for who in ("websocketd", "keruta"):
            if who == "websocketd":
                reps = self.guarded(
                    lambda: self.websocketd_stream(1, n, lat=True, timeout=60 + n / 50)
                )
            else:
                reps = self.guarded(
                    lambda: self.keruta_stream(
                        f"sqlite:///{self.tmp('db')}/keruta.db", 1, n, lat=True, timeout=60 + n / 50
                    )
                )
            for q in (50, 99):
                vals = [percentile(r["lat_us"], q) for r in reps.get("reps", [])]
                ms = median([v / 1000 for v in vals if v is not None])
                p = dict(params, **delivery(reps))
                self.add(
                    f"{who} latency p{q} (write -> viewer)", ms, "ms", p, missing=reps.get("error")
                )

    def scenario_memory(self) -> None:
        n = self.size("agent_mem_lines")
        params = {"lines": n, "hub": "down", "reps": self.reps}
        if self.quick:
            params["note"] = "quick mode: fewer lines than the 2,000,000 of the target"
        vals = []
        err = None
        for _ in range(self.reps):
            try:
                vals.append(self.agent_hub_down(n))
            except Exception as e:  # noqa: BLE001 - a figure goes missing, the run goes on
                err = describe(e)
        self.add("agent peak RSS, hub down", median(vals), "MiB", params, missing=err)

        n = self.size("stall_lines")
        params = {"viewers": 10, "stalled_viewers": 1, "lines": n, "reps": self.reps}
        res = self.guarded(
            lambda: self.keruta_stream(
                f"sqlite:///{self.tmp('db')}/keruta.db", 10, n, stall=1, timeout=60 + 10 * n / 5000
            )
        )
        val = median([r["hub_rss"] for r in res.get("reps", [])])
        self.add(
            "hub peak RSS, fan-out with 1 stalled viewer",
            val,
            "MiB",
            dict(params, **delivery(res)),
            missing=res.get("error"),
        )

    def agent_hub_down(self, n: int) -> float:
        d = self.tmp("agent-mem")
        port = free_port()  # nothing listens there: the hub is down throughout
        agent = start(
            [
                self.agent_bin,
                "run",
                "--hub",
                f"http://127.0.0.1:{port}",
                "--task-id",
                "bench-mem",
                "--quiet",
                "--spool-dir",
                str(d / "spool"),
                "--drain-timeout",
                "1",
                "--",
                PY,
                PRODUCER,
                "--lines",
                str(n),
            ],
            str(d / "agent.log"),
            env=self.env,
            cwd=d,
        )
        peak = 0.0
        end = time.monotonic() + 60 + n / 5000
        saw_child = False
        try:
            while agent.poll() is None and time.monotonic() < end:
                peak = max(peak, peak_rss_mib(agent.pid) or 0.0)
                kids = children(agent.pid)
                saw_child = saw_child or bool(kids)
                if saw_child and not kids:
                    # the producer is done and every line spooled or sent: the
                    # agent now waits out its drain; its high-water mark is final
                    peak = max(peak, peak_rss_mib(agent.pid) or 0.0)
                time.sleep(0.1)
            if agent.poll() is None:
                raise RuntimeError("agent still running at the deadline")
        finally:
            stop(agent)
        if not peak:
            raise RuntimeError("agent exited before its RSS could be read")
        return peak

    def scenario_ingest(self) -> None:
        n = self.size("ingest_lines")
        out: dict[str, float | None] = {}
        for mode, label in (
            ("seed", "seed design: one `log` frame per line, waiting for nothing"),
            ("batched", "keruta frames: `logs` of 500 records with a producer id"),
        ):
            params = {"lines": n, "store": "SQLite", "reps": self.reps}
            vals, err = [], None
            for _ in range(self.reps):
                try:
                    vals.append(self.ingest_once(mode, n))
                except Exception as e:  # noqa: BLE001
                    err = describe(e)
            out[mode] = median(vals)
            self.add(f"hub ingest, {label}, committed", out[mode], "lines/s", params, missing=err)
        self.add(
            "ratio batched/seed ingest",
            ratio(out["batched"], out["seed"]),
            "x",
            {"lines": n},
            missing="a side is missing" if None in out.values() else None,
        )

    def ingest_once(self, mode: str, n: int) -> float:
        d = self.tmp("ingest")
        port = free_port()
        hub = client = None
        try:
            hub = start(
                [
                    self.hub_bin,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--db",
                    f"sqlite:///{d}/keruta.db",
                ],
                str(d / "hub.log"),
                env=self.env,
                cwd=d,
            )
            if not wait_healthz(port, hub):
                raise RuntimeError("keruta-hub not healthy within 30 s")
            timeout = 60 + n / 1000
            client = start(
                [
                    PY,
                    INGEST,
                    "--url",
                    f"ws://127.0.0.1:{port}/api/v1/ws",
                    "--task",
                    f"ingest-{mode}",
                    "--lines",
                    str(n),
                    "--mode",
                    mode,
                    "--timeout",
                    str(timeout),
                    "--out",
                    str(d / "ingest.json"),
                ],
                str(d / "ingest.log"),
            )
            client.wait(timeout + 30)
            with open(d / "ingest.json") as f:
                res = json.load(f)
        finally:
            stop(client)
            stop(hub, grace=15)
        if res.get("error") or res.get("lines_per_s") is None:
            raise RuntimeError(f"ingest {mode}: {res.get('error') or 'not all acknowledged'}")
        return float(res["lines_per_s"])

    def scenario_store(self) -> None:
        rows = self.size("query_rows")
        for store in ("sqlite", "pg"):
            label = "SQLite" if store == "sqlite" else "PostgreSQL"
            names = [f"{label} store.append ceiling (batches of 500, no network)"] + [
                f"{label} query: {q}" for q, _ in query_list(rows)
            ]
            try:
                if store == "sqlite":
                    self.store_and_queries(f"sqlite:///{self.tmp('db')}/keruta.db", label, rows)
                else:
                    with self.pg_database() as url:
                        self.store_and_queries(url, label, rows)
            except Exception as e:  # noqa: BLE001
                done = {f["name"] for f in self.figures}
                for name in names:
                    if name not in done:
                        self.add(
                            name,
                            None,
                            "ms" if "query" in name else "rows/s",
                            {"rows": rows},
                            missing=describe(e),
                        )

    def store_and_queries(self, db: str, label: str, rows: int) -> None:
        d = self.tmp("store")
        out = d / "store.json"
        p = start(
            [PY, STORE_BENCH, "--db", db, "--rows", str(rows), "--out", str(out)],
            str(d / "store.log"),
        )
        try:
            rc = p.wait(120 + rows / 2000)
        finally:
            stop(p)
        if rc != 0 or not out.exists():
            raise RuntimeError(f"store_bench exited {rc}: {tail(d / 'store.log')}")
        res = json.loads(out.read_text())
        self.add(
            f"{label} store.append ceiling (batches of 500, no network)",
            res["rows_per_s"],
            "rows/s",
            {"rows": rows, "batch": 500, "producer": "one producer id", "reps": 1},
        )
        port = free_port()
        hub = start(
            [self.hub_bin, "--host", "127.0.0.1", "--port", str(port), "--db", db],
            str(d / "hub.log"),
            env=self.env,
            cwd=d,
        )
        try:
            if not wait_healthz(port, hub):
                raise RuntimeError("keruta-hub not healthy within 30 s")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for name, path in query_list(rows):
                times = []
                err = None
                for i in range(8):  # the first warms caches and is not counted
                    t0 = time.perf_counter()
                    conn.request("GET", f"/api/v1/tasks/bench-query{path}")
                    r = conn.getresponse()
                    body = r.read()
                    ms = (time.perf_counter() - t0) * 1000
                    if r.status != 200 or b'"content":[]' in body:
                        err = f"HTTP {r.status}, {body[:120]!r}"
                        break
                    if i:
                        times.append(ms)
                self.add(
                    f"{label} query: {name}",
                    median(times) if not err else None,
                    "ms",
                    {"rows": rows, "requests": len(times), "via": "REST, keep-alive"},
                    missing=err,
                )
            conn.close()
        finally:
            stop(hub, grace=15)

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
        self, name: str, res: dict[str, Any], params: dict[str, Any], hub: bool = False
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
        self.add(name, value, "lines/s", p, missing=missing)
        return value

    def run(self) -> int:
        load = os.getloadavg()
        header = (
            f"keruta bench {'--quick' if self.quick else 'full'} {self.date} commit {self.commit}; "
            f"{os.cpu_count()} cores; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
            f"websocketd: {websocketd_version(self.websocketd) if self.websocketd else self.wsd_missing}"
        )
        print(header, flush=True)
        self.add("load average (1 min) at start", round(load[0], 2), "load", {})
        only = self.args.only.split(",") if self.args.only else SCENARIOS
        started = time.monotonic()
        for name in SCENARIOS:
            if name not in only:
                continue
            t0 = time.monotonic()
            try:
                getattr(self, "scenario_" + name)()
            except Exception as e:  # noqa: BLE001 - a bug in one scenario must not end the run
                self.add(f"scenario {name}", None, "", {}, missing=describe(e))
                traceback.print_exc()
            print(f"# {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        load = os.getloadavg()
        self.add("load average (1 min) at end", round(load[0], 2), "load", {})
        table = format_table(self.figures)
        footer = f"total {time.monotonic() - started:.0f} s"
        print("\n" + header + "\n\n" + table + "\n\n" + footer, flush=True)
        results = Path(self.args.results_dir)
        results.mkdir(parents=True, exist_ok=True)
        stamp = self.date.replace(":", "")
        (results / f"bench-{stamp}.jsonl").write_text(
            "".join(json_line(f) + "\n" for f in self.figures)
        )
        (results / f"bench-{stamp}.md").write_text(header + "\n\n" + table + "\n\n" + footer + "\n")
        print(f"results: {results}/bench-{stamp}.jsonl and .md", flush=True)
        if not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            print(f"kept {self.root}")
        return 0


class Missing(Exception):
    """A figure cannot be measured here (not a failure of the thing measured)."""


def summarize(results: list[dict[str, Any]], lines: int) -> dict[str, Any]:
    counting = [r for r in results if not r.get("stalled")]
    counts = [r["count"] for r in counting]
    firsts = [r["t_first"] for r in counting if r.get("t_first")]
    lasts = [r["t_last"] for r in counting if r.get("t_last")]
    total = sum(counts)
    first = min(firsts) / 1e9 if firsts else None
    last = max(lasts) / 1e9 if lasts else None
    dups = sum(r.get("dups", 0) for r in counting)
    gaps = sum(r.get("gaps", 0) for r in counting)
    problem = check_delivery(counts, lines, dups, gaps)
    errors = {r["error"] for r in counting if r.get("error")}
    if errors:
        problem = ((problem + "; ") if problem else "") + "; ".join(sorted(errors))[:300]
    lat = [x for r in counting for x in r.get("lat_us", [])]
    return {
        "rate": rate(total, first, last),
        "problem": problem,
        "lat_us": lat,
        "received": total,
        "last": last,
    }


def query_list(rows: int) -> list[tuple[str, str]]:
    return [
        ("page by afterSeq (middle), 100 rows", f"/logs?afterSeq={rows // 2}&size=100"),
        ("first page level=ERROR", "/logs?level=ERROR&size=100"),
        ("first page source=stderr", "/logs?source=stderr&size=100"),
        ("stats", "/logs/stats"),
        ("q (rare term), first page", "/logs?q=needle&size=100"),
    ]


def delivery(res: dict[str, Any]) -> dict[str, str]:
    """The delivery check of the reps that ran (none when no rep ran)."""
    return {"delivery": res.get("problem") or "ok"} if res.get("reps") else {}


def _why(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    return a.get("error") or b.get("error") or None


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300] if not isinstance(e, Missing) else str(e)


def tail(path: Path, n: int = 300) -> str:
    try:
        return path.read_text(errors="replace")[-n:].replace("\n", " | ")
    except OSError:
        return "(no log)"


def _which(name: str, bindir: Path) -> str:
    cand = bindir / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found next to {PY} nor on PATH: install the project first")
    return found


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or "?"
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def ensure_websocketd() -> str | None:
    """Install Debian's websocketd when missing; None when it is there, else why not."""
    apt = shutil.which("apt-get")
    if not apt:
        return "no websocketd and no apt-get to install it"
    try:
        r = subprocess.run(
            [apt, "install", "-y", "websocketd"], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get install websocketd failed: {e}"
    if r.returncode != 0 or not shutil.which("websocketd"):
        return f"apt-get install websocketd failed (rc {r.returncode}): {r.stderr.strip()[-200:]}"
    return None


def websocketd_version(path: str | None) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "websocketd"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{path} (Debian {out})" if out else str(path)
    except (OSError, subprocess.TimeoutExpired):
        return str(path)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def psql(dsn: str, sql: str) -> None:
    r = subprocess.run(
        ["psql", dsn, "-v", "ON_ERROR_STOP=1", "-qc", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise RuntimeError(f"psql: {r.stderr.strip()[:200]}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="one rep, smaller sizes (under 5 minutes)")
    ap.add_argument(
        "--reps", type=int, default=3, help="repetitions in full mode (median reported)"
    )
    ap.add_argument("--only", help="comma-separated subset of: " + ",".join(SCENARIOS))
    ap.add_argument(
        "--pg-dsn",
        help="PostgreSQL server to create scratch databases on (default: KERUTA_TEST_PG_DSN)",
    )
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument(
        "--keep", action="store_true", help="keep the temp dirs (logs, databases, spools)"
    )
    args = ap.parse_args()
    if args.only and not set(args.only.split(",")) <= set(SCENARIOS):
        ap.error(f"--only takes {','.join(SCENARIOS)}")
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
