"""One subscription's state, without I/O: catching up, then live.

A subscription is either *catching up* (its connection reads history from the
store, step by step as `next_read` says) or *live* (the broadcaster pushes
each committed range to it). It goes live only when its cursor has reached
the durable seq the broadcaster knows, checked and switched in one plain call,
so history and live meet with no gap and no duplicate. The connection drives
it: `next_read` / `on_durable` / `on_history_page` while catching up,
`on_sent` as frames reach the socket, `slow_consumer_frames` for the resume
point when it falls behind.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping

import attrs

from hub.ws.subscriber_frames import FRAME_RECORDS, encode_chunks, status_payload
from keruta.frames import ErrorFrame, FrameError, SubscribeFrame
from keruta.records import LogRecord, TaskInfo
from keruta.wire import dumps


@attrs.frozen
class Outgoing:
    """One text frame for a connection's sender; `sub`/`through` track delivery."""

    payload: str
    sub: Subscription | None = None
    through: int = 0
    # The memory the frame holds while it waits: what a connection's byte bound counts.
    size: int = attrs.field(init=False, default=attrs.Factory(lambda self: sys.getsizeof(self.payload), takes_self=True))


@attrs.frozen
class ReadDurable:
    """Read the task's durable seq from the store and pass it to `on_durable`."""


@attrs.frozen
class ReadRange:
    """Read at most `limit` records with after < seq <= through matching the
    filter, and pass them to `on_history_page`."""

    task_id: str
    after: int
    through: int
    limit: int
    source: str | None
    level: str | None


READ_DURABLE = ReadDurable()


def _no_wake() -> None:
    pass


@attrs.define(eq=False)
class Subscription:
    task_id: str
    source: str | None
    level: str | None
    # Every record with seq <= cursor has been queued for sending or filtered out.
    cursor: int
    # Never waits; False when the queue is full (the connection tells the client and closes).
    offer: Callable[[Outgoing], bool]
    # The highest seq the sender has actually written to the socket.
    delivered: int = 0
    live: bool = False
    # Called when a live subscription must catch up again: its connection's catch-up runs.
    wake: Callable[[], None] = _no_wake
    # A status frame that arrived while catching up: sent once live.
    pending_status: str | None = None
    # While catching up: the durable seq read from the store that this round reads up to.
    target: int | None = None
    # Counts the rewrites (a gap replacing records, a redaction) published for
    # the task: a history page read while one was published may hold what it
    # took away, and would reach the client after the frame that took it.
    rewrites: int = 0

    def wants(self, record: LogRecord) -> bool:
        return (self.source is None or record.source == self.source) and (
            self.level is None or record.level == self.level
        )

    # --- catching up (driven by the connection) ------------------------

    def go_catch_up(self) -> None:
        """The broadcaster cannot prove a range complete: read it from the store."""
        self.live = False
        self.wake()

    def next_read(self, known: int) -> ReadDurable | ReadRange | None:
        """What catching up reads next, or None once live.

        `known` is the durable seq the broadcaster has published for the task,
        read by the caller with no await before this call: going live here
        means every later commit is pushed by the broadcaster.
        """
        if self.live:
            return None
        if self.target is not None:
            if self.cursor < self.target:
                return ReadRange(self.task_id, self.cursor, self.target, FRAME_RECORDS, self.source, self.level)
            if known <= self.cursor:
                self.live = True
                self.target = None
                return None
        # Not read yet, or more was committed while reading: read the watermark again.
        self.target = None
        return READ_DURABLE

    def on_durable(self, durable_seq: int) -> None:
        self.target = durable_seq

    def on_history_page(self, records: list[LogRecord]) -> list[Outgoing]:
        """The frames for one page of `ReadRange`, to queue in order."""
        assert self.target is not None, "on_history_page without a ReadRange"
        # A short page is the whole rest of the range (filters may leave nothing).
        through = records[-1].seq if len(records) == FRAME_RECORDS else self.target
        frames = [Outgoing(payload, self, last) for payload, last in encode_chunks(self.task_id, records, through)]
        self.cursor = through
        return frames

    def on_task(self, task: TaskInfo | None) -> None:
        """The task as read when subscribing: its status is sent after the history,
        unless a newer one was published meanwhile."""
        if task is not None and self.pending_status is None:
            self.pending_status = status_payload(task)

    def take_status(self) -> str | None:
        payload, self.pending_status = self.pending_status, None
        return payload

    # --- live (driven by the broadcaster) -------------------------------

    def take_live(self, frames: Iterable[tuple[str, int]], through: int) -> None:
        """Frames of a committed range up to `through`, offered in order."""
        self.cursor = through
        for payload, last in frames:
            if not self.offer(Outgoing(payload, self, last)):
                break

    def on_status(self, payload: str) -> None:
        if self.live:
            self.offer(Outgoing(payload))
        else:
            self.pending_status = payload

    # --- delivery -------------------------------------------------------

    def on_sent(self, through: int) -> None:
        """The sender wrote a frame of this subscription covering through `through`."""
        if through > self.delivered:
            self.delivered = through

    @property
    def resume_from(self) -> int:
        """The first seq not written to the socket: where to resubscribe."""
        return self.delivered + 1


def slow_consumer_frames(subs: Iterable[Subscription]) -> list[str]:
    """The SLOW_CONSUMER error frames once the sender has stopped: only then
    is `delivered` final (a frame the sender was blocked on has gone out).
    A connection without subscriptions was cut off for the replies to its
    writes it did not read: one frame, with nothing to resume from."""
    resume = {s.task_id: s.resume_from for s in subs}
    if not resume:
        message = "the client did not read the replies to its writes; reconnect and resend what was not acknowledged"
        return [dumps(ErrorFrame("SLOW_CONSUMER", message))]
    return [
        dumps(
            ErrorFrame(
                "SLOW_CONSUMER", f"subscriber of {task_id} fell behind; resubscribe with fromSeq={resume_from}", resume_from
            )
        )
        for task_id, resume_from in resume.items()
    ]


def check_subscribe(frame: SubscribeFrame, held: Mapping[str, Subscription], most: int) -> None:
    """Raises the FrameError a subscribe frame is answered with, if any."""
    if frame.task_id not in held and len(held) >= most:
        raise FrameError(
            "TOO_MANY_SUBSCRIPTIONS",
            f"this connection already holds {len(held)} subscriptions, the most allowed; "
            "unsubscribe from one first",
        )
