"""When the writer's next commit may start (sans-IO: plain numbers, no clock).

Every commit costs the same fixed work whatever it holds (a worker-thread
hop, BEGIN/COMMIT, the syncer's fsync hop, the answers' bookkeeping): with
many producers each sending a small frame, commits that follow each other
back to back held a few frames each and that fixed work was most of the
hub's CPU per frame. So while commits follow each other -- the last one
ended with requests already waiting -- the next one starts at most one
`interval` after the last one started, gathering what arrives meanwhile
(group commit). A commit that ended with nothing waiting lets the next start
at once: a quiet line (one every 10 ms, say) is never held back, however
soon it follows the last.
"""

from __future__ import annotations

import math

import attrs


@attrs.define
class CommitPacing:
    interval: float
    last_start: float = -math.inf
    # Whether the last commit ended with requests already waiting.
    backlogged: bool = False

    def earliest(self, now: float) -> float:
        """The earliest time the next commit may start, `now` at the soonest."""
        if not self.backlogged:
            return now
        return max(now, self.last_start + self.interval)

    def started(self, now: float) -> None:
        self.last_start = now

    def ended(self, waiting: bool) -> None:
        """A commit ended; `waiting`: requests were already waiting for the next."""
        self.backlogged = waiting
