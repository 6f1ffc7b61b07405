"""The store scenario: each store's append ceiling and its REST queries on a large task."""

from __future__ import annotations

import http.client
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    free_port,
    median,
    start,
    stop,
    wait_healthz,
)
from harness import Harness  # noqa: E402
from tools import PY, STORE_BENCH, describe, query_list, tail  # noqa: E402


class StoreScenarios(Harness):
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
