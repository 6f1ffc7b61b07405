"""/api/v1/tasks/<task_id>/redact: take a leaked secret back out (the admin's).

The values are replaced by `***` in every stored record of the task, a few
chunks per transaction (hub/redaction.py), and a `redaction` record, which
the first of those transactions appends and each later one adds to, stays
behind. As each step commits, live viewers are told which seqs to read
again, and are sent the record (new, or grown: they replace the one they
hold). The token was proven before the body was read (hub/admission.py).
"""

from __future__ import annotations

import orjson
from quart import Blueprint, Response, request

from hub.access import Access
from hub.actors.broadcaster import Broadcaster
from hub.answers import Redacted, answer_json
from hub.errors import ApiError
from hub.redaction import BadValues, check_values, redact
from hub.rewrites import announce
from hub.routes.common import check_task_id, json_response
from hub.store.base import REDACTED, REPLACED, Store
from hub.store.redacting import RedactStep


def blueprint(
    *,
    access: Access,
    store: Store,
    broadcaster: Broadcaster,
) -> Blueprint:
    bp = Blueprint("redact", __name__)

    @bp.post("/api/v1/tasks/<task_id>/redact")
    async def redact_task(task_id: str) -> Response:
        access.need_admin()
        check_task_id(task_id)
        body = await request.get_data()
        try:
            values = check_values(orjson.loads(body))
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "INVALID_REQUEST", f"body is not valid JSON: {exc}") from None
        except BadValues as exc:
            raise ApiError(400, "INVALID_REQUEST", str(exc)) from None
        if await store.task(task_id) is None:
            raise ApiError(404, "NOT_FOUND", f"no task {task_id}")

        redacted: list[int] = []
        grown: set[int] = set()

        def publish(step: RedactStep) -> None:
            broadcaster.publish_redacted(task_id, step.seqs)
            redacted.extend(step.seqs)
            if step.appended is not None:
                broadcaster.publish_records(step.appended.inserted, step.appended.durable)
            elif step.seqs and step.record is not None:
                # The record grew: viewers past it replace the one they hold.
                broadcaster.publish_replaced(task_id, [step.record])
                grown.add(step.record.seq)

        done = await redact(store, task_id, values, publish)
        # And the other hubs' viewers (the appended record reaches them as any append does).
        await announce(store, task_id, REDACTED, redacted)
        await announce(store, task_id, REPLACED, sorted(grown))
        if done.full:
            raise ApiError(
                409, "TASK_FULL",
                f"{done.records} records of task {task_id} were redacted, but the task has given its last seq: "
                "no redaction record was added",
            )
        if done.record is None:
            raise ApiError(404, "NOT_FOUND", f"no task {task_id}")
        return json_response(answer_json(Redacted(done.records, done.record.seq)))

    return bp
