"""The newest spooled records, kept in memory so the uplink rarely reads files."""

from __future__ import annotations

import collections


class RecentRecords:
    """The last records appended, up to `budget` bytes of payload, oldest first.

    Consecutive seqs: the record with seq s sits at index s - first seq.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: collections.deque[tuple[int, bytes]] = collections.deque()
        self._size = 0

    def append(self, entries: list[tuple[int, bytes]]) -> None:
        for seq, payload in entries:
            # A tight copy: orjson's bytes keep a 4 KiB allocation behind a
            # 200-byte record, which would make the cache 20 times its budget.
            self._entries.append((seq, bytes(memoryview(payload))))
            self._size += len(payload)
        self._trim()

    def append_run(self, first_seq: int, payloads: list[bytes]) -> None:
        """Records `first_seq`, `first_seq + 1`, ... whose bytes are already
        tight (built by formatting or joining, not orjson's spare room)."""
        self._entries.extend(zip(range(first_seq, first_seq + len(payloads)), payloads, strict=True))
        self._size += sum(map(len, payloads))
        self._trim()

    def _trim(self) -> None:
        while self._size > self.budget and self._entries:
            self._size -= len(self._entries.popleft()[1])

    def release(self, through: int) -> None:
        """Forget records with seq <= `through` (the hub stored them)."""
        while self._entries and self._entries[0][0] <= through:
            self._size -= len(self._entries.popleft()[1])

    def read(self, from_seq: int, max_records: int, max_bytes: int) -> list[tuple[int, bytes]] | None:
        """Like Spool.read, or None when `from_seq` is older than what is kept."""
        if not self._entries or self._entries[0][0] > from_seq:
            return None
        out: list[tuple[int, bytes]] = []
        total = 0
        i = from_seq - self._entries[0][0]
        while i < len(self._entries) and len(out) < max_records:
            entry = self._entries[i]
            if out and total + len(entry[1]) > max_bytes:
                break
            out.append(entry)
            total += len(entry[1])
            i += 1
        return out
