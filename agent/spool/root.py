"""Where spools live: the root directory and the tasks spooled under it."""

from __future__ import annotations

import os
from pathlib import Path


def default_root() -> Path:
    env = os.environ.get("KERUTA_SPOOL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "keruta" / "spool"


def spooled_tasks(root: Path) -> list[str]:
    """Task ids that have a spool directory under `root`."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _holds_task(p))


def _holds_task(directory: Path) -> bool:
    """Whether a directory holds a spooled task (its task.json); one this
    process may not look into counts, so that flush names it instead of
    passing it over."""
    try:
        (directory / "task.json").stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True
