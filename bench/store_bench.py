#!/usr/bin/env python3
"""The store's own ceiling: records written straight into a store, no network.

    store_bench.py --db sqlite:///PATH | postgresql://... --rows N [--batch 500] --out F
    store_bench.py --db ... --rows N --tasks 50 --batch 1 [--pool 1000] [--out F]

Appends N producer-style records (one producer id, its seqs 1..N, as an agent
run sends them; docs/identity.md) to task --task with `store.append` in
batches of --batch, and reports rows/s over all but the first batch (which
warms caches and prepared statements). The task it leaves behind is the one
the query figures read: levels INFO / WARN (1 in 7) / ERROR (1 in 100),
stderr 1 line in 5, and the rare term "needle" in 1 line in 50,000.

With --tasks T, the fleet's shape instead: each append holds --batch records
of each of T tasks, every task its own producer (a hub's writer coalescing
the frames of many agents into one commit), the tasks taken in turn from a
pool of --pool (default T). It reports the CPU the whole process spent per
record (time.process_time: the store's worker threads too), which the
machine's varying wall speed leaves alone, and prints it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import write_json  # noqa: E402

from hub.store import Incoming, open_store_from_url  # noqa: E402

TS = "2026-11-28T12:00:00.000Z"
RARE = "needle"


def message(i: int) -> str:
    word = RARE if i % 50_000 == 25_000 else "item"
    return f"{i:09d} worker-{i % 16} processed {word} {i} in {i * 7 % 1000} ms ".ljust(79, "x")


def batch(task: str, producer: str, start: int, end: int) -> list[Incoming]:
    return [
        Incoming(
            task_id=task,
            seq=i,
            timestamp=TS,
            source="stderr" if i % 5 == 0 else "stdout",
            level="ERROR" if i % 100 == 0 else "WARN" if i % 7 == 0 else "INFO",
            message=message(i),
            line_number=i,
            producer=producer,
        )
        for i in range(start, end)
    ]


async def load(db: str, task: str, rows: int, size: int) -> dict[str, object]:
    store = open_store_from_url(db)
    await store.open()
    try:
        producer = "bench-ceiling-0001"
        elapsed = cpu = 0.0
        timed_rows = 0
        for n, start in enumerate(range(1, rows + 1, size)):
            items = batch(task, producer, start, min(start + size, rows + 1))
            began, began_cpu = time.perf_counter(), time.process_time()
            res = await store.append(items)
            # As the hub's writer does, after answering: a quiet task's small chunks merged.
            await store.compact(res.compact)
            if n:
                elapsed += time.perf_counter() - began
                cpu += time.process_time() - began_cpu
                timed_rows += len(items)
            if len(res.inserted) != len(items):
                raise RuntimeError(
                    f"batch at {start}: {len(res.inserted)} of {len(items)} inserted"
                )
        durable = await store.durable_seq(task)
    finally:
        await store.close()
    print(f"bulk {size}: {cpu / max(timed_rows, 1) * 1e6:.2f} us CPU/record,"
          f" {timed_rows / elapsed if elapsed else 0:.0f} rows/s wall")
    return {
        "rows": rows,
        "durable": durable,
        "rows_per_s": timed_rows / elapsed if elapsed else None,
        "cpu_us_per_row": cpu / timed_rows * 1e6 if timed_rows else None,
        "seconds": elapsed,
    }


async def load_fleet(db: str, rows: int, tasks: int, size: int, pool: int) -> dict[str, object]:
    store = open_store_from_url(db)
    await store.open()
    try:
        names = [(f"fleet-{k:05d}", f"fleet-agent-{k:05d}") for k in range(pool)]
        sent = [0] * pool
        turn = 0
        appends = rows // (tasks * size)
        wall = cpu = 0.0
        timed_rows = 0
        for n in range(appends + 1):
            items = []
            for _ in range(tasks):
                k = turn % pool
                turn += 1
                task, producer = names[k]
                items += batch(task, producer, sent[k] + 1, sent[k] + 1 + size)
                sent[k] += size
            began, began_cpu = time.perf_counter(), time.process_time()
            res = await store.append(items)
            await store.compact(res.compact)
            if n:  # the first creates the tasks and warms up
                wall += time.perf_counter() - began
                cpu += time.process_time() - began_cpu
                timed_rows += len(items)
            if len(res.inserted) != len(items):
                raise RuntimeError(f"append {n}: {len(res.inserted)} of {len(items)} inserted")
    finally:
        await store.close()
    res_ = {
        "rows": timed_rows,
        "tasks": tasks,
        "batch": size,
        "rows_per_s": timed_rows / wall if wall else None,
        "cpu_us_per_row": cpu / timed_rows * 1e6 if timed_rows else None,
        "seconds": wall,
    }
    print(f"fleet {tasks}x{size} (pool {pool}): {res_['cpu_us_per_row']:.1f} us CPU/record,"
          f" {res_['rows_per_s']:.0f} rows/s wall")
    return res_


async def main_async(a: argparse.Namespace) -> dict[str, object]:
    if a.tasks:
        work = lambda: load_fleet(a.db, a.rows, a.tasks, a.batch, a.pool or a.tasks)  # noqa: E731
    else:
        work = lambda: load(a.db, a.task, a.rows, a.batch)  # noqa: E731
    if a.db.startswith("postgres"):
        import trio_asyncio

        async with trio_asyncio.open_loop():
            return await work()
    return await work()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--task", default="bench-query")
    ap.add_argument("--tasks", type=int, default=0, help="the fleet's shape: this many tasks an append")
    ap.add_argument("--pool", type=int, default=0, help="with --tasks: the tasks taken in turn")
    ap.add_argument("--out")
    a = ap.parse_args()
    res = trio.run(main_async, a)
    if a.out:
        write_json(a.out, res)


if __name__ == "__main__":
    main()
