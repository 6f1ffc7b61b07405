#!/usr/bin/env python3
"""Issue 17's queries straight through the Store interface, no network.

    store_query.py --db URL --task T --rows N --out F [--reps 7] [--raw-reps 1]

On the task store_bench.py left behind (N rows): a page of 100 by afterSeq
from the middle, the first page by level=ERROR and by source=stderr, stats,
the first page of q=needle; each median ms over --reps calls after one warm-up
(3 calls when the warm-up took over a second). Then the raw download as
hub/routes/logs.py raw_logs builds it from `store.iter_task`, in MB/s
(10^6 bytes). Uses only hub.store's public interface (open_store_from_url,
LogQuery, query, stats, iter_task), so it keeps measuring whatever layout the
store has behind it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import write_json  # noqa: E402

from hub.store import LogQuery, open_store_from_url  # noqa: E402

SLOW_S = 1.0  # a warm-up slower than this: 3 timed calls instead of --reps


async def timed(
    fn: Callable[[], Awaitable[Any]], check: Callable[[Any], str | None], reps: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = await fn()
    warm = time.perf_counter() - t0
    problem = check(first)
    if problem:
        return {"error": problem}
    n = min(reps, 3) if warm > SLOW_S else reps
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - t0) * 1000)
    return {"ms": statistics.median(times), "calls": n, "warmup_ms": warm * 1000}


def page_check(page: Any) -> str | None:
    return None if page.content else "empty page"


async def raw_download(store: Any, task: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    total = lines = 0
    async for chunk in store.iter_task(task):
        parts = []
        for r in chunk:
            parts.append(r.message if r.partial else r.message + "\n")
        total += len("".join(parts).encode("utf-8", "surrogatepass"))
        lines += len(chunk)
    s = time.perf_counter() - t0
    return {"mb_per_s": total / 1e6 / s if s else None, "bytes": total, "lines": lines, "s": s}


async def measure(a: argparse.Namespace) -> dict[str, Any]:
    store = open_store_from_url(a.db)
    await store.open()
    task, rows = a.task, a.rows
    out: dict[str, Any] = {"rows": rows}
    try:
        pages = {
            "after_seq": LogQuery(task_id=task, after_seq=rows // 2, size=100),
            "level": LogQuery(task_id=task, level="ERROR", size=100),
            "source": LogQuery(task_id=task, source="stderr", size=100),
        }
        for name, q in pages.items():
            out[name] = await timed(partial(store.query, q), page_check, a.reps)
        out["stats"] = await timed(
            lambda: store.stats(task),
            lambda s: None if s.total_logs == rows else f"stats say {s.total_logs} of {rows} lines",
            a.reps,
        )
        out["q"] = await timed(
            lambda: store.query(LogQuery(task_id=task, q="needle", size=100)), page_check, a.reps
        )
        raws = [await raw_download(store, task) for _ in range(a.raw_reps)]
        best = statistics.median(r["mb_per_s"] for r in raws)
        out["raw"] = dict(raws[0], mb_per_s=best, reps=len(raws))
        if raws[0]["lines"] != rows:
            out["raw"]["error"] = f"iter_task gave {raws[0]['lines']} of {rows} lines"
    finally:
        await store.close()
    return out


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    if a.db.startswith("postgres"):
        import trio_asyncio

        async with trio_asyncio.open_loop():
            return await measure(a)
    return await measure(a)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--task", default="bench-query")
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--raw-reps", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    res = trio.run(main_async, a)
    write_json(a.out, res)


if __name__ == "__main__":
    main()
