"""The store scenario: for each store and each task size (1,000,000 lines; 10,000,000 in
the full run), a fresh database loaded by store_bench.py, then its size on disk, the
queries through the Store interface (store_query.py) and through a hub's REST API,
raw download included.

Nothing here reads the store's tables: the load and the Store-interface queries go
through hub.store's interface, the disk figure through files and PostgreSQL's
catalog, the rest through REST. So it measures whatever layout the store has.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    free_port,
    median,
    start,
    stop,
    wait_healthz,
)
from disk import pg_bytes, sqlite_bytes  # noqa: E402
from harness import Harness  # noqa: E402
from targets import QUERIES, STORES, query_key, raw_key  # noqa: E402
from tools import PY, STORE_BENCH, STORE_QUERY, describe, query_paths, tail  # noqa: E402

TASK = "bench-query"  # the task store_bench.py writes
SLOW_S = 1.0  # a warm-up slower than this: 3 timed requests instead of 7
REST_REPS = 7


def store_figures(store: str, label: str, slot: str, rows: int) -> list[tuple[str, str, str]]:
    """(key, name, unit) of every figure the store scenario adds for one store and task."""
    task = f"{label}, {rows:,}-line task"
    out = [
        (
            f"append.{store}" if slot == "small" else f"append.{store}.{slot}",
            f"{label} store.append ceiling (batches of 500, no network), loading the {rows:,}-line task",
            "rows/s",
        ),
        (f"load_s.{store}.{slot}", f"{task}: load time (store_bench process, wall)", "s"),
        (f"disk.{store}.{slot}", f"{task}: disk per line", "bytes/line"),
    ]
    for qid, qlabel, _, _ in QUERIES:
        out.append(
            (query_key(store, slot, qid, "store"), f"{task}: {qlabel} (Store interface)", "ms")
        )
        out.append((query_key(store, slot, qid, "rest"), f"{task}: {qlabel} (REST)", "ms"))
    out.append((raw_key(store, slot, "iter"), f"{task}: raw download (store.iter_task)", "MB/s"))
    out.append((raw_key(store, slot, "rest"), f"{task}: raw download (REST)", "MB/s"))
    return out


def load_task(d: Path, db: str, rows: int, batch: int, timeout: float) -> dict[str, Any]:
    """bench/store_bench.py's load of TASK (rows records, `batch` an append); its result."""
    out = d / "store.json"
    p = start(
        [PY, STORE_BENCH, "--db", db, "--rows", str(rows), "--batch", str(batch), "--task", TASK, "--out", str(out)],
        str(d / "store.log"),
    )
    try:
        rc = p.wait(timeout)
    finally:
        stop(p)
    if rc != 0 or not out.exists():
        raise RuntimeError(f"store_bench exited {rc}: {tail(d / 'store.log')}")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


class StoreScenarios(Harness):
    def store_sizes(self) -> list[tuple[str, int]]:
        sizes = [("small", self.rows_small)]
        if self.rows_big:
            sizes.append(("big", self.rows_big))
        return sizes

    def scenario_store(self) -> None:
        for store, label in STORES:
            for slot, rows in self.store_sizes():
                expected = store_figures(store, label, slot, rows)
                try:
                    with self.store_db(store) as db:
                        self.store_task(db, store, label, slot, rows)
                except Exception as e:  # noqa: BLE001 - the figures go missing, the run goes on
                    done = {f.get("key") for f in self.figures}
                    for key, name, unit in expected:
                        if key not in done:
                            self.add(name, None, unit, {"rows": rows}, missing=describe(e), key=key)

        for store, label in STORES:
            try:
                with self.store_db(store) as db:
                    self.quiet_task(db, store, label)
            except Exception as e:  # noqa: BLE001 - the figure goes missing, the run goes on
                self.add(f"{label}, a quiet task: disk per line", None, "bytes/line", {}, missing=describe(e))

    def quiet_task(self, db: str, store: str, label: str, rows: int = 10_000) -> None:
        """A task written a record a commit, as a quiet job's agent writes it
        (the fleet's shape): its bytes on disk per line."""
        load_task(self.tmp("quiet"), db, rows, 1, 120 + rows / 50)
        size = sqlite_bytes(db) if store == "sqlite" else pg_bytes(db)
        params = {"rows": rows, "batch": 1, "text_bytes_per_line": 80}
        self.add(f"{label}, a quiet task: disk per line", size["bytes"] / rows, "bytes/line", params,
                 key=f"disk.{store}.quiet")
        if store == "pg":
            # Merged chunks and updated rows leave dead tuples that VACUUM makes
            # reusable but does not give back: the live data alone.
            live = pg_bytes(db, full=True)
            self.add(f"{label}, a quiet task: disk per line after VACUUM FULL", live["bytes"] / rows, "bytes/line",
                     params, key=f"disk.{store}.quiet.live")

    @contextlib.contextmanager
    def store_db(self, store: str) -> Iterator[str]:
        if store == "pg":
            with self.pg_database() as url:
                yield url
            return
        d = self.tmp("db")
        try:
            yield f"sqlite:///{d}/keruta.db"
        finally:
            if not self.args.keep:  # the 10M file is gigabytes: free it now
                shutil.rmtree(d, ignore_errors=True)

    def store_task(self, db: str, store: str, label: str, slot: str, rows: int) -> None:
        names = {key: (name, unit) for key, name, unit in store_figures(store, label, slot, rows)}

        def add(
            key: str, value: float | None, params: dict[str, Any], missing: str | None = None
        ) -> None:
            name, unit = names[key]
            self.add(name, value, unit, dict({"rows": rows}, **params), missing=missing, key=key)

        d = self.tmp("store")
        # 1. load: store.append in batches of 500
        t0 = time.monotonic()
        res = load_task(d, db, rows, 500, 120 + rows / 2000)
        load_s = time.monotonic() - t0
        append_key = f"append.{store}" if slot == "small" else f"append.{store}.{slot}"
        add(append_key, res["rows_per_s"], {"batch": 500, "producer": "one producer id", "reps": 1})
        add(f"load_s.{store}.{slot}", load_s, {"append_s": round(res["seconds"], 1)})

        # 2. disk, the store closed
        size = sqlite_bytes(db) if store == "sqlite" else pg_bytes(db)
        add(
            f"disk.{store}.{slot}",
            size["bytes"] / rows,
            dict(
                {"total_mb": round(size["bytes"] / 1e6, 1), "text_bytes_per_line": 80},
                **{k: v for k, v in size.items() if k != "bytes"},
            ),
        )

        # 3. the queries through the Store interface
        qout = d / "query.json"
        raw_reps = 1 if (self.quick or slot == "big") else 3
        p = start(
            [
                PY,
                STORE_QUERY,
                "--db",
                db,
                "--task",
                TASK,
                "--rows",
                str(rows),
                "--raw-reps",
                str(raw_reps),
                "--out",
                str(qout),
            ],
            str(d / "query.log"),
        )
        try:
            rc = p.wait(300 + rows / 2000)
        finally:
            stop(p)
        if rc != 0 or not qout.exists():
            err = f"store_query exited {rc}: {tail(d / 'query.log')}"
            for qid, _, _, _ in QUERIES:
                add(query_key(store, slot, qid, "store"), None, {}, missing=err)
            add(raw_key(store, slot, "iter"), None, {}, missing=err)
        else:
            q = json.loads(qout.read_text())
            for qid, _, _, _ in QUERIES:
                r = q.get(qid, {})
                add(
                    query_key(store, slot, qid, "store"),
                    r.get("ms"),
                    {"calls": r.get("calls"), "via": "Store interface"},
                    missing=r.get("error"),
                )
            raw = q.get("raw", {})
            add(
                raw_key(store, slot, "iter"),
                raw.get("mb_per_s") if not raw.get("error") else None,
                {
                    "mb": round(raw.get("bytes", 0) / 1e6, 1),
                    "reps": raw.get("reps"),
                    "via": "store.iter_task joined as raw_logs does",
                },
                missing=raw.get("error"),
            )

        # 4. the same through a hub's REST API, and the raw endpoint
        self.rest_queries(db, d, store, slot, rows, raw_reps, add)

    def rest_queries(
        self, db: str, d: Path, store: str, slot: str, rows: int, raw_reps: int, add: Any
    ) -> None:
        port = free_port()
        hub = start(
            [self.hub_bin, "--host", "127.0.0.1", "--port", str(port), "--db", db],
            str(d / "hub.log"),
            env=self.env,
            cwd=d,
        )
        try:
            if not wait_healthz(port, hub, 120):
                raise RuntimeError(f"keruta-hub not healthy within 120 s: {tail(d / 'hub.log')}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            for qid, path in query_paths(rows):
                times: list[float] = []
                err = None
                reps = REST_REPS
                for i in range(reps + 1):  # the first warms caches and is not counted
                    t0 = time.perf_counter()
                    conn.request("GET", f"/api/v1/tasks/{TASK}{path}")
                    r = conn.getresponse()
                    body = r.read()
                    s = time.perf_counter() - t0
                    if r.status != 200 or b'"content":[]' in body:
                        err = f"HTTP {r.status}, {body[:120]!r}"
                        break
                    if i == 0 and s > SLOW_S:
                        reps = 3
                    if i:
                        times.append(s * 1000)
                    if i >= reps:
                        break
                add(
                    query_key(store, slot, qid, "rest"),
                    median(times) if not err else None,
                    {"requests": len(times), "via": "REST, keep-alive"},
                    missing=err,
                )
            rates: list[float] = []
            err = cut = None
            want = rows * 80  # store_bench's lines are 79 characters and a newline
            for _ in range(raw_reps):
                t0 = time.perf_counter()
                conn.request("GET", f"/api/v1/tasks/{TASK}/logs/raw")
                r = conn.getresponse()
                got = 0
                try:
                    while chunk := r.read(1 << 20):
                        got += len(chunk)
                except http.client.IncompleteRead as e:
                    got += len(e.partial)
                s = time.perf_counter() - t0
                if r.status != 200:
                    err = f"HTTP {r.status}"
                    break
                rates.append(got / 1e6 / s)
                if got != want:
                    # the rate of what came is still a rate; the cut is a failure
                    cut = f"cut: {got:,} of {want:,} bytes, the hub closed it after {s:.0f} s"
                    break
            conn.close()
            add(
                raw_key(store, slot, "rest"),
                median(rates) if not err else None,
                {
                    "mb": round(want / 1e6, 1),
                    "reps": len(rates),
                    "via": "GET .../logs/raw, keep-alive",
                    "delivery": cut or "ok",
                },
                missing=err,
            )
        finally:
            stop(hub, grace=15)
