"""The OpenAPI description served at /openapi.json."""

from __future__ import annotations

from typing import Any

from keruta import __version__
from keruta.levels import LEVELS
from keruta.limits import INT32_MAX, INT32_MIN, INT64_MAX, MAX_SEQ
from keruta.records import SOURCES, TASK_STATES

_ERROR = {"$ref": "#/components/schemas/Error"}
# valid_task_id: the charset, but never the path components "." and "..".
TASK_ID_PATTERN = r"^(?!\.\.?$)[A-Za-z0-9._:-]{1,128}$"
_TASK_ID = {"name": "taskId", "in": "path", "required": True, "schema": {"type": "string", "pattern": TASK_ID_PATTERN}}
_SOURCE = {"type": "string", "enum": list(SOURCES)}
_LEVEL = {"type": "string", "enum": list(LEVELS)}
_NULLABLE_TS = {"type": ["string", "null"], "format": "date-time"}
_COUNT = {"type": "integer", "minimum": 0}


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _errors(*codes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in codes:
        out[str(c)] = {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
        if c in (429, 503):
            out[str(c)]["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}
    return out


def _ok(schema: dict[str, Any], kind: str = "application/json") -> dict[str, Any]:
    return {"200": {"description": "ok", "content": {kind: {"schema": schema}}}}


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    # Every answer names all its fields: required defaults to all of them.
    return {"type": "object", "required": list(properties) if required is None else required, "properties": properties}


def openapi_document(max_page_size: int = 1000) -> dict[str, Any]:
    """The description of what the hub answers; tests run schemathesis
    against it, so a response that drifts from it fails the suite."""
    record = _obj(
        {
            "id": {"type": "string"},
            "taskId": {"type": "string", "pattern": TASK_ID_PATTERN},
            "seq": {"type": "integer", "minimum": 1, "maximum": INT64_MAX},
            "timestamp": {"type": "string", "format": "date-time"},
            "source": _SOURCE,
            "level": _LEVEL,
            "message": {"type": "string"},
            "lineNumber": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_SEQ},
            "metadata": {"type": "object"},
            "partial": {"type": "boolean"},
        },
        ["id", "taskId", "seq", "timestamp", "source", "level", "message", "metadata"],
    )
    log_request = _obj(
        {
            "message": {"type": "string"},
            "source": {**_SOURCE, "default": "stdout"},
            "level": _LEVEL,
            "lineNumber": {"type": "integer", "minimum": 0, "maximum": MAX_SEQ},
            "metadata": {"type": "object"},
            "seq": {"type": "integer", "minimum": 1, "maximum": MAX_SEQ},
            "timestamp": {"type": "string", "format": "date-time"},
            "partial": {"type": "boolean"},
        },
        ["message"],
    )
    task = _obj(
        {
            "taskId": {"type": "string", "pattern": TASK_ID_PATTERN},
            "state": {"type": "string", "enum": list(TASK_STATES)},
            "exitCode": {"type": ["integer", "null"], "minimum": INT32_MIN, "maximum": INT32_MAX},
            "firstTimestamp": _NULLABLE_TS,
            "lastTimestamp": _NULLABLE_TS,
            "totalLogs": _COUNT,
            "durableSeq": {"type": "integer", "minimum": 0},
            "updatedAt": _NULLABLE_TS,
        }
    )
    page = _obj(
        {
            "content": {"type": "array", "items": {"$ref": "#/components/schemas/LogRecord"}},
            "totalElements": _COUNT,
            "totalPages": _COUNT,
            "number": _COUNT,
            "size": {"type": "integer", "minimum": 1},
        }
    )
    counts = {"type": "object", "additionalProperties": _COUNT}
    stats = _obj(
        {
            "taskId": {"type": "string"},
            "totalLogs": _COUNT,
            "logCounts": counts,
            "levelCounts": counts,
            "timeRange": _obj({"start": _NULLABLE_TS, "end": _NULLABLE_TS}),
            "lastUpdated": _NULLABLE_TS,
        }
    )
    ids = {"oneOf": [_obj({"id": {"type": "string"}}), _obj({"ids": {"type": "array", "items": {"type": "string"}}})]}
    auth: list[dict[str, list[str]]] = [{"bearer": []}, {"queryToken": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "keruta hub", "version": __version__},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "queryToken": {"type": "apiKey", "in": "query", "name": "token"},
            },
            "schemas": {
                "Error": _obj({"error": {"type": "string"}, "message": {"type": "string"}}),
                "LogRecord": record,
                "LogRequest": log_request,
                "Task": task,
                "LogPage": page,
                "LogStats": stats,
            },
        },
        "security": auth,
        "paths": {
            "/api/v1/tasks/{taskId}/logs": {
                "parameters": [_TASK_ID],
                "post": {
                    "summary": "Store one LogRequest or an array of them",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/LogRequest"}, {"type": "array", "items": {"$ref": "#/components/schemas/LogRequest"}, "minItems": 1, "maxItems": 1000}]}}}},
                    "responses": {**_ok(ids), **_errors(400, 401, 403, 409, 413, 429, 503)},
                },
                "get": {
                    "summary": "A page of the task's records in seq order",
                    "parameters": [
                        _q("source", _SOURCE, "only this source"),
                        _q("level", _LEVEL, "only this level"),
                        _q("page", {"type": "integer", "minimum": 0, "maximum": 10_000_000, "default": 0}, "page number"),
                        _q("size", {"type": "integer", "minimum": 1, "maximum": max_page_size, "default": 100}, "page size"),
                        _q("from", {"type": "string", "format": "date-time"}, "timestamp >= from"),
                        _q("to", {"type": "string", "format": "date-time"}, "timestamp <= to"),
                        _q("afterSeq", {"type": "integer", "minimum": 0, "maximum": INT64_MAX}, "cursor: seq > afterSeq"),
                        _q("q", {"type": "string"}, "substring of message (case-sensitive)"),
                    ],
                    "responses": {**_ok({"$ref": "#/components/schemas/LogPage"}), **_errors(400, 401, 403, 503)},
                },
                "delete": {
                    "summary": "Delete the task's records older than `before` (all without it)",
                    "parameters": [_q("before", {"type": "string", "format": "date-time"}, "delete records older than this")],
                    "responses": {**_ok(_obj({"deletedCount": _COUNT})), **_errors(400, 401, 403, 503)},
                },
            },
            "/api/v1/tasks/{taskId}/logs/stats": {
                "parameters": [_TASK_ID],
                "get": {"summary": "Counts by source and level, time range", "responses": {**_ok({"$ref": "#/components/schemas/LogStats"}), **_errors(400, 401, 403, 404, 503)}},
            },
            "/api/v1/tasks/{taskId}/logs/raw": {
                "parameters": [_TASK_ID],
                "get": {"summary": "The whole log as text, streamed", "responses": {**_ok({"type": "string"}, "text/plain"), **_errors(400, 401, 403, 503)}},
            },
            "/api/v1/tasks": {"get": {"summary": "All tasks", "responses": {**_ok(_obj({"tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}}})), **_errors(401, 403, 503)}}},
            "/api/v1/tasks/{taskId}": {"parameters": [_TASK_ID], "get": {"summary": "One task's state", "responses": {**_ok({"$ref": "#/components/schemas/Task"}), **_errors(400, 401, 403, 404, 503)}}},
            # A plain HTTP GET (no Upgrade) is a 400.
            "/api/v1/ws": {"get": {"summary": "WebSocket: log, logs, status, subscribe, unsubscribe, ping (see CONTRACT); the token may come as the subprotocol bearer.<base64url token> beside keruta", "responses": {"101": {"description": "switching protocols"}, **_errors(400, 401, 403)}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": _ok(_obj({"status": {"type": "string", "enum": ["ok"]}, "store": {"type": "string", "enum": ["ok", "unavailable"]}}))}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {**_ok({"type": "string"}, "text/plain"), **_errors(401, 403)}}},
            "/openapi.json": {"get": {"summary": "This document", "security": [], "responses": _ok({"type": "object"})}},
            "/": {"get": {"summary": "The web viewer", "security": [], "responses": _ok({"type": "string"}, "text/html")}},
            "/tasks/{taskId}": {"parameters": [_TASK_ID], "get": {"summary": "The web viewer for one task", "security": [], "responses": {**_ok({"type": "string"}, "text/html"), **_errors(400)}}},
            "/static/{name}": {"parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}], "get": {"summary": "The web viewer's files (hub/static/)", "security": [], "responses": {**_ok({"type": "string"}, "text/javascript"), **_errors(404)}}},
        },
    }
