"""The OpenAPI document served at /openapi.json, generated.

The component schemas come from the attrs models the wire uses
(keruta.records, hub/answers.py): their fields and types, the converter's
camelCase names and omitted defaults, and what their validators accept. A
model that changes changes the document; tests hold the hub's real answers
to it. The paths are a table.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import attrs
from attrs import validators as v

from hub import answers
from hub.redaction import MAX_VALUE_CHARS, MAX_VALUES
from hub.store.base import MAX_SECTIONS
from keruta import __version__
from keruta.levels import LEVELS
from keruta.limits import DEFAULT_LIMITS, INT64_MAX
from keruta.records import SOURCES, TASK_ID_PATTERN, LogRecord, LogRequest, TaskInfo
from keruta.wire import camel, omitted_if_default

# Producers' bodies: a field with a default may be left out. Every other
# model is an answer: it names every field the converter does not omit.
REQUESTS = (LogRequest,)
MODELS: dict[str, type] = {
    "LogRecord": LogRecord,
    "LogRequest": LogRequest,
    "Task": TaskInfo,
    **{cls.__name__: cls for cls in answers.ANSWERS},
}
_NAMES = {cls: name for name, cls in MODELS.items()}
_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    bool: {"type": "boolean"},
    float: {"type": "number"},
    Any: {},
}
_BOUNDS = {">=": "minimum", "<=": "maximum", ">": "exclusiveMinimum", "<": "exclusiveMaximum"}


def type_schema(tp: Any) -> dict[str, Any]:
    """JSON Schema for a field's type: scalars, `X | None`, list, dict, attrs models."""
    if tp in _SCALARS:
        return dict(_SCALARS[tp])
    if tp in _NAMES:
        return {"$ref": f"#/components/schemas/{_NAMES[tp]}"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        schema = type_schema(inner)
        if "type" in schema:
            return {**schema, "type": [schema["type"], "null"]}
        return {"oneOf": [schema, {"type": "null"}]}
    if origin is list:
        return {"type": "array", "items": type_schema(args[0])}
    if origin is dict:
        return {"type": "object"} if args[1] is Any else {"type": "object", "additionalProperties": type_schema(args[1])}
    raise TypeError(f"no JSON Schema for {tp!r}")


def validator_schema(check: Any) -> dict[str, Any]:
    """What a validator accepts: attrs' own (bounds, `in_`, `and_`,
    `optional`) or one marked with keruta.records.json_schema."""
    if check is None:
        return {}
    if isinstance(check, list | tuple):
        return {k: val for c in check for k, val in validator_schema(c).items()}
    marked = getattr(check, "json_schema", None)
    if marked is not None:
        return dict(marked)
    kind = type(check)
    if kind is type(v.ge(0)):
        return {_BOUNDS[check.compare_op]: check.bound}
    if kind is type(v.in_(())):
        return {"enum": list(check.options)}
    if kind is type(v.and_()):
        return validator_schema(list(check._validators))
    if kind is type(v.optional(v.ge(0))):
        return validator_schema(check.validator)
    raise TypeError(f"no JSON Schema for the validator {check!r}")


def model_schema(cls: type) -> dict[str, Any]:
    fields = attrs.fields(attrs.resolve_types(cls))
    properties: dict[str, Any] = {}
    required = []
    for a in fields:
        schema = type_schema(a.type)
        schema.update(validator_schema(a.validator))
        schema.update(a.metadata.get("json_schema", {}))
        if "enum" in schema and isinstance(schema.get("type"), list):
            schema["enum"] = [*schema["enum"], None]  # `X | None`: null is allowed too
        if cls in REQUESTS and a.default is not attrs.NOTHING:
            if a.default is not None and not isinstance(a.default, attrs.Factory):  # type: ignore[arg-type]
                schema["default"] = a.default
        elif a.default is attrs.NOTHING or not omitted_if_default(cls, a.name):
            required.append(camel(a.name))
        properties[camel(a.name)] = schema
    # Answers name exactly these fields; the hub ignores what a producer adds.
    extra = {} if cls in REQUESTS else {"additionalProperties": False}
    return {"type": "object", "required": required, "properties": properties, **extra}


# Rules across fields, as JSON Schema says them: a record that names its
# producer carries that producer's seq (hub/ingest.py from_requests).
_CROSS_FIELD: dict[str, dict[str, Any]] = {
    "LogRequest": {
        "if": {"required": ["producer"], "properties": {"producer": {"type": "string"}}},
        "then": {"required": ["seq"], "properties": {"seq": {"type": "integer"}}},
        # The hub's own records a producer may not send (keruta/recordjson.py
        # _hub_made): a redaction's audit record, a gap with accounts.
        "allOf": [
            {"not": {"required": ["kind"], "properties": {"kind": {"const": "redaction"}}}},
            {"not": {
                "required": ["kind", "metadata"],
                "properties": {
                    "kind": {"const": "gap"},
                    "metadata": {"type": "object", "required": ["gap"],
                                 "properties": {"gap": {"type": "object", "required": ["accounts"]}}},
                },
            }},
        ],
    },
}


def component_schemas() -> dict[str, Any]:
    return {name: {**model_schema(cls), **_CROSS_FIELD.get(name, {})} for name, cls in MODELS.items()}


# --- paths ----------------------------------------------------------------------

def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_TASK_ID = {"name": "taskId", "in": "path", "required": True, "schema": {"type": "string", "pattern": TASK_ID_PATTERN}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_TIME = {"type": "string", "format": "date-time"}
_READ = (400, 401, 403, 503)
# What makes a GET a WebSocket handshake (RFC 6455, 4.1); without it the
# answer is 426 Upgrade Required.
_HANDSHAKE = [
    {"name": "Upgrade", "in": "header", "required": True, "schema": {"type": "string", "enum": ["websocket"]}},
    {"name": "Connection", "in": "header", "required": True, "schema": {"type": "string", "enum": ["Upgrade"]}},
    {"name": "Sec-WebSocket-Version", "in": "header", "required": True, "schema": {"type": "string", "enum": ["13"]}},
    {"name": "Sec-WebSocket-Key", "in": "header", "required": True,
     "schema": {"type": "string", "pattern": "^[A-Za-z0-9+/]{21}[AQgw]==$"}},
]


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _operation(summary: str, answer: dict[str, Any] | None, errors: tuple[int, ...] = (),
               kind: str = "application/json", public: bool = False, **more: Any) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if answer is None:  # the WebSocket upgrade
        responses["101"] = {"description": "switching protocols"}
    else:
        responses["200"] = {"description": "ok", "content": {kind: {"schema": answer}}}
    for code in errors:
        responses[str(code)] = {"description": "error", "content": {"application/json": {"schema": _ref("Error")}}}
        if code in (429, 503):
            responses[str(code)]["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}
    return {"summary": summary, "responses": responses, **({"security": []} if public else {}), **more}


def _redact_body() -> dict[str, Any]:
    value = {"type": "string", "minLength": 1, "maxLength": MAX_VALUE_CHARS}
    values = {"type": "array", "items": value, "minItems": 1, "maxItems": MAX_VALUES}
    return {"type": "object", "required": ["values"], "properties": {"values": values}, "additionalProperties": False}


def _paths(max_page_size: int, max_batch: int) -> dict[str, Any]:
    text = {"type": "string"}
    post_body = {"oneOf": [_ref("LogRequest"), {"type": "array", "items": _ref("LogRequest"), "minItems": 1, "maxItems": max_batch}]}
    logs_query = [
        # Empty is "any", as an HTML form sends an unset choice.
        _query("source", {"type": "string", "enum": [*SOURCES, ""]}, "only this source (empty: any)"),
        _query("level", {"type": "string", "enum": [*LEVELS, ""]}, "only this level (empty: any)"),
        _query("page", {"type": "integer", "minimum": 0, "maximum": 10_000_000, "default": 0}, "page number"),
        _query("size", {"type": "integer", "minimum": 1, "maximum": max_page_size, "default": 100}, "page size"),
        _query("from", _TIME, "timestamp >= from"),
        _query("to", _TIME, "timestamp <= to"),
        _query("afterSeq", {"type": "integer", "minimum": 0, "maximum": INT64_MAX}, "cursor: seq > afterSeq"),
        _query("q", text, "substring of message (case-sensitive)"),
    ]
    return {
        "/api/v1/tasks/{taskId}/logs": {
            "parameters": [_TASK_ID],
            "post": _operation(
                "Store one LogRequest or an array of them", {"oneOf": [_ref("StoredId"), _ref("StoredIds")]},
                (400, 401, 403, 408, 409, 413, 429, 503),
                requestBody={"required": True, "content": {"application/json": {"schema": post_body}}},
            ),
            "get": _operation("A page of the task's records in seq order", _ref("LogPage"), _READ, parameters=logs_query),
            "delete": _operation(
                "Delete the task's records older than `before` (all without it; the admin token); with "
                "`before`, a `gap` record (reason `deleted`) stays in their place", _ref("Deleted"), _READ,
                parameters=[_query("before", _TIME, "delete records older than this")],
            ),
        },
        "/api/v1/tasks/{taskId}/logs/stats": {
            "parameters": [_TASK_ID],
            "get": _operation("Counts by source and level, time range", _ref("LogStats"), (*_READ, 404)),
        },
        "/api/v1/tasks/{taskId}/logs/raw": {
            "parameters": [_TASK_ID],
            "get": _operation("The whole log as text, streamed", text, _READ, kind="text/plain"),
        },
        "/api/v1/tasks/{taskId}/sections": {
            "parameters": [_TASK_ID],
            "get": _operation(
                "The task's sections (CI markers: ::group::, section_start, --- ...), nested, in seq order, "
                "at most `size` per answer; `nextAfterSeq` says where to continue (null: no more)",
                _ref("TaskSections"), (*_READ, 404),
                parameters=[
                    _query("afterSeq", {"type": "integer", "minimum": 0, "maximum": INT64_MAX, "default": 0},
                           "cursor: sections with startSeq > afterSeq (a previous answer's nextAfterSeq)"),
                    _query("size", {"type": "integer", "minimum": 1, "maximum": MAX_SECTIONS, "default": MAX_SECTIONS},
                           "most sections listed (nested ones count)"),
                ],
            ),
        },
        "/api/v1/tasks/{taskId}/verify": {
            "parameters": [_TASK_ID],
            "get": _operation(
                "Whether the stored log is what its runs sent (Guarantee 7): complete, incomplete "
                "(what is missing) or unverified; reads every record of the task",
                _ref("Verify"), (*_READ, 404),
            ),
        },
        "/api/v1/tasks/{taskId}/redact": {
            "parameters": [_TASK_ID],
            "post": _operation(
                "Replace every occurrence of the values in the task's stored records with *** (the admin "
                "token); live viewers are told which seqs changed, and a `redaction` record stays behind",
                _ref("Redacted"), (400, 401, 403, 404, 408, 413, 503),
                requestBody={"required": True, "content": {"application/json": {"schema": _redact_body()}}},
            ),
        },
        "/api/v1/tasks": {"get": _operation("All tasks", _ref("TaskList"), (401, 403, 503))},
        "/api/v1/tasks/{taskId}": {"parameters": [_TASK_ID], "get": _operation("One task's state", _ref("Task"), (*_READ, 404))},
        # A plain HTTP GET (no Upgrade) is a 400.
        "/api/v1/ws": {"get": _operation(
            "WebSocket: log, logs, status, subscribe, unsubscribe, ping (see CONTRACT); the token "
            "may come as the subprotocol bearer.<base64url token> beside keruta", None, (400, 401, 403, 426),
            parameters=_HANDSHAKE,
        )},
        "/healthz": {"get": _operation("Liveness", _ref("Health"), public=True)},
        "/metrics": {"get": _operation("Prometheus metrics", text, (401, 403), kind="text/plain")},
        "/openapi.json": {"get": _operation("This document", {"type": "object"}, public=True)},
        "/": {"get": _operation("The web viewer", text, kind="text/html", public=True)},
        "/tasks/{taskId}": {"parameters": [_TASK_ID], "get": _operation("The web viewer for one task", text, (400,), kind="text/html", public=True)},
        "/static/{name}": {"parameters": [_NAME], "get": _operation("The web viewer's files (hub/static/)", text, (404,), kind="text/javascript", public=True)},
    }


def openapi_document(
    max_page_size: int = 1000, max_batch: int = DEFAULT_LIMITS.max_records_per_batch, tokens_required: bool = True
) -> dict[str, Any]:
    """The description of what the hub answers; tests run schemathesis
    against it and validate real answers with its schemas. `tokens_required`:
    whether this hub was started with tokens; a hub without them enforces
    none, and its document says so rather than declare auth it ignores."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "keruta hub", "version": __version__},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "queryToken": {"type": "apiKey", "in": "query", "name": "token"},
            },
            "schemas": component_schemas(),
        },
        "security": [{"bearer": []}, {"queryToken": []}] if tokens_required else [],
        "paths": _paths(max_page_size, max_batch),
    }

