"""Operations: /healthz, /metrics (Prometheus text), /openapi.json."""

from __future__ import annotations

from collections.abc import Callable

from quart import Blueprint, Response

from hub.access import Access
from hub.metrics import Metrics
from hub.openapi import openapi_document
from hub.routes.common import json_response


def blueprint(
    *, access: Access, metrics: Metrics, store_available: Callable[[], bool], max_page_size: int
) -> Blueprint:
    """`store_available`: whether the writer is committing (hub/actors/writer.py Writer.available)."""
    bp = Blueprint("ops", __name__)

    @bp.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok", "store": "ok" if store_available() else "unavailable"})

    @bp.get("/metrics")
    async def metrics_text() -> Response:
        access.need(write=False)
        return Response(metrics.render(), content_type="text/plain; version=0.0.4")

    @bp.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(openapi_document(max_page_size, tokens_required=not access.authorizer.open))

    return bp
