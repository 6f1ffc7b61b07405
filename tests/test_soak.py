"""The soak (tests/soak.py): agents and REST writers through hub kills, agent
kills and database outages, then every line and every 200 answer checked.

It runs when KERUTA_SOAK_SECONDS says how long: `.ci/run` runs 60 s on each
store, `tox -e soak` 600 s. KERUTA_SOAK_SEED repeats a run's choices. The
checker itself is tested below on stores made wrong on purpose.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import pg_dsn
from tests.soak import SoakConfig, run_soak
from tests.soakcheck import (
    AgentRun,
    RestWriter,
    check_store,
    percentile,
    planned_counts,
    rest_message,
)

SECONDS_ENV, SEED_ENV = "KERUTA_SOAK_SECONDS", "KERUTA_SOAK_SEED"


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get(SECONDS_ENV), reason=f"the soak runs when {SECONDS_ENV} is set (.ci/run: 60, tox -e soak: 600)"
)
async def test_soak(db_url: str, tmp_path: Path) -> None:
    """Once per store (db_url's params); PostgreSQL adds the database refusing connections."""
    seconds = os.environ[SECONDS_ENV]
    seed = int(os.environ.get(SEED_ENV) or random.randrange(1 << 32))
    config = SoakConfig(
        db=db_url,
        workdir=tmp_path,
        seconds=float(seconds),
        seed=seed,
        admin_dsn=None if db_url.startswith("sqlite") else pg_dsn(),
    )
    problems = await run_soak(config)
    assert not problems, f"{len(problems)} problems, the first: {problems[0]} (seed {seed})"


# --- the checker, on stores made wrong on purpose ---------------------------


def printed(run: AgentRun) -> list[tuple[str, str]]:
    """(source, message) of every line the run's COMMAND prints, stream by stream."""
    counts = planned_counts(run.lines, run.seed)
    return [
        (source, f"{run.tag} {stream} {i} ..")
        for stream, source in (("out", "stdout"), ("err", "stderr"))
        for i in range(counts[stream])
    ]


def as_stored(task_id: str, lines: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [
        {"id": f"{task_id}-{n}", "seq": n, "source": source, "message": message}
        for n, (source, message) in enumerate(lines, start=1)
    ]


def world() -> tuple[AgentRun, AgentRun, RestWriter, list[tuple[str, str]]]:
    """A run that ended, a killed one, a REST writer, all on task T; and
    what a faultless hub stores for them, in an order it could have."""
    done = AgentRun("a0.0", "T", lines=40, seed=1, exit_code=0, delivered=True)
    killed = AgentRun("a1.0", "T", lines=40, seed=2, kill_requested=True, exit_code=-9, delivered=True)
    killed.spooled_max = {"out": 10, "err": 0}
    writer = RestWriter("rest-0", "T")
    lines = printed(done)
    lines += [(s, m) for s, m in printed(killed) if int(m.split()[2]) <= 12]  # a prefix per stream
    lines.append(("agent", "keruta-agent: the agent stopped before the command finished"))
    for n in (1, 2, 3):
        lines.append(("stdout", rest_message("rest-0", n, 2)))
        writer.answered[n] = f"T-{len(lines)}"
    return done, killed, writer, lines


def killed_out_from(line: tuple[str, str], index: int) -> bool:
    return line[1].startswith("a1.0 out ") and int(line[1].split()[2]) >= index


def verdict(lines: list[tuple[str, str]], *, stored: list[dict[str, Any]] | None = None) -> list[str]:
    done, killed, writer, _ = world()
    return check_store({"T": stored if stored is not None else as_stored("T", lines)}, [done, killed], [writer])


def test_the_checker_passes_a_faultless_store() -> None:
    assert verdict(world()[3]) == []


@pytest.mark.parametrize(
    "spoil, complaint",
    [
        (lambda lines: lines + [lines[3]], "once each in order"),  # a line stored twice
        (lambda lines: lines[:5] + lines[6:], "not 0.."),  # a finished run's line lost
        (lambda lines: [x for x in lines if not x[1].startswith("a0.0 err")], "of the"),  # its stderr lost
        (lambda lines: [x for x in lines if not killed_out_from(x, 10)], "in the spool"),  # spooled, then lost
        (lambda lines: lines + [lines[-1]], "stored producer seqs"),  # a REST record twice
        (lambda lines: lines[:-1], "stored producer seqs"),  # an answered REST record missing
        (lambda lines: lines + [("stdout", "hello")], "nobody wrote"),
        (lambda lines: lines + [("stderr", rest_message("rest-0", 4, 0))], "nobody wrote"),
    ],
)
def test_the_checker_finds(spoil: Any, complaint: str) -> None:
    problems = verdict(spoil(world()[3]))
    assert any(complaint in p for p in problems), problems


def test_the_checker_finds_gaps_repeated_ids_and_misplaced_records() -> None:
    stored = as_stored("T", world()[3])
    gap = [dict(r, seq=r["seq"] + (r["seq"] > 7)) for r in stored]
    assert any("seqs are not 1.." in p for p in verdict([], stored=gap))
    twin = [dict(r, id="same") if r["seq"] in (2, 9) else r for r in stored]
    assert any("already stored" in p for p in verdict([], stored=twin))
    done, killed, writer, lines = world()
    elsewhere = check_store({"T": as_stored("T", lines[1:]), "U": as_stored("U", lines[:1])}, [done, killed], [writer])
    assert any("stored here" in p for p in elsewhere)
    wrong_id = [dict(r, id="other") if r["message"].startswith("rest-0 #2") else r for r in stored]
    assert any("answered as" in p for p in verdict([], stored=wrong_id))


def test_the_checker_reports_runs_that_failed_or_were_not_delivered() -> None:
    done, killed, writer, lines = world()
    done.exit_code = 1
    killed.delivered = False
    problems = check_store({"T": as_stored("T", lines)}, [done, killed], [writer])
    assert any("exited 1" in p for p in problems)
    assert any("never delivered" in p for p in problems)


def test_percentile_is_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(n) for n in range(1, 101)], 99) == 99.0
    assert percentile([5.0], 99) == 5.0
