"""The web viewer's page (/ and /tasks/<id>) and its files (/static/<name>)."""

from __future__ import annotations

from quart import Blueprint, Response

from hub.errors import ApiError
from hub.routes.common import check_task_id
from hub.viewer import VIEWER_HEADERS, viewer_asset, viewer_html


def _page() -> Response:
    return Response(viewer_html(), content_type="text/html; charset=utf-8", headers=VIEWER_HEADERS)


def blueprint() -> Blueprint:
    bp = Blueprint("viewer", __name__)

    @bp.get("/")
    async def index() -> Response:
        return _page()

    @bp.get("/tasks/<task_id>")
    async def task_page(task_id: str) -> Response:
        check_task_id(task_id)
        return _page()

    @bp.get("/static/<name>")
    async def static_file(name: str) -> Response:
        found = viewer_asset(name)
        if found is None:
            raise ApiError(404, "NOT_FOUND", f"no file {name}")
        body, content_type = found
        return Response(body, content_type=content_type, headers=VIEWER_HEADERS)

    return bp
