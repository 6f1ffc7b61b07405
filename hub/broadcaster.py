"""The broadcaster: delivers committed records to a task's live subscribers.

A subscription is either *live* (the broadcaster pushes each committed range
to it, encoded once and shared) or *catching up* (its connection reads from
the store). It only goes live when it has everything up to the durable seq the
broadcaster knows, so history and live meet with no gap and no duplicate. The
broadcaster never waits on a subscriber: a full queue means SLOW_CONSUMER.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

import attrs
import orjson
import trio

from keruta.records import LogRecord, TaskInfo
from keruta.wire import StatusFrame, dumps, logs_frame_text

# Keep a live or history frame well below the frame limit whatever the lines hold.
FRAME_RECORDS = 500
FRAME_BYTES = 1024 * 1024
# A record's fields but message and metadata, keys included, with a 128-character taskId.
RECORD_FIELDS_BYTES = 400


@attrs.frozen
class Outgoing:
    """One text frame for a connection's sender; `sub`/`through` track delivery."""

    payload: str
    sub: Subscription | None = None
    through: int = 0
    # The memory the frame holds while it waits: what a connection's byte bound counts.
    size: int = attrs.field(init=False, default=attrs.Factory(lambda self: sys.getsizeof(self.payload), takes_self=True))


@attrs.define(eq=False)
class Subscription:
    task_id: str
    source: str | None
    level: str | None
    # Every record with seq <= cursor has been queued for sending or filtered out.
    cursor: int
    # Called when the queue is full: the connection tells the client and closes.
    offer: Callable[[Outgoing], bool]
    # The highest seq the sender has actually written to the socket.
    delivered: int = 0
    live: bool = False
    wake: trio.Event = attrs.field(factory=trio.Event)
    pending_status: str | None = None

    def wants(self, record: LogRecord) -> bool:
        return (self.source is None or record.source == self.source) and (
            self.level is None or record.level == self.level
        )

    def go_catch_up(self) -> None:
        self.live = False
        self.wake.set()


def status_payload(task: TaskInfo) -> str:
    return dumps(StatusFrame(task.task_id, task.state, task.exit_code))


def encoded_size(record: LogRecord) -> int:
    """About the bytes a record takes in a frame, never much less: escaping
    (a control character is six bytes) and metadata are measured, not guessed."""
    size = len(orjson.dumps(record.message)) + RECORD_FIELDS_BYTES
    if record.metadata:
        size += len(orjson.dumps(record.metadata))
    return size


def _size_bound(record: LogRecord) -> int:
    """Never less than `encoded_size`: a character is at most six bytes escaped."""
    size = 6 * len(record.message) + 2 + RECORD_FIELDS_BYTES
    if record.metadata:
        size += len(orjson.dumps(record.metadata))
    return size


def encode_chunks(task_id: str, records: Sequence[LogRecord], through: int) -> Iterator[tuple[str, int]]:
    """`logs` frames for records, each with the seq it covers through.

    The last frame covers through `through`, which may lie past its last
    record when filters or a range end leave nothing more to send.
    """
    start = 0
    while start < len(records):
        end = min(len(records), start + FRAME_RECORDS)
        # Measuring every record is only needed when the frame may be too big.
        if sum(_size_bound(r) for r in records[start:end]) > FRAME_BYTES:
            end = start
            size = 0
            while end < len(records) and end - start < FRAME_RECORDS:
                cost = encoded_size(records[end])
                if end > start and size + cost > FRAME_BYTES:
                    break
                size += cost
                end += 1
        last = records[end - 1].seq if end < len(records) else through
        yield logs_frame_text(task_id, records[start:end]), last
        start = end


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

    def publish_records(self, inserted: Iterable[LogRecord], durable: dict[str, int]) -> None:
        """After a commit: `inserted` are the new records, `durable` the new watermarks."""
        by_task: dict[str, list[LogRecord]] = {}
        for record in inserted:
            if record.task_id in self.subs:
                by_task.setdefault(record.task_id, []).append(record)
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
        window = [r for r in records if prev is not None and prev < r.seq <= through]
        # The commit holds the whole range (prev, through] only when nothing
        # else (a gap filled late, another hub) contributed to it.
        complete = prev is not None and len(window) == through - prev
        shared: dict[tuple[str | None, str | None], list[tuple[str, int]]] = {}
        for sub in list(subs):
            if not sub.live or sub.cursor >= through:
                continue
            if not complete or sub.cursor < prev:  # type: ignore[operator]
                sub.go_catch_up()
                continue
            if sub.cursor == prev:
                key = (sub.source, sub.level)
                frames = shared.get(key)
                if frames is None:
                    wanted = [r for r in window if sub.wants(r)]
                    frames = shared[key] = list(encode_chunks(task_id, wanted, through))
            else:
                wanted = [r for r in window if r.seq > sub.cursor and sub.wants(r)]
                frames = list(encode_chunks(task_id, wanted, through))
            sub.cursor = through
            for payload, last in frames:
                if not sub.offer(Outgoing(payload, sub, last)):
                    break

    @staticmethod
    def _first_advance(task_id: str, subs: set[Subscription], through: int, records: list[LogRecord]) -> None:
        """The first commit published for a task since it has subscribers: with
        no watermark to compare with, a live subscription takes it live only
        if it holds everything past the subscription's cursor."""
        for sub in list(subs):
            if not sub.live or sub.cursor >= through:
                continue
            after = [r for r in records if sub.cursor < r.seq <= through]
            if len(after) != through - sub.cursor:
                sub.go_catch_up()
                continue
            frames = list(encode_chunks(task_id, [r for r in after if sub.wants(r)], through))
            sub.cursor = through
            for payload, last in frames:
                if not sub.offer(Outgoing(payload, sub, last)):
                    break

    def publish_status(self, task: TaskInfo) -> None:
        payload = status_payload(task)
        if task.task_id not in self.subs or self.last_status.get(task.task_id) == payload:
            return
        self.last_status[task.task_id] = payload
        for sub in list(self.subs.get(task.task_id, ())):
            if sub.live:
                sub.offer(Outgoing(payload))
            else:
                sub.pending_status = payload
