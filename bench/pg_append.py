"""PostgreSQL store: append throughput (COPY vs INSERT ... unnest) and `q` search cost.

    /tmp/venv/bin/python bench/pg_append.py [--dsn postgresql://postgres@127.0.0.1:5432/test]
        [--rows 200000] [--batch 500] [--q-rows 1000000]

Works in throwaway databases (keruta_bench_*) created and dropped through the
--dsn server. Prints one line per measurement.

1. append: `PostgresStore.append` end to end (task row lock, insert, durable
   watermark, counts, NOTIFY, commit), one task, `--rows` rows in batches of
   `--batch`, once per insert method; and the bare insert statement of each
   method alone in a transaction, to show what the method itself costs.
2. q: a task of `--q-rows` rows; a page (100 rows + total count) for a rare,
   a common and an absent substring with `strpos` (what the store runs), then
   the same through a pg_trgm GIN index with `LIKE '%...%'`, plus the index's
   build time and size and what it costs appends.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import trio
import trio_asyncio
import triopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub.store.base import Incoming, LogQuery  # noqa: E402
from hub.store.postgres import PostgresStore  # noqa: E402
from keruta.timefmt import now_ts  # noqa: E402


@asynccontextmanager
async def scratch_database(dsn: str):  # type: ignore[no-untyped-def]
    name = "keruta_bench_" + secrets.token_hex(4)
    async with triopg.connect(dsn) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(dsn)._replace(path="/" + name))
    finally:
        with trio.CancelScope(shield=True):
            async with triopg.connect(dsn) as admin:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def batches(task: str, rows: int, batch: int) -> list[list[Incoming]]:
    ts = now_ts()
    out = []
    for start in range(1, rows + 1, batch):
        out.append(
            [
                Incoming(
                    task_id=task,
                    seq=seq,
                    timestamp=ts,
                    source="stdout" if seq % 5 else "stderr",
                    level="INFO" if seq % 7 else "WARN",
                    message=f"2026-01-01 12:00:00 worker-{seq % 16} processed item {seq} in {seq * 7 % 1000} ms",
                    line_number=seq,
                    metadata={"processId": 4242},
                )
                for seq in range(start, min(start + batch, rows + 1))
            ]
        )
    return out


async def bench_store_append(dsn: str, method: str, rows: int, batch: int) -> float:
    async with scratch_database(dsn) as url:
        store = PostgresStore(url, insert_method=method)
        await store.open()
        try:
            work = batches("bench", rows, batch)
            await store.append(work[0])  # warm up: prepared statements, catalog caches
            started = time.perf_counter()
            for items in work[1:]:
                await store.append(items)
            elapsed = time.perf_counter() - started
            assert await store.durable_seq("bench") == rows
        finally:
            await store.close()
    return (rows - len(work[0])) / elapsed


async def bench_bare_insert(dsn: str, method: str, rows: int, batch: int) -> float:
    """Only the insert statement(s) of a method, each batch its own transaction."""
    from hub.store.rules import TaskProgress, plan_batch

    async with scratch_database(dsn) as url:
        store = PostgresStore(url, insert_method=method)
        await store.open()
        try:
            work = batches("bench", rows, batch)
            # every record is new: the plan's records are exactly what gets inserted
            plans = [
                [r for r in plan_batch(items, {"bench": TaskProgress(0, 0)}).records if r is not None]
                for items in work
            ]
            elapsed = 0.0
            for n, fresh in enumerate(plans):
                started = time.perf_counter()
                inserted = await store._write(store._dialect.insert(fresh))
                if n:
                    elapsed += time.perf_counter() - started
                assert len(inserted) == len(fresh)
        finally:
            await store.close()
    return (rows - len(plans[0])) / elapsed


async def timed(conn: Any, sql: str, *args: Any, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await conn.fetch(sql, *args)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def time_store_query(store: PostgresStore, q: str, runs: int = 5) -> tuple[float, int]:
    times = []
    total = 0
    for _ in range(runs):
        started = time.perf_counter()
        page = await store.query(LogQuery(task_id="big", q=q, size=100))
        times.append(time.perf_counter() - started)
        total = page.total_elements
    return statistics.median(times) * 1000, total


def like_pattern(q: str) -> str:
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def bench_q(dsn: str, q_rows: int, batch: int) -> None:
    async with scratch_database(dsn) as url:
        store = PostgresStore(url)
        await store.open()
        try:
            async with store._connection() as conn:
                started = time.perf_counter()
                await conn.execute(
                    """
                    INSERT INTO keruta_logs (task_id, seq, id, ts, source, level, message, line_number, metadata, partial)
                    SELECT 'big', i, md5(i::text), to_char(timestamp '2026-01-01' + i * interval '1 ms',
                           'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                           CASE WHEN i % 5 = 0 THEN 'stderr' ELSE 'stdout' END,
                           CASE WHEN i % 7 = 0 THEN 'WARN' ELSE 'INFO' END,
                           'worker-' || (i % 16) || ' processed item ' || i || ' hash ' || md5(i::text),
                           i, NULL, false
                    FROM generate_series(1, $1) AS i
                    """,
                    q_rows,
                )
                await conn.execute(
                    "INSERT INTO keruta_tasks (task_id, state, durable_seq, max_seq, total_logs) VALUES ('big', 'running', $1, $1, $1)",
                    q_rows,
                )
                await conn.execute("VACUUM ANALYZE keruta_logs")
                print(f"q: loaded {q_rows} rows in {time.perf_counter() - started:.1f} s")
                rare = (await conn.fetchval("SELECT md5('777777')"))[:10]
                cases = {"rare": rare, "common (1/16)": "worker-3 ", "absent": "no-such-text"}
                for name, q in cases.items():
                    ms, total = await time_store_query(store, q)
                    print(
                        f"q without index, {name:14} {q!r:16}: {ms:8.1f} ms per page+count (total {total})"
                    )
                try:
                    await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                except Exception as exc:  # noqa: BLE001
                    print(f"q: pg_trgm unavailable ({exc}); no index figures")
                    return
                started = time.perf_counter()
                await conn.execute(
                    "CREATE INDEX keruta_logs_message_trgm ON keruta_logs USING gin (message gin_trgm_ops)"
                )
                built = time.perf_counter() - started
                size = await conn.fetchval(
                    "SELECT pg_size_pretty(pg_relation_size('keruta_logs_message_trgm'))"
                )
                table = await conn.fetchval("SELECT pg_size_pretty(pg_table_size('keruta_logs'))")
                await conn.execute("ANALYZE keruta_logs")
                print(f"q: trigram GIN index built in {built:.1f} s, {size} (table {table})")
                for name, q in cases.items():
                    pattern = like_pattern(q)
                    page_ms = await timed(
                        conn,
                        "SELECT * FROM keruta_logs WHERE task_id = $1 AND message LIKE $2 ORDER BY seq LIMIT 100",
                        "big",
                        pattern,
                    )
                    count_ms = await timed(
                        conn,
                        "SELECT count(*) FROM keruta_logs WHERE task_id = $1 AND message LIKE $2",
                        "big",
                        pattern,
                    )
                    print(
                        f"q with trigram index, {name:14} {q!r:16}: {page_ms + count_ms:8.1f} ms per page+count "
                        f"(page {page_ms:.1f} + count {count_ms:.1f})"
                    )
        finally:
            await store.close()

    # What the index costs appends.
    async with scratch_database(dsn) as url:
        store = PostgresStore(url)
        await store.open()
        try:
            async with store._connection() as conn:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                await conn.execute(
                    "CREATE INDEX keruta_logs_message_trgm ON keruta_logs USING gin (message gin_trgm_ops)"
                )
            work = batches("bench", 100_000, batch)
            await store.append(work[0])
            started = time.perf_counter()
            for items in work[1:]:
                await store.append(items)
            rate = (100_000 - batch) / (time.perf_counter() - started)
            print(
                f"store.append with trigram index (auto, batches of {batch}): {rate:10,.0f} rows/s"
            )
        finally:
            await store.close()


async def main(args: argparse.Namespace) -> None:
    async with trio_asyncio.open_loop():
        for method in ("copy", "unnest"):
            rate = await bench_bare_insert(args.dsn, method, args.rows, args.batch)
            print(
                f"bare insert, {method:6}: {rate:10,.0f} rows/s  ({args.rows} rows, batches of {args.batch})"
            )
        for method in ("copy", "unnest", "auto"):
            rate = await bench_store_append(args.dsn, method, args.rows, args.batch)
            print(
                f"store.append, {method:6}: {rate:10,.0f} rows/s  ({args.rows} rows, batches of {args.batch})"
            )
        for method in ("copy", "unnest", "auto"):
            rate = await bench_store_append(args.dsn, method, args.rows // 10, 20)
            print(
                f"store.append, {method:6}: {rate:10,.0f} rows/s  ({args.rows // 10} rows, batches of 20)"
            )
        if args.q_rows:
            await bench_q(args.dsn, args.q_rows, args.batch)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--q-rows", type=int, default=1_000_000)
    trio.run(main, parser.parse_args())
