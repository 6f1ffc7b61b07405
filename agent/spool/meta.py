"""A spool's task.json: which task, which hub, which producer, the final state."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from keruta.timefmt import now_ts


def read_meta(path: Path, task_id: str, hub_url: str | None, warn: Callable[[str], None]) -> tuple[dict[str, Any], bool]:
    """task.json's contents brought up to date, and whether they must be written."""
    new = not path.exists()
    meta: dict[str, Any] = {}
    if not new:
        try:
            meta = orjson.loads(path.read_bytes())
        except (orjson.JSONDecodeError, OSError) as exc:
            warn(f"spool {path.parent}: unreadable task.json ({exc}); rewriting it")
            meta = {}
    changed = new
    if meta.get("taskId") != task_id:
        meta["taskId"] = task_id
        changed = True
    if hub_url and meta.get("hubUrl") != hub_url:
        meta["hubUrl"] = hub_url
        changed = True
    meta.setdefault("createdAt", now_ts())
    meta.setdefault("final", None)
    if new or not isinstance(meta.get("producer"), str):
        # This run, to the hub: its records' seqs are this producer's own.
        meta["producer"] = uuid.uuid4().hex
        changed = True
    return meta, changed
