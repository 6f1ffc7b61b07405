"""The REST answers that are not records or tasks, as attrs models.

hub/openapi.py builds the API's schemas from these and from keruta.records,
and a test holds the hub's real answers to those schemas (no field more, none
less), so routes that build an answer from these models say what the
document says. `answer_json` gives the wire (camelCase) form.
"""

from __future__ import annotations

from typing import Any

import attrs
from cattrs.gen import make_dict_unstructure_fn, override

from keruta.records import TIMESTAMP, LogRecord, TaskInfo
from keruta.wire import camel, converter

_COUNT = attrs.validators.ge(0)


@attrs.frozen
class LogPage:
    content: list[LogRecord]
    total_elements: int = attrs.field(validator=_COUNT)
    total_pages: int = attrs.field(validator=_COUNT)
    number: int = attrs.field(validator=_COUNT)
    size: int = attrs.field(validator=attrs.validators.ge(1))


@attrs.frozen
class TimeRange:
    start: str | None = attrs.field(metadata=TIMESTAMP)
    end: str | None = attrs.field(metadata=TIMESTAMP)


@attrs.frozen
class LogStats:
    task_id: str
    total_logs: int = attrs.field(validator=_COUNT)
    log_counts: dict[str, int]
    level_counts: dict[str, int]
    time_range: TimeRange
    last_updated: str | None = attrs.field(metadata=TIMESTAMP)


@attrs.frozen
class TaskList:
    tasks: list[TaskInfo]


@attrs.frozen
class StoredId:
    """A POST of one LogRequest: the stored record's id and task seq (null
    for a resent record whose row was deleted since: not stored again)."""

    id: str | None
    seq: int | None


@attrs.frozen
class StoredIds:
    """A POST of an array: the ids and task seqs in the array's order."""

    ids: list[str | None]
    seqs: list[int | None]


@attrs.frozen
class Deleted:
    deleted_count: int = attrs.field(validator=_COUNT)


@attrs.frozen
class Redacted:
    """A redaction: how many records changed, and the seq of its `redaction` record."""

    redacted_records: int = attrs.field(validator=_COUNT)
    seq: int = attrs.field(validator=attrs.validators.ge(1))


@attrs.frozen
class Health:
    status: str = attrs.field(validator=attrs.validators.in_(("ok",)))
    store: str = attrs.field(validator=attrs.validators.in_(("ok", "unavailable")))


@attrs.frozen
class Error:
    """Every 4xx/5xx answer: `error` is the code (CONTRACT), `message` for humans."""

    error: str
    message: str


ANSWERS: tuple[type, ...] = (
    LogPage, TimeRange, LogStats, TaskList, StoredId, StoredIds, Deleted, Health, Error, Redacted,
)

for _cls in ANSWERS:
    _renames: dict[str, Any] = {a.name: override(rename=camel(a.name)) for a in attrs.fields(_cls)}
    converter.register_unstructure_hook(_cls, make_dict_unstructure_fn(_cls, converter, **_renames))


def answer_json(answer: Any) -> Any:
    return converter.unstructure(answer)
