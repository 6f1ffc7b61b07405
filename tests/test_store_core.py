"""The store algorithms (hub/store/core.py) driven by hand: no database, the
test answers each op itself and checks what was asked."""

from __future__ import annotations

from typing import Any

from hub.store import core
from hub.store.base import LogQuery
from hub.store.pg_dialect import PostgresDialect
from hub.store.rows import LOG_COLUMNS
from hub.store.steps import EXEC, ROW, Dialect, Op, drive_sync

SQLITE = Dialect()
PG = PostgresDialect("auto", notify=True, origin="hubA")


def log_row(seq: int) -> tuple[Any, ...]:
    return ("t1", seq, f"id{seq}", "2026-01-01T00:00:00Z", "stdout", "INFO", "x", None, None, 0, None)


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


def test_templates_become_each_dialects_sql():
    template = "SELECT seq FROM {logs} WHERE task_id = ? AND seq > ?{lock}"
    assert SQLITE.sql(template) == "SELECT seq FROM logs WHERE task_id = ? AND seq > ?"
    assert PG.sql(template) == "SELECT seq FROM keruta_logs WHERE task_id = $1 AND seq > $2 FOR UPDATE"
    assert SQLITE.in_list("seq", [1, 2, 3], "bigint") == ("seq IN (?,?,?)", [1, 2, 3])
    assert PG.in_list("seq", [1, 2, 3], "bigint") == ("seq = ANY(?::bigint[])", [[1, 2, 3]])


def test_where_names_every_filter_in_order():
    query = LogQuery(task_id="t1", source="stderr", start="a", q="x\x00y", after_seq=5)
    sql, params = core.where(SQLITE, query)
    assert sql == "task_id = ? AND source = ? AND ts >= ? AND {contains}(message, ?) > 0 AND seq > ?"
    assert params == ["t1", "stderr", "a", "x\x00y", 5]
    assert core.where(PG, query)[1][3] == "x\ufffdy"  # as PostgreSQL stored the line
    assert core.where(SQLITE, LogQuery(task_id="t1", q="")) == ("task_id = ?", ["t1"])


def test_page_totals_come_from_the_cheapest_place():
    full = [log_row(s) for s in range(1, 11)]
    # No filter: the task row's count.
    asked, page = replay(core.query(SQLITE, LogQuery(task_id="t1", size=10)), [full, (42,)])
    assert "total_logs" in asked[1].sql and page.total_elements == 42
    # A short first page is its own total.
    asked, page = replay(core.query(SQLITE, LogQuery(task_id="t1", level="INFO", size=20)), [full])
    assert len(asked) == 1 and page.total_elements == 10
    # A full page filtered by source and level: the counts table.
    asked, page = replay(core.query(PG, LogQuery(task_id="t1", source="stdout", size=10)), [full, (77,)])
    assert "keruta_counts" in asked[1].sql and asked[1].args == ("t1", "stdout")
    assert page.total_elements == 77
    # Anything else: count the rows.
    asked, page = replay(core.query(SQLITE, LogQuery(task_id="t1", q="x", size=10)), [full, (13,)])
    assert asked[1].sql.startswith("SELECT count(*) FROM logs") and page.total_elements == 13
    assert [r.seq for r in page.content] == list(range(1, 11))


def test_delete_of_an_unknown_task_stops_at_its_row():
    asked, result = replay(core.delete_chunk(PG, "nope", None), [None])
    assert result == (0, False)
    assert asked == [Op(ROW, "SELECT 1 FROM keruta_tasks WHERE task_id = $1 FOR UPDATE", ("nope",))]


def test_a_state_change_is_announced_only_where_hubs_listen():
    task_row = ("t1", "running", None, None, None, 0, 0, "now")
    answers = [None, ("pending", None, 0), None, task_row]
    asked, info = replay(core.set_state(PG, "t1", "running", None, None), [*answers, None])
    assert info.state == "running"
    assert asked[-1].kind == EXEC and asked[-1].args == ("keruta_durable", f"t1 {core.STATUS_NOTICE} hubA")
    asked, _ = replay(core.set_state(SQLITE, "t1", "running", None, None), answers)
    assert "pg_notify" not in " ".join(op.sql for op in asked)


def test_log_rows_have_eleven_columns():
    assert len(LOG_COLUMNS) == len(log_row(1)) == 11
