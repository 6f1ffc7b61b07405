"""The recorder: the one actor that gives records their seq and writes them to the spool.

It owns the receive end of the capture channel (both capture actors and the
run itself hold its send ends). Each LineBatch is encoded and appended to the
spool in one step, so seq order is spool order is send order; what it wrote
goes on as a RecordBatch (a seq range) to the rate limiter. When every send
end is closed it has drained the channel, and it closes its own output.

The actors downstream never wait on the hub while a message is offered to
them (the limiter waits on the clock with its input still open, the uplink's
input loop only updates counters), so the command only ever waits on this
actor, that is, on the local spool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import trio

from agent.pipeline.linesplit import Line
from agent.pipeline.messages import (
    AgentLine,
    CaptureMessage,
    Finished,
    LineBatch,
    RecordBatch,
    SpooledMessage,
    Started,
)
from agent.spool import Spool
from keruta.levels import LEVELS, determine_level
from keruta.timefmt import now_ts

# How often the "spool full" warning repeats while lines are being dropped.
FULL_WARNING_EVERY = 10.0

Say = Callable[[str], None]


async def record(
    inbox: trio.MemoryReceiveChannel[CaptureMessage],
    recorder: Recorder,
    outbox: trio.MemorySendChannel[SpooledMessage],
) -> None:
    """The recorder actor: until every capture (and the run) has closed its end."""
    with inbox, outbox:
        async for message in inbox:
            first = recorder.next_seq
            if isinstance(message, LineBatch):
                recorder.write(message.source, message.lines, message.ts)
                if message.spooled is not None:
                    message.spooled.set()
            elif isinstance(message, AgentLine):
                recorder.write_agent(message.text)
            elif isinstance(message, Started):
                recorder.metadata = {"processId": message.pid}
            elif isinstance(message, Finished):
                recorder.finish()
                recorder.spool.set_final(message.state, message.exit_code)
            if recorder.next_seq > first:
                await outbox.send(RecordBatch(first, recorder.next_seq - 1))
            if isinstance(message, Finished):
                await outbox.send(message)


def encode_line(
    task_id: str,
    seq: int,
    timestamp: str,
    source: str,
    level: str,
    message: str,
    line_number: int,
    metadata: dict[str, Any],
    partial: bool,
) -> bytes:
    """`orjson.dumps(record_to_wire(LogRecord(...)))` without building the LogRecord: this runs
    once per line, and every field is valid by construction (a test holds the
    two to the same bytes)."""
    body: dict[str, Any] = {
        "taskId": task_id,
        "seq": seq,
        "timestamp": timestamp,
        "source": source,
        "level": level,
        "message": message,
        "lineNumber": line_number,
        "metadata": metadata,
    }
    if partial:
        body["partial"] = True
    return orjson.dumps(body)


class LineEncoder:
    """`encode_line` for the lines of one batch, which share task, timestamp,
    source and metadata: those parts are encoded once per batch (per line,
    building and dumping a dict was a sixth of the agent's CPU). A test holds
    it to encode_line's bytes."""

    _LEVELS = {level: level.encode() for level in LEVELS}

    def __init__(self, task_id: str, ts: str, source: str, metadata: dict[str, Any]) -> None:
        self.head = b'{"taskId":' + orjson.dumps(task_id) + b',"seq":'
        self.mid = b',"timestamp":' + orjson.dumps(ts) + b',"source":' + orjson.dumps(source) + b',"level":"'
        meta = orjson.dumps(metadata)
        self.tail = b',"metadata":' + meta + b"}"
        self.tail_partial = b',"metadata":' + meta + b',"partial":true}'

    def encode(self, seq: int, level: str, message: str, line_number: int, partial: bool) -> bytes:
        return b"".join(
            (
                self.head,
                b"%d" % seq,
                self.mid,
                self._LEVELS[level],
                b'","message":',
                orjson.dumps(message),
                b',"lineNumber":%d' % line_number,
                self.tail_partial if partial else self.tail,
            )
        )


class Recorder:
    """Gives lines their seq and writes them to the spool.

    When the spool is full (the hub has been away long enough for its disk
    budget to fill up), a line is dropped rather than blocking the command;
    drops are counted, announced on stderr, and recorded as an `agent`
    record as soon as there is room again (or at the end, regardless).
    """

    def __init__(
        self,
        spool: Spool,
        task_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        on_written: Callable[[int], None] = lambda _n: None,
        say: Say = lambda _m: None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.spool = spool
        self.task_id = task_id
        self.metadata = metadata or {}
        self.on_written = on_written
        self.say = say
        self.clock = clock
        self.next_seq = spool.last_seq + 1
        self.agent_lines = 0
        self.written = 0
        self.dropped: dict[str, int] = {}
        self.dropped_total = 0
        self._unreported = 0
        self._last_warning: float | None = None
        self._write_error = ""

    def _record(self, source: str, text: str, line_number: int, ts: str, partial: bool) -> bytes:
        return encode_line(
            self.task_id,
            self.next_seq,
            ts,
            source,
            determine_level(text),
            text,
            line_number,
            self.metadata,
            partial,
        )

    def write(self, source: str, lines: list[tuple[Line, int]], ts: str | None = None) -> None:
        """Spool `lines` (each with its line number) read from `source` at `ts`."""
        if not lines:
            return
        ts = ts or now_ts()
        entries: list[tuple[int, bytes]] = []
        size = 0
        if self._unreported:
            self._write_drop_notice(ts, force=False)
        encoder = LineEncoder(self.task_id, ts, source, self.metadata)
        for line, number in lines:
            text = line.text
            payload = encoder.encode(self.next_seq, determine_level(text), text, number, line.partial)
            frame = self.spool.frame_size(len(payload))
            if self._unreported or not self.spool.has_room(size + frame):
                # Once dropping, keep dropping until the notice itself fits,
                # so that the notice sits where the gap is.
                self._drop(source)
                continue
            entries.append((self.next_seq, payload))
            self.next_seq += 1
            size += frame
        if not self._append(entries):
            for _ in entries:
                self._drop(source, self._write_error)

    def write_agent(self, text: str, ts: str | None = None) -> None:
        """An `agent`-source record (always written, even past the spool budget)."""
        self.agent_lines += 1
        payload = self._record("agent", text, self.agent_lines, ts or now_ts(), False)
        self.next_seq += 1
        self._append([(self.next_seq - 1, payload)])

    def _append(self, entries: list[tuple[int, bytes]]) -> bool:
        if not entries:
            return True
        try:
            self.spool.append(entries)
        except OSError as exc:
            # The disk is full or failing: the command must not stop for that.
            # These seqs were not used; the drop is counted like a full spool.
            self.next_seq = entries[0][0]
            self._write_error = f"cannot write to the spool in {self.spool.dir}: {exc}"
            return False
        self.written += len(entries)
        self.on_written(len(entries))
        return True

    def _drop(self, source: str, why: str | None = None) -> None:
        self.dropped[source] = self.dropped.get(source, 0) + 1
        self.dropped_total += 1
        self._unreported += 1
        now = self.clock()
        if self._last_warning is None or now - self._last_warning >= FULL_WARNING_EVERY:
            self._last_warning = now
            reason = why or (
                f"SPOOL FULL: {self.spool.used_bytes} bytes in {self.spool.dir} "
                f"(--spool-max-bytes {self.spool.max_bytes}) and the hub has not acknowledged "
                "them"
            )
            self.say(
                f"{reason}; DROPPING output lines until this changes "
                f"({self.dropped_total} dropped so far). The command keeps running."
            )

    def _drop_notice(self) -> str:
        detail = ", ".join(f"{src}: {n}" for src, n in sorted(self.dropped.items()))
        return (
            f"keruta-agent: the spool was full; {self._unreported} output records were dropped "
            f"here ({detail} in total so far)"
        )

    def _write_drop_notice(self, ts: str, force: bool) -> None:
        text = self._drop_notice()
        payload_len = len(text) + 400
        if not force and not self.spool.has_room(self.spool.frame_size(payload_len)):
            return
        self._unreported = 0
        self.write_agent(text, ts)
        if not force:
            self.say(text.removeprefix("keruta-agent: ") + "; there is room again")

    def finish(self) -> None:
        """At the end: make sure a gap is recorded even if the spool is still full."""
        if self._unreported:
            self._write_drop_notice(now_ts(), force=True)


