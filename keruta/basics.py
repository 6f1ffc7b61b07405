"""The data model's plain constants and the task-id rule, on the standard
library alone: `keruta-agent run` imports them before it starts its command,
when every import is a delay (agent/cli.py). keruta.limits and
keruta.records, where they belong, re-export them."""

from __future__ import annotations

import re

# Integers as the stores hold them (BIGINT / SQLite INTEGER are int64).
INT64_MAX = 2**63 - 1
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
# The largest `seq`, `fromSeq` or `lineNumber` a producer may give: browsers
# read JSON numbers as doubles, exact up to 2**53 - 1, and the hub's own
# max+1 assignment stays far inside int64.
MAX_SEQ = 2**53 - 1

SOURCES = ("stdout", "stderr", "agent")

TASK_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TASK_ID_RULE = "1-128 characters of [A-Za-z0-9._:-], not '.' or '..'"
TASK_ID_PATTERN = rf"^(?!\.\.?$){TASK_ID_RE.pattern}$"

# Task ids already found valid: every record of a batch names the same one, and
# a LogRecord is built several times on its way into the store. Bounded: it is
# emptied when full.
_VALID_TASK_IDS: set[str] = set()
_VALID_TASK_IDS_MAX = 4096


def valid_task_id(value: object) -> bool:
    if type(value) is str and value in _VALID_TASK_IDS:
        return True
    # "." and ".." are path components: the agent's spool directory would be
    # the spool root itself or its parent.
    if isinstance(value, str) and TASK_ID_RE.fullmatch(value) is not None and value not in (".", ".."):
        if type(value) is str:
            if len(_VALID_TASK_IDS) >= _VALID_TASK_IDS_MAX:
                _VALID_TASK_IDS.clear()
            _VALID_TASK_IDS.add(value)
        return True
    return False
