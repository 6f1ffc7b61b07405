"""A chunk: up to CHUNK_RECORDS consecutive records of one task, stored as one row.

The row carries what lets a reader skip a chunk without opening it -- the
seq range, the time range, how many records it holds per (source, level) --
and the records themselves, encoded once and compressed (`lines`, `body`). Nothing
here does I/O: the stores write and read the rows (docs/architecture.md, "The
store"), and the algorithms in hub/store/core.py decide which to open.

The records are the JSON of their columns (columns compress far better than
rows: a task's timestamps, sources and levels repeat), zstd-compressed unless
the JSON is under PLAIN_BELOW bytes (a quiet task's chunk of a few records,
where a zstd frame would gain some bytes for a microsecond or two each, until
the chunk is merged; a reader tells a zstd frame by its magic number, and
plain JSON starts with "{"), in two parts: `lines`, what a raw download and a text search read, and `body`,
the rest:

    lines: {"m": [messages], "p": [partial] (absent: none)}
    body:  {"t": [timestamps], "s": [sources] or one source, "l": [levels] or one,
            "n": [line numbers] or one, "x": [metadata or null] (absent: none has any),
            "k": [kinds] (absent: all lines), "q": [seqs] (absent: seq_first, +1, ...),
            "w": [producers] or one (absent: none has one)}

"w" is who wrote each record as the hub answers it (keruta.records.LogRecord
`producer`; null for the hub's own gap and redaction records). A chunk
written before the column existed has none: its records answer without one.

A chunk is written once per batch and rewritten only when a delete or a cap
cuts inside it (its seqs are then no longer consecutive and "q" says which
they are) or a redaction changes what it holds.
"""

from __future__ import annotations

import functools
import operator
import threading
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import orjson
import zstandard

from hub.store.base import record_id, record_ids
from keruta.records import LogRecord, trusted_record

# At most this many records, and about this many bytes of messages, per chunk:
# a page or a resumed subscriber opens one or two chunks, not dozens, and a
# lookup of one record decodes at most this much.
CHUNK_RECORDS = 500
CHUNK_BYTES = 64 * 1024
# A quiet task stores a chunk a commit, of a record or a few: each such chunk
# costs a row, its index entry and zstd's frame, some 250 bytes a line where a
# full chunk costs about 10. So whenever an append of a small chunk reaches a
# multiple of COMPACT_EVERY in the task's seqs, the task's trailing run of
# chunks under SMALL_CHUNK records and half CHUNK_BYTES is merged into full
# ones, in a transaction of its own (`Store.compact`, which the writer runs
# when an append says so, after answering it): each record is re-encoded
# about twice, once per COMPACT_EVERY small commits.
SMALL_CHUNK = 128
COMPACT_EVERY = 64
# Level 1: most of the ratio of the higher levels (the columns repeat), at a
# cost per row far below the rest of an append.
_LEVEL = 1


class _Zstd(threading.local):
    """A compressor and a decompressor for each thread: zstandard's objects
    must not be used by two threads at once, and the stores' reads run in
    several worker threads together (two concurrent catch-ups sharing one
    decompressor were handed each other's records, or "Data corruption")."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=_LEVEL)
        self.decompressor = zstandard.ZstdDecompressor()


_zstd = _Zstd()
# A chunk part's JSON shorter than this is stored as it is (module docstring).
PLAIN_BELOW = 512
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@attrs.define(slots=True)  # not frozen: one is built per chunk, and a frozen init costs 3x
class ChunkRow:
    """One chunk as its row holds it (the column order of both stores);
    never changed once built."""

    task_id: str
    seq_first: int
    seq_last: int
    n: int
    ts_first: str
    ts_last: str
    tally: str  # JSON [[source, level, n], ...]
    lines: bytes
    body: bytes
    # UTF-8 bytes of its messages: what a task's cap counts (its own column,
    # after the nine `values` gives).
    bytes: int = 0
    # Its records per (source, level), as `tally` says (what the task's counts add).
    counts: dict[tuple[str, str], int] = attrs.field(factory=dict, eq=False)

    def values(self) -> tuple[Any, ...]:
        return (
            self.task_id, self.seq_first, self.seq_last, self.n, self.ts_first, self.ts_last,
            self.tally, self.lines, self.body,
        )


def tally_count(tally: str, n: int, source: str | None, level: str | None) -> int:
    """How many of a chunk's `n` records have this source and level (None:
    any), from its `tally` column: the chunk itself is not opened."""
    if source is None and level is None:
        return n
    return sum(k for s, lv, k in orjson.loads(tally) if (source is None or s == source) and (level is None or lv == level))


def split(records: Sequence[LogRecord]) -> Iterator[Sequence[LogRecord]]:
    """A task's new records (in seq order) in chunks of at most CHUNK_RECORDS
    records and about CHUNK_BYTES of messages."""
    for start, end in bounds([r.message for r in records]):
        yield records[start:end]


def bounds(messages: Sequence[str]) -> list[tuple[int, int]]:
    """Where `split` cuts records with these messages: (start, end) of each chunk."""
    n = len(messages)
    if n <= CHUNK_RECORDS and sum(map(len, messages)) + 16 * n <= CHUNK_BYTES:
        return [(0, n)] if n else []
    cuts = []
    start = 0
    size = 0
    for i, m in enumerate(messages):
        size += len(m) + 16
        if i - start >= CHUNK_RECORDS or (size > CHUNK_BYTES and i > start):
            cuts.append((start, i))
            start, size = i, len(m) + 16
    if start < n:
        cuts.append((start, n))
    return cuts


def small(n: int, nbytes: int) -> bool:
    """Whether a chunk of n records and nbytes of messages is one to merge."""
    return n < SMALL_CHUNK and nbytes < CHUNK_BYTES // 2


def compaction_due(records: Sequence[LogRecord]) -> bool:
    """Whether an append of these records (one task's, in seq order) merges
    the task's trailing small chunks: it stored a small chunk and its seqs
    reach a multiple of COMPACT_EVERY, shifted by the task's own offset
    (tasks started together would otherwise all merge in the same commits:
    a fleet of 1,000 held every ack for ~200 ms every 64 lines)."""
    if len(records) >= SMALL_CHUNK:
        return False
    shift = compaction_shift(records[0].task_id)
    return (records[-1].seq + shift) // COMPACT_EVERY > (records[0].seq - 1 + shift) // COMPACT_EVERY


@functools.lru_cache(maxsize=4096)
def compaction_shift(task_id: str) -> int:
    """A task's offset of its merges, stable across hubs and restarts."""
    return zlib.crc32(task_id.encode()) % COMPACT_EVERY


def _column(values: Sequence[Any]) -> Any:
    """One value when all are equal (a task's source, level...), else the list."""
    first = values[0]
    # Counted in C: a chunk's columns are mostly of one value.
    return first if values.count(first) == len(values) else values


def encode(records: Sequence[LogRecord]) -> ChunkRow:
    """A chunk of one task's records, in seq order."""
    if len(records) == 1:
        return _encode_one(records[0])
    if len(records) <= 8:
        # A few records' columns in one pass, in C (a fleet's commit): ten
        # list comprehensions would cost more to set up than to run.
        return encode_columns(records[0].task_id, *zip(*map(_fields, records), strict=True))
    return encode_columns(
        records[0].task_id,
        [r.seq for r in records],
        [r.timestamp for r in records],
        [r.source for r in records],
        [r.level for r in records],
        [r.message for r in records],
        [r.line_number for r in records],
        [r.metadata for r in records],
        [r.partial for r in records],
        [r.kind for r in records],
        [r.producer for r in records],
    )


def _encode_one(r: LogRecord) -> ChunkRow:
    """`encode_columns` of one record, the same row at a third of the cost:
    a quiet task's append (a fleet's commit is of many such)."""
    message = r.message
    lines: dict[str, Any] = {"m": [message]}
    if r.partial:
        lines["p"] = [r.partial]
    columns: dict[str, Any] = {"t": [r.timestamp], "s": r.source, "l": r.level, "n": r.line_number}
    if r.metadata:
        columns["x"] = [r.metadata]
    if r.kind is not None:
        columns["k"] = [r.kind]
    if r.producer is not None:
        columns["w"] = r.producer
    return ChunkRow(
        r.task_id,
        r.seq,
        r.seq,
        1,
        r.timestamp,
        r.timestamp,
        orjson.dumps([[r.source, r.level, 1]]).decode(),
        pack(orjson.dumps(lines)),
        pack(orjson.dumps(columns)),
        len(message) if message.isascii() else message_bytes([message]),
        {(r.source, r.level): 1},
    )


_fields = operator.attrgetter(
    "seq", "timestamp", "source", "level", "message", "line_number", "metadata", "partial", "kind", "producer"
)


def encode_columns(
    task_id: str,
    seqs: Sequence[int],
    timestamps: Sequence[str],
    sources: Sequence[str],
    levels: Sequence[str],
    messages: Sequence[str],
    numbers: Sequence[int | None],
    metadata: Sequence[dict[str, Any] | None],
    partial: Sequence[bool],
    kinds: Sequence[str | None],
    producers: Sequence[str | None],
) -> ChunkRow:
    """A chunk of one task's records, in seq order, given as columns (lists
    or tuples; a record's metadata: empty or None when it has none)."""
    n = len(seqs)
    lines: dict[str, Any] = {"m": messages}
    if any(partial):
        lines["p"] = partial
    columns: dict[str, Any] = {
        "t": timestamps,
        "s": _column(sources),
        "l": _column(levels),
        "n": _column(numbers),
    }
    if any(metadata):
        columns["x"] = [m or None for m in metadata]
    if kinds.count(None) != n:
        columns["k"] = kinds
    if seqs[-1] - seqs[0] + 1 != n:
        columns["q"] = list(seqs)
    # A batch is mostly one producer's: one value for the chunk.
    producer = _column(producers)
    if producer is not None:
        columns["w"] = producer
    tally = source_level_counts(sources, levels)
    return ChunkRow(
        task_id,
        seqs[0],
        seqs[-1],
        n,
        min(timestamps),
        max(timestamps),
        orjson.dumps([[s, lv, k] for (s, lv), k in tally.items()]).decode(),
        pack(orjson.dumps(lines)),
        pack(orjson.dumps(columns)),
        message_bytes(messages),
        tally,
    )


def pack(data: bytes) -> bytes:
    """A chunk part's JSON as stored (module docstring)."""
    return data if len(data) < PLAIN_BELOW else _zstd.compressor.compress(data)


def unpack(part: bytes) -> bytes:
    """The JSON of a chunk part as stored, compressed or not."""
    if part[:4] == _ZSTD_MAGIC:
        return _zstd.decompressor.decompress(part)  # type: ignore[no-any-return]
    return bytes(part)


def merge(task_id: str, chunks: Sequence[tuple[int, dict[str, Any]]]) -> list[ChunkRow]:
    """The records of consecutive chunks (each its seq_first and `columns`),
    in seq order, as chunks of `split`'s size: the same records, seqs,
    tallies and bytes, straight from their columns (no record built, nor its
    id)."""
    seqs: list[int] = []
    timestamps: list[str] = []
    sources: list[str] = []
    levels: list[str] = []
    messages: list[str] = []
    numbers: list[int | None] = []
    metadata: list[dict[str, Any] | None] = []
    partial: list[bool] = []
    kinds: list[str | None] = []
    producers: list[str | None] = []
    for seq_first, cols in chunks:
        m = cols["m"]
        n = len(m)
        messages += m
        seqs += seqs_of(cols, seq_first)
        timestamps += cols["t"]
        sources += _expand(cols["s"], n)
        levels += _expand(cols["l"], n)
        numbers += _expand(cols["n"], n)
        metadata += cols.get("x") or [None] * n
        partial += cols.get("p") or [False] * n
        kinds += cols.get("k") or [None] * n
        producers += _expand(cols.get("w"), n)
    return [
        encode_columns(
            task_id, seqs[a:b], timestamps[a:b], sources[a:b], levels[a:b], messages[a:b], numbers[a:b],
            metadata[a:b], partial[a:b], kinds[a:b], producers[a:b],
        )
        for a, b in bounds(messages)
    ]


def source_level_counts(sources: Sequence[str], levels: Sequence[str]) -> dict[tuple[str, str], int]:
    """How many records have each (source, level). A batch is mostly of one
    source and one level: told by two scans in C, not a tuple per record."""
    n = len(sources)
    if n and sources.count(sources[0]) == n and levels.count(levels[0]) == n:
        return {(sources[0], levels[0]): n}
    return Counter(zip(sources, levels, strict=True))


def message_bytes(messages: Sequence[str]) -> int:
    """The UTF-8 bytes of messages (a lone surrogate as the digest counts it)."""
    text = "".join(messages)
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def lines_json(lines: bytes) -> bytes:
    """The JSON of a chunk's `lines` part (for a substring test before decoding it)."""
    return unpack(lines)


def body_json(body: bytes) -> bytes:
    """The JSON of a chunk's `body` part (metadata among it)."""
    return unpack(body)


def columns(lines: bytes, body: bytes) -> dict[str, Any]:
    """Every column of a chunk, from its two parts."""
    cols: dict[str, Any] = orjson.loads(unpack(body))
    cols.update(orjson.loads(unpack(lines)))
    return cols


def _expand(value: Any, n: int) -> list[Any]:
    return value if isinstance(value, list) else [value] * n


def seqs_of(cols: dict[str, Any], seq_first: int) -> list[int] | range:
    n = len(cols["m"])
    q = cols.get("q")
    return q if q is not None else range(seq_first, seq_first + n)


def decode_row(task_id: str, row: Sequence[Any]) -> list[LogRecord]:
    """The records of a chunk row (CHUNK_FULL: seq_first first, lines and body
    last) about to be rewritten or dropped, decoded outside the cache: its
    entry would be dead at once, and would push out chunks readers want."""
    return decode(task_id, row[0], row[-2], row[-1])


def decode(task_id: str, seq_first: int, lines: bytes, body: bytes) -> list[LogRecord]:
    """The records of a chunk, in seq order."""
    return records_of(task_id, seq_first, columns(lines, body))


def records_of(task_id: str, seq_first: int, cols: dict[str, Any]) -> list[LogRecord]:
    """The records of decoded columns."""
    messages = cols["m"]
    n = len(messages)
    seqs = seqs_of(cols, seq_first)
    timestamps = cols["t"]
    sources = _expand(cols["s"], n)
    levels = _expand(cols["l"], n)
    numbers = _expand(cols["n"], n)
    metadata = cols.get("x") or [None] * n
    partial = cols.get("p") or [False] * n
    kinds = cols.get("k") or [None] * n
    producers = _expand(cols.get("w"), n)
    ids = record_ids(task_id, seq_first, n) if "q" not in cols else [record_id(task_id, s) for s in seqs]
    # Positional, inline: a catching-up subscriber and every page read this way.
    return [
        trusted_record(
            task_id,
            seqs[i],
            timestamps[i],
            sources[i],
            levels[i],
            messages[i],
            numbers[i],
            metadata[i] or {},
            partial[i],
            ids[i],
            kinds[i],
            producers[i],
        )
        for i in range(n)
    ]


def raw_text(lines: bytes) -> str:
    """The chunk's lines as a raw download shows them: each message, with a
    newline unless it is a partial line."""
    cols = orjson.loads(unpack(lines))
    messages = cols["m"]
    partial = cols.get("p")
    if partial is None:
        return "\n".join(messages) + "\n"
    return "".join(m if p else m + "\n" for m, p in zip(messages, partial, strict=True))


class ChunkCache:
    """The records of the chunks read last, decoded once.

    A catching-up subscriber reads a few records at a time, and pages read
    the chunks around each other: without this, every read would decompress
    and rebuild the whole chunk. Keyed by the task, the chunk's seqs and its
    compressed parts themselves: a rewrite that keeps the seqs (a redaction,
    a cap's gap record growing) changes the parts, so a stale entry is never
    served, on this hub or on another sharing the database. Only what was
    read from the database goes in, never what a transaction that may still
    roll back wrote. Shared by reader threads, hence the lock.
    """

    def __init__(self, chunks: int = 64, max_bytes: int = 16 * 1024 * 1024) -> None:
        self._chunks = chunks
        # About what the records hold (their messages, and a few hundred bytes
        # of object each): a chunk of a few huge lines counts as what it is.
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[tuple[str, int, int, int, bytes, bytes], tuple[list[LogRecord], int]] = OrderedDict()
        self._lock = threading.Lock()

    def records(self, task_id: str, row: Sequence[Any]) -> list[LogRecord]:
        """The records of a chunk row (seq_first, seq_last, n, ..., lines, body)."""
        # Hashing the compressed parts costs far less than decoding them.
        key = (task_id, row[0], row[1], row[2], bytes(row[-2]), bytes(row[-1]))
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
        records = decode(task_id, row[0], row[-2], row[-1])
        size = sum(len(r.message) for r in records) + 300 * len(records)
        with self._lock:
            if key not in self._items:
                self._items[key] = (records, size)
                self._bytes += size
            while self._items and (len(self._items) > self._chunks or self._bytes > self._max_bytes):
                _, (_, gone) = self._items.popitem(last=False)
                self._bytes -= gone
        return records
