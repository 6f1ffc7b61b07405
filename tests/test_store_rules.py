"""The batch rules both stores share (hub/store/rules.py), without a database."""

from __future__ import annotations

import pytest

from hub.store.base import FULL, GAP, INSERTED
from hub.store.rules import PENDING, ProducerProgress, TaskProgress, plan_batch, tally
from keruta.limits import INT64_MAX, MAX_SEQ
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



def test_a_task_at_the_last_seq_stores_what_fits_and_refuses_the_rest_without_moving_the_mark():
    # Numbered near MAX_SEQ: room for two of one producer's run of four.
    progress = {"t1": TaskProgress(max_seq=MAX_SEQ - 2, durable_seq=MAX_SEQ - 2)}
    producers = {("t1", ""): ProducerProgress(high=0), ("t1", "~w"): ProducerProgress(high=0)}
    plan = plan_batch([rec(1), rec(2), rec(3), rec(4), rec(1, producer="~w")], progress, producers)
    assert plan.status == [INSERTED, INSERTED, FULL, FULL, FULL]
    assert [r.seq if r else None for r in plan.records] == [MAX_SEQ - 1, MAX_SEQ, None, None, None]
    assert producers[("t1", "")].high == 2, "a refused record is never below the producer's mark"
    assert producers[("t1", "~w")].high == 0


def test_a_task_numbered_past_max_seq_before_it_was_the_hubs_refuses_every_new_record():
    # Schema v2 took a client's seq as the task's: a migrated task may sit at int64's end.
    progress = {"t1": TaskProgress(max_seq=INT64_MAX, durable_seq=INT64_MAX)}
    producers = {("t1", "p"): ProducerProgress(high=0)}
    plan = plan_batch([rec(1, producer="p")], progress, producers)
    assert plan.status == [FULL] and plan.records == [None]
    assert progress["t1"].batch_max == 0
