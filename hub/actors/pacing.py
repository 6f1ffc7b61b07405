"""When the writer's next commit may start (sans-IO: plain numbers, no clock).

Every commit costs the same fixed work whatever it holds (a worker-thread
hop, BEGIN/COMMIT, the syncer's fsync hop, the answers' bookkeeping): with
many producers each sending a small frame, commits that follow each other
back to back held a few frames each and that fixed work was most of the
hub's CPU per frame. So while commits follow each other, the next one starts
at most one `interval` after the previous one started, gathering what
arrives meanwhile (group commit); after a quiet spell, or when a commit
itself took longer than `interval`, the next starts at once, so a lone
line's commit is never delayed.
"""

from __future__ import annotations

import math

import attrs


@attrs.define
class CommitPacing:
    interval: float
    last_start: float = -math.inf

    def earliest(self, now: float) -> float:
        """The earliest time the next commit may start, `now` at the soonest."""
        return max(now, self.last_start + self.interval)

    def started(self, now: float) -> None:
        self.last_start = now
