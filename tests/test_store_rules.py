"""The batch rules both stores share (hub/store/rules.py), without a database."""

from __future__ import annotations

import pytest

from hub.store.base import GAP, INSERTED
from hub.store.rules import PENDING, ProducerProgress, TaskProgress, plan_batch, tally
from keruta.records import InvalidField
from tests.storedata import rec


def test_plan_batch_gives_the_next_task_seqs_and_finds_what_may_be_stored():
    progress = {
        "t1": TaskProgress(max_seq=5, durable_seq=5),
        "t2": TaskProgress(max_seq=0, durable_seq=0),
    }
    producers = {
        ("t1", ""): ProducerProgress(high=3),
        ("t1", "p"): ProducerProgress(high=0),
        ("t2", ""): ProducerProgress(high=0),
    }
    items = [rec(4), rec(2), rec(1, task="t2"), rec(1, producer="p"), rec(7), rec(4)]
    plan = plan_batch(items, progress, producers)
    # New records take the task's next seqs in order, whatever their own seq.
    assert [(r.task_id, r.seq) if r else None for r in plan.records] == [
        ("t1", 6),
        None,
        ("t2", 1),
        ("t1", 7),
        None,
        None,
    ]
    # 2 was sent before (looked up); 7 is past a gap; the second 4 too, for now.
    assert plan.status == [INSERTED, PENDING, INSERTED, INSERTED, GAP, PENDING]
    assert plan.lookups == [1, 5]
    tally(plan.inserted(), progress)  # what the insert reported stored
    assert progress["t1"].durable_after_batch() == 7
    assert producers[("t1", "")].high == 4 and producers[("t1", "")].new_ranges == [[4, 4, 6]]


def test_a_hub_made_producer_may_skip_but_never_goes_back():
    progress = {"t1": TaskProgress(max_seq=0, durable_seq=0)}
    producers = {("t1", "~w"): ProducerProgress(high=3)}
    plan = plan_batch([rec(7, producer="~w"), rec(9, producer="~w")], progress, producers)
    assert plan.status == [INSERTED, INSERTED]
    assert producers[("t1", "~w")].new_ranges == [[7, 7, 1], [9, 9, 2]]


def test_a_producer_seq_below_one_is_refused():
    progress = {"t1": TaskProgress(max_seq=0, durable_seq=0)}
    with pytest.raises(InvalidField):
        plan_batch([rec(0)], progress, {("t1", ""): ProducerProgress(high=0)})

