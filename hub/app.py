"""The Quart-Trio application: REST routes, the WebSocket endpoint, errors as JSON."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from hub.auth import WS_SUBPROTOCOL, Role, bearer_token, subprotocol_token
from hub.connection import CLOSE_POLICY, Connection
from hub.ingest import from_requests
from hub.openapi import openapi_document
from hub.origin import OriginPolicy
from hub.state import Hub
from hub.store.base import LogQuery, StoreUnavailable
from hub.viewer import VIEWER_HEADERS, viewer_asset, viewer_html
from hub.writer import write_within
from keruta.levels import LEVELS
from keruta.limits import INT64_MAX
from keruta.records import SOURCES, TASK_ID_RULE, LogRequest, TaskInfo, valid_task_id
from keruta.timefmt import canonical_ts
from keruta.wire import ErrorFrame, FrameError, check_record_limits, converter, dumps, structure

log = logging.getLogger("keruta.hub.app")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


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
    }


def _check_task_id(task_id: str) -> None:
    if not valid_task_id(task_id):
        raise ApiError(400, "INVALID_TASK_ID", f"taskId must be {TASK_ID_RULE}")


def _int_param(name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "INVALID_PARAMETER", f"parameter '{name}' must be an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ApiError(400, "INVALID_PARAMETER", f"parameter '{name}' must be {bound}")
    return value


def _choice_param(name: str, choices: tuple[str, ...]) -> str | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if raw not in choices:
        raise ApiError(400, "INVALID_PARAMETER", f"parameter '{name}' must be one of {', '.join(choices)}")
    return raw


def _time_param(name: str) -> str | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        return canonical_ts(raw)
    except (ValueError, TypeError):
        raise ApiError(400, "INVALID_PARAMETER", f"parameter '{name}' must be an RFC 3339 timestamp") from None


def create_app(hub: Hub) -> QuartTrio:
    app = QuartTrio("keruta-hub")
    app.config["MAX_CONTENT_LENGTH"] = hub.config.limits.max_frame_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    limits = hub.config.limits

    def role() -> Role:
        return hub.authorizer.role(bearer_token(request.headers.get("Authorization"), request.args.get("token")))

    def need(write: bool) -> None:
        r = role()
        if r is Role.NONE:
            raise ApiError(401, "UNAUTHORIZED", "a valid token is required (Authorization: Bearer TOKEN or ?token=)")
        if write and not r.can_write:
            raise ApiError(403, "FORBIDDEN", "the viewer token may only read")

    def need_admin() -> None:
        need(write=False)
        if not role().can_delete:
            raise ApiError(403, "FORBIDDEN", "deleting logs needs the admin token (--admin-token)")

    origins = OriginPolicy(hub.config.allow_origins)

    def origin_refusal(origin: str) -> str:
        return (
            f"requests from a page on {origin} may not change anything here or open a WebSocket; "
            "start the hub with --allow-origin to permit that origin"
        )

    @app.before_request
    async def read_body_first() -> None:
        # An answer given before the body is read would leave the body on a
        # keep-alive connection and wedge the next request on it.
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            await request.get_data()

    def host_refusal(host: str) -> str | None:
        if not hub.authorizer.open or origins.host_permitted(host):
            return None
        return (
            f"this hub has no tokens and answers only requests addressed to it by a loopback "
            f"name (localhost, 127.0.0.1, [::1]), not {host!r}; start it with --allow-origin "
            "for another name"
        )

    @app.before_request
    async def check_origin() -> None:
        # Registered after read_body_first, so a refusal never leaves a body unread.
        refusal = host_refusal(request.host)
        if refusal is not None:
            raise ApiError(403, "FORBIDDEN_HOST", refusal)
        # Reads are not refused: without CORS headers the page cannot see the answer.
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return
        origin = request.headers.get("Origin")
        if not origins.permits(origin, request.scheme, request.host):
            raise ApiError(403, "FORBIDDEN_ORIGIN", origin_refusal(str(origin)))

    @app.after_request
    async def close_after_oversized(response: Response) -> Response:
        if response.status_code == 413:
            # The rest of an oversized body is never read: end the connection.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        hub.metrics.error(exc.code)
        return json_response({"error": exc.code, "message": exc.message}, exc.status, exc.headers)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "TOO_LARGE"}.get(status, "BAD_REQUEST")
        message = exc.description or exc.name
        if status == 413:
            message = f"request body is larger than {limits.max_frame_bytes} bytes"
        hub.metrics.error(code)
        return json_response({"error": code, "message": message}, status)

    @app.errorhandler(StoreUnavailable)
    async def store_unavailable(exc: StoreUnavailable) -> Response:
        hub.metrics.error("STORE_UNAVAILABLE")
        return json_response({"error": "STORE_UNAVAILABLE", "message": "the store is unavailable; retry"}, 503, {"Retry-After": "1"})

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        hub.metrics.error("INTERNAL")
        return json_response({"error": "INTERNAL", "message": "internal error; see the hub's log"}, 500)

    # --- logs -------------------------------------------------------------

    @app.post("/api/v1/tasks/<task_id>/logs")
    async def post_logs(task_id: str) -> Response:
        need(write=True)
        _check_task_id(task_id)
        body = await request.get_data()
        if len(body) > limits.max_frame_bytes:
            raise ApiError(413, "TOO_LARGE", f"request body is larger than {limits.max_frame_bytes} bytes")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "INVALID_REQUEST", f"body is not valid JSON: {exc}") from None
        array = isinstance(data, list)
        if array and len(data) > limits.max_records_per_batch:
            raise ApiError(413, "TOO_LARGE", f"the array holds {len(data)} items; at most {limits.max_records_per_batch}")
        if array and not data:
            raise ApiError(400, "INVALID_REQUEST", "the array is empty")
        if not array and not isinstance(data, dict):
            raise ApiError(400, "INVALID_REQUEST", "body must be a LogRequest object or an array of them")
        if array:
            for i, item in enumerate(data):
                if not isinstance(item, dict):
                    raise ApiError(400, "INVALID_REQUEST", f"invalid field '[{i}]': expected a LogRequest object")
        try:
            reqs = structure(data, list[LogRequest]) if array else [structure(data, LogRequest)]
            for i, r in enumerate(reqs):
                check_record_limits(r, limits, f"[{i}]" if array else "body")  # type: ignore[arg-type]
            items = from_requests(task_id, reqs, array)
        except FrameError as exc:
            if exc.code == "TOO_LARGE":
                raise ApiError(413, "TOO_LARGE", exc.message) from None
            raise ApiError(400, "INVALID_REQUEST", exc.message) from None
        wait = hub.limiter(task_id).retry_after(len(items))
        if wait > 0:
            seconds = max(1, int(wait + 0.999))
            raise ApiError(429, "RATE_LIMITED", f"task {task_id} is over its rate limit; retry in {seconds}s", {"Retry-After": str(seconds)})
        outcome = await write_within(hub.writer_inbox, items, hub.config.post_timeout)
        if outcome is None:
            raise ApiError(
                503, "STORE_UNAVAILABLE",
                "the store is unavailable; the records were NOT stored: retry later",
                {"Retry-After": "5"},
            )
        if outcome.error is not None:
            raise ApiError(503, "STORE_ERROR", "the records could not be stored; retry", {"Retry-After": "1"})
        if outcome.refusals:
            others = " (the other records of the array were stored)" if array and len(items) > 1 else ""
            raise ApiError(409, outcome.refusals[0].code, outcome.refusals[0].message + others)
        ids = [r.id for r in outcome.records if r is not None]
        return json_response({"ids": ids} if array else {"id": ids[0]})

    @app.get("/api/v1/tasks/<task_id>/logs")
    async def get_logs(task_id: str) -> Response:
        need(write=False)
        _check_task_id(task_id)
        query = LogQuery(
            task_id=task_id,
            source=_choice_param("source", SOURCES),
            level=_choice_param("level", LEVELS),
            start=_time_param("from"),
            end=_time_param("to"),
            q=request.args.get("q") or None,
            after_seq=_int_param("afterSeq", None, 0, INT64_MAX),
            page=_int_param("page", 0, 0, 10_000_000) or 0,
            size=_int_param("size", 100, 1, hub.config.max_page_size) or 100,
        )
        page = await hub.store.query(query)
        return json_response(
            {
                "content": [converter.unstructure(r) for r in page.content],
                "totalElements": page.total_elements,
                "totalPages": page.total_pages,
                "number": page.number,
                "size": page.size,
            }
        )

    @app.get("/api/v1/tasks/<task_id>/logs/stats")
    async def get_stats(task_id: str) -> Response:
        need(write=False)
        _check_task_id(task_id)
        if await hub.store.task(task_id) is None:
            raise ApiError(404, "NOT_FOUND", f"no task {task_id}")
        stats = await hub.store.stats(task_id)
        return json_response(
            {
                "taskId": stats.task_id,
                "totalLogs": stats.total_logs,
                "logCounts": stats.log_counts,
                "levelCounts": stats.level_counts,
                "timeRange": {"start": stats.start, "end": stats.end},
                "lastUpdated": stats.last_updated,
            }
        )

    @app.delete("/api/v1/tasks/<task_id>/logs")
    async def delete_logs(task_id: str) -> Response:
        need_admin()
        _check_task_id(task_id)
        count = await hub.store.delete(task_id, _time_param("before"))
        return json_response({"deletedCount": count})

    @app.get("/api/v1/tasks/<task_id>/logs/raw")
    async def raw_logs(task_id: str) -> Response:
        need(write=False)
        _check_task_id(task_id)

        async def lines() -> AsyncIterator[bytes]:
            async for chunk in hub.store.iter_task(task_id):
                parts = []
                for r in chunk:
                    parts.append(r.message if r.partial else r.message + "\n")
                yield "".join(parts).encode("utf-8", "surrogatepass")

        return Response(lines(), content_type="text/plain; charset=utf-8")

    # --- tasks ------------------------------------------------------------

    @app.get("/api/v1/tasks")
    async def list_tasks() -> Response:
        need(write=False)
        return json_response({"tasks": [task_json(t) for t in await hub.store.tasks()]})

    @app.get("/api/v1/tasks/<task_id>")
    async def get_task(task_id: str) -> Response:
        need(write=False)
        _check_task_id(task_id)
        task = await hub.store.task(task_id)
        if task is None:
            raise ApiError(404, "NOT_FOUND", f"no task {task_id}")
        return json_response(task_json(task))

    # --- operations -------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok", "store": "ok" if hub.writer_available() else "unavailable"})

    @app.get("/metrics")
    async def metrics() -> Response:
        need(write=False)
        return Response(hub.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(openapi_document(hub.config.max_page_size))

    # --- viewer -----------------------------------------------------------

    @app.get("/")
    async def index() -> Response:
        return await viewer_page()

    @app.get("/tasks/<task_id>")
    async def task_page(task_id: str) -> Response:
        _check_task_id(task_id)
        return await viewer_page()

    async def viewer_page() -> Response:
        return Response(viewer_html(), content_type="text/html; charset=utf-8", headers=VIEWER_HEADERS)

    @app.get("/static/<name>")
    async def static_file(name: str) -> Response:
        found = viewer_asset(name)
        if found is None:
            raise ApiError(404, "NOT_FOUND", f"no file {name}")
        body, content_type = found
        return Response(body, content_type=content_type, headers=VIEWER_HEADERS)

    # --- WebSocket ----------------------------------------------------------

    @app.websocket("/api/v1/ws")
    async def ws_endpoint() -> None:
        offered = websocket.requested_subprotocols
        token = bearer_token(
            websocket.headers.get("Authorization"), subprotocol_token(offered) or websocket.args.get("token")
        )
        r = hub.authorizer.role(token)
        origin = websocket.headers.get("Origin")
        # Refused like a missing token (accepted, one error frame, close 1008),
        # so a client sees why; nothing it sends is read as a frame.
        refusal: ErrorFrame | None = None
        bad_host = host_refusal(websocket.host)
        if bad_host is not None:
            refusal = ErrorFrame("FORBIDDEN_HOST", bad_host)
        elif not origins.permits(origin, websocket.scheme, websocket.host):
            refusal = ErrorFrame("FORBIDDEN_ORIGIN", origin_refusal(str(origin)))
        elif r is Role.NONE:
            refusal = ErrorFrame("UNAUTHORIZED", "a valid token is required (Authorization: Bearer TOKEN or ?token=)")
        # A browser that offered subprotocols drops a connection accepted with none.
        await websocket.accept(subprotocol=WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None)
        if refusal is not None:
            hub.metrics.error(refusal.code)
            await websocket.send(dumps(refusal))
            await websocket.close(CLOSE_POLICY, refusal.code.lower())
            # Stay until the client answers the close (then we are cancelled), so
            # frames it already sent are read, not reset, and it sees 1008.
            with trio.move_on_after(2):
                while True:
                    await websocket.receive()
            return
        await Connection(hub, websocket._get_current_object(), r).run()  # type: ignore[attr-defined]

    return app
