"""Issue 17's targets and the table that checks one bench run against them (pure: no I/O).

Every figure a target reads carries a `key` (common.figure); a target names
the key, the direction and the goal. Query and disk targets are defined on a
task of a given size (1,000,000 or 10,000,000 lines): a figure measured on
another size (`--rows`, or the quick run without the 10M task) is still shown,
marked with the size it was measured on, and its result gets an asterisk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common import format_value

SMALL = 1_000_000  # the "1,000,000-line task" of the targets
BIG = 10_000_000  # the "10,000,000-line task"
# The end-to-end rate the CI-step target allows for delivery: "bare time plus
# lines ÷ the end-to-end rate above" (the SQLite end-to-end target).
CI_E2E_RATE = 150_000

STORES = (("sqlite", "SQLite"), ("pg", "PostgreSQL"))
# slot -> the task size the targets for that slot are written for
SLOTS = {"small": SMALL, "big": BIG}
# (query id, label, goal on the 1M task, goal on the 10M task), in ms
QUERIES = (
    ("after_seq", "page of 100 by afterSeq (middle)", 5.0, 10.0),
    ("level", "first page by level=ERROR", 20.0, 50.0),
    ("source", "first page by source=stderr", 20.0, 50.0),
    ("stats", "stats", 5.0, 5.0),
    ("q", "q for a rare term (needle), first page", 300.0, 3000.0),
)
RAW_GOAL_MB_S = 100.0


@dataclass(frozen=True)
class Target:
    label: str
    key: str  # the figure measured against the goal
    op: str  # ">=" or "<="
    goal: float
    unit: str
    rows: int | None = None  # the task size the goal is written for
    alt: str | None = None  # a second figure shown beside it (not judged)
    alt_label: str = ""


def query_key(store: str, slot: str, query: str, via: str) -> str:
    """via: "store" (the Store interface) or "rest" (the hub's REST API)."""
    return f"query.{store}.{slot}.{query}.{via}"


def raw_key(store: str, slot: str, via: str) -> str:
    """via: "rest" (GET .../logs/raw) or "iter" (store.iter_task, joined as raw_logs does)."""
    return f"raw.{store}.{slot}.{via}"


def targets() -> list[Target]:
    t: list[Target] = [
        Target("store.append alone, SQLite", "append.sqlite", ">=", 500_000, "rows/s"),
        Target("store.append alone, PostgreSQL", "append.pg", ">=", 300_000, "rows/s"),
        Target("end to end, persisted, 1 viewer, SQLite", "e2e.sqlite", ">=", 150_000, "lines/s"),
        Target("end to end SQLite / websocketd, same run", "e2e.ratio.sqlite", ">=", 1.0, "x"),
        Target("end to end, persisted, 1 viewer, PostgreSQL", "e2e.pg", ">=", 120_000, "lines/s"),
    ]
    for store, name in STORES:
        t.append(
            Target(
                f"disk per 80-byte line, {name}",
                f"disk.{store}.small",
                "<=",
                25,
                "bytes/line",
                rows=SMALL,
            )
        )
    t += [
        Target("latency p50 at 100 lines/s", "lat.keruta.p50", "<=", 1.0, "ms"),
        Target("latency p99 at 100 lines/s", "lat.keruta.p99", "<=", 3.0, "ms"),
    ]
    for slot, rows in SLOTS.items():
        size = "1M" if slot == "small" else "10M"
        for store, name in STORES:
            for qid, label, small_goal, big_goal in QUERIES:
                t.append(
                    Target(
                        f"{name}, {size}-line task: {label}",
                        query_key(store, slot, qid, "store"),
                        "<=",
                        small_goal if slot == "small" else big_goal,
                        "ms",
                        rows=rows,
                        alt=query_key(store, slot, qid, "rest"),
                        alt_label="REST",
                    )
                )
            t.append(
                Target(
                    f"{name}, {size}-line task: raw download",
                    raw_key(store, slot, "rest"),
                    ">=",
                    RAW_GOAL_MB_S,
                    "MB/s",
                    rows=rows,
                    alt=raw_key(store, slot, "iter"),
                    alt_label="store.iter_task",
                )
            )
    t += [
        Target(
            "CI step, hub down: run time / bare time (agent never holds the command back)",
            "ci.hub_down_ratio",
            "<=",
            1.2,
            "x",
        ),
        Target(
            f"CI step, hub up: run time / (bare + lines ÷ {CI_E2E_RATE:,})",
            "ci.hub_up_ratio",
            "<=",
            1.0,
            "x",
        ),
        Target("fan-out, 10 viewers, keruta / websocketd", "fanout.ratio.10", ">=", 1.0, "x"),
        Target("fan-out, 100 viewers, keruta / websocketd", "fanout.ratio.100", ">=", 1.5, "x"),
        Target("sections: end-to-end CPU cost (a group every 1,000 lines)", "features.sections_cost", "<=", 5.0, "%"),
        Target("verification: the agent's digest, share of end-to-end CPU", "features.verify_cost", "<=", 5.0, "%"),
    ]
    return t


def judge(target: Target, fig: dict[str, Any] | None) -> str:
    """pass / FAIL / not measured (why); an asterisk when measured on another task size;
    FAIL whenever the figure's delivery check found lines lost, doubled or cut."""
    if fig is None:
        return "not measured"
    value = fig.get("value")
    if value is None:
        return "not measured: " + str(fig.get("missing", "?"))
    ok = value >= target.goal if target.op == ">=" else value <= target.goal
    res = "pass" if ok else "FAIL"
    delivery = fig.get("parameters", {}).get("delivery", "ok")
    if delivery != "ok":  # lost, doubled or cut lines: not a pass, whatever the speed
        res = f"FAIL ({delivery})"
    if target.rows is not None and fig.get("parameters", {}).get("rows") != target.rows:
        res += "*"
    return res


def _with_unit(value: float, unit: str, goal: bool = False) -> str:
    if unit == "x":
        return f"{value:.2f}×"
    if goal and value == int(value):
        return f"{value:,.0f} {unit}"  # "≤ 300 ms", not "≤ 300.00 ms"
    return f"{format_value(value, unit)} {unit}"


def _measured(target: Target, fig: dict[str, Any] | None, alt: dict[str, Any] | None) -> str:
    if fig is None or fig.get("value") is None:
        text = "—"
    else:
        text = _with_unit(fig["value"], fig["unit"])
        rows = fig.get("parameters", {}).get("rows")
        if target.rows is not None and rows != target.rows:
            text += f" (on {rows:,} lines)" if isinstance(rows, int) else " (other size)"
    if alt is not None and alt.get("value") is not None:
        text += f" ({target.alt_label}: {_with_unit(alt['value'], alt['unit'])})"
    return text


def targets_table(figs: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of every target: goal, measured value, result."""
    by_key = {f["key"]: f for f in figs if f.get("key")}
    rows = [
        "| target (issue 17) | goal | measured | result |",
        "|---|---|---|---|",
    ]
    for t in targets():
        fig = by_key.get(t.key)
        alt = by_key.get(t.alt) if t.alt else None
        goal = ("≥ " if t.op == ">=" else "≤ ") + _with_unit(t.goal, t.unit, goal=True)
        cells = [t.label, goal, _measured(t, fig, alt), judge(t, fig)]
        rows.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(rows)


def ci_figures(res: dict[str, Any]) -> list[tuple[str, float | None, str, str | None]]:
    """(name, value, unit, key) of the CI-step scenario from bench/ci_step.py's JSON
    {bare_s, hub_down_s, hub_up_s, lines}; a value is None when an input is missing."""

    def num(k: str) -> float | None:
        v = res.get(k)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    bare, down, up, lines = num("bare_s"), num("hub_down_s"), num("hub_up_s"), num("lines")

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    allowance = bare + lines / CI_E2E_RATE if bare is not None and lines is not None else None
    return [
        ("CI step: the command bare", bare, "s", "ci.bare_s"),
        ("CI step: `keruta-agent run`, hub down", down, "s", "ci.hub_down_s"),
        ("CI step: `keruta-agent run`, hub up (waits for the acks)", up, "s", "ci.hub_up_s"),
        ("CI step: hub down / bare", div(down, bare), "x", "ci.hub_down_ratio"),
        ("CI step: hub up / bare", div(up, bare), "x", "ci.hub_up_bare_ratio"),
        (
            f"CI step: hub up / (bare + lines ÷ {CI_E2E_RATE:,})",
            div(up, allowance),
            "x",
            "ci.hub_up_ratio",
        ),
        ("CI step: lines / hub-down run time", div(lines, down), "lines/s", "ci.hub_down_rate"),
        # the floor under "hub down": the command as the agent runs it, read by a bare CPython loop
        ("CI step: the command read by a bare Python loop (floor)", num("reader_floor_s"), "s", "ci.reader_floor_s"),
        ("CI step: that floor / bare", div(num("reader_floor_s"), bare), "x", "ci.reader_floor_ratio"),
        # a job that does not wait per step: `run --no-wait`, then `flush --wait` at its end
        (
            "CI step: `run --no-wait`, the step alone",
            num("hub_up_no_wait_run_s"),
            "s",
            "ci.no_wait_run_s",
        ),
        (
            "CI step: `run --no-wait` + `flush --wait` at the job's end",
            num("hub_up_no_wait_s"),
            "s",
            "ci.no_wait_s",
        ),
    ]
