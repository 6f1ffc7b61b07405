"""Records rewritten in place (a DELETE's or a cap's gap, a redaction),
told to the other hubs sharing the database, whose viewers hold them too.

The hub that rewrote them publishes to its own viewers (hub/actors/broadcaster.py
`publish_replaced`, `publish_redacted`) and announces it here after the
commit; the other hubs' notifiers (hub/actors/notifier.py) publish it to
theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hub.store.base import Listens, Rewrite, Store, StoreUnavailable

log = logging.getLogger("keruta.hub.rewrites")


async def announce(store: Store, task_id: str, kind: str, seqs: Sequence[int]) -> None:
    """`kind` is REPLACED or REDACTED (hub/store/base.py `Rewrite`); a
    store no other hub shares has nobody to tell."""
    if not seqs or not isinstance(store, Listens):
        return
    try:
        await store.announce(Rewrite(task_id, kind, tuple(seqs)))
    except StoreUnavailable as exc:
        # Committed, and this hub's viewers have it; the other hubs' viewers
        # see it when they next read those records.
        log.warning("could not tell the other hubs that %s records of %s were rewritten: %s", kind, task_id, exc)
