"""What the soak (tests/soak.py) writes, what it remembers of it, and the
verdict on what the hub stored: plain data and functions, no I/O, so the
checker's own tests (tests/test_soak.py) can hand it broken stores.

The lines carry their own identity in the message, so a stored record says
who wrote it without any help from the hub:

- an agent run's COMMAND prints `TAG out I ...` on stdout and `TAG err J ...`
  on stderr, I and J counting from 0 per stream (TAG: `aSLOT.RUN`);
- a REST writer posts `PRODUCER #N ...`, N being its own producer seq.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

# The COMMAND an agent runs: `plan` is shared with the checker, which runs it
# too to know how many lines each stream of a run that ended normally printed.
PROGRAM = r"""
import os, random, sys, time

def plan(n, seed):
    r = random.Random(seed)
    return [2 if r.random() < 0.2 else 1 for _ in range(n)]

def main(tag, n, rate, seed):
    r = random.Random(seed + 1)
    counts = {1: 0, 2: 0}
    for k, fd in enumerate(plan(n, seed)):
        name = "out" if fd == 1 else "err"
        os.write(fd, f"{tag} {name} {counts[fd]} {'.' * r.randint(0, 60)}\n".encode())
        counts[fd] += 1
        if k % 10 == 9:
            time.sleep(10 / rate)

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
"""

_AGENT_LINE = re.compile(r"(a\d+\.\d+) (out|err) (\d+) \.*")
_REST_LINE = re.compile(r"(rest-\d+) #(\d+) \.*")
STREAMS = {"out": "stdout", "err": "stderr"}


def planned_counts(n: int, seed: int) -> dict[str, int]:
    """Lines per stream ("out", "err") that PROGRAM prints for (n, seed)."""
    namespace: dict[str, Any] = {}
    exec(PROGRAM, namespace)
    fds: list[int] = namespace["plan"](n, seed)
    return {"out": fds.count(1), "err": fds.count(2)}


def agent_line(message: str) -> tuple[str, str, int] | None:
    """(tag, stream, index) of a line PROGRAM printed, or None."""
    m = _AGENT_LINE.fullmatch(message)
    return (m[1], m[2], int(m[3])) if m else None


def rest_message(producer_name: str, n: int, pad: int) -> str:
    return f"{producer_name} #{n} {'.' * pad}"


def rest_line(message: str) -> tuple[str, int] | None:
    """(writer name, producer seq) of a message a REST writer posted, or None."""
    m = _REST_LINE.fullmatch(message)
    return (m[1], int(m[2])) if m else None


@attrs.define
class AgentRun:
    """One `keruta-agent run`: what its COMMAND was told to print, and its fate."""

    tag: str
    task_id: str
    lines: int
    seed: int
    kill_requested: bool = False
    exit_code: int | None = None
    # Of a killed run: per stream, the highest index found in its spool right
    # after the kill (-1: none). Those lines reached the spool, so the hub must
    # end up with them.
    spooled_max: dict[str, int] = attrs.field(factory=lambda: {"out": -1, "err": -1})
    # Whatever the run left in its spool was delivered (by itself or `flush`).
    delivered: bool = False

    @property
    def killed(self) -> bool:
        return self.kill_requested and self.exit_code != 0


@attrs.define
class RestWriter:
    """A REST client with a producer id of its own (or none: the task's
    anonymous producer), numbering its records 1, 2, 3... and retrying a POST
    unchanged until it is answered 200."""

    name: str
    task_id: str
    anonymous: bool = False
    array: bool = False
    # Producer seq -> the record id the 200 answer gave, and the task seq if it said one.
    answered: dict[int, str] = attrs.field(factory=dict)
    answered_seq: dict[int, int] = attrs.field(factory=dict)
    posts: int = 0
    retries: int = 0
    failures: list[str] = attrs.field(factory=list)

    @property
    def producer(self) -> str | None:
        return None if self.anonymous else self.name


def check_store(
    stored: Mapping[str, Sequence[Mapping[str, Any]]],
    runs: Iterable[AgentRun],
    writers: Iterable[RestWriter],
) -> list[str]:
    """Everything wrong with what the hub stored (`stored`: task id -> its
    records in seq order), given what the runs and writers did. Empty: all is well.

    - every task's seqs are 1..N, no gap, no repeat; every record id once;
    - every record is a line one of them wrote, in the task it wrote it to;
    - a run that ended normally: each stream's lines stored once each, all,
      in order; a killed run: each stream's stored lines are a prefix of what
      it printed (once each, in order) that holds every line that was in its
      spool when it was killed; lines after that were lost with the agent;
    - a REST writer: each of its records stored exactly once, in its order,
      and exactly those that were answered 200, under the id (and task seq)
      the answer gave.
    """
    problems: list[str] = []
    runs_by_tag = {r.tag: r for r in runs}
    writers_by_name = {w.name: w for w in writers}
    seen_ids: dict[str, str] = {}
    # tag -> stream -> indices in stored order; writer -> [(producer seq, record)]
    run_lines: dict[str, dict[str, list[int]]] = {t: {"out": [], "err": []} for t in runs_by_tag}
    writer_lines: dict[str, list[tuple[int, Mapping[str, Any]]]] = {n: [] for n in writers_by_name}

    for task_id, records in stored.items():
        seqs = [r["seq"] for r in records]
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"task {task_id}: seqs are not 1..{len(seqs)}: {_first_break(seqs)}")
        for r in records:
            where = f"task {task_id} seq {r['seq']}"
            if r["id"] in seen_ids:
                problems.append(f"{where}: id {r['id']} already stored at {seen_ids[r['id']]}")
            seen_ids[r["id"]] = where
            if r.get("partial"):
                problems.append(f"{where}: a partial record, but no line is that long")
            if r["source"] == "agent":
                continue  # the agent's own words (e.g. flush's note on a killed run)
            line = agent_line(r["message"])
            if line is not None and line[0] in runs_by_tag:
                tag, stream, index = line
                run = runs_by_tag[tag]
                if run.task_id != task_id or r["source"] != STREAMS[stream]:
                    problems.append(f"{where}: {r['source']} line of run {tag} ({run.task_id}) stored here")
                    continue
                run_lines[tag][stream].append(index)
                continue
            rest = rest_line(r["message"])
            if rest is not None and rest[0] in writers_by_name and r["source"] == "stdout":
                writer = writers_by_name[rest[0]]
                if writer.task_id != task_id:
                    problems.append(f"{where}: a record of {writer.name} ({writer.task_id}) stored here")
                    continue
                writer_lines[writer.name].append((rest[1], r))
                continue
            problems.append(f"{where}: nobody wrote this {r['source']} record: {r['message'][:80]!r}")

    for tag, run in runs_by_tag.items():
        problems.extend(_check_run(run, run_lines[tag]))
    for name, writer in writers_by_name.items():
        problems.extend(_check_writer(writer, writer_lines[name]))
    return problems


def _check_run(run: AgentRun, got: Mapping[str, list[int]]) -> list[str]:
    problems = []
    if not run.delivered:
        problems.append(f"run {run.tag}: its spool was never delivered")
    if not run.killed and run.exit_code != 0:
        problems.append(f"run {run.tag}: `keruta-agent run` exited {run.exit_code}, not COMMAND's 0")
    printed = planned_counts(run.lines, run.seed)
    for stream, indices in got.items():
        what = f"run {run.tag} {STREAMS[stream]}"
        if indices != list(range(len(indices))):
            problems.append(f"{what}: stored lines are not 0..{len(indices) - 1} once each in order: "
                            f"{_first_break(indices, start=0)}")
        stored = len(set(indices))
        if stored > printed[stream]:
            problems.append(f"{what}: {stored} lines stored, but COMMAND printed only {printed[stream]}")
        elif not run.killed and stored < printed[stream]:
            problems.append(f"{what}: {stored} of the {printed[stream]} lines COMMAND printed are stored")
        elif run.killed and stored <= run.spooled_max[stream]:
            problems.append(f"{what}: line {run.spooled_max[stream]} was in the spool of the killed "
                            f"agent, but only {stored} lines are stored")
    return problems


def _check_writer(writer: RestWriter, got: list[tuple[int, Mapping[str, Any]]]) -> list[str]:
    problems = [f"{writer.name}: {f}" for f in writer.failures[:5]]
    numbers = [n for n, _ in got]
    answered = sorted(writer.answered)
    if numbers != answered:
        problems.append(
            f"{writer.name} on {writer.task_id}: stored producer seqs {_first_break(numbers)} "
            f"({len(numbers)} records), answered 200: {len(answered)} "
            f"(1..{answered[-1] if answered else 0}); first difference: {_first_difference(numbers, answered)}"
        )
    for n, record in got:
        if n in writer.answered and record["id"] != writer.answered[n]:
            problems.append(f"{writer.name} #{n}: stored as id {record['id']}, answered as {writer.answered[n]}")
        if n in writer.answered_seq and record["seq"] != writer.answered_seq[n]:
            problems.append(
                f"{writer.name} #{n}: stored at seq {record['seq']}, answered as seq {writer.answered_seq[n]}"
            )
    return problems


def _first_break(values: Sequence[int], start: int = 1) -> str:
    for i, v in enumerate(values):
        if v != i + start:
            return f"position {i} holds {v}, not {i + start} (around: {list(values[max(0, i - 3):i + 4])})"
    return "in order"


def _first_difference(a: Sequence[int], b: Sequence[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"position {i}: stored {x}, answered {y}"
    if len(a) != len(b):
        return f"position {min(len(a), len(b))}: one list ends"
    return "none"


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile p (0-100) of values (not empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]
