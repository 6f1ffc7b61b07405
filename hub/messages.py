"""What the writer, the syncer and the connections tell each other: plain data.

A write goes to the writer as a `WriteRequest`; once its commit is durable
the syncer answers it. A request names whom to answer: a `Mailbox` (a
WebSocket connection: every outcome of one sync goes to it as one `Written`
message, which the connection's own sender task takes, so one commit costs a
connection one wake-up and its acks go out coalesced) or a `done` function
(a REST POST waiting for its one answer). Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from hub.store.base import Incoming
from keruta.records import LogRecord, TaskInfo
from keruta.summary import Summary


@attrs.frozen
class StatusChange:
    task_id: str
    state: str
    exit_code: int | None
    producer: str | None = None
    # From an agent, with its final state: what the run sent (keruta/summary.py).
    summary: Summary | None = None
    # The cap the task's agent asked for (--max-bytes), if any.
    max_bytes: int | None = None


@attrs.frozen
class Refusal:
    """Records of one request the store would not take (never acknowledged)."""

    code: str  # SEQ_CONFLICT, SEQ_GAP or TASK_FULL
    message: str
    resume_from: int | None = None
    # SEQ_CONFLICT, TASK_FULL: the identity whose acknowledgements stop at `cap` for good.
    key: tuple[str, str] | None = None
    cap: int = 0


@attrs.frozen
class WriteOutcome:
    records: list[LogRecord | None] = attrs.field(factory=list)
    # What may be acknowledged: (task_id, producer) -> the producer's own seq,
    # capped below a refused record. Hub-made producers are not acknowledged
    # (their clients get the POST's answer).
    producers: dict[tuple[str, str], int] = attrs.field(factory=dict)
    refusals: list[Refusal] = attrs.field(factory=list)
    task: TaskInfo | None = None
    # After a status change with a producer: (producer, its stored state, exit code).
    run_state: tuple[str, str, int | None] | None = None
    error: Exception | None = None


@attrs.frozen
class Written:
    """The outcomes of one connection's writes that one sync made durable, in
    commit order."""

    outcomes: Sequence[WriteOutcome]


class Mailbox(Protocol):
    """Where a connection takes its answers. `deliver` is called from the
    syncer: it must only record the message and wake its owner, never block."""

    def deliver(self, message: Written) -> None: ...


@attrs.define(eq=False)
class WriteRequest:
    """Records or a status change, and whom to tell once it is committed:
    `reply_to` (a connection) or `done` (called synchronously; it must not block)."""

    done: Callable[[WriteOutcome], None] | None = None
    items: Sequence[Incoming] = ()
    status: StatusChange | None = None
    reply_to: Mailbox | None = None
    # While True, a commit holding these records is under way: its outcome is
    # unknown until it returns, so the request can no longer be withdrawn.
    attempting: bool = False
    withdrawn: bool = False

    def withdraw(self) -> bool:
        """Give up on this request (a REST POST out of time).

        True: it is not stored and never will be (the writer drops it before
        its next attempt). False: a commit holding it is under way or done;
        `done` reports that attempt's outcome (records if it committed, once
        synced; `Withdrawn` if it did not).
        """
        self.withdrawn = True
        return not self.attempting

    @property
    def task_id(self) -> str:
        """The one task a request writes to (a frame's, a POST's)."""
        return self.status.task_id if self.status is not None else self.items[0].task_id


class Withdrawn(Exception):
    """The request was withdrawn before a commit stored it."""


def answer(answers: Sequence[tuple[WriteRequest, WriteOutcome]]) -> None:
    """Gives durable outcomes to their requesters: one `Written` per mailbox
    (its outcomes in commit order), `done` for the rest, in order."""
    boxes: dict[int, tuple[Mailbox, list[WriteOutcome]]] = {}
    for request, outcome in answers:
        box = request.reply_to
        if box is None:
            if request.done is not None:
                request.done(outcome)
            continue
        entry = boxes.get(id(box))
        if entry is None:
            boxes[id(box)] = (box, [outcome])
        else:
            entry[1].append(outcome)
    for box, outcomes in boxes.values():
        box.deliver(Written(outcomes))
