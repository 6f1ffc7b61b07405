"""Taking a leaked secret back out of a task's stored records.

The store rewrites the chunks that hold a value, a few per transaction
(hub/store/redacting.py `redact_step`), and keeps the `redaction` record
that stays behind in step with them (appended by the first step, added to
by each later one): how many records, who, when, and per producer what the
change did to its summary's bytes and digest, so `verify` stays meaningful
at every commit (docs/identity.md). Never the values. This walks the task
with it and tells whoever asks what each step did as it goes (live viewers
re-read the seqs it changed, and get the record).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from hub.store.accounts import Accounts
from hub.store.base import Store
from hub.store.redacting import RedactStep
from keruta.records import LogRecord

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
    # The redaction's record as the last step left it; None: no such task,
    # or (`full`) the task had no seq left for one (the values are redacted).
    record: LogRecord | None
    full: bool = False


async def redact(
    store: Store, task_id: str, values: Sequence[str], on_step: Callable[[RedactStep], None] = lambda step: None,
    by: str = "admin",
) -> Redacted:
    """Redact `values` in every record of the task stored when it starts;
    `on_step` gets each step right after it committed (the seqs it rewrote,
    its record as it now is)."""
    through = await store.durable_seq(task_id)
    after = 0
    count = 0
    accounts = Accounts()
    record: LogRecord | None = None
    while True:
        step = await store.redact_step(task_id, values, after, through, None if record is None else record.seq, by)
        count += len(step.seqs)
        accounts.merge(step.accounts)
        record = step.record
        on_step(step)
        if step.done or (record is None and not step.full):
            break
        after = step.cursor
    return Redacted(count, accounts, record, step.full)
