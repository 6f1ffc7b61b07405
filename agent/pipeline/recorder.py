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

from collections.abc import Callable, Iterable
from typing import Any

import orjson
import trio

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
from agent.spool import Spool
from keruta.levels import LEVELS, determine_level
from keruta.limits import INT64_MAX
from keruta.timefmt import now_ts

# How often the "spool full" warning repeats while lines are being dropped.
FULL_WARNING_EVERY = 10.0
# Besides a gap record, what the spool's budget keeps free for task.json's
# final state and the `acked` file.
META_ROOM = 128
# A gap ends once this share of the budget is free again (at most
# RESUME_ROOM_MAX), so that a nearly full spool does not alternate between
# one line kept and a gap record.
RESUME_SHARE = 16
RESUME_ROOM_MAX = 1 << 20

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
    kind: str | None = None,
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
    if kind is not None:
        body["kind"] = kind
    return orjson.dumps(body)


# Bytes that a JSON string holds as they are (orjson escapes `"`, `\\` and
# controls only), plus the `\n` that separates a Block's lines: what is left
# of a Block after deleting these needs escaping.
_VERBATIM = bytes(b for b in range(256) if (b >= 0x20 and b not in b'"\\') or b == 0x0A)
# Lowered, every word a level looks for holds one of these ("trace" covers
# "traceback", "warn" covers "warning").
_LEVEL_HINTS = (b"error", b"fatal", b"critical", b"panic", b"exception", b"trace", b"warn", b"deprecated", b"debug")
# Past this many lines with a hint in a Block, every line's level is looked at.
_HINTED_LINES_MAX = 64


class LineEncoder:
    """`encode_line` for the lines of one batch, which share task, timestamp,
    source and metadata: those parts are encoded once per batch (per line,
    building and dumping a dict was a sixth of the agent's CPU), and a Block
    is encoded with no Python code run per line (`encode_block`). A test
    holds both to encode_line's bytes.

    Kept to this module (not the hub's record encoder): the recorder's hot
    path is the one place that gets the record's fields separately and one
    line's work must be a few C calls."""

    _LEVELS = {level: level.encode() for level in LEVELS}

    def __init__(self, task_id: str, ts: str, source: str, metadata: dict[str, Any]) -> None:
        self.head = b'{"taskId":' + orjson.dumps(task_id) + b',"seq":'
        self.mid = b',"timestamp":' + orjson.dumps(ts) + b',"source":' + orjson.dumps(source) + b',"level":"'
        meta = orjson.dumps(metadata)
        self.tail = b',"metadata":' + meta + b"}"
        self.tail_partial = b',"metadata":' + meta + b',"partial":true}'
        # One line of a Block, level INFO: seq, message, lineNumber; the rest
        # fixed (its own `%` doubled, a task id or metadata may hold one).
        head, mid, tail = (part.replace(b"%", b"%%") for part in (self.head, self.mid, self.tail))
        self._info_verbatim = head + b"%d" + mid + b'INFO","message":"%b","lineNumber":%d' + tail
        self._info_escaped = head + b"%d" + mid + b'INFO","message":%b,"lineNumber":%d' + tail

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

    def encode_block(self, seq: int, block: Block, line_number: int) -> list[bytes]:
        """The records of `block`'s lines, from `seq` and `line_number` on."""
        raws = block.lines
        count = len(raws)
        seqs = range(seq, seq + count)
        numbers = range(line_number, line_number + count)
        if block.data.translate(None, _VERBATIM):
            # Quotes, backslashes or control characters: orjson escapes each line.
            messages = map(orjson.dumps, map(bytes.decode, raws))
            records = list(map(self._info_escaped.__mod__, zip(seqs, messages, numbers, strict=True)))
        else:
            records = list(map(self._info_verbatim.__mod__, zip(seqs, raws, numbers, strict=True)))
        for i in _maybe_not_info(block):
            text = raws[i].decode()
            level = determine_level(text)
            if level != "INFO":
                records[i] = self.encode(seq + i, level, text, line_number + i, False)
        return records


def _maybe_not_info(block: Block) -> Iterable[int]:
    """The indexes of `block`'s lines whose level may not be INFO: those that
    hold a level's word in ASCII letters of any case, and those that are not
    ASCII (determine_level matches case-insensitively beyond ASCII there)."""
    data = block.data
    low = data.lower()
    hits = []
    for hint in _LEVEL_HINTS:
        at = low.find(hint)
        while at != -1:
            hits.append(at)
            if len(hits) > _HINTED_LINES_MAX:
                return range(len(block.lines))
            at = low.find(hint, at + len(hint))
    lines: set[int] = set()
    if hits:
        hits.sort()
        line, counted = 0, 0
        for at in hits:
            line += data.count(b"\n", counted, at)
            counted = at
            lines.add(line)
    if not data.isascii():
        lines.update(i for i, raw in enumerate(block.lines) if not raw.isascii())
    return sorted(lines)


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
        on_written: Callable[[int], None] = lambda _n: None,
        say: Say = lambda _m: None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.spool = spool
        self.task_id = task_id
        self.on_written = on_written
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

    def _record(self, source: str, text: str, line_number: int, ts: str, partial: bool) -> bytes:
        return encode_line(
            self.task_id,
            self.next_seq,
            ts,
            source,
            determine_level(text),
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
        payloads: list[bytes] = []
        kept: list[tuple[Line | Block, int]] = []
        # Bytes the payloads take in the spool, counted as frames of their own
        # (a run frame takes less: what is checked against the budget is never short).
        size = 0
        closing: Gap | None = None
        dropped: list[tuple[Line | Block, int]] = []
        items = list(lines)
        i = 0
        while i < len(items):
            item, number = items[i]
            if isinstance(item, Block):
                if self._gap is None or closing is not None:
                    block = encoder.encode_block(self.next_seq, item, number)
                    block_size = sum(map(len, block)) + len(block) * frame(0)
                    if self._fits(size + block_size):
                        payloads += block
                        kept.append((item, number))
                        self.next_seq += len(block)
                        size += block_size
                        i += 1
                        continue
                # A gap to close first, or not all of it fits: line by line.
                items[i : i + 1] = [(line, number + k) for k, line in enumerate(item.texts())]
                continue
            line = item
            text = line.text
            level = determine_level(text)
            payload = encoder.encode(self.next_seq, level, text, number, line.partial)
            if self._gap is not None and closing is None:
                # Room again (and some to spare): the gap record goes first,
                # where the gap is.
                gap_payload = self._gap_payload(self._gap, self.next_seq)
                payload = encoder.encode(self.next_seq + 1, level, text, number, line.partial)
                if not self._fits(frame(len(gap_payload)) + frame(len(payload)) + self._resume_room):
                    dropped = items[i:]
                    break
                closing = self._gap
                payloads.append(gap_payload)
                self.next_seq += 1
                size += frame(len(gap_payload))
            elif not self._fits(size + frame(len(payload))):
                # The rest of this read goes too: a gap is one run of lines.
                dropped = items[i:]
                break
            payloads.append(payload)
            kept.append((line, number))
            self.next_seq += 1
            size += frame(len(payload))
            i += 1
        reason = SPOOL_FULL
        if not self._append(first, payloads):
            dropped = kept + dropped
            closing = None
            reason = SPOOL_ERROR
        elif closing is not None:
            self.agent_lines += 1
            self._gap = None
            self.say(f"{closing.message()}; the spool has room again")
        if dropped:
            self._drop(source, dropped, ts, reason)

    def write_agent(self, text: str, ts: str | None = None) -> None:
        """An `agent`-source record (always written, even past the spool budget)."""
        self.agent_lines += 1
        payload = self._record("agent", text, self.agent_lines, ts or now_ts(), False)
        self.next_seq += 1
        self._append(self.next_seq - 1, [payload])

    def _append(self, first: int, payloads: list[bytes]) -> bool:
        if not payloads:
            return True
        try:
            self.spool.append_run(first, payloads)
        except OSError as exc:
            # The disk is full or failing: the command must not stop for that.
            # These seqs were not used; the drop is counted like a full spool.
            self.next_seq = first
            self._write_error = f"cannot write to the spool in {self.spool.dir}: {exc}"
            return False
        self.written += len(payloads)
        self.on_written(len(payloads))
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
