"""The batch rules both stores share (hub/store/rules.py), without a database."""

from __future__ import annotations

from hub.store.base import DUPLICATE, INSERTED, record_id
from hub.store.rules import PENDING, TaskProgress, advance, plan_batch
from tests.storedata import rec


def test_plan_batch_assigns_seqs_and_finds_what_may_be_stored():
    progress = {
        "t1": TaskProgress(max_seq=5, durable_seq=3),
        "t2": TaskProgress(max_seq=0, durable_seq=0),
    }
    plan = plan_batch(
        [rec(None), rec(4), rec(None, task="t2"), rec(9), rec(None), rec(4)], progress
    )
    assert [(r.task_id, r.seq) for r in plan.records] == [
        ("t1", 6),
        ("t1", 4),
        ("t2", 1),
        ("t1", 9),
        ("t1", 10),
        ("t1", 4),
    ]
    # 4 may be stored (at or below max_seq): looked up; the second 4 is the same record.
    assert plan.status == [INSERTED, PENDING, INSERTED, INSERTED, INSERTED, DUPLICATE]
    assert plan.lookups == [1]
    assert all(r.id == record_id(r.task_id, r.seq) for r in plan.records)


def test_advance_and_durable_through_batch():
    assert advance(3, [4, 5, 7]) == (5, False)
    assert advance(3, [4, 5]) == (5, True)
    assert advance(3, []) == (3, True)

    def through(durable: int, max_seq: int, inserted: list[int]) -> tuple[int, bool]:
        task = TaskProgress(max_seq=max_seq, durable_seq=durable)
        task.inserted_seqs.extend(inserted)
        return task.durable_through_batch()

    assert through(0, 0, [1, 2, 3]) == (3, False)  # the newest rows: nothing above to look at
    assert through(2, 9, [3, 4]) == (4, True)  # rows up to 9 are stored: look further
    assert through(2, 9, [5, 6]) == (2, False)  # 3 still missing
    assert through(2, 2, [4, 3]) == (4, False)
    assert through(5, 5, [1, 2]) == (5, False)  # re-stored after a delete: no effect
