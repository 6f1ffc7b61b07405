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
