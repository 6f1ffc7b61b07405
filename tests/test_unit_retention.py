"""hub/actors/retention.py: the cutoff, periodic passes on the autojump clock, and a
store outage waited out. The store is a real SQLite file."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import trio
import trio.testing

from hub.actors.retention import cutoff, run_retention
from hub.store.base import Incoming, StoreUnavailable
from hub.store.sqlite import SQLiteStore
from keruta.timefmt import format_ts


def test_cutoff_is_days_before_now_in_the_canonical_form() -> None:
    now = dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.UTC)
    assert cutoff(now, 1) == "2026-03-09T12:00:00.000000Z"
    assert cutoff(now, 0.5) == "2026-03-10T00:00:00.000000Z"


class PassCountingStore(SQLiteStore):
    """A real SQLite store that reports each retention pass (and can fail some)."""

    def __init__(self, path: Path, failures: int = 0) -> None:
        super().__init__(path)
        self.passes: list[float] = []
        self.failures = failures
        self.passed = trio.Event()

    async def delete_older_than(self, before: str) -> int:
        self.passes.append(trio.current_time())
        try:
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable("database is away")
            return await super().delete_older_than(before)
        finally:
            self.passed.set()

    async def next_pass(self) -> None:
        self.passed = trio.Event()
        await self.passed.wait()


def row(task: str, seq: int, age_days: float) -> Incoming:
    ts = format_ts(dt.datetime.now(dt.UTC) - dt.timedelta(days=age_days))
    return Incoming(task, seq, ts, "stdout", "INFO", f"line {seq}")


async def test_passes_delete_only_old_records_every_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = PassCountingStore(tmp_path / "r.db")
    await store.open()
    try:
        await store.append([row("t", 1, 3), row("t", 2, 2.5), row("t", 3, 0.1), row("u", 1, 5)])
        await store.set_state("u", "succeeded", 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_retention, store, 1.0, 60.0)
            for _ in range(3):
                await store.next_pass()
            nursery.cancel_scope.cancel()
        # t still runs: its old head leaves a gap record where it was.
        kept = await store.read_range("t", 0, 10, 10)
        assert [(r.seq, r.kind) for r in kept] == [(1, "gap"), (3, None)]
        assert kept[0].metadata["gap"]["reason"] == "retention"
        assert kept[0].metadata["gap"]["lines"] == 2
        assert await store.read_range("u", 0, 10, 10) == []
        gaps = [b - a for a, b in zip(store.passes, store.passes[1:], strict=False)]
        # At least the interval apart (the clock may also jump while SQLite works in its thread).
        assert all(gap >= 60.0 for gap in gaps), gaps
    finally:
        await store.close()


async def test_a_store_outage_is_retried_not_fatal(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    store = PassCountingStore(tmp_path / "r.db", failures=2)
    await store.open()
    try:
        await store.append([row("t", 1, 3)])
        await store.set_state("t", "failed", 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_retention, store, 1.0, 3600.0)
            for _ in range(3):
                await store.next_pass()
            nursery.cancel_scope.cancel()
        assert len(store.passes) == 3 and store.failures == 0
        # Retried after a backoff, long before the next regular pass.
        assert store.passes[2] - store.passes[0] < 3600.0
        assert await store.read_range("t", 0, 10, 10) == []
    finally:
        await store.close()
