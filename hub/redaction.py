"""Taking a leaked secret back out of a task's stored records.

The store rewrites the chunks that hold a value, a few per transaction
(hub/store/trimming.py `redact_step`); this walks the task with it, tells
whoever asks which seqs changed as it goes (live viewers re-read them), and
makes the `redaction` record that stays behind: how many records, who, when,
and per producer what the change did to its summary's bytes and digest, so
`verify` stays meaningful (docs/identity.md). Never the values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from hub.store.accounts import Accounts
from hub.store.base import Incoming, Store
from keruta.timefmt import now_ts

# A request names at most this many values, each at most this long: a
# redaction reads every chunk of the task once, whatever their number, but
# tests each value against each.
MAX_VALUES = 100
MAX_VALUE_CHARS = 4096


class BadValues(ValueError):
    pass


def check_values(body: Any) -> list[str]:
    """The values of a redact request's body `{"values": [...]}`; BadValues says what is wrong."""
    if not isinstance(body, dict) or set(body) != {"values"}:
        raise BadValues('the body is {"values": ["a secret", ...]}')
    values = body["values"]
    if not isinstance(values, list) or not values:
        raise BadValues("values must be a non-empty array of strings")
    if len(values) > MAX_VALUES:
        raise BadValues(f"values holds {len(values)} items; at most {MAX_VALUES}")
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v:
            raise BadValues(f"values[{i}] must be a non-empty string")
        if len(v) > MAX_VALUE_CHARS:
            raise BadValues(f"values[{i}] is longer than {MAX_VALUE_CHARS} characters")
    return list(dict.fromkeys(values))


@attrs.frozen
class Redacted:
    records: int
    accounts: Accounts


async def redact(
    store: Store, task_id: str, values: Sequence[str], changed: Callable[[list[int]], None] = lambda seqs: None
) -> Redacted:
    """Redact `values` in every record of the task stored when it starts;
    `changed` gets the seqs each step rewrote, right after it committed."""
    through = await store.durable_seq(task_id)
    after = 0
    count = 0
    accounts = Accounts()
    while after < through:
        step = await store.redact_step(task_id, values, after, through)
        if step.seqs:
            count += len(step.seqs)
            changed(step.seqs)
        accounts.merge(step.accounts)
        if step.done:
            break
        after = step.cursor
    return Redacted(count, accounts)


def redaction_item(task_id: str, redacted: Redacted, by: str = "admin", at: str | None = None) -> Incoming:
    """The audit record, to append like any record (the writer numbers it)."""
    at = at or now_ts()
    noun = "record" if redacted.records == 1 else "records"
    return Incoming(
        task_id=task_id,
        seq=None,
        timestamp=at,
        source="agent",
        level="WARN",
        message=f"{redacted.records:,} {noun} redacted by {by} at {at}",
        metadata={
            "redaction": {
                "records": redacted.records,
                "by": by,
                "at": at,
                "accounts": redacted.accounts.to_json(counts=False),
            }
        },
        kind="redaction",
    )
