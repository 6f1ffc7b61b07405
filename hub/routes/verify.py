"""/api/v1/tasks/<task_id>/verify: is the stored log what its runs sent (hub/verify.py)."""

from __future__ import annotations

from quart import Blueprint, Response

from hub.answers import answer_json
from hub.routes.access import Access
from hub.routes.common import ApiError, check_task_id, json_response
from hub.store.base import Store


def blueprint(*, access: Access, store: Store) -> Blueprint:
    bp = Blueprint("verify", __name__)

    @bp.get("/api/v1/tasks/<task_id>/verify")
    async def verify(task_id: str) -> Response:
        access.need(write=False)
        check_task_id(task_id)
        answer = await store.verify(task_id)
        if answer is None:
            raise ApiError(404, "NOT_FOUND", f"no task {task_id}")
        return json_response(answer_json(answer))

    return bp
