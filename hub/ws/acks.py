"""What a connection owes a producer about its writes, without I/O.

Acks are coalesced per (task, producer): only the highest seq is sent, so
they are bounded and never dropped, whatever the outbox holds. An ack never
reaches past a record of this connection that was refused (SEQ_CONFLICT caps
that identity for good). STORE_ERROR is coalesced like an ack; the other
answers (SEQ_CONFLICT, SEQ_GAP, a run's stored status) are a few per write in
flight. The sender takes them with `next_frame`, before its next queued frame:
every ack the connection owes goes out in one burst, after one sync (hub/messages.py
`Written`), never one per request.

Replies count against the connection's byte bound like the frames in its
outbox (hub/ws/queues.py): errors and answers as measured, each coalesced ack
at the most one can take. Before a write goes to the writer its connection
holds `WRITE_REPLY_BYTES` of room for its answers, so a client that never reads
them stops being read once they fill the bound (hub/ws/connection.py).
"""

from __future__ import annotations

import sys

import attrs

from hub.messages import WriteOutcome
from hub.store.base import hub_made
from keruta.frames import AckFrame, ErrorFrame, StatusFrame
from keruta.limits import INT64_MAX
from keruta.wire import dumps

Key = tuple[str, str]  # (task_id, producer); "" is the anonymous producer

# The most one coalesced ack holds (a 128-character task id, a 64-character producer).
ACK_BYTES = sys.getsizeof(dumps(AckFrame("t" * 128, INT64_MAX, "p" * 64, INT64_MAX)))
# Room held for one write's replies until its commit: a frame names one task
# and one producer, so at most a SEQ_CONFLICT, a SEQ_GAP (each under 0.5 KiB
# with the longest names) or the run's status, and one new ack.
WRITE_REPLY_BYTES = 2048
# An ack names the hub's backlog only past this many bytes: the hub is then
# behind by more than a commit's worth of small frames, and a producer should
# batch (agent/link/batcher.py); below it acks stay as they were.
BEHIND_BYTES = 256 * 1024


@attrs.define
class Replies:
    # (task_id, producer) -> the producer's own seq to acknowledge.
    acks: dict[Key, int] = attrs.field(factory=dict)
    # Acks never reach past a record this connection sent that was refused.
    caps: dict[Key, int] = attrs.field(factory=dict)
    # Error frames about this connection's writes, one per code.
    errors: dict[str, str] = attrs.field(factory=dict)
    # Frames answering single writes, in order, and the bytes they hold.
    answers: list[str] = attrs.field(factory=list)
    answer_bytes: int = 0

    @property
    def bytes(self) -> int:
        """What the replies hold against the connection's byte bound."""
        return self.answer_bytes + sum(map(sys.getsizeof, self.errors.values())) + len(self.acks) * ACK_BYTES

    def on_written(self, outcome: WriteOutcome) -> bool:
        """Takes a write's outcome (after its commit); True when there is something to send."""
        if outcome.error is not None:
            self.errors["STORE_ERROR"] = dumps(ErrorFrame("STORE_ERROR", "the hub could not store the records; resend them"))
            return True
        for refusal in outcome.refusals:
            self._answer(dumps(ErrorFrame(refusal.code, refusal.message, refusal.resume_from)))
            if refusal.key is not None:
                self.caps[refusal.key] = min(self.caps.get(refusal.key, refusal.cap), refusal.cap)
        for key, seq in outcome.producers.items():
            if hub_made(key[1]):
                # The hub numbered these records (a `log` frame without seq):
                # its own producer is no coordinate of the client's.
                continue
            seq = min(seq, self.caps.get(key, seq))
            if seq > self.acks.get(key, 0):
                self.acks[key] = seq
        if outcome.task is not None and outcome.run_state is not None:
            # The run's own state, to that run: how an agent knows its final
            # status is stored. After the ack its records are owed (committed
            # before it), which would otherwise wait behind the answers.
            producer, state, code = outcome.run_state
            task_id = outcome.task.task_id
            owed = self.acks.pop((task_id, producer), None)
            if owed is not None:
                self._answer(dumps(AckFrame(task_id, owed, producer or None)))
            self._answer(dumps(StatusFrame(task_id, state, code, producer)))
        return bool(outcome.producers or self.answers)

    def _answer(self, payload: str) -> None:
        self.answers.append(payload)
        self.answer_bytes += sys.getsizeof(payload)

    def abandon(self) -> None:
        """The connection was cut off: its errors and answers will never be sent."""
        self.errors.clear()
        self.answers.clear()
        self.answer_bytes = 0

    def next_frame(self, backlog: int | None = None) -> str | None:
        """Errors first, then answers, then acks: a refusal arrives before the
        ack that stops short of it. Past `BEHIND_BYTES` an ack carries
        `backlog`: how far behind the hub is (bytes of writes it holds, read
        and not yet answered), so a producer can batch while the hub is slow."""
        if self.errors:
            return self.errors.popitem()[1]
        if self.answers:
            payload = self.answers.pop(0)
            self.answer_bytes -= sys.getsizeof(payload)
            return payload
        if self.acks:
            (task_id, producer), seq = self.acks.popitem()
            # The anonymous producer's acks name none, as the seed's clients expect.
            behind = backlog if backlog is not None and backlog >= BEHIND_BYTES else None
            return dumps(AckFrame(task_id, seq, producer or None, behind))
        return None
