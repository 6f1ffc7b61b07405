"""The OpenAPI description served at /openapi.json."""

from __future__ import annotations

from typing import Any

from keruta import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_TASK_ID = {"name": "taskId", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}}


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "error", "content": {"application/json": {"schema": _ERROR}}} for c in codes}


def _ok(schema: dict[str, Any], kind: str = "application/json") -> dict[str, Any]:
    return {"200": {"description": "ok", "content": {kind: {"schema": schema}}}}


def openapi_document() -> dict[str, Any]:
    record = {
        "type": "object",
        "required": ["id", "taskId", "seq", "timestamp", "source", "level", "message"],
        "properties": {
            "id": {"type": "string"},
            "taskId": {"type": "string"},
            "seq": {"type": "integer", "minimum": 1},
            "timestamp": {"type": "string", "format": "date-time"},
            "source": {"type": "string", "enum": ["stdout", "stderr", "agent"]},
            "level": {"type": "string", "enum": ["DEBUG", "INFO", "WARN", "ERROR"]},
            "message": {"type": "string"},
            "lineNumber": {"type": "integer"},
            "metadata": {"type": "object"},
            "partial": {"type": "boolean"},
        },
    }
    log_request = {
        "type": "object",
        "required": ["message"],
        "properties": {
            "message": {"type": "string"},
            "source": {"type": "string", "enum": ["stdout", "stderr", "agent"], "default": "stdout"},
            "level": {"type": "string", "enum": ["DEBUG", "INFO", "WARN", "ERROR"]},
            "lineNumber": {"type": "integer"},
            "metadata": {"type": "object"},
            "seq": {"type": "integer", "minimum": 1},
            "timestamp": {"type": "string", "format": "date-time"},
            "partial": {"type": "boolean"},
        },
    }
    task = {
        "type": "object",
        "properties": {
            "taskId": {"type": "string"},
            "state": {"type": "string", "enum": ["pending", "running", "succeeded", "failed"]},
            "exitCode": {"type": ["integer", "null"]},
            "firstTimestamp": {"type": ["string", "null"]},
            "lastTimestamp": {"type": ["string", "null"]},
            "totalLogs": {"type": "integer"},
        },
    }
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
                "Error": {"type": "object", "properties": {"error": {"type": "string"}, "message": {"type": "string"}}},
                "LogRecord": record,
                "LogRequest": log_request,
                "Task": task,
            },
        },
        "security": auth,
        "paths": {
            "/api/v1/tasks/{taskId}/logs": {
                "parameters": [_TASK_ID],
                "post": {
                    "summary": "Store one LogRequest or an array of them",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/LogRequest"}, {"type": "array", "items": {"$ref": "#/components/schemas/LogRequest"}, "maxItems": 1000}]}}}},
                    "responses": {**_ok({"oneOf": [{"type": "object", "properties": {"id": {"type": "string"}}}, {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "string"}}}}]}), **_errors(400, 401, 403, 413, 429)},
                },
                "get": {
                    "summary": "A page of the task's records in seq order",
                    "parameters": [
                        _q("source", {"type": "string", "enum": ["stdout", "stderr", "agent"]}, "only this source"),
                        _q("level", {"type": "string", "enum": ["DEBUG", "INFO", "WARN", "ERROR"]}, "only this level"),
                        _q("page", {"type": "integer", "minimum": 0, "default": 0}, "page number"),
                        _q("size", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "page size"),
                        _q("from", {"type": "string", "format": "date-time"}, "timestamp >= from"),
                        _q("to", {"type": "string", "format": "date-time"}, "timestamp <= to"),
                        _q("afterSeq", {"type": "integer", "minimum": 0}, "cursor: seq > afterSeq"),
                        _q("q", {"type": "string"}, "substring of message (case-sensitive)"),
                    ],
                    "responses": {**_ok({"type": "object", "properties": {"content": {"type": "array", "items": {"$ref": "#/components/schemas/LogRecord"}}, "totalElements": {"type": "integer"}, "totalPages": {"type": "integer"}, "number": {"type": "integer"}, "size": {"type": "integer"}}}), **_errors(400, 401)},
                },
                "delete": {
                    "summary": "Delete the task's records older than `before` (all without it)",
                    "parameters": [_q("before", {"type": "string", "format": "date-time"}, "delete records older than this")],
                    "responses": {**_ok({"type": "object", "properties": {"deletedCount": {"type": "integer"}}}), **_errors(400, 401, 403)},
                },
            },
            "/api/v1/tasks/{taskId}/logs/stats": {
                "parameters": [_TASK_ID],
                "get": {"summary": "Counts by source and level, time range", "responses": {**_ok({"type": "object"}), **_errors(400, 401, 404)}},
            },
            "/api/v1/tasks/{taskId}/logs/raw": {
                "parameters": [_TASK_ID],
                "get": {"summary": "The whole log as text, streamed", "responses": {**_ok({"type": "string"}, "text/plain"), **_errors(400, 401)}},
            },
            "/api/v1/tasks": {"get": {"summary": "All tasks", "responses": {**_ok({"type": "object", "properties": {"tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}}}}), **_errors(401)}}},
            "/api/v1/tasks/{taskId}": {"parameters": [_TASK_ID], "get": {"summary": "One task's state", "responses": {**_ok({"$ref": "#/components/schemas/Task"}), **_errors(400, 401, 404)}}},
            "/api/v1/ws": {"get": {"summary": "WebSocket: log, logs, status, subscribe, unsubscribe, ping (see CONTRACT); the token may come as the subprotocol bearer.<base64url token> beside keruta", "responses": {"101": {"description": "switching protocols"}}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": _ok({"type": "object"})}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": _ok({"type": "string"}, "text/plain")}},
            "/openapi.json": {"get": {"summary": "This document", "security": [], "responses": _ok({"type": "object"})}},
            "/": {"get": {"summary": "The web viewer", "security": [], "responses": _ok({"type": "string"}, "text/html")}},
            "/tasks/{taskId}": {"parameters": [_TASK_ID], "get": {"summary": "The web viewer for one task", "security": [], "responses": _ok({"type": "string"}, "text/html")}},
            "/static/{name}": {"parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}], "get": {"summary": "The web viewer's files (hub/static/)", "security": [], "responses": {**_ok({"type": "string"}, "text/javascript"), **_errors(404)}}},
        },
    }
