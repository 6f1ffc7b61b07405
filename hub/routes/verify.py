"""/api/v1/tasks/<task_id>/verify: is the stored log what its runs sent (hub/store/verify.py)."""

from __future__ import annotations

import trio
from quart import Blueprint, Response

from hub.access import Access
from hub.answers import Verify, answer_json
from hub.errors import ApiError
from hub.routes.common import check_task_id, json_response
from hub.store.base import Store

# Verifications under way at once: each reads a whole task and hashes it in a
# worker thread, so readers cannot take every thread the hub has.
CONCURRENT = 2


class _Flight:
    """One verification of a task, whose answer every request for it meanwhile shares."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: Verify | None = None
        self.error: BaseException | None = None


def blueprint(*, access: Access, store: Store) -> Blueprint:
    bp = Blueprint("verify", __name__)
    limiter = trio.CapacityLimiter(CONCURRENT)
    flights: dict[str, _Flight] = {}

    async def verified(task_id: str) -> Verify | None:
        flight = flights.get(task_id)
        if flight is not None:
            await flight.done.wait()
        else:
            flight = flights[task_id] = _Flight()
            try:
                async with limiter:
                    flight.answer = await store.verify(task_id)
            except BaseException as exc:
                flight.error = exc
                raise
            finally:
                del flights[task_id]
                flight.done.set()
        if flight.error is not None:
            raise ApiError(
                503, "STORE_UNAVAILABLE", "the verification could not read the store; retry later",
                {"Retry-After": "1"},
            )
        return flight.answer

    @bp.get("/api/v1/tasks/<task_id>/verify")
    async def verify(task_id: str) -> Response:
        access.need(write=False)
        check_task_id(task_id)
        answer = await verified(task_id)
        if answer is None:
            raise ApiError(404, "NOT_FOUND", f"no task {task_id}")
        return json_response(answer_json(answer))

    return bp
