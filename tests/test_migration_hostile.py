"""Schema migrations under faults: a hub opens a database an older hub made
(schema v3, one row per line, before chunks) and migrates it in place while
it is SIGKILLed, started two or three times at once, held up by another
session's transaction or lock, cut off from PostgreSQL, short of disk, or
while the old hub still writes to it; or is given an old database with odd
content at its edges, or a current one whose version stamp a dump lost.

Whatever happens on the way, the end state is the one an undisturbed
migration reaches, checked twice: in the migrated tables (every old record
exactly once, with its seq and every column as it was; the tasks', counts'
and producers' rows carried over; the byte counts right) and through the hub
(task answers, stats, raw logs, `verify`, and the producers' identity: a
producer resending its old seqs is acknowledged and nothing is stored again;
its next seq follows on). Between faults the database is the old one
untouched, never something half-migrated that a later hub would misread.

Real `python -m hub` processes, real SQLite files, real PostgreSQL
(KERUTA_TEST_PG_DSN; each test its own database, tests/pgpool.py), real
processes holding the locks. No mocks. Old databases are built directly with
the old schema's statements (the stores' `_MIGRATIONS` 1-3), as
tests/test_store_chunks.py builds them.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import orjson
import pytest
import trio

from hub.store import chunk, pg_schema, sqlite_schema
from hub.store.base import record_id
from keruta.limits import INT32_MAX, INT32_MIN, INT64_MAX, MAX_SEQ
from tests import pgpool
from tests.hubclient import http_client, logs_path, ws_for
from tests.support import python_m, sqlite_url
from tests.test_store_chunks import COLUMNS, TABLES
from tests.test_store_hostile import PG_HOLDER, SQLITE_HOLDER, assert_refused_at_start, holding

T = TypeVar("T")

# Hang guard for anything that waits on a hub or the database: never a timing.
PATIENCE = 60.0
OLD_VERSION = 3
VERSION = sqlite_schema.SCHEMA_VERSION
assert pg_schema.SCHEMA_VERSION == VERSION


# --- an old database -----------------------------------------------------------


def stamp(n: int) -> str:
    """2026-01-02T03:04:05Z plus n milliseconds, in the canonical form (fast: built for each of 10^5 rows)."""
    seconds, ms = divmod(n, 1000)
    minutes, second = divmod(11045 + seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"2026-01-02T{hour:02d}:{minute:02d}:{second:02d}.{ms * 1000:06d}Z"


@attrs.define
class OldDb:
    """The rows of a schema-v3 database, table by table, columns as in
    tests/test_store_chunks.py's COLUMNS and TABLES."""

    logs: list[tuple[Any, ...]] = attrs.field(factory=list)
    tasks: list[tuple[Any, ...]] = attrs.field(factory=list)
    counts: list[tuple[Any, ...]] = attrs.field(factory=list)
    producers: list[tuple[Any, ...]] = attrs.field(factory=list)
    ranges: list[tuple[Any, ...]] = attrs.field(factory=list)
    # Per task: (producer, pseq) of each task seq, where a producer sent it.
    identity: dict[str, dict[int, tuple[str, int]]] = attrs.field(factory=dict)

    def add_task(
        self, task: str, rows: list[tuple[Any, ...]], *, state: str = "running", exit_code: int | None = None,
        producers: Sequence[tuple[Any, ...]] = (), ranges: Sequence[tuple[Any, ...]] = (),
        updated_at: str | None = None,
    ) -> None:
        """A task, its rows (COLUMNS), and the tasks/counts rows they make."""
        self.logs.extend(rows)
        top = max((r[1] for r in rows), default=0)
        runs = max((p[2] for p in producers), default=0)
        first = min((r[3] for r in rows), default=None)
        last = max((r[3] for r in rows), default=None)
        self.tasks.append((task, state, exit_code, top, top, first, last, len(rows), updated_at or last, runs, runs))
        for (source, level), n in sorted(Counter((r[4], r[5]) for r in rows).items()):
            self.counts.append((task, source, level, n))
        self.producers.extend(producers)
        self.ranges.extend(ranges)

    def add_runs(self, task: str, runs: list[tuple[str, int, int]], *, state: str = "running") -> None:
        """A task its producers wrote: runs of (producer, first pseq, last pseq), in the order stored."""
        rows, ranges, seq = [], [], 0
        high: dict[str, int] = {}
        who = self.identity.setdefault(task, {})
        for producer, first, last in runs:
            ranges.append((task, producer, first, last, seq + 1))
            for pseq in range(first, last + 1):
                seq += 1
                rows.append(big_row(task, producer, pseq, seq))
                who[seq] = (producer, pseq)
            high[producer] = last
        names = list(dict.fromkeys(p for p, _, _ in runs))
        producers = [
            (task, p, n, high[p], state, None, stamp(seq)) for n, p in enumerate(names, 1)
        ]
        self.add_task(task, rows, state=state, producers=producers, ranges=ranges)

    def tables(self) -> Iterator[tuple[str, str, list[tuple[Any, ...]]]]:
        """(v3 table name in SQLite, its columns, rows) for every table but logs."""
        for key, rows in (("tasks", self.tasks), ("counts", self.counts), ("producers", self.producers),
                          ("ranges", self.ranges)):
            if rows:
                yield TABLES[key][0], TABLES[key][1], rows

    def records(self) -> list[tuple[Any, ...]]:
        """What each old row must read back as: (task, seq, timestamp, source,
        level, message, line number, metadata, partial, kind), in (task, seq) order."""
        return sorted(
            (r[0], r[1], r[3], r[4], r[5], r[6], r[7], orjson.loads(r[8]) if r[8] else {}, bool(r[9]), r[10])
            for r in self.logs
        )

    def messages(self, task: str) -> list[tuple[int, str, bool]]:
        return sorted((r[1], r[6], bool(r[9])) for r in self.logs if r[0] == task)


def big_row(task: str, producer: str, pseq: int, seq: int) -> tuple[Any, ...]:
    level = "ERROR" if pseq % 97 == 0 else "WARN" if pseq % 13 == 0 else "INFO"
    source = "stderr" if pseq % 7 == 0 else "stdout"
    metadata = None if pseq % 1000 else orjson.dumps({"pseq": pseq, "producer": producer}).decode()
    return (task, seq, record_id(task, seq), stamp(seq), source, level, f"{task} {producer} {pseq}", pseq,
            metadata, False, None)


# The database a fleet left: big enough that its migration takes a while
# (~0.5 s of CPU), several tasks, producers interleaved within a task.
BIG_RUNS: dict[str, list[tuple[str, int, int]]] = {
    "big-a": [("p1", 1, 40_000), ("p2", 1, 30_000), ("p1", 40_001, 70_000), ("p2", 30_001, 50_000)],
    "big-b": [("p3", 1, 50_000)],
    "big-c": [("p4", 1, 25_000), ("p5", 1, 20_000), ("p4", 25_001, 30_000)],
}


def big_database(scale: float = 1.0) -> OldDb:
    db = OldDb()
    for task, runs in BIG_RUNS.items():
        scaled = [(p, int((first - 1) * scale) + 1, int(last * scale)) for p, first, last in runs]
        db.add_runs(task, scaled, state="succeeded" if task == "big-b" else "running")
    return db


def build_sqlite(path: Path, db: OldDb) -> None:
    """A v3 SQLite file as an old hub left it (WAL mode, closed cleanly)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for step in range(1, OLD_VERSION + 1):
        for statement in sqlite_schema._MIGRATIONS[step]:
            assert isinstance(statement, str)
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {OLD_VERSION}")
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO logs ({', '.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})", db.logs)
    for table, columns, rows in db.tables():
        conn.executemany(f"INSERT INTO {table} ({columns}) VALUES ({','.join('?' * len(rows[0]))})", rows)
    conn.execute("COMMIT")
    conn.close()


async def pg(url: str, work: Callable[[Any], Awaitable[T]]) -> T:
    """`work(conn)` on a connection of the test's own (asyncpg, in a thread of its own)."""
    import asyncpg

    async def run() -> T:
        conn = await asyncpg.connect(url)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return await trio.to_thread.run_sync(pgpool._in_own_thread, run)


async def pg_fetch(url: str, query: str, *args: Any) -> list[Any]:
    async def fetch(conn: Any) -> list[Any]:
        return list(await conn.fetch(query, *args))

    return await pg(url, fetch)


async def build_pg(url: str, db: OldDb) -> None:
    """A v3 PostgreSQL database as an old hub left it."""
    statements = [s for step in range(1, OLD_VERSION + 1) for s in pg_schema._MIGRATIONS[step]]
    assert all(isinstance(s, str) for s in statements)

    async def build(conn: Any) -> None:
        for statement in statements:
            await conn.execute(statement)
        await conn.execute("CREATE TABLE keruta_schema (version integer NOT NULL)")
        await conn.execute(f"INSERT INTO keruta_schema VALUES ({OLD_VERSION})")
        await conn.copy_records_to_table("keruta_logs", records=db.logs, columns=list(COLUMNS))
        for table, columns, rows in db.tables():
            await conn.copy_records_to_table(
                "keruta_" + table, records=rows, columns=[c.strip() for c in columns.split(",")]
            )
        await conn.execute("ANALYZE")

    await pg(url, build)


# --- what a database is now ------------------------------------------------------


@attrs.frozen
class Found:
    """A database as the test reads it: its version, its tables, and (once
    migrated) every record decoded from the chunks and the other tables' rows."""

    version: int
    tables: frozenset[str]
    records: list[tuple[Any, ...]]
    tasks: dict[str, dict[str, Any]]
    counts: set[tuple[Any, ...]]
    producers: set[tuple[Any, ...]]
    ranges: set[tuple[Any, ...]]
    old_rows: int  # rows of the old per-line table, where it is still there


TASK_COLUMNS = ("task_id", "state", "exit_code", "durable_seq", "max_seq", "first_ts", "last_ts", "total_logs",
                "updated_at", "runs")


def decoded(chunks: list[Any]) -> list[tuple[Any, ...]]:
    out = []
    for task_id, seq_first, lines, body in chunks:
        for r in chunk.decode(task_id, seq_first, bytes(lines), bytes(body)):
            out.append((r.task_id, r.seq, r.timestamp, r.source, r.level, r.message, r.line_number,
                        r.metadata, r.partial, r.kind))
    return out


def read_sqlite(path: Path) -> Found:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = frozenset(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        if version < 4:
            old = conn.execute("SELECT count(*) FROM logs").fetchone()[0]
            return Found(version, tables, [], {}, set(), set(), set(), old)
        chunks = conn.execute("SELECT task_id, seq_first, lines, body FROM keruta_chunks ORDER BY task_id, seq_last")
        records = decoded(chunks.fetchall())
        names = ", ".join((*TASK_COLUMNS, "stored_bytes"))
        tasks = {r[0]: dict(zip((*TASK_COLUMNS, "stored_bytes"), r, strict=True))
                 for r in conn.execute(f"SELECT {names} FROM keruta_tasks")}
        counts = set(conn.execute(f"SELECT {TABLES['counts'][1]} FROM keruta_counts"))
        producers = set(conn.execute(f"SELECT {TABLES['producers'][1]} FROM keruta_producers"))
        ranges = set(conn.execute(f"SELECT {TABLES['ranges'][1]} FROM keruta_producer_ranges"))
        return Found(version, tables, records, tasks, counts, producers, ranges, 0)
    finally:
        conn.close()


async def read_pg(url: str, *, count: bool = True) -> Found:
    """`count`: count the old table's rows (which waits for a migration
    holding that table; without it, only what a hub's commit would change)."""

    async def read(conn: Any) -> Found:
        version = await conn.fetchval("SELECT max(version) FROM keruta_schema")
        tables = frozenset(r[0] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        if version < 4:
            old = await conn.fetchval("SELECT count(*) FROM keruta_logs") if count else -1
            return Found(version, tables, [], {}, set(), set(), set(), old)
        chunks = await conn.fetch(
            "SELECT task_id, seq_first, lines, body FROM keruta_chunks ORDER BY task_id COLLATE \"C\", seq_last")
        names = ", ".join((*TASK_COLUMNS, "stored_bytes"))
        tasks = {r[0]: dict(r) for r in await conn.fetch(f"SELECT {names} FROM keruta_tasks")}
        counts = {tuple(r) for r in await conn.fetch(f"SELECT {TABLES['counts'][1]} FROM keruta_counts")}
        producers = {tuple(r) for r in await conn.fetch(f"SELECT {TABLES['producers'][1]} FROM keruta_producers")}
        ranges = {tuple(r) for r in await conn.fetch(
            f"SELECT {TABLES['ranges'][1]} FROM keruta_producer_ranges")}
        return Found(version, tables, decoded(list(chunks)), tasks, counts, producers, ranges, 0)

    return await pg(url, read)


def assert_untouched(found: Found, db: OldDb, where: str) -> None:
    """Still the old database, every row there: nothing half-migrated."""
    assert found.version == OLD_VERSION, f"{where}: schema version {found.version}"
    assert found.old_rows in (len(db.logs), -1), f"{where}: {found.old_rows} old rows of {len(db.logs)}"
    assert not {t for t in found.tables if "chunks" in t or "sections" in t}, f"{where}: {sorted(found.tables)}"


def assert_migrated(found: Found, db: OldDb) -> None:
    """Migrated, and every row carried over exactly."""
    assert found.version == VERSION
    assert not found.old_rows and "logs" not in found.tables and "keruta_logs" not in found.tables, found.tables
    expected = db.records()
    if found.records != expected:
        seqs = Counter((r[0], r[1]) for r in found.records)
        doubled = [k for k, n in seqs.items() if n > 1][:5]
        lost = sorted({(r[0], r[1]) for r in expected} - set(seqs))[:5]
        changed = [(a, b) for a, b in zip(found.records, expected, strict=False) if a != b][:2]
        raise AssertionError(f"{len(found.records)} records read of {len(expected)}: doubled {doubled}, "
                             f"lost {lost}, first changed (found, old) {changed}")
    for row in db.tasks:
        task = found.tasks[row[0]]
        assert tuple(task[c] for c in TASK_COLUMNS) == row[:9] + row[10:], (row, task)
        stored = chunk.message_bytes([r[5] for r in expected if r[0] == row[0]])
        assert task["stored_bytes"] == stored, (row[0], task["stored_bytes"], stored)
    assert set(found.tasks) == {row[0] for row in db.tasks}
    assert found.counts == set(db.counts)
    assert found.producers == set(db.producers)
    assert found.ranges == set(db.ranges)


# --- hub processes ------------------------------------------------------------------


class Hub:
    """A `python -m hub` child, started without waiting for it to listen (it
    may be killed before it does); `fsize` caps the size of any file it writes
    (RLIMIT_FSIZE: a full disk, as the process sees it)."""

    def __init__(self, db: str, *args: str, fsize: int | None = None) -> None:
        def limit() -> None:
            assert fsize is not None
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

        self.db = db
        self.output: list[str] = []
        self.url = ""
        self.proc = subprocess.Popen(
            python_m("hub", "--host", "127.0.0.1", "--port", "0", "--db", db, *args),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            encoding="utf-8", errors="replace", preexec_fn=limit if fsize is not None else None,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for line in self.proc.stderr:
                self.output.append(line)
                if not self.url and "keruta-hub: listening on " in line:
                    self.url = line.split("listening on ", 1)[1].split()[0]

    @property
    def stderr_text(self) -> str:
        return "".join(self.output)

    async def listening(self) -> Hub:
        with trio.fail_after(PATIENCE):
            while not self.url:
                assert self.proc.poll() is None, f"the hub exited ({self.proc.returncode}):\n{self.stderr_text}"
                await trio.sleep(0.02)
        return self

    def cpu(self) -> float:
        """Seconds of CPU the process has used (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def has_open(self, path: Path) -> bool:
        try:
            fds = os.listdir(f"/proc/{self.proc.pid}/fd")
        except FileNotFoundError:
            return False
        for fd in fds:
            try:
                if os.readlink(f"/proc/{self.proc.pid}/fd/{fd}") == str(path):
                    return True
            except OSError:
                continue
        return False

    async def kill(self) -> None:
        self.proc.kill()
        await trio.to_thread.run_sync(self.proc.wait)

    def http(self) -> Any:
        return http_client(self.url)

    def ws(self) -> Any:
        return ws_for(self.url.replace("http://", "ws://") + "/api/v1/ws")

    def assert_clean(self) -> None:
        """No traceback, no error logged (warnings of an outage waited out are fine)."""
        assert "Traceback" not in self.stderr_text and " ERROR " not in self.stderr_text, self.stderr_text[-5000:]


@pytest.fixture
def hubs() -> Iterator[Callable[..., Hub]]:
    """Starts hub processes for a test; kills what is left of them at its end."""
    started: list[Hub] = []

    def start(db: str, *args: str, fsize: int | None = None) -> Hub:
        started.append(Hub(db, *args, fsize=fsize))
        return started[-1]

    yield start
    for hub in started:
        if hub.proc.poll() is None:
            hub.proc.kill()
        hub.proc.wait(10)
        print(f"--- hub on {hub.db} stderr ---\n{hub.stderr_text[-5000:]}")


# --- what a hub serves of a migrated database ------------------------------------


async def assert_served(hub: Hub, db: OldDb) -> None:
    """The hub answers every old task as it was: its answer, stats, raw log,
    first and last pages, and `verify`."""
    async with hub.http() as client:
        listed = (await client.get("/api/v1/tasks")).json()["tasks"]
        assert {t["taskId"] for t in listed} >= {row[0] for row in db.tasks}
        for row in db.tasks:
            task_id, state, exit_code, durable, _, first, last, total = row[:8]
            answer = (await client.get(f"/api/v1/tasks/{task_id}")).json()
            assert (answer["state"], answer["exitCode"], answer["totalLogs"], answer["durableSeq"]) == (
                state, exit_code, total, durable), answer
            assert (answer["firstTimestamp"], answer["lastTimestamp"]) == (first, last), answer
            mine = [r for r in db.logs if r[0] == task_id]
            stats = (await client.get(logs_path(task_id, "/stats"))).json()
            assert stats["totalLogs"] == total, stats
            assert stats["levelCounts"] == dict(Counter(r[5] for r in mine)), stats
            assert {k: v for k, v in stats["logCounts"].items() if v} == dict(Counter(r[4] for r in mine)), stats
            messages = db.messages(task_id)
            raw = await client.get(logs_path(task_id, "/raw"))
            assert raw.status_code == 200, raw.text
            assert raw.text == "".join(m if partial else m + "\n" for _, m, partial in messages), task_id
            for params in ({"afterSeq": 0}, {"afterSeq": max(0, messages[-1][0] - 3) if messages else 0}):
                page = await client.get(logs_path(task_id), params={**params, "size": 1000})
                assert page.status_code == 200, page.text
                want = [(s, m) for s, m, _ in messages if s > params["afterSeq"]][:1000]
                assert [(r["seq"], r["message"]) for r in page.json()["content"]] == want, params
            verify = await client.get(f"/api/v1/tasks/{task_id}/verify")
            assert verify.status_code == 200, verify.text
            # No old run sent a summary (schema v6 brought them): nothing to hold the log to.
            assert verify.json()["verdict"] == "unverified", verify.json()


def wire(row: tuple[Any, ...], pseq: int) -> dict[str, Any]:
    """An old row as its producer sent it (its own seq), to send it again."""
    record = {"seq": pseq, "timestamp": row[3], "source": row[4], "level": row[5], "message": row[6],
              "lineNumber": row[7], "metadata": orjson.loads(row[8]) if row[8] else {}}
    if row[9]:
        record["partial"] = True
    if row[10]:
        record["kind"] = row[10]
    return record


async def assert_identity_kept(hub: Hub, db: OldDb, task: str) -> None:
    """Each producer of `task` resends its first, some middle and its last old
    records (across its runs): all acknowledged, none stored again; as is a
    seq of its whose record was deleted since. Its next records get the
    task's next seqs; a resend with other content is a SEQ_CONFLICT and
    stores nothing."""
    rows = {r[1]: r for r in db.logs if r[0] == task}
    of: dict[str, dict[int, tuple[Any, ...]]] = {}
    for seq, (producer, pseq) in db.identity[task].items():
        of.setdefault(producer, {})[pseq] = rows[seq]
    high = {p[1]: p[3] for p in db.producers if p[0] == task}
    top = next(t[4] for t in db.tasks if t[0] == task)
    async with hub.ws() as ws:

        async def send(producer: str, records: list[dict[str, Any]]) -> None:
            await ws.send({"type": "logs", "taskId": task, "producer": producer, "records": records})
            with trio.fail_after(PATIENCE):
                await ws.wait_ack(task, records[-1]["seq"])
            ws.acked.pop(task)

        for producer, sent in sorted(of.items()):
            pseqs = sorted(sent)
            middle = len(pseqs) // 2
            for window in (pseqs[:500], pseqs[max(0, middle - 250):middle + 250], pseqs[-500:]):
                await send(producer, [wire(sent[p], p) for p in window])
            gone = sorted(set(range(1, high[producer] + 1)) - set(pseqs))[:1]
            if gone:
                await send(producer, [{**wire(sent[pseqs[0]], gone[0]), "message": "deleted since"}])
            await send(producer, [
                {"seq": p, "timestamp": stamp(0), "source": "stdout", "level": "INFO",
                 "message": f"{task} {producer} new {p}", "lineNumber": p, "metadata": {}}
                for p in (high[producer] + 1, high[producer] + 2)
            ])
    async with hub.ws() as ws:
        producer, sent = sorted(of.items())[0]
        first = min(sent)
        other = {**wire(sent[first], first), "message": "not what was sent"}
        await ws.send({"type": "logs", "taskId": task, "producer": producer, "records": [other]})
        with trio.fail_after(PATIENCE):
            error = await ws.recv_type("error")
        assert error["code"] == "SEQ_CONFLICT", error
    async with hub.http() as client:
        answer = (await client.get(f"/api/v1/tasks/{task}")).json()
        assert answer["totalLogs"] == len(rows) + 2 * len(of), answer
        page = (await client.get(logs_path(task), params={"afterSeq": top, "size": 1000})).json()["content"]
    expected = [f"{task} {producer} new {p}"
                for producer in sorted(of) for p in (high[producer] + 1, high[producer] + 2)]
    assert [(r["seq"], r["message"]) for r in page] == list(enumerate(expected, top + 1)), page


# --- 1. SIGKILL in the middle of a migration ---------------------------------------


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def kill_sqlite_migration(hubs: Callable[..., Hub], path: Path, moment: str) -> bool:
    """Start a hub on the old file and SIGKILL it at `moment` of its
    migration; whether it was killed before it listened."""
    hub = hubs(sqlite_url(path))
    with trio.fail_after(PATIENCE):
        while not hub.has_open(path):
            assert hub.proc.poll() is None, hub.stderr_text
            await trio.sleep(0.002)
        begun = hub.cpu()
        wal = path.with_name(path.name + "-wal")
        while not hub.url:
            assert hub.proc.poll() is None, hub.stderr_text
            if moment == "begun":
                break
            if moment.startswith("cpu+") and hub.cpu() - begun >= float(moment[4:]):
                break
            if moment == "writing" and size_of(wal) > 1 << 20:
                break
            await trio.sleep(0.002)
    killed_early = not hub.url
    await hub.kill()
    return killed_early


async def test_sqlite_hub_sigkilled_mid_migration_then_migrated_by_the_next(
    hubs: Callable[..., Hub], tmp_path: Path
) -> None:
    """A hub is SIGKILLed migrating a big v3 file: as it opens it, early and
    midway through its work (by the CPU it used), and as it writes its pages. After each kill the
    file is the old one, untouched (its migration is one transaction). The
    next hub migrates it; everything is there once and served, identity kept."""
    db = big_database()
    path = tmp_path / "old.db"
    await trio.to_thread.run_sync(build_sqlite, path, db)
    interrupted = 0
    for moment in ("begun", "cpu+0.05", "cpu+0.25", "writing"):
        early = await kill_sqlite_migration(hubs, path, moment)
        found = await trio.to_thread.run_sync(read_sqlite, path)
        if found.version == OLD_VERSION:
            assert early, "the hub listened on a database it had not migrated"
            assert_untouched(found, db, f"killed at {moment}")
            interrupted += 1
        else:
            assert_migrated(found, db)
    # The kills came in the migration, not after it, at least mostly.
    assert interrupted >= 3, interrupted
    hub = await hubs(sqlite_url(path)).listening()
    assert_migrated(await trio.to_thread.run_sync(read_sqlite, path), db)
    await assert_served(hub, db)
    await assert_identity_kept(hub, db, "big-a")
    hub.assert_clean()


PG_KILL_MOMENTS = ("begun", "chunks", "drop", "alter")


HUB_BACKENDS = (
    "SELECT pid, state, wait_event_type, wait_event, query FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name = 'keruta-hub'"
)


async def hub_backends(url: str) -> list[Any]:
    return await pg_fetch(url, HUB_BACKENDS)


async def until_no_hub_backends(url: str) -> None:
    """A killed hub's backend goes once it notices; until then it holds its locks."""
    with trio.fail_after(PATIENCE):
        while await hub_backends(url):
            await trio.sleep(0.02)


def at_moment(backends: list[Any], moment: str) -> bool:
    for b in backends:
        query = b["query"] or ""
        if moment == "begun" and b["state"] in ("active", "idle in transaction"):
            return True
        # The chunks' rounds: reading old rows, encoding them (idle in the
        # transaction, the read its last query), writing chunks.
        if moment == "chunks" and ("FROM keruta_logs WHERE" in query or query.startswith("INSERT INTO keruta_chunks")):
            return True
        if moment == "drop" and b["wait_event_type"] == "Lock" and query.startswith("DROP TABLE keruta_logs"):
            return True
        if moment == "alter" and b["wait_event_type"] == "Lock" and query.startswith("ALTER TABLE keruta_tasks"):
            return True
    return False


async def until_migrating(url: str, hub: Hub, moment: str, sightings: int = 1) -> None:
    """Watch the hub's backends (on one connection, as fast as it answers)
    until its migration is at `moment`, seen `sightings` times."""
    import asyncio

    async def watch(conn: Any) -> None:
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE
        while seen < sightings:
            assert not hub.url, f"the hub migrated before {moment}: watch faster, or a bigger database"
            assert hub.proc.poll() is None, hub.stderr_text
            assert loop.time() < deadline, f"the hub's migration never came to {moment}"
            seen += at_moment(await conn.fetch(HUB_BACKENDS), moment)
            await asyncio.sleep(0.001)

    await pg(url, watch)


# What holds the migration at a moment: another session's lock (a report,
# pg_dump) on the table its next statement must have to itself.
PG_STALL = {
    "drop": "SELECT count(*) FROM keruta_logs",
    "alter": "SELECT count(*) FROM keruta_tasks",
}


@asynccontextmanager
async def nothing() -> AsyncIterator[None]:
    yield None


@pytest.mark.pg
async def test_pg_hub_sigkilled_mid_migration_then_migrated_by_the_next(
    hubs: Callable[..., Hub], fresh_pg_url: str
) -> None:
    """A hub is SIGKILLed migrating a big v3 database: as it starts, while it
    writes chunks, and held (by another session's read of the table) at the
    DROP of the old table and at the ALTER of the tasks: each its last
    statements before the commit. After each kill, once its backend is gone,
    the database is the old one untouched; the next hub migrates it and
    everything is there once and served, identity kept."""
    url = fresh_pg_url
    db = big_database()
    await build_pg(url, db)
    for moment in PG_KILL_MOMENTS:
        async with holding(PG_HOLDER, url, PG_STALL[moment]) if moment in PG_STALL else nothing() as holder:
            hub = hubs(url)
            await until_migrating(url, hub, moment, sightings=20 if moment == "chunks" else 1)
            await hub.kill()
            if holder is not None:
                await holder.release()
        await until_no_hub_backends(url)
        assert_untouched(await read_pg(url), db, f"killed at {moment}")
    hub = await hubs(url).listening()
    assert_migrated(await read_pg(url), db)
    await assert_served(hub, db)
    await assert_identity_kept(hub, db, "big-a")
    hub.assert_clean()


# --- 2. hubs started together on one old database -----------------------------------


async def advisory_waiters(url: str) -> int:
    return sum(b["wait_event"] == "advisory" for b in await hub_backends(url))


@pytest.mark.pg
async def test_pg_three_hubs_started_at_once_on_an_old_database(hubs: Callable[..., Hub], fresh_pg_url: str) -> None:
    """Three hubs started at once on one v3 database (a fleet's units after an
    upgrade): one migrates, the two others wait on the schema lock meanwhile
    (never a second migration at the same time, nor after: no error, no
    record twice), then all three serve the same records, and what one
    stores the others read."""
    url = fresh_pg_url
    db = big_database(0.4)
    await build_pg(url, db)
    # Another session's read of the old table holds the migration at its
    # DROP, so the three surely meet however they were scheduled.
    async with holding(PG_HOLDER, url, PG_STALL["drop"]) as holder:
        three = [hubs(url) for _ in range(3)]
        with trio.fail_after(PATIENCE):
            while True:
                backends = await hub_backends(url)
                migrating = [b for b in backends if at_moment([b], "chunks") or at_moment([b], "drop")]
                assert len(migrating) <= 1, backends
                if at_moment(backends, "drop") and sum(b["wait_event"] == "advisory" for b in backends) == 2:
                    break
                assert not any(h.url for h in three), "a hub listened on a database another was migrating"
                await trio.sleep(0.005)
        await holder.release()
    for hub in three:
        await hub.listening()
    assert_migrated(await read_pg(url), db)
    await assert_served(three[1], db)
    await assert_identity_kept(three[2], db, "big-c")
    async with three[0].http() as client:
        answer = (await client.get("/api/v1/tasks/big-c")).json()
    assert answer["totalLogs"] == len(db.identity["big-c"]) + 4, answer
    for hub in three:
        hub.assert_clean()


@pytest.mark.pg
async def test_pg_the_migrating_hub_killed_while_two_wait(hubs: Callable[..., Hub], fresh_pg_url: str) -> None:
    """A hub is SIGKILLed mid-migration (held at its last statements by
    another session's read) while two more wait for it on the schema lock:
    one of those takes the migration over from the start, the other waits
    again; both serve, every record there once."""
    url = fresh_pg_url
    db = big_database(0.4)
    await build_pg(url, db)
    # Another session's read of the old table holds the first hub's
    # migration at its DROP, long enough for the two others to start.
    async with holding(PG_HOLDER, url, PG_STALL["drop"]) as holder:
        first = hubs(url)
        await until_migrating(url, first, "drop")
        waiting = [hubs(url), hubs(url)]
        with trio.fail_after(PATIENCE):
            while await advisory_waiters(url) < 2:
                assert all(h.proc.poll() is None for h in waiting), [h.stderr_text for h in waiting]
                await trio.sleep(0.01)
        await first.kill()
        await holder.release()
    for hub in waiting:
        await hub.listening()
    assert_migrated(await read_pg(url), db)
    await assert_served(waiting[0], db)
    await assert_identity_kept(waiting[1], db, "big-b")
    for hub in waiting:
        hub.assert_clean()


async def test_sqlite_two_hubs_started_at_once_on_an_old_file(hubs: Callable[..., Hub], tmp_path: Path) -> None:
    """Two hubs on one old SQLite file (a second unit, a forgotten process):
    started at once, one migrates while the other waits for the write lock;
    then one is SIGKILLed mid-migration while the other waits, and the one
    left migrates. Both serve the same records, each there once."""
    db = big_database(0.5)
    path, other = tmp_path / "old.db", tmp_path / "other.db"
    await trio.to_thread.run_sync(build_sqlite, path, db)
    await trio.to_thread.run_sync(build_sqlite, other, db)
    pair = [hubs(sqlite_url(path)), hubs(sqlite_url(path))]
    for hub in pair:
        await hub.listening()
    assert_migrated(await trio.to_thread.run_sync(read_sqlite, path), db)
    await assert_served(pair[1], db)
    await assert_identity_kept(pair[0], db, "big-c")
    async with pair[1].http() as client:
        assert (await client.get("/api/v1/tasks/big-c")).json()["totalLogs"] == len(db.identity["big-c"]) + 4
    # Again on another old file: the one that migrates (it works; the other
    # sleeps in SQLite's busy handler) is SIGKILLed while the other waits.
    again = [hubs(sqlite_url(other)), hubs(sqlite_url(other))]
    with trio.fail_after(PATIENCE):
        while not all(hub.has_open(other) for hub in again):
            await trio.sleep(0.002)
    before = [hub.cpu() for hub in again]
    await trio.sleep(0.05)
    worked = [hub.cpu() - b for hub, b in zip(again, before, strict=True)]
    first, second = again if worked[0] >= worked[1] else again[::-1]
    assert not first.url, "the migration was over before it could be killed"
    await first.kill()
    await second.listening()
    assert_migrated(await trio.to_thread.run_sync(read_sqlite, other), db)
    await assert_served(second, db)
    for hub in (*pair, second):
        hub.assert_clean()


# --- 3. SQLite: another process in the old file -----------------------------------

SQLITE_READER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN")
print(conn.execute("SELECT count(*) FROM logs").fetchone()[0], flush=True)
sys.stdin.readline()
print(conn.execute("SELECT count(*) FROM logs").fetchone()[0], flush=True)
conn.execute("COMMIT")
"""


@pytest.mark.parametrize("journal", ["wal", "delete"])
async def test_sqlite_old_file_held_by_a_reader_then_a_writer_while_a_hub_migrates(
    hubs: Callable[..., Hub], tmp_path: Path, journal: str
) -> None:
    """A `sqlite3` shell holds a read transaction on the old file (in WAL mode
    as an old hub left it, or in rollback-journal mode): the hub migrates
    past it in WAL mode, or waits for it to end to switch to WAL; the
    reader's snapshot is the old database to the end. Then, on a
    second old file, a shell holds the write lock (BEGIN EXCLUSIVE) as the hub
    starts: the hub waits, touches nothing, and migrates once it goes."""
    db = big_database(0.2)
    path = tmp_path / "old.db"
    await trio.to_thread.run_sync(build_sqlite, path, db)
    if journal == "delete":
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
        conn.close()
    reader = subprocess.Popen(
        [sys.executable, "-c", SQLITE_READER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert int(reader.stdout.readline()) == len(db.logs)
        hub = hubs(sqlite_url(path))
        if journal == "wal":
            await hub.listening()
        else:
            # Its switch to WAL waits for the reader: it neither serves nor gives up meanwhile.
            await trio.sleep(1.5)
            assert not hub.url and hub.proc.poll() is None, hub.stderr_text
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert int(reader.stdout.readline()) == len(db.logs), "the reader's snapshot changed under it"
        await hub.listening()
    finally:
        reader.kill()
        reader.wait()
    assert_migrated(await trio.to_thread.run_sync(read_sqlite, path), db)
    await assert_served(hub, db)
    hub.assert_clean()

    locked = tmp_path / "locked.db"
    await trio.to_thread.run_sync(build_sqlite, locked, db)
    async with holding(SQLITE_HOLDER, str(locked)) as holder:
        second = hubs(sqlite_url(locked))
        with trio.fail_after(PATIENCE):
            while not second.has_open(locked):
                await trio.sleep(0.01)
        await trio.sleep(1.0)
        assert not second.url and second.proc.poll() is None, second.stderr_text
        assert_untouched(await trio.to_thread.run_sync(read_sqlite, locked), db, "while locked")
        await holder.release()
    await second.listening()
    assert_migrated(await trio.to_thread.run_sync(read_sqlite, locked), db)
    await assert_served(second, db)
    second.assert_clean()


# --- an old hub still writing while a new one migrates ----------------------------

LIVE_TASK = "aaa-live"  # sorts first: its old rows are read in the migration's first round
OLD_HUB = "old-hub"
OLD_HUB_BATCH = 50
OLD_HUB_PAUSE = 0.01  # between its appends: a steady stream, not a flood


def old_hub_rows(top: int) -> list[tuple[Any, ...]]:
    return [big_row(LIVE_TASK, OLD_HUB, s, s) for s in range(top + 1, top + OLD_HUB_BATCH + 1)]


def old_hub_counts(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [(LIVE_TASK, source, level, n) for (source, level), n in Counter((r[4], r[5]) for r in rows).items()]


def sqlite_old_hub(path: str) -> None:
    """What a v3 hub's append did, batch after batch, each line printed once
    committed (acknowledged), until the database is no longer a v3 one."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=PATIENCE)
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            top = conn.execute("SELECT max_seq FROM tasks WHERE task_id = ?", (LIVE_TASK,)).fetchone()[0]
            rows = old_hub_rows(top)
            last, at = rows[-1][1], rows[-1][3]
            conn.executemany(f"INSERT INTO logs ({', '.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})", rows)
            conn.execute("UPDATE tasks SET max_seq = ?, durable_seq = ?, total_logs = total_logs + ?, last_ts = ?,"
                         " updated_at = ? WHERE task_id = ?", (last, last, len(rows), at, at, LIVE_TASK))
            conn.executemany("INSERT INTO counts VALUES (?, ?, ?, ?) ON CONFLICT (task_id, source, level)"
                             " DO UPDATE SET n = n + excluded.n", old_hub_counts(rows))
            conn.execute("UPDATE producers SET high = ?, last_write = ? WHERE task_id = ?", (last, at, LIVE_TASK))
            conn.execute("UPDATE producer_ranges SET pseq_last = ? WHERE task_id = ?", (last, LIVE_TASK))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            print(f"stopped: {' '.join(str(exc).split())}", flush=True)
            return
        print(last, flush=True)
        time.sleep(OLD_HUB_PAUSE)


def pg_old_hub(url: str) -> None:
    """The same on PostgreSQL: the task's row locked first, as a v3 hub did."""
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url)
        while True:
            try:
                async with conn.transaction():
                    top = await conn.fetchval(
                        "SELECT max_seq FROM keruta_tasks WHERE task_id = $1 FOR UPDATE", LIVE_TASK)
                    rows = old_hub_rows(top)
                    last, at = rows[-1][1], rows[-1][3]
                    await conn.copy_records_to_table("keruta_logs", records=rows, columns=list(COLUMNS))
                    await conn.execute(
                        "UPDATE keruta_tasks SET max_seq = $1, durable_seq = $1, total_logs = total_logs + $2,"
                        " last_ts = $3, updated_at = $3 WHERE task_id = $4", last, len(rows), at, LIVE_TASK)
                    await conn.executemany(
                        "INSERT INTO keruta_counts VALUES ($1, $2, $3, $4) ON CONFLICT (task_id, source, level)"
                        " DO UPDATE SET n = keruta_counts.n + excluded.n", old_hub_counts(rows))
                    await conn.execute("UPDATE keruta_producers SET high = $1, last_write = $2 WHERE task_id = $3",
                                       last, at, LIVE_TASK)
                    await conn.execute("UPDATE keruta_producer_ranges SET pseq_last = $1 WHERE task_id = $2",
                                       last, LIVE_TASK)
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                print(f"stopped: {type(exc).__name__}: {' '.join(str(exc).split())}", flush=True)
                return
            print(last, flush=True)
            await asyncio.sleep(OLD_HUB_PAUSE)

    asyncio.run(run())


OLD_HUB_PROGRAM = """
import sys
from tests import test_migration_hostile as t
(t.sqlite_old_hub if sys.argv[1] == "sqlite" else t.pg_old_hub)(sys.argv[2])
"""


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
async def test_an_old_hub_still_writing_while_a_new_hub_migrates(
    hubs: Callable[..., Hub], tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    """A rolling upgrade: the old hub goes on appending (a v3 append, batch
    after batch, each acknowledged once committed) while a new hub starts on
    the same database and migrates it. Whatever the old hub acknowledged,
    before or during the migration, is in the migrated database exactly
    once, with its task's counts; the old hub's later appends fail (its
    tables are gone) and store nothing."""
    db = big_database(0.5)
    db.add_runs(LIVE_TASK, [(OLD_HUB, 1, 1000)])
    if store == "sqlite":
        path = tmp_path / "old.db"
        url = sqlite_url(path)
        await trio.to_thread.run_sync(build_sqlite, path, db)
        target = str(path)
    else:
        url = target = request.getfixturevalue("fresh_pg_url")
        await build_pg(url, db)
    root = Path(__file__).resolve().parent.parent
    old = await trio.lowlevel.open_process(
        [sys.executable, "-c", OLD_HUB_PROGRAM, store, target], cwd=root, stdout=subprocess.PIPE,
    )
    acked: list[str] = []

    async def read_acks() -> None:
        assert old.stdout is not None
        buffer = b""
        async for data in old.stdout:
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            acked.extend(line.decode() for line in lines)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_acks)
            with trio.fail_after(PATIENCE):
                while len(acked) < 3:
                    await trio.sleep(0.01)
            hub = await hubs(url).listening()
            with trio.fail_after(PATIENCE):
                await old.wait()
    finally:
        if old.returncode is None:
            old.kill()
            with trio.CancelScope(shield=True):
                await old.wait()
    # It stopped because its tables were gone (or it lost a deadlock to the migration), nothing else.
    assert acked and acked[-1].startswith("stopped"), acked[-3:]
    assert any(why in acked[-1] for why in ("no such table", "does not exist", "deadlock")), acked[-1]
    top = int(acked[-2])
    assert [int(a) for a in acked[:-1]] == list(range(1000 + OLD_HUB_BATCH, top + 1, OLD_HUB_BATCH))
    expected = big_database(0.5)
    expected.add_runs(LIVE_TASK, [(OLD_HUB, 1, top)])
    found = await trio.to_thread.run_sync(read_sqlite, path) if store == "sqlite" else await read_pg(url)
    assert_migrated(found, expected)
    await assert_served(hub, expected)
    await assert_identity_kept(hub, expected, LIVE_TASK)
    hub.assert_clean()


# --- 4. odd content at the edges ---------------------------------------------------

LONG_TASK = ("T.-:_9" * 30)[:128]
METADATA = orjson.dumps({
    "nested": {"list": [1, 2, {"null": None}], "empty": {}}, "ünïcödé": "ñ \U0001f600", "top": INT64_MAX,
    "bottom": -INT64_MAX - 1, "float": 1.5, "true": True, "": "",
}).decode()


def edge_database(*, nul: bool) -> OldDb:
    """An old database with content at its edges (`nul`: a NUL inside a
    message, which SQLite holds and PostgreSQL text cannot)."""
    db = OldDb()

    def row(task: str, seq: int, message: str, at: int, **columns: Any) -> tuple[Any, ...]:
        values = {"source": "stdout", "level": "INFO", "line": None, "metadata": None, "partial": False,
                  "kind": None, **columns}
        return (task, seq, record_id(task, seq), stamp(at), values["source"], values["level"], message,
                values["line"], values["metadata"], values["partial"], values["kind"])

    def written(task: str, producer: str, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
        """A producer that sent every seq up to the last row's, its seqs the
        task's (the rows between deleted since)."""
        db.identity[task] = {r[1]: (producer, r[1]) for r in rows}
        return {"producers": [(task, producer, 1, rows[-1][1], "running", None, stamp(0))],
                "ranges": [(task, producer, 1, rows[-1][1], 1)]}

    # Seqs at the top of what a client could give (v1, v2) and of int64.
    seqs = (1, 2, MAX_SEQ - 1, MAX_SEQ, INT64_MAX - 1, INT64_MAX)
    top = [row("edge-top", s, f"top {s}", i) for i, s in enumerate(seqs)]
    db.add_task("edge-top", top)
    texts = [
        "", "x" * (1 << 20), "\u00e9" * 100_000, "\U0001f600" * 1000, "tab\there", "carriage\rreturn",
        "embedded\nnewline", "  blanks at both ends  ", "a line cut ", "in two", "'quotes' \"and\" \\back\\",
    ]
    if nul:
        texts.append("nul\x00inside")
    text = [row("edge-text", s, m, s, partial=(m == "a line cut "), line=s) for s, m in enumerate(texts, 1)]
    db.add_task("edge-text", text, **written("edge-text", "writer", text))
    # Every source, level and kind, metadata and line numbers at their edges, holes between seqs.
    columns = [
        row("edge-columns", 1, "no metadata, no line", 1),
        row("edge-columns", 2, "empty metadata", 2, metadata="{}", line=0),
        row("edge-columns", 3, "metadata", 3, metadata=METADATA, line=MAX_SEQ, level="DEBUG"),
        row("edge-columns", 10, "after a hole", 4, source="stderr", level="WARN"),
        row("edge-columns", 11, "error", 5, source="stderr", level="ERROR", line=7),
        row("edge-columns", 500, "3 lines (30 bytes) not kept", 6, source="agent", level="WARN", kind="gap",
            metadata=orjson.dumps({"gap": {"reason": "spool_full", "lines": 3, "bytes": 30}}).decode()),
        row("edge-columns", 501, "earlier than the one before", 0),
        *(row("edge-columns", s, f"many {s}", s) for s in range(600, 1700)),
    ]
    db.add_task("edge-columns", columns, state="succeeded", exit_code=0, **written("edge-columns", "cols", columns))
    # Tasks without records: one never written to, its nullable columns NULL;
    # one with only a final status, from a producer that sent no record.
    db.add_task("edge-empty", [])
    db.add_task("edge-status", [], state="failed", exit_code=INT32_MIN,
                producers=[("edge-status", "quiet", 1, 0, "failed", INT32_MAX, stamp(0))], updated_at=stamp(9))
    # A producer with no records beside one with some, its nullable columns NULL.
    idle = [row("edge-idle", s, f"idle {s}", s) for s in (1, 2, 3)]
    identity = written("edge-idle", "a", idle)
    identity["producers"].append(("edge-idle", "b", 2, 0, None, None, None))
    db.add_task("edge-idle", idle, **identity)
    db.add_task(LONG_TASK, [row(LONG_TASK, 1, "a task id of 128 characters", 1)])
    # More rows than the PostgreSQL migration reads at once (20 000), after a
    # task of one: its rounds cut inside a task and between tasks.
    db.add_task("edge-round", [row("edge-round", s, f"round {s}", s) for s in range(1, 20_502)])
    return db


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
async def test_an_old_database_with_content_at_its_edges_is_carried_exactly(
    hubs: Callable[..., Hub], tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    """Seqs at MAX_SEQ and at int64's top, holes between seqs, a 1 MiB line
    and wide characters, empty and blank messages, a partial line, a NUL
    (SQLite), metadata and line numbers at their edges and NULL, every
    source, level and kind, a task never written to, a task with only a
    status, producers without records, a 128-character task id: each comes
    through the migration exactly, and is served; producers without records
    start at their first seq."""
    db = edge_database(nul=store == "sqlite")
    if store == "sqlite":
        path = tmp_path / "old.db"
        url = sqlite_url(path)
        await trio.to_thread.run_sync(build_sqlite, path, db)
    else:
        url = request.getfixturevalue("fresh_pg_url")
        await build_pg(url, db)
    hub = await hubs(url).listening()
    found = await trio.to_thread.run_sync(read_sqlite, path) if store == "sqlite" else await read_pg(url)
    assert_migrated(found, db)
    await assert_served(hub, db)
    await assert_identity_kept(hub, db, "edge-columns")
    await assert_identity_kept(hub, db, "edge-idle")
    async with hub.ws() as ws:
        for task, producer, seq in (("edge-idle", "b", 6), ("edge-status", "quiet", 1), ("edge-empty", "new", 1)):
            record = {"seq": 1, "timestamp": stamp(0), "source": "stdout", "level": "INFO", "message": "first",
                      "lineNumber": 1, "metadata": {}}
            await ws.send({"type": "logs", "taskId": task, "producer": producer, "records": [record]})
            with trio.fail_after(PATIENCE):
                await ws.wait_ack(task, 1)
            async with hub.http() as client:
                page = (await client.get(logs_path(task), params={"afterSeq": seq - 1})).json()["content"]
            assert [(r["seq"], r["message"]) for r in page] == [(seq, "first")], (task, page)
    hub.assert_clean()


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
async def test_a_migrated_task_at_the_top_of_int64_refuses_more_records_clearly(
    hubs: Callable[..., Hub], tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    """A v1/v2 hub stored a client's seq as the task's, up to int64's top: the
    task comes through the migration, but has no seq left to give. A new
    record for it is refused at once with a clear 4xx (a 503 "retry" would be
    retried for ever), over REST and WebSocket, without a traceback; nothing
    is stored, and every other task is served as before."""
    db = OldDb()
    for task, seqs in (("full", (1, INT64_MAX - 1, INT64_MAX)), ("other", (1,))):
        db.add_task(task, [(task, s, record_id(task, s), stamp(i), "stdout", "INFO", f"{task} {s}", None, None,
                            False, None) for i, s in enumerate(seqs)])
    if store == "sqlite":
        url = sqlite_url(tmp_path / "old.db")
        await trio.to_thread.run_sync(build_sqlite, tmp_path / "old.db", db)
    else:
        url = request.getfixturevalue("fresh_pg_url")
        await build_pg(url, db)
    hub = await hubs(url).listening()
    async with hub.http() as client:
        with trio.fail_after(PATIENCE):
            resp = await client.post(logs_path("full"), json={"message": "one more"})
        assert resp.status_code == 409 and resp.json()["error"] == "TASK_FULL", (resp.status_code, resp.text)
        async with hub.ws() as ws:
            record = {"seq": 1, "timestamp": stamp(0), "source": "stdout", "level": "INFO", "message": "ws more",
                      "lineNumber": 1, "metadata": {}}
            await ws.send({"type": "logs", "taskId": "full", "producer": "late", "records": [record]})
            with trio.fail_after(PATIENCE):
                frame = await ws.recv()
            # Not STORE_ERROR ("resend them"): resending can never succeed.
            assert frame["type"] == "error" and frame["code"] == "TASK_FULL", frame
        assert (await client.post(logs_path("other"), json={"message": "other 2"})).json()["seq"] == 2
        page = (await client.get(logs_path("full"), params={"size": 10})).json()["content"]
        assert [r["seq"] for r in page] == [1, INT64_MAX - 1, INT64_MAX], page
        # A redaction still takes the secret out; only its own record has no seq to go under.
        resp = await client.post("/api/v1/tasks/full/redact", json={"values": ["full"]})
        assert resp.status_code == 409 and resp.json()["error"] == "TASK_FULL", resp.text
        assert "3 records" in resp.json()["message"], resp.text
        page = (await client.get(logs_path("full"), params={"size": 10})).json()["content"]
        assert [r["seq"] for r in page] == [1, INT64_MAX - 1, INT64_MAX], page
        assert not any("full" in r["message"] for r in page), page
    hub.assert_clean()


# --- 5. a migration cut off midway ------------------------------------------------


async def terminate_hub_backends(url: str) -> int:
    rows = await pg_fetch(url, (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'keruta-hub'"
    ))
    return len(rows)


@pytest.mark.pg
async def test_pg_migrating_backend_terminated_the_hub_retries_and_serves(
    hubs: Callable[..., Hub], fresh_pg_url: str
) -> None:
    """The migrating hub's backend is terminated (pg_terminate_backend, as an
    admin or a failover would), twice, mid-migration: the hub waits it out
    and migrates from the start again; then it serves everything once, and a
    later hub on the same database reads the same."""
    url = fresh_pg_url
    db = big_database(0.4)
    await build_pg(url, db)
    hub = hubs(url)
    for _ in range(2):
        await until_migrating(url, hub, "chunks", sightings=5)
        assert await terminate_hub_backends(url) >= 1
        await until_no_hub_backends(url)
        # The hub is about to try again: no count of the old rows, which its next attempt may hold.
        assert_untouched(await read_pg(url, count=False), db, "after the backend was terminated")
    await hub.listening()
    assert hub.stderr_text.count("retrying") >= 2, hub.stderr_text
    assert_migrated(await read_pg(url), db)
    await assert_served(hub, db)
    hub.assert_clean()
    await hub.kill()
    later = await hubs(url).listening()
    assert_migrated(await read_pg(url), db)
    await assert_served(later, db)
    later.assert_clean()


@pytest.mark.pg
async def test_pg_old_table_held_by_a_long_reader_past_the_db_timeout(
    hubs: Callable[..., Hub], fresh_pg_url: str
) -> None:
    """A long read of the old table (a report, pg_dump) holds the migration at
    the DROP of that table for longer than --db-timeout: the hub's attempts
    time out and are rolled back, the database stays the old one, and once
    the reader is done the next attempt migrates and the hub serves."""
    url = fresh_pg_url
    db = big_database(0.2)
    await build_pg(url, db)
    async with holding(PG_HOLDER, url, PG_STALL["drop"]) as holder:
        hub = hubs(url, "--db-timeout", "1")
        with trio.fail_after(PATIENCE):
            while hub.stderr_text.count("retrying") < 2:
                assert not hub.url and hub.proc.poll() is None, hub.stderr_text
                await trio.sleep(0.05)
        assert (await pg_fetch(url, "SELECT max(version) FROM keruta_schema"))[0][0] == OLD_VERSION
        await holder.release()
    await hub.listening()
    assert_migrated(await read_pg(url), db)
    await assert_served(hub, db)
    hub.assert_clean()


async def test_sqlite_disk_full_mid_migration_then_space_freed(hubs: Callable[..., Hub], tmp_path: Path) -> None:
    """The disk fills as the hub migrates (the migration writes about the
    database's size again, into the WAL; RLIMIT_FSIZE stands in for the full
    disk): each attempt is rolled back, the hub says why and waits, the file
    stays the old one; once there is room the next attempt migrates."""
    db = big_database(0.5)
    path = tmp_path / "old.db"
    await trio.to_thread.run_sync(build_sqlite, path, db)
    size = path.stat().st_size
    hub = hubs(sqlite_url(path), fsize=size // 3)
    with trio.fail_after(PATIENCE):
        while hub.stderr_text.count("retrying") < 2:
            assert not hub.url and hub.proc.poll() is None, hub.stderr_text
            await trio.sleep(0.05)
    assert str(path) in hub.stderr_text and "disk" in hub.stderr_text, hub.stderr_text
    assert_untouched(await trio.to_thread.run_sync(read_sqlite, path), db, "with the disk full")
    resource.prlimit(hub.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    await hub.listening()
    assert_migrated(await trio.to_thread.run_sync(read_sqlite, path), db)
    await assert_served(hub, db)
    hub.assert_clean()


# --- 6. a database whose version stamp is not its schema ---------------------------


async def test_a_dump_restored_sqlite_database_is_served_or_refused_never_waited_on(
    hubs: Callable[..., Hub], tmp_path: Path
) -> None:
    """A current database backed up with `sqlite3 db .dump` (or Python's
    iterdump) and restored: the dump keeps every table and row but not
    PRAGMA user_version, so the restored file says schema 0 over schema-7
    tables. Running the migrations from 0 cannot work (its tables exist).
    The hub must either serve the records or refuse the file at start with
    one clear line naming it; not retry it for ever as an outage."""
    source = tmp_path / "current.db"
    first = await hubs(sqlite_url(source)).listening()
    async with first.http() as client:
        resp = await client.post(logs_path("kept"), json=[{"message": f"kept {i}"} for i in range(1, 6)])
        assert resp.status_code == 200, resp.text
    first.proc.terminate()
    await trio.to_thread.run_sync(first.proc.wait)
    restored = tmp_path / "restored.db"

    def restore() -> None:
        conn = sqlite3.connect(source)
        dump = "\n".join(conn.iterdump())
        conn.close()
        out = sqlite3.connect(restored)
        out.executescript(dump)
        assert out.execute("PRAGMA user_version").fetchone()[0] == 0
        out.close()

    await trio.to_thread.run_sync(restore)
    content = restored.read_bytes()
    hub = hubs(sqlite_url(restored))
    with trio.fail_after(10):  # opening a small file takes milliseconds: longer is waiting
        while not hub.url and hub.proc.poll() is None:
            assert "retrying" not in hub.stderr_text, f"retried as an outage:\n{hub.stderr_text}"
            await trio.sleep(0.05)
    if hub.url:
        async with hub.http() as client:
            page = (await client.get(logs_path("kept"))).json()["content"]
        assert [r["message"] for r in page] == [f"kept {i}" for i in range(1, 6)], page
    else:
        await trio.to_thread.run_sync(hub.proc.wait)
        assert_refused_at_start(hub.proc.returncode, hub.stderr_text, str(restored))
        assert restored.read_bytes() == content, "the hub changed a file it refused"
