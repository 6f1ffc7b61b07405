"""A spool's task.json: which task, which hub, which producer, the final state."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from keruta.records import PRODUCER_RE
from keruta.timefmt import now_ts

# The run's producer id again, in a file of its own written once: a task.json
# found damaged gives it back, where a new id would make the hub store again
# every line it holds already.
PRODUCER_FILE = "producer"


def read_meta(path: Path, task_id: str, hub_url: str | None, warn: Callable[[str], None]) -> tuple[dict[str, Any], bool]:
    """task.json's contents brought up to date, and whether they must be written."""
    new = not path.exists()
    meta: dict[str, Any] = {}
    if not new:
        # A task.json that cannot be read (OSError) is not rewritten: it names
        # the run's producer, and a new one would make the hub store again
        # what it holds already. The caller says why it cannot open the spool.
        try:
            meta = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            warn(f"spool {path.parent}: unreadable task.json ({exc}); rewriting it")
            meta = {}
        if not isinstance(meta, dict):
            warn(f"spool {path.parent}: task.json holds no JSON object; rewriting it")
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
    final = meta["final"]
    if final is not None and not _readable_final(final):
        # Written by another version, or damaged: a final state this agent
        # cannot send. The run's end is then unknown, as if its agent had
        # stopped before the command finished (flush says so).
        warn(
            f"spool {path.parent}: task.json's final state is unreadable ({orjson.dumps(final)[:200].decode()}); "
            "the run is delivered as failed, its exit code unknown"
        )
        meta["final"] = None
        changed = True
    if new or not isinstance(meta.get("producer"), str):
        kept = kept_producer(path.parent / PRODUCER_FILE)
        if kept is not None and not new:
            warn(f"spool {path.parent}: task.json had no producer id; it is {kept}, from {PRODUCER_FILE}")
        # This run, to the hub: its records' seqs are this producer's own.
        meta["producer"] = kept or uuid.uuid4().hex
        changed = True
    return meta, changed


def _readable_final(final: Any) -> bool:
    """Whether a final state is one this agent wrote and can send."""
    if not isinstance(final, dict):
        return False
    code = final.get("exitCode")
    last = final.get("lastSeq", 0)
    return (
        final.get("state") in ("succeeded", "failed")
        and (code is None or (type(code) is int and -(2**31) <= code < 2**31))
        and type(last) is int
        and last >= 0
        and (final.get("summary") is None or isinstance(final.get("summary"), dict))
    )


def kept_producer(path: Path) -> str | None:
    """The producer id PRODUCER_FILE holds; None when it holds none."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if PRODUCER_RE.fullmatch(text) else None
