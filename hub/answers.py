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


@attrs.frozen
class Section:
    """A collapsible section of a task's log (hub/store/sections.py): between
    the records `startSeq` and `endSeq` (null: still open, or never closed),
    `lines` records, `errors` of them ERROR (nested sections' too)."""

    name: str
    title: str
    # "github", "gitlab", "buildkite" from the agent; what a REST producer named.
    style: str | None
    collapsed: bool
    start_seq: int = attrs.field(validator=attrs.validators.ge(1))
    end_seq: int | None
    started_at: str = attrs.field(metadata=TIMESTAMP)
    ended_at: str | None = attrs.field(metadata=TIMESTAMP)
    duration_ms: int | None
    lines: int = attrs.field(validator=_COUNT)
    errors: int = attrs.field(validator=_COUNT)
    has_error: bool
    sections: list[Section]


@attrs.frozen
class TaskSections:
    """A page of a task's sections: those starting after `afterSeq`, at most
    `size` (GET .../sections). `nextAfterSeq`: the `startSeq` of the last one
    listed when more start after it (ask again with `afterSeq` set to it);
    null when this is the last page."""

    task_id: str
    sections: list[Section]
    next_after_seq: int | None = attrs.field(validator=attrs.validators.optional(attrs.validators.ge(1)))


@attrs.frozen
class Counts:
    """Records, and lines and bytes per source."""

    records: int = attrs.field(validator=_COUNT)
    lines: dict[str, int]
    bytes: dict[str, int]


@attrs.frozen
class MissingRange:
    """Producer seqs neither stored nor inside a gap, and the task seqs they
    were stored at (null where the hub no longer knows)."""

    from_pseq: int = attrs.field(validator=attrs.validators.ge(1))
    to_pseq: int = attrs.field(validator=attrs.validators.ge(1))
    from_seq: int | None
    to_seq: int | None


_VERDICT = {"json_schema": {"enum": ["complete", "incomplete", "unverified"]}}


@attrs.frozen
class ProducerVerdict:
    """One run of the task against its summary (null: it sent none yet):
    `records`, `lines`, `bytes` what it says it sent, `stored` what the hub
    holds of it, `accounted` what gaps and redactions stand for."""

    producer: str
    verdict: str = attrs.field(metadata=_VERDICT)
    records: int | None
    lines: dict[str, int] | None
    bytes: dict[str, int] | None
    stored: Counts
    accounted: Counts
    missing: list[MissingRange]
    digest_ok: bool | None


@attrs.frozen
class Verify:
    """GET .../verify (Guarantee 7): the task's verdict, a line for people,
    and each run's."""

    task_id: str
    verdict: str = attrs.field(metadata=_VERDICT)
    message: str
    producers: list[ProducerVerdict]


ANSWERS: tuple[type, ...] = (
    LogPage, TimeRange, LogStats, TaskList, StoredId, StoredIds, Deleted, Health, Error, Redacted,
    Counts, MissingRange, ProducerVerdict, Verify, Section, TaskSections,
)

for _cls in ANSWERS:
    _renames: dict[str, Any] = {a.name: override(rename=camel(a.name)) for a in attrs.fields(_cls)}
    converter.register_unstructure_hook(_cls, make_dict_unstructure_fn(_cls, converter, **_renames))


def answer_json(answer: Any) -> Any:
    return converter.unstructure(answer)
