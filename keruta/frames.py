"""The WebSocket frames, as attrs classes: what each carries and what it accepts."""

from __future__ import annotations

from typing import ClassVar

import attrs

from keruta.limits import INT32_MAX, INT32_MIN, INT64_MAX
from keruta.records import (
    TASK_STATES,
    InvalidField,
    LogRecord,
    _optional_level,
    _optional_seq,
    _optional_source,
    _producer,
    _task_id,
)
from keruta.summary import Summary


class FrameError(ValueError):
    """An inbound frame was refused; `code` is the wire error code."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def _state(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    if value not in TASK_STATES:
        raise InvalidField("state", f"must be one of {', '.join(TASK_STATES)}")


def _optional_max_bytes(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    if value is not None and (type(value) is not int or not 1 <= value <= INT64_MAX):
        raise InvalidField("maxBytes", f"must be an integer between 1 and {INT64_MAX}")


def _exit_code(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    # The stores keep an exit code as a 32-bit integer, as processes report it.
    if value is not None and (type(value) is not int or not INT32_MIN <= value <= INT32_MAX):
        raise InvalidField("exitCode", f"must be an integer between {INT32_MIN} and {INT32_MAX}")


# --- frames a client sends -------------------------------------------------


@attrs.frozen
class LogFrame:
    """The seed's LogMessage. Its `seq`, if any, is the anonymous producer's
    own; without one (`numbered` False, the record's seq a placeholder) the
    hub numbers it as it numbers a POST without `seq`, and acks nothing."""

    TYPE: ClassVar[str] = "log"
    record: LogRecord
    numbered: bool = True




@attrs.frozen
class LogsFrame:
    """A batch of records; the agent's normal frame and the hub's live frame.

    With `producer` (an agent run's id), the records' `seq` are the producer's
    own and the hub assigns the task seqs (docs/identity.md); the hub's own
    `logs` frames never carry it.
    """

    TYPE: ClassVar[str] = "logs"
    task_id: str = attrs.field(validator=_task_id)
    records: list[LogRecord]
    producer: str | None = attrs.field(default=None, validator=_producer)


@attrs.frozen
class StatusFrame:
    TYPE: ClassVar[str] = "status"
    task_id: str = attrs.field(validator=_task_id)
    state: str = attrs.field(validator=_state)
    exit_code: int | None = attrs.field(default=None, validator=_exit_code)
    # From an agent: the run whose state this is. From the hub: only on the
    # reply to that run's own status frame, with the run's stored state.
    producer: str | None = attrs.field(default=None, validator=_producer)
    # From an agent, with its final state: what the run sent (keruta/summary.py).
    summary: Summary | None = None
    # From an agent (--max-bytes): the most message bytes it wants the hub to
    # keep of the task, head and tail (the hub's --max-task-bytes where lower).
    max_bytes: int | None = attrs.field(default=None, validator=_optional_max_bytes)


@attrs.frozen
class SubscribeFrame:
    TYPE: ClassVar[str] = "subscribe"
    task_id: str = attrs.field(validator=_task_id)
    from_seq: int | None = attrs.field(default=None, validator=_optional_seq)
    source: str | None = attrs.field(default=None, validator=_optional_source)
    level: str | None = attrs.field(default=None, validator=_optional_level)


@attrs.frozen
class UnsubscribeFrame:
    TYPE: ClassVar[str] = "unsubscribe"
    task_id: str = attrs.field(validator=_task_id)


@attrs.frozen
class PingFrame:
    TYPE: ClassVar[str] = "ping"


# --- frames the hub sends --------------------------------------------------


@attrs.frozen
class SubscribedFrame:
    TYPE: ClassVar[str] = "subscribed"
    task_id: str
    timestamp: str


@attrs.frozen
class AckFrame:
    TYPE: ClassVar[str] = "ack"
    task_id: str
    seq: int
    # Set: `seq` is that producer's own seq, every one of its records up to it is stored.
    producer: str | None = None
    # Bytes of writes the hub holds, read and not yet answered: how far behind it is.
    backlog: int | None = None


@attrs.frozen
class PongFrame:
    TYPE: ClassVar[str] = "pong"


@attrs.frozen
class ErrorFrame:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    resume_from: int | None = None


@attrs.frozen
class RedactedFrame:
    """To a task's subscribers: a redaction rewrote these records; read them again."""

    TYPE: ClassVar[str] = "redacted"
    task_id: str
    seqs: list[int]


HubFrame = SubscribedFrame | LogsFrame | AckFrame | StatusFrame | PongFrame | ErrorFrame | RedactedFrame
CLIENT_FRAMES: dict[str, type] = {
    c.TYPE: c
    for c in (LogFrame, LogsFrame, StatusFrame, SubscribeFrame, UnsubscribeFrame, PingFrame)
}
HUB_FRAMES: dict[str, type] = {
    c.TYPE: c
    for c in (SubscribedFrame, LogsFrame, AckFrame, StatusFrame, PongFrame, ErrorFrame, RedactedFrame)
}
