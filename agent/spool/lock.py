"""Owning a task's spool directory: an flock on its `lock` file."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

# Tries past the first when the spool's directory goes away as it is taken.
_RACE_RETRIES = 20


class SpoolLocked(Exception):
    """Another live process owns this task's spool."""


def task_directory(root: Path, task_id: str) -> Path:
    """The spool directory of `task_id` under `root`."""
    if task_id in ("", ".", "..") or "/" in task_id or os.sep in task_id or "\x00" in task_id:
        # Not a directory of its own under root: writing there would put the
        # spool into (or above) the root, where `flush` never looks.
        raise ValueError(f"task id {task_id!r} cannot name a spool directory")
    return Path(root) / task_id


def lock_directory(directory: Path, create: bool = True) -> int:
    """Own the spool: an flock on the `lock` file linked in the directory.

    `remove` unlinks `lock` (last) while holding it, so a process that
    opened it before then can get the flock of a file no longer linked:
    it owns nothing and must start again, on a new file (and, if the
    directory went too, a new directory). The inode check makes that
    race safe: whoever holds the flock of the linked `lock` is the owner.
    """
    path = directory / "lock"
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    for attempt in range(_RACE_RETRIES + 1):
        try:
            if create:
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, flags, 0o600)
        except (FileNotFoundError, FileExistsError) as exc:
            # The directory was removed between mkdir and open, or between
            # mkdir's EEXIST and its check that the name is a directory: a
            # race with another run of the task, which a retry or two gets
            # past. What fails every time is not a race (a dangling symlink,
            # a path no mkdir can make): the error is the answer.
            racing = not (isinstance(exc, FileExistsError) and _is_other_than_a_directory(directory))
            if create and racing and attempt < _RACE_RETRIES:
                continue
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"{directory} is in use by another keruta-agent") from None
        try:
            linked = os.stat(path)
        except FileNotFoundError:
            linked = None
        held = os.fstat(fd)
        if linked is not None and (linked.st_dev, linked.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)
        if not create:
            raise FileNotFoundError(f"{directory} was removed by its agent")
    raise FileNotFoundError(f"{directory} kept being removed while this agent took it")


def _is_other_than_a_directory(path: Path) -> bool:
    """Whether `path` names something that is not a directory, from one stat:
    asking "exists?" then "a directory?" could see it created between the
    two and then removed, by another run of the same task. A symlink to
    nothing is something other than a directory: asked of the name itself
    (lstat), so that a directory another run makes meanwhile is not taken
    for one."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        try:
            return stat.S_ISLNK(os.lstat(path).st_mode)
        except FileNotFoundError:
            return False
