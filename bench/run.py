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
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    children,
    format_table,
    free_port,
    json_line,
    median,
    peak_rss_mib,
    percentile,
    ratio,
    start,
    stop,
    wait_healthz,
)
from stores import StoreScenarios  # noqa: E402
from targets import ci_figures, targets_table  # noqa: E402
from tools import (  # noqa: E402
    CI_STEP,
    FLEET,
    FLOOR,
    IDLE_FLOOR,
    INGEST,
    PRODUCER,
    PY,
    SCENARIOS,
    WAKEUPS,
    Missing,
    delivery,
    describe,
    missing_reason,
    tail,
    websocketd_version,
)


class Bench(StoreScenarios):
    """The scenarios of issue 8, each adding its figures."""

    def scenario_e2e(self) -> None:
        n = self.size("e2e_lines")
        params = {"lines": n, "bytes_per_line": 80, "viewers": 1, "reps": self.reps}
        timeout = 60 + n / 2000
        wsd = self.guarded(lambda: self.websocketd_stream(1, n, timeout=timeout))
        wsd_rate = self.add_rate(
            "websocketd 1 viewer, live only", wsd, params, key="e2e.websocketd"
        )
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
                f"keruta end to end, persisted in {label}, 1 viewer",
                res,
                params,
                hub=True,
                key=f"e2e.{store}",
            )
            self.add(
                "ratio keruta/websocketd" + f" ({label}, 1 viewer)",
                ratio(k, wsd_rate),
                "x",
                params,
                missing=missing_reason(res, wsd),
                key=f"e2e.ratio.{store}",
            )
            self.add_cpu_budget(label, res, n, params)

    def add_cpu_budget(self, label: str, res: dict[str, Any], lines: int, params: dict[str, Any]) -> None:
        """Where the machine's CPU went per line in an end-to-end run: the hub,
        the agent with its command, the viewer. 150,000 lines/s on 2 cores is
        a budget of 13.3 CPU-µs a line for all of them together."""
        parts = {"hub": "hub_cpu_s", "agent + command": "agent_cpu_s", "viewer": "viewer_cpu_s"}
        total: float | None = 0.0
        for who, field in parts.items():
            per = [r[field] / lines * 1e6 for r in res.get("reps", []) if r.get(field) is not None]
            value = round(median(per), 2) if per else None
            self.add(f"end to end, {label}: {who} CPU per line", value, "µs/line", params,
                     missing=None if per else "not measured")
            total = None if total is None or value is None else total + value
        self.add(f"end to end, {label}: CPU per line, all processes", total, "µs/line",
                 dict(params, budget_for_150k_on_2_cores=round(2e6 / 150_000, 1)))

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
                missing=missing_reason(res, wsd),
                key=f"fanout.ratio.{viewers}",
            )

    def scenario_latency(self) -> None:
        n = self.size("lat_lines")
        params = {"lines": n, "interval_ms": 10, "reps": self.reps}
        for who in ("websocketd", "keruta", "floor"):
            if who == "websocketd":
                reps = self.guarded(
                    lambda: self.websocketd_stream(1, n, lat=True, timeout=60 + n / 50)
                )
            elif who == "floor":
                # bench/latency_floor.py: keruta's crossings and a commit in a
                # worker thread, nothing else
                reps = self.guarded(lambda: self.latency_floor_stream(n, timeout=60 + n / 50))
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
                    f"{who} latency p{q} (write -> viewer)"
                    if who != "floor"
                    else f"latency floor p{q}: a bare Trio relay and server, the line committed to SQLite in a worker thread",
                    ms,
                    "ms",
                    p,
                    missing=reps.get("error"),
                    key=f"lat.{who}.p{q}",
                )
        # The floor under them: what waking a sleeping thread or process costs
        # here (bench/wakeups.py); a keruta line wakes three processes and the
        # hub's commit thread, a websocketd line two processes.
        try:
            done = subprocess.run([PY, WAKEUPS], check=True, timeout=120, capture_output=True, text=True)
            woke = json.loads(done.stdout.splitlines()[-1])
        except Exception as e:  # noqa: BLE001 - the figures go missing, the run goes on
            self.add("latency floor: wake-ups", None, "", {}, missing=describe(e))
            return
        self.add("latency floor: a Trio worker-thread round trip, 10 ms after the last", woke["thread_round_trip_idle_ms"],
                 "ms", {"back_to_back_ms": woke["thread_round_trip_busy_ms"]}, key="lat.floor.thread")
        self.add("latency floor: a process-to-process round trip, 10 ms after the last",
                 woke["process_round_trip_idle_ms"], "ms", {}, key="lat.floor.process")

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

    def scenario_fleet(self) -> None:
        """bench/fleet.py: many producer connections, each a one-record frame
        5 times a second (or 20 lines a second shaped as the agent sends
        them), 50 viewers on 10 of the tasks; then 5,000 idle connections, and
        what 5,000 idle connections cost a bare Trio server and hypercorn with
        keruta's patches (bench/idle_floor.py: the floor under that figure)."""
        seconds = self.size("fleet_seconds")
        runs = [
            ("flat", 200, 5.0, 50), ("flat", 1000, 5.0, 50), ("agent", 1000, 20.0, 50), ("idle", 5000, 0.0, 0),
        ]
        for mode, producers, rate, viewers in runs:
            out = Path(self.tmp("fleet")) / "fleet.json"
            cmd = [PY, FLEET, "--producers", str(producers), "--rate", str(rate), "--viewers", str(viewers),
                   "--seconds", str(seconds if rate else 5), "--mode", "agent" if mode == "agent" else "flat",
                   "--out", str(out)]
            label = f"fleet {producers} {'idle' if mode == 'idle' else mode} producers"
            params: dict[str, Any] = {"producers": producers, "rate": rate, "mode": mode, "viewers": viewers,
                                      "seconds": seconds}
            try:
                subprocess.run(cmd, check=True, timeout=seconds + 600, stdout=subprocess.DEVNULL)
                r = json.loads(out.read_text())
            except Exception as e:  # noqa: BLE001 - a figure goes missing, the run goes on
                self.add(label, None, "", params, missing=describe(e))
                continue
            params.update({k: r[k] for k in ("frames_offered_per_s", "lines_taken_per_s", "store_missing",
                                             "store_extra", "viewer_lost", "viewer_doubled", "load")})
            self.add(f"{label}: hub RSS peak", r["hub_rss_peak_mb"], "MB", params, key=f"fleet.{mode}{producers}.rss")
            if not rate:
                # What they cost connected and idle; the peak also holds their
                # arrival and their departure (5,000 at once, each way).
                self.add(f"{label}: hub RSS, all connected and idle", r["hub_rss_connected_mb"], "MB",
                         dict(params, rss_start_mb=r["hub_rss_start_mb"]), key=f"fleet.{mode}{producers}.rss_connected")
            if rate:
                self.add(f"{label}: ack p50", r["ack_p50_ms"], "ms", params, key=f"fleet.{mode}{producers}.p50")
                self.add(f"{label}: ack p99", r["ack_p99_ms"], "ms", params, key=f"fleet.{mode}{producers}.p99")
                self.add(f"{label}: hub CPU per frame", r["hub_cpu_us_per_frame"], "µs", params,
                         key=f"fleet.{mode}{producers}.cpu")
            if r.get("line_p99_ms") is not None:
                # The agent's own wait for a frame comes before the ack's.
                self.add(f"{label}: a line's arrival to its ack, p50", r["line_p50_ms"], "ms", params,
                         key=f"fleet.{mode}{producers}.line_p50")
                self.add(f"{label}: a line's arrival to its ack, p99", r["line_p99_ms"], "ms", params,
                         key=f"fleet.{mode}{producers}.line_p99")
        for server in ("hypercorn-floor", "trio-floor", "trio-store-floor"):
            # The same fleets against a server that only decodes each frame and
            # acks it (bench/frame_floor.py): the floor under the hub's CPU per
            # frame, and under the agents' ack p99, on each stack; and against
            # the bare Trio server that also commits and syncs what it acks
            # with keruta's store, as the hub must.
            for mode, rate in (("flat", 5.0), ("agent", 20.0)):
                out = Path(self.tmp("fleet")) / "floor.json"
                bare = server.removesuffix("-floor")
                does = "decode, ack"
                if bare == "trio-store":
                    bare, does = "trio", "decode, commit to keruta's SQLite store, sync, ack"
                label = (f"frame floor: 1000 producers x 5/s to a bare {bare} server ({does})" if mode == "flat"
                         else f"frame floor: 1000 agents x 20 lines/s to a bare {bare} server ({does})")
                key = f"fleet.floor.{server}" + ("" if mode == "flat" else ".agent")
                try:
                    subprocess.run([PY, FLEET, "--server", server, "--producers", "1000", "--rate", str(rate),
                                    "--viewers", "0", "--mode", mode, "--seconds", str(seconds), "--out", str(out)],
                                   check=True, timeout=seconds + 600, stdout=subprocess.DEVNULL)
                    r = json.loads(out.read_text())
                except Exception as e:  # noqa: BLE001 - a figure goes missing, the run goes on
                    self.add(label, None, "", {"server": server, "mode": mode}, missing=describe(e))
                    continue
                params = {"server": server, "mode": mode, "load": r["load"], "ack_p50_ms": r["ack_p50_ms"]}
                if mode == "flat":
                    self.add(f"{label}: CPU per frame", r["hub_cpu_us_per_frame"], "µs",
                             dict(params, ack_p99_ms=r["ack_p99_ms"]), key=f"{key}.cpu")
                    if server == "trio-store-floor":
                        self.add(f"{label}: ack p99", r["ack_p99_ms"], "ms",
                                 dict(params, cpu_us_per_frame=r["hub_cpu_us_per_frame"]), key=f"{key}.p99")
                else:
                    self.add(f"{label}: ack p99", r["ack_p99_ms"], "ms",
                             dict(params, cpu_us_per_frame=r["hub_cpu_us_per_frame"]), key=f"{key}.p99")
        try:
            done = subprocess.run([PY, IDLE_FLOOR, "--connections", "5000"], check=True, timeout=600,
                                  capture_output=True, text=True)
            floors = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        except Exception as e:  # noqa: BLE001 - a figure goes missing, the run goes on
            self.add("idle floor", None, "", {"connections": 5000}, missing=describe(e))
            return
        for floor in floors:
            self.add(f"idle floor: 5000 connections to a bare {floor['kind']} server, RSS", floor["rss_after_mb"],
                     "MB", {k: floor[k] for k in ("rss_before_mb", "kb_per_connection")})

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

    def scenario_ci(self) -> None:
        """Issue 17's CI step, measured by bench/ci_step.py (its own module: it times
        the bare command and `keruta-agent run` with the hub down and up). The hook:
        when the file is not there, the CI rows say so and the run goes on."""
        params: dict[str, Any] = {}
        try:
            if not CI_STEP.exists():
                raise Missing(f"{CI_STEP.name} not present (hook: scenario_ci in bench/run.py)")
            res, params = self.run_ci_step()
            err = res.get("error")
        except Exception as e:  # noqa: BLE001
            res, err = {}, describe(e)
        for name, value, unit, key in ci_figures(res):
            self.add(name, value, unit, params, missing=err, key=key)

    def run_ci_step(self) -> tuple[dict[str, Any], dict[str, Any]]:
        d = self.tmp("ci")
        # ci_step.py's flags are its own: pass the ones its --help offers
        helptext = subprocess.run(
            [PY, str(CI_STEP), "--help"], capture_output=True, text=True, timeout=60
        ).stdout
        cmd = [PY, str(CI_STEP)]
        params: dict[str, Any] = {}
        if "--lines" in helptext:
            cmd += ["--lines", str(self.size("ci_lines"))]
            params["lines"] = self.size("ci_lines")
        if self.quick and "--quick" in helptext:
            cmd.append("--quick")
            params["quick"] = True
        elif "--reps" in helptext:
            cmd += ["--reps", str(self.reps)]
            params["reps"] = self.reps
        out = d / "ci_step.out"
        p = start(cmd, str(out), env=self.env, cwd=d)
        try:
            rc = p.wait(900)
        finally:
            stop(p)
        found = None
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found = json.loads(line)
        if rc != 0 or not isinstance(found, dict):
            raise RuntimeError(f"ci_step.py exited {rc}: {tail(out)}")
        params["lines"] = found.get("lines", params.get("lines"))
        # what the hub says it stored of the last runs: every line, or the figure is suspect
        params.update({k: v for k, v in found.items() if k.endswith("_stored") or k == "load"})
        return found, params

    def scenario_floor(self) -> None:
        """The least CPU a hub spends per record (bench/floor.py), beside what
        keruta's hub spent per line in this run's e2e scenario."""
        d = self.tmp("floor")
        out = d / "floor.json"
        p = start([PY, FLOOR, "--out", str(out)], str(d / "floor.log"))
        try:
            rc = p.wait(300)
        finally:
            stop(p)
        if rc != 0 or not out.exists():
            raise RuntimeError(f"floor.py exited {rc}: {tail(d / 'floor.log')}")
        res = json.loads(out.read_text())
        params = {"records_per_frame": res["records_per_frame"]}
        for step, us in res["steps_us"].items():
            self.add(f"hub floor: {step}", round(us, 2), "µs/record", params)
        floor = round(res["sum_us"], 2)
        self.add("hub floor: the sum, per record", floor, "µs/record", params, key="floor.sum")
        hub = next((f["value"] for f in self.figures
                    if f["name"] == "end to end, SQLite: hub CPU per line" and f.get("value")), None)
        self.add("hub CPU per line (e2e, SQLite) / floor", ratio(hub, floor), "x", params,
                 missing=None if hub else "the e2e scenario did not run or measured no hub CPU")

    def scenario_features(self) -> None:
        """What sections and verification cost end to end: the same SQLite
        stream, plain and with a GitHub group every 1,000 lines, alternated,
        judged on CPU (hub + agent with its command) per line, which a shared
        machine disturbs less than wall time; then the hub's `verify` of the
        task just streamed."""
        n = self.size("e2e_lines")
        every = 1000
        timeout = 60 + n / 2000
        params = {"lines": n, "bytes_per_line": 80, "viewers": 1, "section_every": every, "reps": self.reps}
        plain: list[dict[str, Any]] = []
        marked: list[dict[str, Any]] = []
        for _ in range(max(self.reps, 2)):
            for runs, extra in ((plain, ()), (marked, ("--section-every", str(every)))):
                try:
                    runs.append(self.keruta_stream(
                        f"sqlite:///{self.tmp('db')}/keruta.db", 1, n, timeout=timeout, producer_args=extra
                    ))
                except Exception as e:  # noqa: BLE001 - reported as a missing figure
                    self.add("features: a stream failed", None, "", params, missing=describe(e))
                    return

        def cpu_us(runs: list[dict[str, Any]]) -> float | None:
            per = [(r["hub_cpu_s"] + r["agent_cpu_s"]) / n * 1e6 for r in runs
                   if r.get("hub_cpu_s") is not None and r.get("agent_cpu_s") is not None]
            return median(per) if per else None

        base, with_sections = cpu_us(plain), cpu_us(marked)
        self.add("CPU per line, plain (hub + agent)", round(base, 2) if base else None, "µs/line", params)
        self.add("CPU per line, a section every 1,000 lines", round(with_sections, 2) if with_sections else None,
                 "µs/line", params)
        cost = None if not base or with_sections is None else round((with_sections - base) / base * 100, 1)
        self.add("sections: CPU cost over plain", cost, "%", params, key="features.sections_cost")
        rates = [median([r.get("rate") for r in runs]) for runs in (plain, marked)]
        if all(rates):
            self.add("sections: end-to-end rate, marked / plain", round(rates[1] / rates[0], 3), "x", params)
        # Verification is always on: what it adds is the agent's digest of each
        # line it sends (keruta/digest.py), measured here on the same lines, as
        # a share of the whole way's CPU per line above. The hub's check runs
        # only when asked (GET .../verify), off the streaming path.
        digest_us = self.digest_us_per_line()
        self.add("verification: the agent's digest, CPU per line", round(digest_us, 3), "µs/line", {})
        share = None if not base else round(digest_us / base * 100, 1)
        self.add("verification: share of end-to-end CPU per line", share, "%", params, key="features.verify_cost")

    @staticmethod
    def digest_us_per_line() -> float:
        sys.path.insert(0, str(HERE.parent))
        from keruta import digest

        lines = [b"%09d " % i + b"x" * 69 for i in range(2000)]
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for k in range(10):
                digest.block_sum(1 + 2000 * k, "stdout", 1 + 2000 * k, lines)
            best = min(best, (time.perf_counter() - t0) / 20_000 * 1e6)
        return best

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
        goals = targets_table(self.figures)
        footer = f"total {time.monotonic() - started:.0f} s"
        note = (
            "Issue 17's targets (* = measured on another task size than the target's; "
            "queries through the Store interface, REST beside them):"
        )
        text = "\n\n".join([header, note, goals, "All figures:", table, footer]) + "\n"
        print("\n" + text, flush=True)
        results = Path(self.args.results_dir)
        results.mkdir(parents=True, exist_ok=True)
        stamp = self.date.replace(":", "")
        (results / f"bench-{stamp}.jsonl").write_text(
            "".join(json_line(f) + "\n" for f in self.figures)
        )
        (results / f"bench-{stamp}.md").write_text(text)
        (results / "latest.md").write_text(text)
        print(f"results: {results}/bench-{stamp}.jsonl and .md, {results}/latest.md", flush=True)
        if not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            print(f"kept {self.root}")
        return 0


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
    ap.add_argument(
        "--rows",
        type=int,
        help="lines of the store scenario's first task (default 1,000,000, issue 17's size)",
    )
    ap.add_argument(
        "--big-rows",
        type=int,
        help="lines of its second task (default 10,000,000 in the full run, 0 = none; quick: 0)",
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
