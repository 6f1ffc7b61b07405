"""The hub's hand-written hot paths agree with the general code they shortcut.

Decoding a `logs` frame, encoding live frames and computing record ids each
have a fast version; these tests hold them to the slower, obvious
one on many random inputs, errors included.
"""

from __future__ import annotations

import copy
import random
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import orjson
import pytest

from hub.actors.broadcaster import Broadcaster
from hub.store.base import _ID_NAMESPACE, record_id, with_ids
from hub.ws import subscriber_frames
from hub.ws.subscription import Outgoing, Subscription
from keruta import wire
from keruta.frames import FrameError, LogsFrame
from keruta.limits import DEFAULT_LIMITS, Limits
from keruta.records import LogRecord
from keruta.wire import decode_client_frame, dumps, logs_frame_text

VALUES: list[Any] = [
    None, 0, 1, -1, 2**53 - 1, 2**53, 2**63, 1.5, True, False, "", "x", "t1", "..", "INFO", "stdout",
    "agent", "WARN", [], {}, {"a": 1}, {"a": "{[{["}, {"a": [[1]], "b": {"c": {}}}, {"k": "x" * 20},
    [[[[]]]], {"a": {"b": {"c": {"d": {"e": {}}}}}}, "2026-11-28T12:00:00.000000Z", "x" * 3000,
    "é" * 1000, "\u0000" * 10,
]
KEYS = ["taskId", "seq", "timestamp", "source", "level", "message", "lineNumber", "metadata", "partial", "id", "extra"]
SMALL = attrs.evolve(DEFAULT_LIMITS, max_line_bytes=100, max_metadata_bytes=10, max_metadata_depth=3)


def by_converter(text: str, limits: Limits) -> Any:
    """decode_client_frame without keruta.recordjson's reader."""
    cls, data = wire.client_frame_data(text, limits)
    assert cls is LogsFrame
    return wire.logs_frame_by_converter(data, limits)


def decoded(text: str, limits: Limits, decode: Any = decode_client_frame) -> tuple[Any, ...]:
    try:
        return ("ok", decode(text, limits))
    except FrameError as exc:
        return ("error", exc.code, exc.message, exc.field)


def frames(rnd: random.Random, count: int) -> Iterator[str]:
    for _ in range(count):
        records = [
            {
                "taskId": "t1", "seq": i + 1, "timestamp": "2026-11-28T12:00:00.000000Z", "source": "stdout",
                "level": "INFO", "message": f"m{i}", "lineNumber": i, "metadata": {},
            }
            for i in range(rnd.randint(0, 4))
        ]
        frame: dict[str, Any] = {"type": "logs", "taskId": "t1", "producer": "p1", "records": records}
        for _ in range(rnd.randint(0, 3)):
            roll = rnd.random()
            if records and roll < 0.6:
                record = rnd.choice(records)
                if not isinstance(record, dict):
                    continue
                key = rnd.choice(KEYS)
                if rnd.random() < 0.2:
                    record.pop(key, None)
                else:
                    record[key] = copy.deepcopy(rnd.choice(VALUES))
            elif roll < 0.8:
                key = rnd.choice(["taskId", "producer", "records"])
                if rnd.random() < 0.2:
                    frame.pop(key, None)
                else:
                    frame[key] = copy.deepcopy(rnd.choice([*VALUES, "p:1"]))
            elif records:
                records[rnd.randrange(len(records))] = copy.deepcopy(rnd.choice(VALUES))
        yield orjson.dumps(frame).decode()


@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, SMALL], ids=["default", "small"])
def test_fast_logs_decode_matches_the_converter(limits: Limits) -> None:
    texts = list(frames(random.Random(8), 3000))
    fast = [decoded(t, limits) for t in texts]
    general = [decoded(t, limits, by_converter) for t in texts]
    assert fast == general
    assert any(r[0] == "ok" and r[1].records for r in fast) and any(r[0] == "error" for r in fast)


def test_live_frames_match_the_converter_and_split_the_same() -> None:
    rnd = random.Random(8)
    messages = ["", "x", 'é\u2028\x00"\\', "\U0001f600" * 3, "y" * 5000, "\x01" * 40000]

    def general(records: list[LogRecord], through: int) -> Iterator[tuple[str, int]]:
        # encode_chunks the obvious way: every record measured, the frame by the converter.
        start = 0
        while start < len(records):
            end, size = start, 0
            while end < len(records) and end - start < subscriber_frames.FRAME_RECORDS:
                cost = subscriber_frames.encoded_size(records[end])
                if end > start and size + cost > subscriber_frames.FRAME_BYTES:
                    break
                size += cost
                end += 1
            yield dumps(LogsFrame("t1", records[start:end])), records[end - 1].seq if end < len(records) else through
            start = end

    for _ in range(60):
        records = [
            LogRecord(
                "t1", i + 1, "2026-11-28T12:00:00.000000Z", rnd.choice(["stdout", "agent"]), "INFO",
                rnd.choice(messages), rnd.choice([None, 0, 5]), rnd.choice([{}, {"a": [1, "é"]}]),
                rnd.choice([False, True]), rnd.choice([None, "id-1"]),
            )
            for i in range(rnd.randint(0, 30))
        ]
        assert logs_frame_text("t1", records) == dumps(LogsFrame("t1", records))
        many = records * rnd.randint(1, 10)
        assert list(subscriber_frames.encode_chunks("t1", many, 10**6)) == list(general(many, 10**6))
    small = [LogRecord("t1", i, "2026-11-28T12:00:00.000000Z", "stdout", "INFO", f"m{i}") for i in range(1, 1201)]
    assert list(subscriber_frames.encode_chunks("t1", small, 1300)) == list(general(small, 1300))


def test_record_id_is_uuid5_of_task_and_seq() -> None:
    rnd = random.Random(8)
    tasks = ["t1", "a", "x" * 128, "A.b:c-d_9", *(f"task-{rnd.random()}" for _ in range(20))]
    for task in tasks:
        for seq in [*range(1, 300), 2**53 - 1, 2**63 - 1, rnd.randrange(1, 2**63)]:
            assert record_id(task, seq) == str(uuid.uuid5(_ID_NAMESPACE, f"{task}\x00{seq}"))


def _live_sub(cursor: int, offered: list[Outgoing], source: str | None = None) -> Subscription:
    sub = Subscription("t1", source, None, cursor=cursor, offer=lambda o: offered.append(o) or True)
    sub.live = True
    return sub


def _records(seqs: range) -> list[LogRecord]:
    return [
        LogRecord("t1", s, "2026-11-28T12:00:00.000000Z", "stderr" if s % 2 else "stdout", "INFO", f"m{s}")
        for s in seqs
    ]


async def test_first_commit_published_for_a_task_goes_live_when_it_holds_all_past_the_cursor() -> None:
    hub = Broadcaster()
    offered: list[Outgoing] = []
    filtered: list[Outgoing] = []
    sub, stderr_only = _live_sub(2, offered), _live_sub(2, filtered, "stderr")
    hub.add(sub)
    hub.add(stderr_only)
    hub.publish_records(_records(range(3, 6)), {"t1": 5})
    assert sub.live and stderr_only.live and sub.cursor == stderr_only.cursor == 5
    # An append's records have no ids yet: a live frame's do (AppendResult).
    shown = _records(range(3, 6))
    with_ids(shown)
    assert [(orjson.loads(o.payload)["records"], o.through) for o in offered] == [
        ([wire.record_to_wire(r) for r in shown], 5)
    ]
    assert [r["id"] for r in orjson.loads(offered[0].payload)["records"]] == [record_id("t1", s) for s in range(3, 6)]
    assert [[r["seq"] for r in orjson.loads(o.payload)["records"]] for o in filtered] == [[3, 5]]
    # The next commit takes the usual way, from the watermark just set.
    hub.publish_records(_records(range(6, 8)), {"t1": 7})
    assert [[r["seq"] for r in orjson.loads(o.payload)["records"]] for o in offered[1:]] == [[6, 7]]


async def test_first_commit_published_for_a_task_sends_a_subscriber_missing_records_to_the_store() -> None:
    hub = Broadcaster()
    offered: list[Outgoing] = []
    behind, ahead = _live_sub(1, offered), _live_sub(9, offered)
    hub.add(behind)
    hub.add(ahead)
    # Seq 2 was committed before anyone subscribed; this commit does not hold it.
    hub.publish_records(_records(range(3, 6)), {"t1": 5})
    assert not behind.live and behind.cursor == 1
    assert ahead.live and ahead.cursor == 9
    assert offered == []


def test_a_trusted_run_is_the_records_the_validators_make() -> None:
    """The store's loop that builds a producer's run of records sets every
    field a record has (a field added to LogRecord and forgotten there fails
    here), to what the validating constructor makes."""
    from hub.store.base import Incoming
    from keruta.records import trusted_run

    items = [
        Incoming("t-1", 7 + k, "2026-12-07T10:00:00.000000Z", ("stdout", "stderr")[k % 2], ("INFO", "ERROR")[k % 2],
                 f"line {k}", k or None, {"k": k} if k == 2 else {}, k == 3, "agent-1", "section_start" if k == 1 else None)
        for k in range(4)
    ]
    made = trusted_run("t-1", 40, items, "agent-1")
    want = [
        LogRecord(i.task_id, 40 + k, i.timestamp, i.source, i.level, i.message, i.line_number, i.metadata,
                  i.partial, None, i.kind, "agent-1")
        for k, i in enumerate(items)
    ]
    assert made == want  # a slot left unset: AttributeError
