"""/api/v1/tasks/<task_id>/redact: take a leaked secret back out (the admin's).

The values are replaced by `***` in every stored record of the task, a few
chunks per transaction (hub/redaction.py), live viewers are told which seqs
to read again as each step commits, and a `redaction` record stays behind,
appended through the writer like any record, which also takes it to live
viewers. The token was proven before the body was read (hub/admission.py).
"""

from __future__ import annotations

import orjson
import trio
from quart import Blueprint, Response, request

from hub.access import Access
from hub.actors.broadcaster import Broadcaster
from hub.actors.writer import WriteRequest, write_within
from hub.answers import Redacted, answer_json
from hub.config import HubConfig
from hub.errors import ApiError
from hub.redaction import BadValues, check_values, redact, redaction_item
from hub.routes.common import check_task_id, json_response
from hub.store.base import Store


def blueprint(
    *,
    access: Access,
    store: Store,
    writer_inbox: trio.MemorySendChannel[WriteRequest],
    broadcaster: Broadcaster,
    config: HubConfig,
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
        done = await redact(store, task_id, values, lambda seqs: broadcaster.publish_redacted(task_id, seqs))
        outcome = await write_within(writer_inbox, [redaction_item(task_id, done)], config.post_timeout)
        if outcome is None or outcome.error is not None or not outcome.records or outcome.records[0] is None:
            # The records are redacted; only the audit record is missing.
            raise ApiError(
                503, "STORE_UNAVAILABLE",
                f"{done.records} records were redacted but the redaction record could not be stored; "
                "send the request again (it finds nothing more to redact and leaves the record)",
                {"Retry-After": "5"},
            )
        return json_response(answer_json(Redacted(done.records, outcome.records[0].seq)))

    return bp
