"""What every route module shares: errors as JSON, parameter parsing, the task shape."""

from __future__ import annotations

import re
from typing import Any

import orjson
from quart import Response, request

from hub.errors import ApiError
from keruta.records import TASK_ID_RULE, TaskInfo, valid_task_id
from keruta.timefmt import canonical_ts


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def task_json(task: TaskInfo) -> dict[str, Any]:
    return {
        "taskId": task.task_id,
        "state": task.state,
        "exitCode": task.exit_code,
        "firstTimestamp": task.first_timestamp,
        "lastTimestamp": task.last_timestamp,
        "totalLogs": task.total_logs,
        "durableSeq": task.durable_seq,
        "updatedAt": task.updated_at,
        "verdict": task.verdict,
    }


def check_task_id(task_id: str) -> None:
    if not valid_task_id(task_id):
        raise ApiError(400, "INVALID_TASK_ID", f"taskId must be {TASK_ID_RULE}")


_INTEGER = re.compile(r"-?[0-9]+")
# No bound of ours has this many digits: past it, out of range without converting them.
_MAX_DIGITS = 30


def int_param(name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    # ASCII digits only: int() also takes "５", "1_000", " 5" and "+5".
    if not _INTEGER.fullmatch(raw):
        raise ApiError(400, "INVALID_PARAMETER", f"parameter '{name}' must be an integer")
    value = int(raw) if len(raw) <= _MAX_DIGITS else None
    if value is None or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ApiError(400, "INVALID_PARAMETER", f"parameter '{name}' must be {bound}")
    return value


def choice_param(name: str, choices: tuple[str, ...]) -> str | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if raw not in choices:
        raise ApiError(400, "INVALID_PARAMETER", f"parameter '{name}' must be one of {', '.join(choices)}")
    return raw


def time_param(name: str) -> str | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    # Empty is refused, not read as "absent": `DELETE ...?before=` would
    # otherwise delete the whole log.
    try:
        return canonical_ts(raw)
    except (ValueError, TypeError):
        raise ApiError(400, "INVALID_PARAMETER", f"parameter '{name}' must be an RFC 3339 timestamp") from None
