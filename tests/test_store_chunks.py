"""Chunked storage: the chunk format (hub/store/chunk.py) and the migration of
a database from before chunks (schema v3, one row per line) on both stores."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.store import chunk
from hub.store.base import DUPLICATE, INSERTED, LogQuery, record_id
from hub.store.sqlite import SQLiteStore
from keruta.levels import LEVELS
from keruta.limits import MAX_SEQ
from keruta.records import KINDS, SOURCES, LogRecord
from tests.storedata import rec, ts

# -- the format ------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
# The hub refuses metadata JSON cannot hold as int64 (keruta/wire.py), so no store sees it.
_metadata = st.dictionaries(st.text(max_size=5), st.one_of(st.integers(-(2**63), 2**63 - 1), _text, st.none()), max_size=3)


@st.composite
def _chunk_records(draw: Any) -> list[LogRecord]:
    first = draw(st.integers(1, 2**62))
    n = draw(st.integers(1, 30))
    gaps = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    seqs, seq = [], first
    for gap in gaps:
        seqs.append(seq)
        seq += 1 + gap
    return [
        LogRecord(
            "task-1",
            s,
            ts(draw(st.integers(0, 10**6))),
            draw(st.sampled_from(SOURCES)),
            draw(st.sampled_from(LEVELS)),
            draw(_text),
            draw(st.one_of(st.none(), st.integers(0, MAX_SEQ))),
            draw(_metadata),
            draw(st.booleans()),
            record_id("task-1", s),
            draw(st.one_of(st.none(), st.sampled_from(KINDS))),
        )
        for s in seqs
    ]


@given(_chunk_records())
@settings(max_examples=100, deadline=None)
def test_a_chunk_gives_back_exactly_the_records_it_was_made_of(records: list[LogRecord]) -> None:
    row = chunk.encode(records)
    assert chunk.decode("task-1", row.seq_first, row.lines, row.body) == records
    assert (row.seq_first, row.seq_last, row.n) == (records[0].seq, records[-1].seq, len(records))
    assert row.ts_first == min(r.timestamp for r in records) and row.ts_last == max(r.timestamp for r in records)
    for source in SOURCES:
        assert chunk.tally_count(row.tally, row.n, source, None) == sum(r.source == source for r in records)
    assert chunk.tally_count(row.tally, row.n, None, "ERROR") == sum(r.level == "ERROR" for r in records)
    assert chunk.tally_count(row.tally, row.n, None, None) == len(records)
    expected = "".join(r.message if r.partial else r.message + "\n" for r in records)
    assert chunk.raw_text(row.lines) == expected


@given(st.lists(st.tuples(st.sampled_from(SOURCES), st.sampled_from(LEVELS)), min_size=1, max_size=40))
def test_source_level_counts_are_a_plain_count_whether_a_batch_is_uniform_or_mixed(
    pairs: list[tuple[str, str]],
) -> None:
    sources, levels = [s for s, _ in pairs], [lv for _, lv in pairs]
    assert dict(chunk.source_level_counts(sources, levels)) == dict(Counter(pairs))


def test_a_chunk_holds_at_most_its_records_and_about_its_bytes() -> None:
    many = [LogRecord("t", s, ts(s), "stdout", "INFO", "x") for s in range(1, 1201)]
    assert [len(part) for part in chunk.split(many)] == [500, 500, 200]
    big = [LogRecord("t", s, ts(s), "stdout", "INFO", "y" * 10_000) for s in range(1, 21)]
    parts = list(chunk.split(big))
    assert all(sum(len(r.message) for r in part) <= chunk.CHUNK_BYTES for part in parts)
    assert [r for part in parts for r in part] == big
    # One line larger than a chunk's bytes is a chunk of its own.
    assert [len(p) for p in chunk.split([LogRecord("t", 1, ts(1), "stdout", "INFO", "z" * 100_000)])] == [1]


def _with_producers(records: list[LogRecord], producers: list[str | None]) -> list[LogRecord]:
    return [attrs.evolve(r, producer=producers[i % len(producers)]) for i, r in enumerate(records)]


_producers = st.lists(st.one_of(st.none(), st.sampled_from(["", "run-1", "run-2"])), min_size=1, max_size=3)


@given(_chunk_records(), _producers)
@settings(max_examples=100, deadline=None)
def test_a_one_record_chunk_is_the_chunk_its_columns_make(records: list[LogRecord], producers: list[str | None]) -> None:
    """A quiet task's chunk of one record is encoded on a path of its own:
    the same row, byte for byte, as the columns' path gives."""
    (r,) = _with_producers(records[:1], producers)
    row = chunk.encode([r])
    columns = chunk.encode_columns(
        r.task_id, [r.seq], [r.timestamp], [r.source], [r.level], [r.message], [r.line_number], [r.metadata],
        [r.partial], [r.kind], [r.producer],
    )
    assert (row.values(), row.bytes, row.counts) == (columns.values(), columns.bytes, columns.counts)
    assert chunk.decode(r.task_id, row.seq_first, row.lines, row.body) == [r]


@given(_chunk_records(), _producers, st.lists(st.integers(1, 8), min_size=1, max_size=30))
@settings(max_examples=100, deadline=None)
def test_merged_chunks_are_the_chunks_of_their_records(
    records: list[LogRecord], producers: list[str | None], sizes: list[int]
) -> None:
    """A quiet task's small chunks merged from their columns (no record
    built) are the chunks its records would make."""
    records = _with_producers(records, producers)
    parts, at = [], 0
    for size in sizes:
        if at < len(records):
            parts.append(records[at : at + size])
            at += size
    if at < len(records):
        parts.append(records[at:])
    rows = [chunk.encode(part) for part in parts]
    merged = chunk.merge("task-1", [(row.seq_first, chunk.columns(row.lines, row.body)) for row in rows])
    expected = [chunk.encode(part) for part in chunk.split(records)]
    assert [(m.values(), m.bytes, dict(m.counts)) for m in merged] == [
        (e.values(), e.bytes, dict(e.counts)) for e in expected
    ]


def test_a_small_part_is_stored_as_its_json_and_a_compressed_one_still_reads() -> None:
    """zstd gains nothing on a record or two: such a part is its JSON. A
    chunk written compressed, as every one was before, reads as it did."""
    def line(seq: int, text: str) -> LogRecord:
        return LogRecord("t", seq, ts(seq), "stdout", "INFO", text, seq)

    small = [line(1, "one line"), line(2, "two")]
    row = chunk.encode(small)
    assert row.lines.startswith(b"{") and row.body.startswith(b"{")
    compressed = zstandard.ZstdCompressor()
    old_lines, old_body = compressed.compress(row.lines), compressed.compress(row.body)
    assert chunk.decode("t", 1, old_lines, old_body) == chunk.decode("t", 1, row.lines, row.body)
    assert [r.message for r in chunk.decode("t", 1, old_lines, old_body)] == ["one line", "two"]
    assert chunk.raw_text(old_lines) == chunk.raw_text(row.lines) == "one line\ntwo\n"
    assert chunk.lines_json(old_lines) == chunk.lines_json(row.lines) == row.lines
    big = chunk.encode([line(s, f"line {s} of a chunk big enough to compress") for s in range(1, 101)])
    assert not big.lines.startswith(b"{") and chunk.lines_json(big.lines).startswith(b"{")


def test_the_bench_workload_takes_few_bytes_per_line() -> None:
    """The format's part of the disk target (issue 17: 25 bytes a line, both
    stores, measured by `tox -e bench`): the compressed columns alone stay well under it."""
    lines = [
        LogRecord("t", s, ts(s / 1000), "stdout", "INFO", f"{s:09d} worker-{s % 16} processed item {s} in {s * 7 % 1000} ms ".ljust(79, "x"), s)
        for s in range(1, 501)
    ]
    row = chunk.encode(lines)
    assert (len(row.lines) + len(row.body)) / 500 < 15, (len(row.lines) + len(row.body)) / 500


# -- a database from before chunks -----------------------------------------------------

OLD_ROWS = 1200
DELETED = range(600, 611)  # a hole a v3 delete left


def _old_rows() -> list[tuple[Any, ...]]:
    rows = []
    for s in range(1, OLD_ROWS + 1):
        if s in DELETED:
            continue
        level = "ERROR" if s % 100 == 0 else "INFO"
        rows.append(("old", s, record_id("old", s), ts(s), "stdout", level, f"old line {s}", s, None, False, None))
    return rows


def _old_task_rows(rows: list[tuple[Any, ...]]) -> dict[str, list[tuple[Any, ...]]]:
    errors = sum(r[5] == "ERROR" for r in rows)
    return {
        "tasks": [("old", "running", None, OLD_ROWS, OLD_ROWS, ts(1), ts(OLD_ROWS), len(rows), ts(OLD_ROWS), 1, 1)],
        "counts": [("old", "stdout", "INFO", len(rows) - errors), ("old", "stdout", "ERROR", errors)],
        "producers": [("old", "agent-1", 1, OLD_ROWS, "running", None, ts(OLD_ROWS))],
        "ranges": [("old", "agent-1", 1, OLD_ROWS, 1)],
    }


async def _check_migrated(store: Any) -> None:
    rows = _old_rows()
    page = await store.query(LogQuery(task_id="old", size=2000))
    assert [(r.seq, r.message, r.id) for r in page.content] == [(r[1], r[6], r[2]) for r in rows]
    assert page.total_elements == len(rows)
    errors = await store.query(LogQuery(task_id="old", level="ERROR", size=100))
    assert [r.seq for r in errors.content] == [s for s in range(100, OLD_ROWS + 1, 100) if s not in DELETED]
    stats = await store.stats("old")
    assert stats.total_logs == len(rows) and stats.level_counts == {"INFO": len(rows) - 11, "ERROR": 11}
    # Identity came through: a resend is a duplicate, the next record follows on.
    result = await store.append([rec(5, "old line 5", task="old", producer="agent-1", line_number=5),
                                 rec(OLD_ROWS + 1, "new", task="old", producer="agent-1")])
    assert result.status == [DUPLICATE, INSERTED]
    assert result.records[1] is not None and result.records[1].seq == OLD_ROWS + 1
    assert await store.delete("old", ts(300.5)) == 300


async def test_a_sqlite_database_from_before_chunks_is_migrated_in_place(tmp_path: Path) -> None:
    from hub.store import sqlite_schema

    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for step in (1, 2, 3):
        for statement in sqlite_schema._MIGRATIONS[step]:
            assert isinstance(statement, str)
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    rows = _old_rows()
    conn.executemany(f"INSERT INTO logs ({', '.join(COLUMNS)}) VALUES ({','.join('?' * 11)})", rows)
    for table, values in _old_task_rows(rows).items():
        conn.executemany(f"INSERT INTO {TABLES[table][0]} ({TABLES[table][1]}) VALUES ({','.join('?' * len(values[0]))})", values)
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        await _check_migrated(store)
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_schema.SCHEMA_VERSION
    assert not conn.execute("SELECT name FROM sqlite_master WHERE name = 'logs'").fetchall()
    conn.close()


@pytest.mark.pg
async def test_a_postgresql_database_from_before_chunks_is_migrated_in_place(pg_url: str) -> None:
    from hub.store import pg_schema
    from hub.store.postgres import PostgresStore
    from tests import pgpool

    statements = [s for step in (1, 2, 3) for s in pg_schema._MIGRATIONS[step]]
    assert all(isinstance(s, str) for s in statements)
    statements.append("CREATE TABLE keruta_schema (version integer NOT NULL)")
    statements.append("INSERT INTO keruta_schema VALUES (3)")
    rows = _old_rows()

    def literal(v: Any) -> str:
        if v is None:
            return "NULL"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        return "'" + str(v).replace("'", "''") + "'"

    def insert(table: str, columns: str, values: list[tuple[Any, ...]]) -> str:
        return f"INSERT INTO {table} ({columns}) VALUES " + ",".join(
            "(" + ",".join(literal(v) for v in row) + ")" for row in values
        )

    statements.append(insert("keruta_logs", ", ".join(COLUMNS), rows))
    for table, values in _old_task_rows(rows).items():
        statements.append(insert("keruta_" + TABLES[table][0], TABLES[table][1], values))
    pgpool.admin(pg_url, *statements)
    store = PostgresStore(pg_url)
    await store.open()
    try:
        await _check_migrated(store)
    finally:
        await store.close()


COLUMNS = ("task_id", "seq", "id", "ts", "source", "level", "message", "line_number", "metadata", "partial", "kind")
TABLES = {
    "tasks": ("tasks", "task_id, state, exit_code, durable_seq, max_seq, first_ts, last_ts, total_logs, updated_at, run_no, runs"),
    "counts": ("counts", "task_id, source, level, n"),
    "producers": ("producers", "task_id, producer, run_no, high, state, exit_code, last_write"),
    "ranges": ("producer_ranges", "task_id, producer, pseq_first, pseq_last, seq_first"),
}


# -- a delete that cuts inside a chunk -------------------------------------------------


async def test_a_delete_before_a_time_inside_a_chunk_keeps_its_newer_records(store: Any) -> None:
    await store.append([rec(s) for s in range(1, 101)])  # one chunk
    assert await store.delete("t1", ts(40.5)) == 40
    page = await store.query(LogQuery(task_id="t1", size=1000))
    assert [r.seq for r in page.content] == list(range(41, 101)) and page.total_elements == 60
    after = await store.query(LogQuery(task_id="t1", after_seq=90, size=5))
    assert [r.seq for r in after.content] == [91, 92, 93, 94, 95] and after.total_elements == 10
    # Timestamps a producer gave out of order: the delete leaves a hole inside the chunk.
    await store.append([rec(101, at=1000), rec(102, at=5), rec(103, at=1001)])
    assert await store.delete("t1", ts(41.5)) == 2  # 41, and 102 inside the newest chunk
    after = await store.query(LogQuery(task_id="t1", after_seq=99, size=2))
    assert [r.seq for r in after.content] == [100, 101] and after.total_elements == 3
    assert [r.seq for r in await store.read_range("t1", 100, 200, 10)] == [101, 103]
    raw = "".join([text async for text in store.iter_raw("t1")])
    assert raw.splitlines() == [f"line {s}" for s in [*range(42, 102), 103]]
    stats = await store.stats("t1")
    assert stats.total_logs == 61 and stats.start == ts(42) and stats.end == ts(1001)
    assert await store.delete("t1", None) == 61
    assert (await store.query(LogQuery(task_id="t1"))).content == []


def test_the_chunk_cache_is_bounded_in_bytes_and_never_serves_a_rewritten_chunk() -> None:
    def line(seq: int, message: str) -> LogRecord:
        return LogRecord("t", seq, ts(seq), "stdout", "INFO", message, id=record_id("t", seq))

    cache = chunk.ChunkCache(chunks=64, max_bytes=300_000)
    big = [chunk.encode([line(s, "m" * 100_000)]).values()[1:] for s in range(1, 11)]
    first = cache.records("t", big[0])
    assert cache.records("t", big[0]) is first  # kept while it fits
    for row in big[1:]:
        cache.records("t", row)
    # Ten chunks of 100 kB do not fit in 300 kB: the first was decoded again.
    assert cache.records("t", big[0]) is not first and cache.records("t", big[0]) == first
    # A chunk rewritten by a delete holds fewer records under the same seq_last.
    whole = [line(s, f"line {s}") for s in range(20, 25)]
    assert cache.records("t", chunk.encode(whole).values()[1:]) == whole
    assert cache.records("t", chunk.encode(whole[2:]).values()[1:]) == whole[2:]


def test_tasks_started_together_merge_in_different_commits() -> None:
    # A fleet's tasks, a line a commit each from seq 1: each merges once every
    # COMPACT_EVERY lines, but not all at the same line.
    tasks = [f"job-{i}" for i in range(1000)]
    due = {t: [s for s in range(1, 2 * chunk.COMPACT_EVERY + 1) if chunk.compaction_due([rec(s, task=t)])] for t in tasks}
    for seqs in due.values():
        assert len(seqs) == 2 and seqs[1] - seqs[0] == chunk.COMPACT_EVERY
    at_once = Counter(seqs[0] for seqs in due.values())
    assert len(at_once) == chunk.COMPACT_EVERY and max(at_once.values()) < 40, at_once.most_common(3)
    # A batch that spans a task's turn merges it, as does one that ends on it.
    first = due["job-0"][0]
    assert chunk.compaction_due([rec(s, task="job-0") for s in range(first - 2, first + 3)])
    assert not chunk.compaction_due([rec(s, task="job-0") for s in range(first + 1, first + 4)])


# -- chunks decoded by several threads at once ----------------------------------------


# zstandard's objects must not be shared by threads, and a store's reads run
# in worker threads, several at a time: with one decompressor for all, two
# catch-ups were handed each other's records, "Data corruption", or a crash.
async def test_concurrent_reads_of_compressed_chunks_each_get_their_own_records(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "k.db", readers=8)
    await store.open()
    try:
        tasks = [f"task-{i}" for i in range(8)]
        for task in tasks:
            await store.append([rec(s, f"{task} line {s} " + "x" * 200, task=task) for s in range(1, 2001)])
        got: dict[str, list[list[str]]] = {task: [] for task in tasks}

        async def read(task: str) -> None:
            for after in range(0, 2000, 500):
                got[task].append([r.message for r in await store.read_range(task, after, after + 500, 500)])

        async with trio.open_nursery() as nursery:
            for task in tasks * 3:
                nursery.start_soon(read, task)
        for task in tasks:
            expected = [[f"{task} line {s} " + "x" * 200 for s in range(after + 1, after + 501)] for after in range(0, 2000, 500)]
            assert sorted(got[task]) == sorted(expected * 3)
    finally:
        await store.close()
