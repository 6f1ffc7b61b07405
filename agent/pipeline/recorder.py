"""The recorder: the one actor that gives records their seq and writes them to the spool.

It owns the receive end of the capture channel (both capture actors and the
run itself hold its send ends). Each LineBatch is encoded and appended to the
spool in one step, so seq order is spool order is send order; what it wrote
goes on as a RecordBatch (a seq range) to the throttle (the rate limiter).
When every send end is closed it has drained the channel, and it closes its
own output.

The actors downstream never wait on the hub while a message is offered to
them (the throttle waits on the clock with its input still open, the uplink's
input loop only updates counters), so the command only ever waits on this
actor, that is, on the local spool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from agent.pipeline.encoding import LineEncoder, LineRun
from agent.pipeline.gap import SPOOL_ERROR, SPOOL_FULL, Gap, text_bytes
from agent.pipeline.linesplit import Block, Line, each_line
from agent.pipeline.messages import (
    AgentLine,
    CaptureMessage,
    Finished,
    LineBatch,
    RecordBatch,
    SpooledMessage,
    Started,
)
from agent.pipeline.sections import Event, SectionTracker, may_hold_marker, split_block
from agent.spool.spool import SUMMARY_ROOM, Spool
from keruta.levels import determine_level
from keruta.limits import INT64_MAX
from keruta.recordjson import encode_line
from keruta.timefmt import now_ts

# How often the "spool full" warning repeats while lines are being dropped.
FULL_WARNING_EVERY = 10.0
# Besides a gap record, what the spool's budget keeps free for task.json's
# final state and the `acked` file, and the run's summary (in summary.json and
# in the final state).
META_ROOM = 128 + 2 * SUMMARY_ROOM
# A gap ends once this share of the budget is free again (at most
# RESUME_ROOM_MAX), so that a nearly full spool does not alternate between
# one line kept and a gap record.
RESUME_SHARE = 16
RESUME_ROOM_MAX = 1 << 20


async def record(
    inbox: trio.MemoryReceiveChannel[CaptureMessage],
    recorder: Recorder,
    deliver: Callable[[SpooledMessage], Awaitable[None]],
) -> None:
    """The recorder actor: until every capture (and the run) has closed its
    end. What it spools goes to `deliver`: the throttle's channel, or the
    Delivery itself when there is no rate limit (no hop between)."""
    with inbox:
        async for message in inbox:
            first = recorder.next_seq
            if isinstance(message, LineBatch):
                recorder.write(message.source, message.lines, message.ts)
                if message.spooled is not None:
                    message.spooled.set()
            elif isinstance(message, AgentLine):
                recorder.write_agent(message.text, level=message.level)
            elif isinstance(message, Started):
                recorder.metadata = {"processId": message.pid}
            elif isinstance(message, Finished):
                recorder.finish()
                await recorder.spool.set_final(message.state, message.exit_code)
            if recorder.next_seq > first:
                await deliver(RecordBatch(first, recorder.next_seq - 1))
            if isinstance(message, Finished):
                await deliver(message)


class Recorder:
    """Gives lines their seq and writes them to the spool.

    When the spool is full (the hub has been away long enough for its disk
    budget to fill up) or its disk fails, a line is dropped rather than
    blocking the command. Dropped lines are counted, announced on stderr,
    and written as ONE `gap` record (agent/pipeline/gap.py) where they were:
    before the first line kept again, or at the end of the run. The budget
    always keeps room for that record, so the spool never holds more than
    `--spool-max-bytes` on disk, the gap included.
    """

    def __init__(
        self,
        spool: Spool,
        task_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        say: Callable[[str], None] = lambda _m: None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.spool = spool
        self.task_id = task_id
        self.say = say
        self.clock = clock
        self.next_seq = spool.last_seq + 1
        self.agent_lines = 0
        self.written = 0
        self.dropped: dict[str, int] = {}
        self.dropped_total = 0
        self.dropped_bytes = 0
        self._gap: Gap | None = None
        self._last_warning: float | None = None
        self._write_error = ""
        self._resume_room = min(spool.max_bytes // RESUME_SHARE, RESUME_ROOM_MAX)
        self.metadata = metadata or {}
        self.sections = SectionTracker()

    @property
    def metadata(self) -> dict[str, Any]:
        return self._metadata

    @metadata.setter
    def metadata(self, value: dict[str, Any]) -> None:
        # Every record carries it, the gap record too: the room kept for that
        # record depends on it.
        self._metadata = value
        largest = Gap.largest(now_ts())
        self._reserve = (
            self.spool.frame_size(len(self._gap_payload(largest, INT64_MAX, INT64_MAX))) + META_ROOM
        )

    def _fits(self, nbytes: int) -> bool:
        """Whether `nbytes` more leave room for a gap record in the budget."""
        return self.spool.has_room(nbytes + self._reserve)

    def _gap_payload(self, gap: Gap, seq: int, line_number: int | None = None) -> bytes:
        return encode_line(
            self.task_id,
            seq,
            gap.first_ts,
            "agent",
            "WARN",
            gap.message(),
            self.agent_lines + 1 if line_number is None else line_number,
            {**self._metadata, **gap.metadata()},
            False,
            "gap",
        )

    def _record(
        self, source: str, text: str, line_number: int, ts: str, partial: bool, level: str | None = None
    ) -> bytes:
        return encode_line(
            self.task_id,
            self.next_seq,
            ts,
            source,
            level or determine_level(text),
            text,
            line_number,
            self._metadata,
            partial,
        )

    def write(self, source: str, lines: list[tuple[Line | Block, int]], ts: str | None = None) -> None:
        """Spool `lines` (each with its line number; a Block with its first
        line's) read from `source` at `ts`."""
        if not lines:
            return
        ts = ts or now_ts()
        encoder = LineEncoder(self.task_id, ts, source, self._metadata)
        frame = self.spool.frame_size
        first = self.next_seq
        pieces: list[bytes | LineRun] = []
        kept: list[tuple[Line | Block, int]] = []
        # Bytes the pieces take in the spool, or more (a record counted as a
        # frame of its own): what is checked against the budget is never short.
        size = 0
        closing: Gap | None = None
        dropped: list[tuple[Line | Block, int]] = []
        items = list(lines)
        # Blocks known to hold no marker line: what split_block left around them.
        plain: set[int] = set()
        i = 0
        while i < len(items):
            item, number = items[i]
            if isinstance(item, Block):
                if id(item) not in plain and may_hold_marker(item.data):
                    parts = split_block(item)
                    numbered: list[tuple[Line | Block, int]] = []
                    for part in parts:
                        numbered.append((part, number))
                        number += part.count if isinstance(part, Block) else 1
                        if isinstance(part, Block):
                            plain.add(id(part))
                    items[i : i + 1] = numbered
                    continue
                self.sections.block(source)
                if self._gap is None or closing is not None:
                    # Spooled as read; the records are encoded when sent.
                    run = LineRun(self.task_id, ts, source, number, self._metadata, item)
                    run_size = self.spool.lines_size(run)
                    if self._fits(size + run_size):
                        pieces.append(run)
                        kept.append((item, number))
                        self.next_seq += run.count
                        size += run_size
                        i += 1
                        continue
                # A gap to close first, or not all of it fits: line by line.
                items[i : i + 1] = [(line, number + k) for k, line in enumerate(item.texts())]
                continue
            line = item
            event = self.sections.line(source, line, ts)
            payload = self._line_payload(encoder, event, self.next_seq, line, number, source, ts)
            if self._gap is not None and closing is None:
                # Room again (and some to spare): the gap record goes first,
                # where the gap is.
                gap_payload = self._gap_payload(self._gap, self.next_seq)
                payload = self._line_payload(encoder, event, self.next_seq + 1, line, number, source, ts)
                if not self._fits(frame(len(gap_payload)) + frame(len(payload)) + self._resume_room):
                    dropped = items[i:]
                    break
                closing = self._gap
                pieces.append(gap_payload)
                self.next_seq += 1
                size += frame(len(gap_payload))
            elif not self._fits(size + frame(len(payload))):
                # The rest of this read goes too: a gap is one run of lines.
                dropped = items[i:]
                break
            pieces.append(payload)
            kept.append((line, number))
            self.next_seq += 1
            size += frame(len(payload))
            i += 1
        reason = SPOOL_FULL
        if not self._append(first, pieces):
            dropped = kept + dropped
            closing = None
            reason = SPOOL_ERROR
        elif closing is not None:
            self.agent_lines += 1
            self._gap = None
            self.say(f"{closing.message()}; the spool has room again")
        if dropped:
            self._drop(source, dropped, ts, reason)

    def _line_payload(
        self, encoder: LineEncoder, event: Event | None, seq: int, line: Line, number: int, source: str, ts: str
    ) -> bytes:
        """A Line's record; a marker line's (agent/pipeline/sections.py) as printed, with its kind,
        level and `metadata.section`."""
        text = line.text
        if event is None:
            return encoder.encode(seq, determine_level(text), text, number, line.partial)
        metadata = self._metadata if event.section is None else {**self._metadata, "section": event.section}
        level = event.level or determine_level(text)
        return encode_line(self.task_id, seq, ts, source, level, text, number, metadata, False, event.kind)

    def write_agent(self, text: str, ts: str | None = None, level: str | None = None) -> None:
        """An `agent`-source record (always written, even past the spool budget)."""
        self.agent_lines += 1
        payload = self._record("agent", text, self.agent_lines, ts or now_ts(), False, level)
        self.next_seq += 1
        self._append(self.next_seq - 1, [payload])

    def _append(self, first: int, pieces: list[bytes | LineRun]) -> bool:
        if not pieces:
            return True
        try:
            self.spool.append_records(first, pieces)
        except OSError as exc:
            # The disk is full or failing: the command must not stop for that.
            # These seqs were not used; the drop is counted like a full spool.
            self.next_seq = first
            self._write_error = f"cannot write to the spool in {self.spool.dir}: {exc}"
            return False
        count = sum(piece.count if isinstance(piece, LineRun) else 1 for piece in pieces)
        self.written += count
        return True

    def _drop(self, source: str, items: list[tuple[Line | Block, int]], ts: str, reason: str) -> None:
        gap = self._gap
        if gap is None:
            gap = self._gap = Gap(reason, ts)
        lines = each_line(items)
        for line, number in lines:
            nbytes = text_bytes(line.text)
            gap.add(source, number, nbytes, ts)
            self.dropped_bytes += nbytes
        self.dropped[source] = self.dropped.get(source, 0) + len(lines)
        self.dropped_total += len(lines)
        now = self.clock()
        if self._last_warning is None or now - self._last_warning >= FULL_WARNING_EVERY:
            self._last_warning = now
            why = self._write_error if reason == SPOOL_ERROR else (
                # What the directory holds now, this read's lines included.
                f"SPOOL FULL: {self.spool.used_bytes:,} bytes in {self.spool.dir} "
                f"(--spool-max-bytes {self.spool.max_bytes:,}) and the hub has not acknowledged "
                "them"
            )
            self.say(
                f"{why}; DROPPING output lines until this changes ({self.dropped_total:,} lines, "
                f"{self.dropped_bytes:,} bytes dropped so far). The command keeps running."
            )

    def finish(self) -> None:
        """At the end: the gap still open is recorded, even if the spool is
        still full (the budget kept room for it)."""
        gap = self._gap
        if gap is None:
            return
        if self._append(self.next_seq, [self._gap_payload(gap, self.next_seq)]):
            self.next_seq += 1
            self.agent_lines += 1
            self._gap = None
        else:
            self.say(f"{gap.message()}, and the gap record could not be written: {self._write_error}")
