"""/api/v1/tasks: every task, one task's state, its sections."""

from __future__ import annotations

from quart import Blueprint, Response

from hub.access import Access
from hub.errors import ApiError
from hub.routes.common import check_task_id, int_param, json_response, task_json
from hub.store.base import MAX_SECTIONS, Store
from keruta.limits import INT64_MAX


def blueprint(*, access: Access, store: Store) -> Blueprint:
    bp = Blueprint("tasks", __name__)

    @bp.get("/api/v1/tasks")
    async def list_tasks() -> Response:
        access.need(write=False)
        return json_response({"tasks": [task_json(t) for t in await store.tasks()]})

    @bp.get("/api/v1/tasks/<task_id>")
    async def get_task(task_id: str) -> Response:
        access.need(write=False)
        check_task_id(task_id)
        task = await store.task(task_id)
        if task is None:
            raise ApiError(404, "NOT_FOUND", f"no task {task_id}")
        return json_response(task_json(task))

    @bp.get("/api/v1/tasks/<task_id>/sections")
    async def get_sections(task_id: str) -> Response:
        access.need(write=False)
        check_task_id(task_id)
        after_seq = int_param("afterSeq", 0, 0, INT64_MAX) or 0
        size = int_param("size", MAX_SECTIONS, 1, MAX_SECTIONS) or MAX_SECTIONS
        page = await store.sections(task_id, after_seq, size)
        if page is None:
            raise ApiError(404, "NOT_FOUND", f"no task {task_id}")
        # Where this page was cut, said in the answer: never a silent truncation.
        return json_response({"taskId": task_id, "sections": page.sections, "nextAfterSeq": page.next_after_seq})

    return bp
