"""The broadcaster: delivers committed records to a task's live subscribers.

A live subscription (hub/ws/subscription.py) gets each committed range pushed,
encoded once per filter and cursor and shared (_SharedFrames): the same
payload str goes to every subscriber that is sent those records. A range the
broadcaster cannot prove complete (a gap filled late, another hub's commit)
sends the subscription back to catching up from the store. The broadcaster never waits on a
subscriber: a full queue means SLOW_CONSUMER.
"""

from __future__ import annotations

from collections.abc import Iterable

from hub.store.base import with_ids
from hub.ws.subscriber_frames import encode_chunks, status_payload
from hub.ws.subscription import Outgoing, Subscription
from keruta.frames import RedactedFrame
from keruta.records import LogRecord, TaskInfo
from keruta.wire import dumps


class Broadcaster:
    def __init__(self) -> None:
        self.subs: dict[str, set[Subscription]] = {}
        # The durable seq of each subscribed task as of the last publish here.
        self.known: dict[str, int] = {}
        # The last status frame published per subscribed task: the same state
        # arriving again (a re-read after a lost notice) is not news.
        self.last_status: dict[str, str] = {}

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.subs.values())

    def add(self, sub: Subscription) -> None:
        self.subs.setdefault(sub.task_id, set()).add(sub)

    def remove(self, sub: Subscription) -> None:
        subs = self.subs.get(sub.task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.subs[sub.task_id]
                self.known.pop(sub.task_id, None)
                self.last_status.pop(sub.task_id, None)

    def known_seq(self, task_id: str) -> int:
        """The durable seq published here for a subscribed task (0 if none yet):
        a catching-up subscription at or past it may go live."""
        return self.known.get(task_id, 0)

    def publish_records(self, inserted: Iterable[LogRecord], durable: dict[str, int]) -> None:
        """After a commit: `inserted` are the new records, `durable` the new watermarks."""
        by_task: dict[str, list[LogRecord]] = {}
        for record in inserted:
            if record.task_id in self.subs:
                by_task.setdefault(record.task_id, []).append(record)
        for records in by_task.values():
            with_ids(records)  # an append's records have none yet (AppendResult)
        for task_id, through in durable.items():
            self._advance(task_id, through, by_task.get(task_id, []))

    def notify_durable(self, task_id: str, through: int) -> None:
        """Another hub committed up to `through`: subscribers read it from the store."""
        self._advance(task_id, through, [])

    def _advance(self, task_id: str, through: int, records: list[LogRecord]) -> None:
        subs = self.subs.get(task_id)
        if not subs:
            return
        prev = self.known.get(task_id)
        if prev is not None and through <= prev:
            return
        self.known[task_id] = through
        records.sort(key=lambda r: r.seq)
        if prev is None:
            self._first_advance(task_id, subs, through, records)
            return
        window = [r for r in records if prev < r.seq <= through]
        # The commit holds the whole range (prev, through] only when nothing
        # else (a gap filled late, another hub) contributed to it.
        complete = len(window) == through - prev
        frames = _SharedFrames(task_id, window, through)
        for sub in list(subs):
            if not sub.live or sub.cursor >= through:
                continue
            if not complete or sub.cursor < prev:
                sub.go_catch_up()
                continue
            sub.take_live(frames.after(sub), through)

    @staticmethod
    def _first_advance(task_id: str, subs: set[Subscription], through: int, records: list[LogRecord]) -> None:
        """The first commit published for a task since it has subscribers: with
        no watermark to compare with, a live subscription takes it live only
        if it holds everything past the subscription's cursor."""
        window = [r for r in records if r.seq <= through]
        frames = _SharedFrames(task_id, window, through)
        for sub in list(subs):
            if not sub.live or sub.cursor >= through:
                continue
            if sum(1 for r in window if r.seq > sub.cursor) != through - sub.cursor:
                sub.go_catch_up()
                continue
            sub.take_live(frames.after(sub), through)

    def publish_replaced(self, task_id: str, records: list[LogRecord]) -> None:
        """Records the hub rewrote in place (a cap's gap record, new or grown),
        to the subscribers that have passed them: a viewer replaces the record
        it holds under that seq. One catching up below them reads them from
        the store."""
        subs = self.subs.get(task_id)
        if not subs or not records:
            return
        with_ids(records)
        low = min(r.seq for r in records)
        for sub in list(subs):
            sub.rewrites += 1
            if sub.cursor < low:
                continue
            wanted = [r for r in records if r.seq <= sub.cursor and sub.wants(r)]
            for payload, _ in encode_chunks(task_id, wanted, wanted[-1].seq if wanted else 0):
                sub.offer(Outgoing(payload))

    def publish_redacted(self, task_id: str, seqs: list[int]) -> None:
        """Records a redaction changed: every subscriber re-reads those it holds."""
        subs = self.subs.get(task_id)
        if not subs or not seqs:
            return
        payload = dumps(RedactedFrame(task_id, seqs))
        for sub in list(subs):
            sub.rewrites += 1
            sub.offer(Outgoing(payload))

    def publish_status(self, task: TaskInfo) -> None:
        payload = status_payload(task)
        if task.task_id not in self.subs or self.last_status.get(task.task_id) == payload:
            return
        self.last_status[task.task_id] = payload
        for sub in list(self.subs.get(task.task_id, ())):
            sub.on_status(payload)


class _SharedFrames:
    """The `logs` frames of one commit, encoded once for every subscription
    that is sent the same records: those with the same cursor and filter
    (most often all of them at the commit's start) share the very same
    payloads."""

    def __init__(self, task_id: str, records: list[LogRecord], through: int) -> None:
        self.task_id = task_id
        self.records = records
        self.through = through
        self.encoded: dict[tuple[int, str | None, str | None], list[tuple[str, int]]] = {}

    def after(self, sub: Subscription) -> list[tuple[str, int]]:
        key = (sub.cursor, sub.source, sub.level)
        frames = self.encoded.get(key)
        if frames is None:
            wanted = [r for r in self.records if r.seq > sub.cursor and sub.wants(r)]
            frames = self.encoded[key] = list(encode_chunks(self.task_id, wanted, self.through))
        return frames
