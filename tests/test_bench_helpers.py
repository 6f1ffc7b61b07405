"""The benchmark suite's pure helpers (bench/common.py): no processes, no timing.

Keeps bench/ importable and its arithmetic right; the figures themselves come
from `tox -e bench`, never from the test suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import common  # noqa: E402


def test_percentile_nearest_rank() -> None:
    vals = list(range(100, 0, -1))  # 1..100, unsorted
    assert common.percentile(vals, 50) == 50
    assert common.percentile(vals, 99) == 99
    assert common.percentile(vals, 100) == 100
    assert common.percentile(vals, 0) == 1
    assert common.percentile([7.0], 99) == 7.0
    assert common.percentile([], 50) is None
    with pytest.raises(ValueError):
        common.percentile([1], 101)


def test_median_skips_missing_values() -> None:
    assert common.median([3, 1, 2]) == 2
    assert common.median([4, 1, 2, 3]) == 2.5
    assert common.median([None, 5, None]) == 5
    assert common.median([None]) is None
    assert common.median([]) is None


def test_rate_counts_intervals_between_first_and_last() -> None:
    assert common.rate(11, 0.0, 1.0) == 10.0
    assert common.rate(1, 0.0, 1.0) is None
    assert common.rate(10, 1.0, 1.0) is None
    assert common.rate(10, None, 1.0) is None
    assert common.ratio(3.0, 2.0) == 1.5
    assert common.ratio(None, 2.0) is None
    assert common.ratio(1.0, 0) is None


def test_check_delivery_reports_loss_duplicates_and_gaps() -> None:
    assert common.check_delivery([10, 10], 10) is None
    problem = common.check_delivery([10, 7, 9], 10, dups=2, gaps=1)
    assert problem is not None
    assert "2/3 viewers short, lost 4 lines" in problem
    assert "2 duplicate" in problem
    assert "1 seqs missing" in problem


def test_figure_json_and_table() -> None:
    ok = common.figure("e2e", 12345.6, "lines/s", {"lines": 100}, date="D", commit="abc")
    gone = common.figure(
        "pg", None, "lines/s", {"lines": 100}, missing="no PostgreSQL", date="D", commit="abc"
    )
    line = json.loads(common.json_line(ok))
    assert line == {
        "name": "e2e",
        "value": 12345.6,
        "unit": "lines/s",
        "parameters": {"lines": 100},
        "date": "D",
        "commit": "abc",
    }
    assert json.loads(common.json_line(gone))["missing"] == "no PostgreSQL"
    table = common.format_table(
        [ok, gone, common.figure("lat", 0.456, "ms", {}), common.figure("r", 1.5, "x", {})]
    )
    rows = table.splitlines()
    assert rows[0].startswith("| figure | value | unit |")
    assert "| e2e | 12,346 | lines/s | lines=100 |" in rows
    assert "| pg | missing | lines/s | MISSING: no PostgreSQL; lines=100 |" in rows
    assert "| lat | 0.46 | ms |  |" in rows
    assert "| r | 1.50x | x |  |" in rows


def test_table_cells_cannot_break_columns() -> None:
    table = common.format_table([common.figure("a|b", 1.0, "MiB", {"k": "x|y"})])
    assert table.splitlines()[-1] == "| a/b | 1.0 | MiB | k=x/y |"


import targets  # noqa: E402


def _fig(key: str, value: float | None, unit: str, **params: object) -> dict[str, object]:
    return common.figure(
        key, value, unit, dict(params), missing="why" if value is None else None, key=key
    )


def _row(table: str, label: str) -> list[str]:
    (line,) = [r for r in table.splitlines() if r.startswith(f"| {label} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_every_issue_17_target_has_one_row() -> None:
    keys = [t.key for t in targets.targets()]
    assert len(keys) == len(set(keys))
    # 5 append/e2e, 2 disk, 2 latency, 2 sizes x 2 stores x (5 queries + raw), 2 CI, 2 fan-out,
    # and what sections and verification cost
    assert len(keys) == 5 + 2 + 2 + 24 + 2 + 2 + 2
    table = targets.targets_table([])
    assert table.count("| not measured |") == len(keys)


def test_targets_table_judges_direction_size_and_missing() -> None:
    figs = [
        _fig("append.sqlite", 600_000, "rows/s"),
        _fig("append.pg", 15_600, "rows/s"),
        _fig("disk.sqlite.small", 24.5, "bytes/line", rows=1_000_000),
        _fig("disk.pg.small", 20.0, "bytes/line", rows=200_000),
        _fig(targets.query_key("sqlite", "small", "q", "store"), 301.0, "ms", rows=1_000_000),
        _fig(targets.query_key("sqlite", "small", "q", "rest"), 250.0, "ms", rows=1_000_000),
        _fig("e2e.pg", None, "lines/s"),
        _fig("ci.hub_down_ratio", 1.2, "x"),
    ]
    table = targets.targets_table(figs)
    assert _row(table, "store.append alone, SQLite")[1:] == [
        "≥ 500,000 rows/s",
        "600,000 rows/s",
        "pass",
    ]
    assert _row(table, "store.append alone, PostgreSQL")[3] == "FAIL"
    assert _row(table, "disk per 80-byte line, SQLite")[2:] == ["24.5 bytes/line", "pass"]
    # measured on another size than the target's: shown, and marked
    assert _row(table, "disk per 80-byte line, PostgreSQL")[2:] == [
        "20.0 bytes/line (on 200,000 lines)",
        "pass*",
    ]
    q = _row(table, "SQLite, 1M-line task: q for a rare term (needle), first page")
    assert q[1:] == ["≤ 300 ms", "301 ms (REST: 250 ms)", "FAIL"]
    assert _row(table, "end to end, persisted, 1 viewer, PostgreSQL")[3] == "not measured: why"
    # the goal itself passes (≤ 1.2x)
    hub_down = next(t for t in targets.targets() if t.key == "ci.hub_down_ratio")
    assert _row(table, hub_down.label)[3] == "pass"


def test_ci_figures_from_ci_step_json() -> None:
    figs = {
        key: value
        for _, value, _, key in targets.ci_figures(
            {"bare_s": 1.0, "hub_down_s": 1.1, "hub_up_s": 7.0, "lines": 1_500_000}
        )
    }
    assert figs["ci.hub_down_ratio"] == 1.1
    assert figs["ci.hub_up_bare_ratio"] == 7.0
    assert figs["ci.hub_up_ratio"] == 7.0 / (1.0 + 10.0)
    assert round(figs["ci.hub_down_rate"] or 0) == round(1_500_000 / 1.1)
    empty = targets.ci_figures({"bare_s": 0, "lines": True})
    assert all(value is None for _, value, _, key in empty if key != "ci.bare_s")


def test_every_target_reads_a_figure_the_bench_makes() -> None:
    import stores

    made = {key for _, _, _, key in targets.ci_figures({})}
    for store, label in targets.STORES:
        for slot, rows in targets.SLOTS.items():
            made |= {key for key, _, _ in stores.store_figures(store, label, slot, rows)}
    # the keys run.py gives its figures (e2e, latency, fan-out)
    run_py = (Path(__file__).resolve().parent.parent / "bench" / "run.py").read_text()
    for key in ("e2e.{store}", "e2e.ratio.{store}", "lat.{who}.p{q}", "fanout.ratio.{viewers}"):
        assert f'key=f"{key}"' in run_py
    made |= {f"e2e.{s}" for s, _ in targets.STORES} | {f"e2e.ratio.{s}" for s, _ in targets.STORES}
    made |= {"lat.keruta.p50", "lat.keruta.p99", "fanout.ratio.10", "fanout.ratio.100"}
    # the features scenario's
    assert 'key="features.sections_cost"' in run_py and 'key="features.verify_cost"' in run_py
    made |= {"features.sections_cost", "features.verify_cost"}
    assert {t.key for t in targets.targets()} <= made
    assert {t.alt for t in targets.targets() if t.alt} <= made


def test_a_figure_with_lost_or_cut_lines_never_passes() -> None:
    t = next(t for t in targets.targets() if t.key == "e2e.sqlite")
    fast = _fig("e2e.sqlite", 200_000, "lines/s", delivery="1/1 viewers short, lost 5 lines")
    assert targets.judge(t, fast) == "FAIL (1/1 viewers short, lost 5 lines)"
    assert targets.judge(t, _fig("e2e.sqlite", 200_000, "lines/s", delivery="ok")) == "pass"
