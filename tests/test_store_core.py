"""The store algorithms (hub/store/core.py) driven by hand: no database, the
test answers each op itself and checks what was asked."""

from __future__ import annotations

from typing import Any

from hub.store import chunk, core
from hub.store.base import LogQuery
from hub.store.pg_sql import PostgresSql
from hub.store.sqlite_sql import SQLiteSql
from hub.store.steps import EXEC, ROW, Op, drive_sync
from keruta.records import LogRecord

SQLITE = SQLiteSql()
PG = PostgresSql(notify=True, origin="hubA")
TS = "2026-01-01T00:00:00.000000Z"


def records(first: int, last: int, level: str = "INFO", message: str = "x") -> list[LogRecord]:
    return [LogRecord("t1", s, TS, "stdout", level, f"{message} {s}", s) for s in range(first, last + 1)]


def full_row(rs: list[LogRecord]) -> tuple[Any, ...]:
    """A chunk as CHUNK_FULL answers it."""
    return chunk.encode(rs).values()[1:]


def head_row(rs: list[LogRecord]) -> tuple[Any, ...]:
    return full_row(rs)[:6]


def replay(steps: Any, answers: list[Any]) -> tuple[list[Op], Any]:
    """Run `steps`, answering the ops in order; return the ops asked and the result."""
    asked: list[Op] = []
    queue = list(answers)

    def do(op: Op) -> Any:
        asked.append(op)
        return queue.pop(0)

    result = drive_sync(steps, do)
    assert not queue, "the algorithm asked fewer ops than answered"
    return asked, result


def test_page_totals_come_from_the_cheapest_place():
    chunk1 = records(1, 10)
    # No filter: the chunk opened for the page, then the task row's count.
    asked, page = replay(core.query(SQLITE, LogQuery(task_id="t1", size=10)), [[head_row(chunk1)], full_row(chunk1), (42,)])
    assert "total_logs" in asked[2].sql and page.total_elements == 42
    assert [r.seq for r in page.content] == list(range(1, 11))
    # A short first page is its own total.
    asked, page = replay(
        core.query(SQLITE, LogQuery(task_id="t1", level="INFO", size=20)), [[head_row(chunk1)], full_row(chunk1)]
    )
    assert len(asked) == 2 and page.total_elements == 10
    # A full page filtered by source: the counts table.
    asked, page = replay(
        core.query(PG, LogQuery(task_id="t1", source="stdout", size=10)), [[head_row(chunk1)], full_row(chunk1), (77,)]
    )
    assert "keruta_counts" in asked[2].sql and asked[2].args == ("t1", "stdout", None)
    assert page.total_elements == 77
    # A text filter: every chunk read is counted.
    chunk2 = records(11, 20)
    asked, page = replay(
        core.query(SQLITE, LogQuery(task_id="t1", q="x", size=10)), [[full_row(chunk1), full_row(chunk2)]]
    )
    assert page.total_elements == 20 and [r.seq for r in page.content] == list(range(1, 11))


def test_chunks_whose_tally_has_no_match_are_not_opened():
    infos, errors = records(1, 500), records(501, 510, level="ERROR")
    # The first chunk's tally says no ERROR: only the second one is read.
    asked, page = replay(
        core.query(SQLITE, LogQuery(task_id="t1", level="ERROR", size=5)),
        [[head_row(infos), head_row(errors)], full_row(errors), (10,)],
    )
    assert [r.seq for r in page.content] == [501, 502, 503, 504, 505]
    assert asked[1].args == ("t1", 500, 510, 1) and page.total_elements == 10
    # A later page skips whole chunks by their tallies too.
    asked, page = replay(
        core.query(SQLITE, LogQuery(task_id="t1", page=1, size=500)),
        [[head_row(infos), head_row(errors)], full_row(errors), (510,)],
    )
    assert [r.seq for r in page.content] == list(range(501, 511))


def test_a_text_search_opens_only_chunks_holding_the_term():
    plain, rare = records(1, 100), records(101, 102, message="needle")
    asked, page = replay(
        core.query(PG, LogQuery(task_id="t1", q="needle", size=10)), [[full_row(plain), full_row(rare)]]
    )
    assert [r.message for r in page.content] == ["needle 101", "needle 102"] and page.total_elements == 2


def test_after_seq_totals_are_arithmetic_when_the_seqs_run_unbroken():
    rs = records(1, 10)
    asked, page = replay(
        core.query(SQLITE, LogQuery(task_id="t1", after_seq=3, size=2)), [[head_row(rs)], full_row(rs), (10, 1, 10)]
    )
    assert [r.seq for r in page.content] == [4, 5] and page.total_elements == 7


def test_delete_of_an_unknown_task_stops_at_its_row():
    asked, result = replay(core.delete_chunk(PG, "nope", None), [None])
    assert result == (0, False, None)
    assert asked == [Op(ROW, "SELECT 1 FROM keruta_tasks WHERE task_id = $1 FOR UPDATE", ("nope",))]


def test_a_state_change_is_announced_only_where_hubs_listen():
    task_row = ("t1", "running", None, None, None, 0, 0, "now", None)
    answers = [None, ("pending", None, 0), None, task_row]
    asked, info = replay(core.set_state(PG, "t1", "running", None, None), [*answers, None])
    assert info.state == "running"
    assert asked[-1].kind == EXEC and asked[-1].args == ("keruta_durable", f"t1 {core.STATUS_NOTICE} hubA")
    asked, _ = replay(core.set_state(SQLITE, "t1", "running", None, None), answers)
    assert "pg_notify" not in " ".join(op.sql for op in asked)
