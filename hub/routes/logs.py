"""/api/v1/tasks/<task_id>/logs: write (POST), page (GET), stats, raw download, delete."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import orjson
import trio
from quart import Blueprint, Response, request

from hub.access import Access
from hub.actors.broadcaster import Broadcaster
from hub.actors.writer import WriteRequest, write_within
from hub.admission import post_deadline
from hub.config import HubConfig
from hub.errors import ApiError
from hub.ingest import from_requests
from hub.rewrites import announce
from hub.routes.common import (
    check_task_id,
    choice_param,
    int_param,
    json_response,
    time_param,
)
from hub.store.base import REPLACED, LogQuery, Store, with_ids
from hub.store.trimming import DELETED
from keruta.frames import FrameError
from keruta.levels import LEVELS
from keruta.limits import INT64_MAX
from keruta.ratelimit import RateLimiter
from keruta.recordjson import record_body
from keruta.records import SOURCES, LogRecord
from keruta.wire import decode_requests


def blueprint(
    *,
    access: Access,
    store: Store,
    writer_inbox: trio.MemorySendChannel[WriteRequest],
    limiter: Callable[[str], RateLimiter],
    config: HubConfig,
    broadcaster: Broadcaster,
) -> Blueprint:
    bp = Blueprint("logs", __name__)
    limits = config.limits

    @bp.post("/api/v1/tasks/<task_id>/logs")
    async def post_logs(task_id: str) -> Response:
        access.need(write=True)
        check_task_id(task_id)
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
            items = from_requests(task_id, decode_requests(data, array, limits), array)
        except FrameError as exc:
            if exc.code == "TOO_LARGE":
                raise ApiError(413, "TOO_LARGE", exc.message) from None
            raise ApiError(400, "INVALID_REQUEST", exc.message) from None
        wait = limiter(task_id).retry_after(len(items))
        if wait > 0:
            seconds = max(1, int(wait + 0.999))
            raise ApiError(429, "RATE_LIMITED", f"task {task_id} is over its rate limit; retry in {seconds}s", {"Retry-After": str(seconds)})
        # Within the deadline the request waited for room against (hub/admission.py).
        timeout = max(0.0, post_deadline(request.scope, config.post_timeout) - trio.current_time())
        outcome = await write_within(writer_inbox, items, timeout)
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
        # A duplicate whose row was deleted since has no id nor seq left: null.
        with_ids(outcome.records)
        ids = [r.id if r is not None else None for r in outcome.records]
        seqs = [r.seq if r is not None else None for r in outcome.records]
        return json_response({"ids": ids, "seqs": seqs} if array else {"id": ids[0], "seq": seqs[0]})

    @bp.get("/api/v1/tasks/<task_id>/logs")
    async def get_logs(task_id: str) -> Response:
        access.need(write=False)
        check_task_id(task_id)
        query = LogQuery(
            task_id=task_id,
            source=choice_param("source", SOURCES),
            level=choice_param("level", LEVELS),
            start=time_param("from"),
            end=time_param("to"),
            q=request.args.get("q") or None,
            after_seq=int_param("afterSeq", None, 0, INT64_MAX),
            page=int_param("page", 0, 0, 10_000_000) or 0,
            size=int_param("size", 100, 1, config.max_page_size) or 100,
        )
        page = await store.query(query)
        return json_response(
            {
                "content": [record_body(r) for r in page.content],
                "totalElements": page.total_elements,
                "totalPages": page.total_pages,
                "number": page.number,
                "size": page.size,
            }
        )

    @bp.get("/api/v1/tasks/<task_id>/logs/stats")
    async def get_stats(task_id: str) -> Response:
        access.need(write=False)
        check_task_id(task_id)
        if await store.task(task_id) is None:
            raise ApiError(404, "NOT_FOUND", f"no task {task_id}")
        stats = await store.stats(task_id)
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

    @bp.delete("/api/v1/tasks/<task_id>/logs")
    async def delete_logs(task_id: str) -> Response:
        access.need_admin()
        check_task_id(task_id)
        # Records older than `before` leave a `deleted` gap, which verify
        # reads as explained; deleting them all leaves an empty log.
        # Live viewers get the gap under the first seq it stands for, as a
        # cap's: a viewer holding the records it replaced reads them again.
        gaps: list[int] = []

        def on_gap(gap: LogRecord) -> None:
            broadcaster.publish_replaced(task_id, [gap])
            gaps.append(gap.seq)

        count = await store.delete(task_id, time_param("before"), gap=DELETED, on_gap=on_gap)
        # And the other hubs' viewers, after the commit.
        await announce(store, task_id, REPLACED, gaps)
        return json_response({"deletedCount": count})

    @bp.get("/api/v1/tasks/<task_id>/logs/raw")
    async def raw_logs(task_id: str) -> Response:
        access.need(write=False)
        check_task_id(task_id)

        async def lines() -> AsyncIterator[bytes]:
            async for text in store.iter_raw(task_id):
                yield text.encode("utf-8", "surrogatepass")

        response = Response(lines(), content_type="text/plain; charset=utf-8")
        # Quart cuts a response off after RESPONSE_TIMEOUT (60 s), which would
        # end a big task's download early and silently; the client's reading
        # paces it instead.
        response.timeout = None
        return response

    return bp
