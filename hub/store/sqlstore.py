"""The `Store` interface written once over the algorithms of hub/store/core.py.

A store subclass says how to run them: `_read` on a connection of its own
(`snapshot`: all statements see one state of the database) and `_write` in a
transaction that commits, or rolls back entirely, before it returns (`sync`:
and is durable against a power cut; False leaves that to `Store.sync`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, TypeVar

import orjson
import trio

from hub.answers import Verify
from hub.store import core, redacting, trimming
from hub.store.base import (
    MAX_SECTIONS,
    AppendResult,
    Incoming,
    LogQuery,
    LogStats,
    Page,
    SectionPage,
)
from hub.store.rows import SEQ_MAX, iter_by_range
from hub.store.rules import check_page
from hub.store.steps import Dialect, Steps
from hub.store.verify import Verification
from keruta.records import TASK_STATES, InvalidField, LogRecord, TaskInfo
from keruta.summary import Summary
from keruta.timefmt import now_ts

T = TypeVar("T")


class SqlStore:
    url: str
    _dialect: Dialect
    row_locks: ClassVar[bool] = False

    async def _read(self, steps: Steps[T], *, snapshot: bool = False) -> T:
        raise NotImplementedError

    async def _write(self, steps: Steps[T], *, sync: bool = True) -> T:
        raise NotImplementedError

    def _snapshot_reads(self) -> AbstractAsyncContextManager[Callable[[Steps[Any]], Awaitable[Any]]]:
        """A read function whose reads, however many and however far apart,
        all see one state of the database (one connection, one transaction)."""
        raise NotImplementedError

    async def sync(self) -> None:
        raise NotImplementedError

    async def upkeep(self) -> None:
        """Nothing by default."""

    async def append(self, items: Sequence[Incoming], busy_wait: float | None = None) -> AppendResult:
        if not items:
            return AppendResult(records=[], inserted=[], durable={})
        return await self._write(core.append(self._dialect, items, busy_wait), sync=False)

    async def compact(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            await self._write(core.compact(self._dialect, task_ids), sync=False)

    async def set_state(
        self, task_id: str, state: str, exit_code: int | None, producer: str | None = None,
        summary: Summary | None = None, busy_wait: float | None = None,
    ) -> TaskInfo:
        if state not in TASK_STATES:
            raise InvalidField("state", f"must be one of {', '.join(TASK_STATES)}")
        # The writer, its one caller, answers through the syncer, which syncs.
        return await self._write(
            core.set_state(
                self._dialect, task_id, state, exit_code, producer, None if summary is None else summary.to_json(),
                busy_wait,
            ),
            sync=False,
        )

    async def verify(self, task_id: str) -> Verify | None:
        """The task's verdict (hub/store/verify.py), which it also keeps as its last
        verdict; None for an unknown task. Reads every chunk, a few at a
        time, and decodes and hashes them in a worker thread; every read sees
        one state of the task, so a redaction, a cap or a DELETE committing
        meanwhile is either wholly in the verdict or not at all (read in
        separate snapshots, a chunk read before a redaction step and its
        redaction record after it counted the change twice)."""
        async with self._snapshot_reads() as read:
            start = await read(core.verify_start(self._dialect, task_id))
            if start is None:
                return None
            summaries, ranges = start
            # The producer of the redaction records writes nothing else: no run to list.
            summaries = [row for row in summaries if row[0] != redacting.REDACTION_PRODUCER]
            check = Verification(
                task_id, [(p, _summary(text)) for p, text, _ in summaries], ranges,
                runs={p for p, _, run in summaries if run},
            )
            after = 0
            while True:
                rows = await read(core.chunks_after(self._dialect, task_id, after))
                if not rows:
                    break
                # to_thread, not the store's thread hop: its limiter bounds how many
                # verifications decode at once, whoever asks for them.
                await trio.to_thread.run_sync(_feed, check, rows)
                after = rows[-1][1]
        answer = await trio.to_thread.run_sync(check.result)
        await self._write(core.set_verdict(self._dialect, task_id, answer.verdict), sync=False)
        return answer

    async def run_state(self, task_id: str, producer: str) -> tuple[str, int | None] | None:
        return await self._read(core.run_state(self._dialect, task_id, producer))

    async def task(self, task_id: str) -> TaskInfo | None:
        return await self._read(core.task(self._dialect, task_id))

    async def tasks(self) -> list[TaskInfo]:
        return await self._read(core.tasks(self._dialect))

    async def durable_seq(self, task_id: str) -> int:
        return await self._read(core.durable_seq(self._dialect, task_id))

    async def query(self, query: LogQuery) -> Page:
        check_page(query)
        # One snapshot for the page and its count.
        return await self._read(core.query(self._dialect, query), snapshot=True)

    async def read_range(
        self,
        task_id: str,
        after_seq: int,
        through_seq: int,
        limit: int,
        source: str | None = None,
        level: str | None = None,
    ) -> list[LogRecord]:
        if limit <= 0 or through_seq <= after_seq:
            return []
        return await self._read(
            core.read_range(self._dialect, task_id, after_seq, through_seq, limit, source, level)
        )

    def iter_task(self, task_id: str, chunk: int = 1000) -> AsyncIterator[list[LogRecord]]:
        return iter_by_range(self.read_range, task_id, chunk)

    async def iter_raw(self, task_id: str) -> AsyncIterator[str]:
        """The whole log of a task as a raw download shows it, a few chunks at a time."""
        after = 0
        while True:
            text, after_next = await self._read(core.raw_after(self._dialect, task_id, after))
            if after_next == after:
                return
            yield text
            after = after_next
            if after >= SEQ_MAX:
                return

    async def sections(self, task_id: str, after_seq: int = 0, limit: int = MAX_SECTIONS) -> SectionPage | None:
        return await self._read(core.task_sections(self._dialect, task_id, after_seq, limit), snapshot=True)

    async def stats(self, task_id: str) -> LogStats:
        return await self._read(core.stats(self._dialect, task_id))

    async def delete(
        self, task_id: str, before: str | None, *, gap: str | None = None,
        on_gap: Callable[[LogRecord], None] | None = None,
    ) -> int:
        # A transaction per chunk, so a big delete never holds the writer for long.
        total = 0
        while True:
            deleted, more, gap_record = await self._write(
                core.delete_chunk(self._dialect, task_id, before, gap=gap)
            )
            total += deleted
            if gap_record is not None and on_gap is not None:
                on_gap(gap_record)
            if not more:
                return total

    async def delete_older_than(self, before: str) -> int:
        total = 0
        for task_id in await self._read(core.old_tasks(self._dialect, before)):
            total += await self.delete(task_id, before, gap=trimming.RETENTION)
        await self._write(core.prune_producers(self._dialect, before))
        return total

    async def cap_step(self, task_id: str, hub_cap: int | None) -> trimming.CapStep | None:
        # Not synced: a cut lost to a power cut is made again by the next commit's check,
        # or by the capper's look for tasks over their cap when the hub starts.
        return await self._write(trimming.cap_step(self._dialect, task_id, hub_cap, now_ts()), sync=False)

    async def tasks_over_cap(self, hub_cap: int | None, limit: int) -> list[str]:
        return await self._read(trimming.over_cap_tasks(self._dialect, hub_cap, limit))

    async def redact_step(
        self, task_id: str, values: Sequence[str], after: int, through: int,
        record: int | None = None, by: str = "admin",
    ) -> redacting.RedactStep:
        return await self._write(redacting.redact_step(self._dialect, task_id, values, after, through, record, by))

    async def set_max_bytes(self, task_id: str, max_bytes: int) -> None:
        await self._write(trimming.set_max_bytes(self._dialect, task_id, max_bytes), sync=False)

def _feed(check: Verification, rows: list[Any]) -> None:
    for row in rows:
        check.add_chunk(row)


def _summary(text: str | None) -> Summary | None:
    """A stored summary (None: none, or one that does not read back)."""
    if text is None:
        return None
    try:
        return Summary.from_json(orjson.loads(text))
    except (orjson.JSONDecodeError, InvalidField):
        return None
