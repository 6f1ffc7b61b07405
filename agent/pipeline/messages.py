"""What the agent's actors pass to one another: batches, never single lines.

    capture ──LineBatch──► recorder ──RecordBatch──► throttle ──RecordBatch──► uplink
                  (Finished follows the last batch down the whole pipeline)

A RecordBatch names a run of consecutive seqs the spool now holds; the
payloads stay in the spool (its cache is bounded in bytes, a channel only in
messages), and the uplink reads them from there, as it must anyway to resend
after a reconnect.
"""

from __future__ import annotations

import attrs
import trio

from agent.pipeline.linesplit import Block, Line


@attrs.frozen
class LineBatch:
    """Lines one capture actor read from `source` at `ts`, each with its line
    number (a Block: the number of its first line).

    `spooled`, when given, is set by the recorder once the lines are in the
    spool (or counted as dropped): the capture shows a line on the agent's own
    output only after that, so a line the user saw is never one a SIGKILL lost.
    """

    source: str
    ts: str
    lines: list[tuple[Line | Block, int]]
    spooled: trio.Event | None = attrs.field(default=None, eq=False)


@attrs.frozen
class Started:
    """The command runs as process `pid` (its records carry it as metadata)."""

    pid: int


@attrs.frozen
class AgentLine:
    """A line in the agent's own voice (source `agent`), e.g. "cannot run COMMAND".
    `level`: None to detect it from the text as for any line."""

    text: str
    level: str | None = None


@attrs.frozen
class RecordBatch:
    """Records `first_seq`..`last_seq` are in the spool."""

    first_seq: int
    last_seq: int

    @property
    def count(self) -> int:
        return self.last_seq - self.first_seq + 1

    def merged(self, later: RecordBatch) -> RecordBatch:
        return RecordBatch(min(self.first_seq, later.first_seq), max(self.last_seq, later.last_seq))


@attrs.frozen
class Finished:
    """The command is done: nothing follows; the final state to report."""

    state: str
    exit_code: int | None


CaptureMessage = LineBatch | Started | AgentLine | Finished
SpooledMessage = RecordBatch | Finished
