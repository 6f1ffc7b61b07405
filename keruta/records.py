"""A record is one line of output; `(task_id, seq)` is its identity everywhere."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs

# Re-exported: where the rest of keruta and the hub look for them.
from keruta.basics import (
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    MAX_SEQ,
    SOURCES,
    TASK_ID_PATTERN,
    TASK_ID_RE,  # noqa: F401
    TASK_ID_RULE,
    valid_task_id,
)
from keruta.levels import LEVELS

# A record's `kind` (CONTRACT.md, Words): None for a line; `gap` says what was
# knowingly not kept (docs/agent.md, "Spool full"); sections and redactions.
KINDS = ("gap", "section_start", "section_end", "redaction")
# The kinds of the hub's own records, which carry accounts of what they stand
# for (a gap, a redaction): a producer may send them only as the hub allows.
HUB_KINDS = frozenset(("gap", "redaction"))
TASK_STATES = ("pending", "running", "succeeded", "failed")
FINAL_STATES = ("succeeded", "failed")


class InvalidField(ValueError):
    """A value broke the contract; `field` is its wire (camelCase) name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


F = TypeVar("F", bound=Callable[..., None])


def json_schema(**schema: Any) -> Callable[[F], F]:
    """What a validator accepts, in JSON Schema terms, kept on the validator:
    hub/openapi.py builds the API's schemas from it, so they say what the
    check does (attrs' own validators it reads directly)."""

    def mark(check: F) -> F:
        setattr(check, "json_schema", schema)  # noqa: B010
        return check

    return mark


# The wire's timestamps: RFC 3339 (keruta.timefmt).
TIMESTAMP = {"json_schema": {"format": "date-time"}}


@json_schema(pattern=TASK_ID_PATTERN)
def _task_id(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    if not valid_task_id(value):
        raise InvalidField("taskId", f"must be {TASK_ID_RULE}")


def _wire_name(attr: attrs.Attribute) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), attr.name)


@json_schema(minimum=1, maximum=MAX_SEQ)
def _seq(_inst: object, attr: attrs.Attribute, value: object) -> None:
    # `seq` or `fromSeq` as a producer may give it.
    if type(value) is not int or not 1 <= value <= MAX_SEQ:
        raise InvalidField(_wire_name(attr), f"must be an integer between 1 and {MAX_SEQ}")


@json_schema(minimum=1, maximum=INT64_MAX)
def _stored_seq(_inst: object, attr: attrs.Attribute, value: object) -> None:
    # A record's seq may be one the hub assigned (max + 1), so only what the
    # stores hold bounds it here; producers' seqs are held to MAX_SEQ by
    # `check_record_limits`.
    if type(value) is not int or not 1 <= value <= INT64_MAX:
        raise InvalidField(_wire_name(attr), f"must be an integer between 1 and {MAX_SEQ}")


@json_schema(minimum=1, maximum=MAX_SEQ)
def _optional_seq(inst: object, attr: attrs.Attribute, value: object) -> None:
    if value is not None:
        _seq(inst, attr, value)


@json_schema(enum=list(SOURCES))
def _source(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    if value not in SOURCES:
        raise InvalidField("source", f"must be one of {', '.join(SOURCES)}")


@json_schema(enum=list(LEVELS))
def _level(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    if value not in LEVELS:
        raise InvalidField("level", f"must be one of {', '.join(LEVELS)}")


@json_schema(enum=list(SOURCES))
def _optional_source(inst: object, attr: attrs.Attribute, value: object) -> None:
    if value is not None:
        _source(inst, attr, value)


@json_schema(enum=list(LEVELS))
def _optional_level(inst: object, attr: attrs.Attribute, value: object) -> None:
    if value is not None:
        _level(inst, attr, value)


@json_schema(enum=list(KINDS))
def _kind(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    if value is not None and value not in KINDS:
        raise InvalidField("kind", f"must be one of {', '.join(KINDS)}, or left out for a line")


@json_schema(minimum=0, maximum=MAX_SEQ)
def _line_number(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    if value is not None and (type(value) is not int or not 0 <= value <= MAX_SEQ):
        raise InvalidField("lineNumber", f"must be an integer between 0 and {MAX_SEQ}")


PRODUCER_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
PRODUCER_RULE = "1-64 characters of [A-Za-z0-9._:-]"


def valid_record_producer(value: object) -> bool:
    """A record's `producer` as the hub answers it: a named producer, or ""."""
    return value is None or (type(value) is str and (value == "" or PRODUCER_RE.fullmatch(value) is not None))


@json_schema(pattern=rf"^({PRODUCER_RE.pattern})?$")
def _record_producer(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    if not valid_record_producer(value):
        raise InvalidField("producer", f"must be {PRODUCER_RULE}, or empty (the anonymous producer)")


# Not frozen, though nothing changes a record once built: a frozen attrs
# class's __init__ sets each field through object.__setattr__, which makes
# building a record several times dearer, and every line is built at least
# once on the hub.
@attrs.define(slots=True, on_setattr=attrs.setters.NO_OP)
class LogRecord:
    """One line. `id` is assigned by the hub; producers leave it None."""

    task_id: str = attrs.field(validator=_task_id)
    seq: int = attrs.field(validator=_stored_seq)
    timestamp: str = attrs.field(metadata=TIMESTAMP)
    source: str = attrs.field(validator=_source)
    level: str = attrs.field(validator=_level)
    message: str
    line_number: int | None = attrs.field(default=None, validator=_line_number)
    metadata: dict[str, Any] = attrs.field(factory=dict)
    partial: bool = False
    id: str | None = None
    # After the fields every record has: the hot paths build records
    # positionally, and a line has no kind.
    kind: str | None = attrs.field(default=None, validator=_kind)
    # Who wrote it, as the hub answers it (docs/identity.md): an agent run's
    # id, a client's named producer, or "" (the anonymous producer). None: the
    # hub's own gap or redaction record, or one stored before records kept it.
    # A client's frames name their producer on the frame, never here.
    producer: str | None = attrs.field(default=None, validator=_record_producer)


_new = object.__new__


def trusted_record(
    task_id: str,
    seq: int,
    timestamp: str,
    source: str,
    level: str,
    message: str,
    line_number: int | None,
    metadata: dict[str, Any],
    partial: bool,
    id: str | None,  # noqa: A002 - the field's name
    kind: str | None,
    producer: str | None = None,
) -> LogRecord:
    """A record from values already checked -- the store's own chunks, a
    record checked on its way in -- built without running the validators again
    (a third of what building a record costs)."""
    r = _new(LogRecord)
    r.task_id = task_id
    r.seq = seq
    r.timestamp = timestamp
    r.source = source
    r.level = level
    r.message = message
    r.line_number = line_number
    r.metadata = metadata
    r.partial = partial
    r.id = id
    r.kind = kind
    r.producer = producer
    return r


def trusted_run(task_id: str, first_seq: int, items: Sequence[Any], producer: str | None) -> list[LogRecord]:
    """`trusted_record`s of one task and producer under consecutive seqs from
    `first_seq`, one per item (anything with a record's fields: the store's
    `Incoming`), in one loop: a call per record made a store append's run of
    500 records 1.7x as long to build."""
    records: list[LogRecord] = []
    add = records.append
    seq = first_seq
    for item in items:
        r = _new(LogRecord)
        r.task_id = task_id
        r.seq = seq
        r.timestamp = item.timestamp
        r.source = item.source
        r.level = item.level
        r.message = item.message
        r.line_number = item.line_number
        r.metadata = item.metadata
        r.partial = item.partial
        r.id = None
        r.kind = item.kind
        r.producer = producer
        add(r)
        seq += 1
    return records


@json_schema(pattern=rf"^{PRODUCER_RE.pattern}$")
def _producer(_inst: object, _attr: attrs.Attribute, value: object) -> None:
    if value is not None and not (isinstance(value, str) and PRODUCER_RE.fullmatch(value)):
        raise InvalidField("producer", f"must be {PRODUCER_RULE}")


@attrs.frozen(slots=True)
class LogRequest:
    """A REST POST body item: the hub fills in what the producer left out."""

    message: str
    source: str = attrs.field(default="stdout", validator=_source)
    level: str | None = attrs.field(default=None, validator=_optional_level)
    line_number: int | None = attrs.field(default=None, validator=_line_number)
    metadata: dict[str, Any] = attrs.field(factory=dict)
    # The producer's own seq (never a task seq): with `producer` (or the
    # anonymous producer's, without), a retried POST is stored once.
    seq: int | None = attrs.field(default=None, validator=_optional_seq)
    timestamp: str | None = attrs.field(default=None, metadata=TIMESTAMP)
    partial: bool = False
    producer: str | None = attrs.field(default=None, validator=_producer)
    kind: str | None = attrs.field(default=None, validator=_kind)


@attrs.frozen(slots=True)
class TaskInfo:
    """A task as the hub answers it. Built from the stores' rows, so checked
    there; the metadata only describes it (hub/openapi.py)."""

    task_id: str = attrs.field(metadata={"json_schema": {"pattern": TASK_ID_PATTERN}})
    state: str = attrs.field(metadata={"json_schema": {"enum": list(TASK_STATES)}})
    exit_code: int | None = attrs.field(
        default=None, metadata={"json_schema": {"minimum": INT32_MIN, "maximum": INT32_MAX}}
    )
    first_timestamp: str | None = attrs.field(default=None, metadata=TIMESTAMP)
    last_timestamp: str | None = attrs.field(default=None, metadata=TIMESTAMP)
    total_logs: int = attrs.field(default=0, metadata={"json_schema": {"minimum": 0}})
    durable_seq: int = attrs.field(default=0, metadata={"json_schema": {"minimum": 0}})
    updated_at: str | None = attrs.field(default=None, metadata=TIMESTAMP)
    # Guarantee 7, as last computed by GET .../verify (hub/verify.py).
    verdict: str = attrs.field(
        default="unverified", metadata={"json_schema": {"enum": ["complete", "incomplete", "unverified"]}}
    )
