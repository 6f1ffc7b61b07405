"""What a connection owes a producer about its writes, without I/O.

Acks are coalesced per (task, producer): only the highest seq is sent, so
they are bounded and never dropped, whatever the outbox holds. An ack never
reaches past a record of this connection that was refused (SEQ_CONFLICT caps
that identity for good). STORE_ERROR is coalesced like an ack; the other
answers (SEQ_CONFLICT, SEQ_GAP, a run's stored status) are a few per write in
flight. The sender takes them with `next_frame`, before its next queued frame.
"""

from __future__ import annotations

import attrs

from hub.actors.writer import WriteOutcome
from keruta.wire import AckFrame, ErrorFrame, StatusFrame, dumps

Key = tuple[str, str]  # (task_id, producer); "" is the anonymous producer


@attrs.define
class Replies:
    # (task_id, producer) -> the producer's own seq to acknowledge.
    acks: dict[Key, int] = attrs.field(factory=dict)
    # Acks never reach past a record this connection sent that was refused.
    caps: dict[Key, int] = attrs.field(factory=dict)
    # Error frames about this connection's writes, one per code.
    errors: dict[str, str] = attrs.field(factory=dict)
    # Frames answering single writes, in order.
    answers: list[str] = attrs.field(factory=list)

    def on_written(self, outcome: WriteOutcome) -> bool:
        """Takes a write's outcome (after its commit); True when there is something to send."""
        if outcome.error is not None:
            self.errors["STORE_ERROR"] = dumps(ErrorFrame("STORE_ERROR", "the hub could not store the records; resend them"))
            return True
        for refusal in outcome.refusals:
            self.answers.append(dumps(ErrorFrame(refusal.code, refusal.message, refusal.resume_from)))
            if refusal.key is not None:
                self.caps[refusal.key] = min(self.caps.get(refusal.key, refusal.cap), refusal.cap)
        for key, seq in outcome.producers.items():
            seq = min(seq, self.caps.get(key, seq))
            if seq > self.acks.get(key, 0):
                self.acks[key] = seq
        if outcome.task is not None and outcome.run_state is not None:
            # The run's own state, to that run: how an agent knows its final status is stored.
            producer, state, code = outcome.run_state
            self.answers.append(dumps(StatusFrame(outcome.task.task_id, state, code, producer)))
        return bool(outcome.producers or self.answers)

    def next_frame(self) -> str | None:
        """Errors first, then answers, then acks: a refusal arrives before the
        ack that stops short of it."""
        if self.errors:
            return self.errors.popitem()[1]
        if self.answers:
            return self.answers.pop(0)
        if self.acks:
            (task_id, producer), seq = self.acks.popitem()
            # The anonymous producer's acks name none, as the seed's clients expect.
            return dumps(AckFrame(task_id, seq, producer or None))
        return None
