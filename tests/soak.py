"""The soak: agents and REST writers on shared and separate tasks while faults
hit at random, then a check that everything that should be stored is, once.

For the soak's whole length (KERUTA_SOAK_SECONDS), against one real hub
process (`python -m hub`) on SQLite or PostgreSQL:

- agent slots, each running `keruta-agent run` after `keruta-agent run` with a
  spool of its own, COMMAND printing numbered lines on stdout and stderr
  (tests/soakcheck.py PROGRAM): two slots share a task, a third has one of its
  own and the fourth another (see `layout`);
- REST writers, each a producer of its own (one the task's anonymous
  producer), numbering its records 1, 2, 3..., retrying a POST unchanged on a
  503 or a connection error until it is answered 200, and remembering what was;
  three write to the agents' tasks, one to a task of its own (each to its own
  task where the hub still takes a REST `seq` for a task seq: `Soak.run` asks);
- a driver that, with a seeded RNG (KERUTA_SOAK_SEED, printed), picks a fault,
  waits until everyone has recovered from it, pauses, and picks the next:
  `hub_kill` (SIGKILL the hub, start it again on its port and database),
  `agent_kill` (SIGKILL a running agent, then `keruta-agent flush` its spool)
  and, on PostgreSQL, `db_refuse` (the hub's database refuses connections and
  its sessions are ended for a few seconds: the server is shared with other
  tests, so it is never restarted).

At the end the runs finish, whatever is left in a spool is flushed, every task
is read back through REST and tests/soakcheck.py judges it. Recovery per fault:
from the fault (hub killed: the kill, its restart begins at once; database:
connections allowed again; agent: the kill) to the first 200 for a POST sent
after the fault began, to the first record an agent got stored again (seen by
polling the task list every MONITOR_EVERY s), and for a killed agent to its
`flush` having delivered everything.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import trio

from agent.spool.root import spooled_tasks
from agent.spool.segment import SEGMENT_SUFFIX, scan
from tests import pgpool
from tests.hubclient import fetch_all, logs_path
from tests.soakcheck import (
    PROGRAM,
    AgentRun,
    RestWriter,
    agent_line,
    check_store,
    percentile,
    rest_message,
)
from tests.support import HubProcess, python_m

DEFAULT_SECONDS = 60.0
WARMUP = 2.0
# Pause after everyone has recovered from a fault, before the next one.
PAUSE = (1.0, 4.0)
# How long the hub's database refuses connections.
REFUSE_FOR = (1.0, 4.0)
# Hang guards, never performance assertions: a fault nobody recovers from
# within RECOVERY_PATIENCE is reported; the wind-down (runs ending, spools
# flushed, writers' last POSTs) has FINISH_PATIENCE.
RECOVERY_PATIENCE = 60.0
FINISH_PATIENCE = 180.0
FLUSH_PATIENCE = 90.0
MONITOR_EVERY = 0.1
POST_RETRY = 0.1
POST_PAUSE = 0.02
LINES_PER_RUN = (300, 1200)
LINE_RATE = 150.0  # per second, per run
AGENT_ARGS = ("--quiet", "--drain-timeout", "10")


@attrs.define
class Layout:
    """Who writes where. Under the identity rule of issue 16 REST writers share
    tasks with agents; `shared_rest=False` puts each on a task of its own,
    which a hub that still takes a REST `seq` for a task seq handles too."""

    slots: list[str]  # agent slot i -> task id
    writers: list[RestWriter]


def layout(shared_rest: bool) -> Layout:
    slots = ["soak-shared-0", "soak-shared-0", "soak-shared-1", "soak-own-a3"]
    shared = ["soak-shared-0", "soak-shared-0", "soak-shared-1", "soak-own-r3"]
    own = [f"soak-own-r{i}" for i in range(4)]
    tasks = shared if shared_rest else own
    writers = [
        RestWriter("rest-0", tasks[0]),
        RestWriter("rest-1", tasks[1], anonymous=True),
        RestWriter("rest-2", tasks[2], array=True),
        RestWriter("rest-3", tasks[3]),
    ]
    return Layout(slots, writers)


@attrs.define
class Fault:
    kind: str
    start: float
    # When the fault was over (see the module docstring).
    lift: float | None = None
    target: str = ""
    first_200: float | None = None
    agents_back: float | None = None
    flushed: float | None = None
    # The agent tasks' totals at the first look after the lift.
    baseline: dict[str, int] | None = None

    def recovered(self) -> bool:
        if self.kind == "agent_kill":
            return self.flushed is not None
        return self.first_200 is not None and self.agents_back is not None

    def recovery(self) -> dict[str, float]:
        assert self.lift is not None
        out = {}
        if self.first_200 is not None:
            out["REST 200"] = max(0.0, self.first_200 - self.lift)
        if self.agents_back is not None:
            out["agents stored"] = max(0.0, self.agents_back - self.lift)
        if self.flushed is not None:
            out["flush delivered"] = self.flushed - self.lift
        return out


@attrs.define
class SoakConfig:
    db: str
    workdir: Path
    seconds: float = DEFAULT_SECONDS
    seed: int = 0
    # PostgreSQL: an admin DSN on the server that holds `db` (for db_refuse).
    admin_dsn: str | None = None


@attrs.define
class Slot:
    name: str
    task_id: str
    runs: int = 0
    run: AgentRun | None = None
    proc: trio.Process | None = None
    started: float = 0.0
    fault: Fault | None = None
    doing: str = "starting"


class Soak:
    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.hub = HubProcess(config.db)
        self.layout = layout(shared_rest=True)
        self.shared_rest = True
        self.slots: list[Slot] = []
        self.runs: list[AgentRun] = []
        self.faults: list[Fault] = []
        self.problems: list[str] = []
        self.stopping = trio.Event()
        self.agent_stderr: dict[str, deque[str]] = {}
        self.stored: dict[str, list[dict[str, Any]]] = {}
        self.gave_up: set[str] = set()  # runs whose spool flush could not empty
        self.began = 0.0
        self.fault_kinds = ["hub_kill", "agent_kill"] + (["db_refuse"] if config.admin_dsn else [])

    @property
    def url(self) -> str:
        return self.hub.url

    # --- the whole soak ---------------------------------------------------

    async def run(self) -> None:
        self.began = trio.current_time()
        await trio.to_thread.run_sync(self.hub.start)
        try:
            self.shared_rest = await self.rest_seq_is_producers()
            self.layout = layout(self.shared_rest)
            self.slots = [Slot(f"a{i}", task) for i, task in enumerate(self.layout.slots)]
            with trio.move_on_after(self.config.seconds + RECOVERY_PATIENCE + FINISH_PATIENCE) as scope:
                async with trio.open_nursery() as outer:
                    outer.start_soon(self.monitor)
                    async with trio.open_nursery() as work:
                        for writer in self.layout.writers:
                            work.start_soon(self.rest_writer, writer)
                        for slot in self.slots:
                            work.start_soon(self.agent_slot, slot)
                        work.start_soon(self.drive_faults)
                    outer.cancel_scope.cancel()
                for run in self.runs:
                    if not run.delivered and run.tag not in self.gave_up:
                        await self.flush(run)
            if scope.cancelled_caught:
                self.problems.append(f"the soak did not wind down in time; {self.where_stuck()}")
            with trio.move_on_after(FINISH_PATIENCE) as reading:
                await self.read_back()
            if reading.cancelled_caught:
                self.problems.append("reading the tasks back took too long")
                return
        finally:
            self.hub.stop()
        self.problems.extend(check_store(self.stored, self.runs, self.layout.writers))

    def where_stuck(self) -> str:
        slots = [f"{s.name}: {s.doing}" for s in self.slots]
        writers = [f"{w.name}: {len(w.answered)} answered, {w.posts} POSTs" for w in self.layout.writers]
        return "; ".join(slots + writers)

    async def rest_seq_is_producers(self) -> bool:
        """The one identity rule (docs/identity.md), checked before the soak
        relies on it: two producers each post their seq 1 to one task, and
        both are stored (a REST `seq` is the producer's own)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            answers = []
            for producer in ("probe-a", "probe-b"):
                body = {"message": f"{producer} 1", "producer": producer, "seq": 1}
                resp = await client.post(logs_path("soak-probe"), json=body)
                answers.append(resp.status_code)
        assert answers == [200, 200], f"the identity probe got {answers}: a REST seq must be the producer's own"
        return True

    # --- REST writers -------------------------------------------------------

    async def rest_writer(self, writer: RestWriter) -> None:
        rng = random.Random(f"{self.config.seed} {writer.name}")
        next_seq = 1
        async with httpx.AsyncClient(base_url=self.url, timeout=20) as client:
            while not self.stopping.is_set():
                count = rng.randint(1, 5) if writer.array else 1
                items = []
                for n in range(next_seq, next_seq + count):
                    item: dict[str, Any] = {"message": rest_message(writer.name, n, rng.randint(0, 60)), "seq": n}
                    if writer.producer is not None:
                        item["producer"] = writer.producer
                    items.append(item)
                answer = await self.post_until_stored(client, writer, items if writer.array else items[0])
                if answer is None:
                    return  # a refusal: in writer.failures, reported by the check
                ids = answer["ids"] if writer.array else [answer["id"]]
                seqs = answer.get("seqs" if writer.array else "seq")
                for k, n in enumerate(range(next_seq, next_seq + count)):
                    writer.answered[n] = ids[k]
                    if seqs is not None:
                        writer.answered_seq[n] = seqs[k] if writer.array else seqs
                next_seq += count
                await trio.sleep(POST_PAUSE)

    async def post_until_stored(
        self, client: httpx.AsyncClient, writer: RestWriter, body: Any
    ) -> dict[str, Any] | None:
        """POST body until a 200 (its answer); a 503 or a lost connection is
        retried unchanged, anything else is a failure (None)."""
        while True:
            sent = trio.current_time()
            writer.posts += 1
            try:
                resp = await client.post(logs_path(writer.task_id), json=body)
            except httpx.TransportError:
                writer.retries += 1
                await trio.sleep(POST_RETRY)
                continue
            if resp.status_code == 503:
                writer.retries += 1
                await trio.sleep(POST_RETRY)
                continue
            if resp.status_code != 200:
                writer.failures.append(f"POST {orjson.dumps(body).decode()[:200]}: {resp.status_code} {resp.text[:300]}")
                return None
            now = trio.current_time()
            for fault in self.faults:
                if fault.kind == "agent_kill" or fault.first_200 is not None or fault.lift is None:
                    continue
                if sent >= fault.start:
                    fault.first_200 = now
            answer: dict[str, Any] = resp.json()
            return answer

    # --- agents -------------------------------------------------------------

    async def agent_slot(self, slot: Slot) -> None:
        rng = random.Random(f"{self.config.seed} {slot.name}")
        while not self.stopping.is_set():
            run = AgentRun(
                tag=f"{slot.name}.{slot.runs}",
                task_id=slot.task_id,
                lines=rng.randint(*LINES_PER_RUN),
                seed=rng.randrange(1 << 30),
            )
            slot.runs += 1
            self.runs.append(run)
            await self.one_run(slot, run)

    def spool_root(self, run: AgentRun) -> Path:
        return self.config.workdir / "spools" / run.tag

    async def one_run(self, slot: Slot, run: AgentRun) -> None:
        root = self.spool_root(run)
        command = [sys.executable, "-c", PROGRAM, run.tag, str(run.lines), str(LINE_RATE), str(run.seed)]
        args = ["run", "--hub", self.url, "--task-id", run.task_id, "--spool-dir", str(root), *AGENT_ARGS, "--", *command]
        proc = await start_agent(args)
        slot.run, slot.proc, slot.started, slot.fault = run, proc, trio.current_time(), None
        slot.doing = f"running {run.tag}"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.keep_stderr, proc, run.tag)
                run.exit_code = await proc.wait()
        finally:
            proc.kill()  # only if the soak was cut short
        slot.proc = None
        slot.doing = f"{run.tag} exited {run.exit_code}"
        fault = slot.fault
        if fault is None:
            run.delivered = not spooled_tasks(root)
            return
        # Killed: what reached its spool must reach the hub, through flush.
        run.spooled_max = spooled_lines(root)
        await self.flush(run, slot)
        if run.delivered:
            fault.flushed = trio.current_time()

    async def keep_stderr(self, proc: trio.Process, tag: str) -> None:
        lines = self.agent_stderr[tag] = deque(maxlen=40)
        assert proc.stderr is not None
        async with proc.stderr as stream:
            pending = b""
            while chunk := await stream.receive_some(65536):
                *done, pending = (pending + chunk).split(b"\n")
                lines.extend(line.decode("utf-8", "replace") for line in done)
            if pending:
                lines.append(pending.decode("utf-8", "replace"))

    async def flush(self, run: AgentRun, slot: Slot | None = None) -> None:
        """`keruta-agent flush` the run's spool until nothing is left in it."""
        root = self.spool_root(run)
        attempts = 0
        with trio.move_on_after(FLUSH_PATIENCE):
            while spooled_tasks(root):
                attempts += 1
                if slot is not None:
                    slot.doing = f"flushing {run.tag} (attempt {attempts})"
                proc = await start_agent(["flush", "--spool-dir", str(root), "--hub", self.url, "--timeout", "30"])
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self.keep_stderr, proc, f"{run.tag} flush")
                        await proc.wait()
                finally:
                    proc.kill()
                if spooled_tasks(root):
                    await trio.sleep(0.5)
            run.delivered = True
        if not run.delivered:
            self.gave_up.add(run.tag)
            self.problems.append(f"run {run.tag}: {attempts} flushes in {FLUSH_PATIENCE:g} s did not empty its spool")

    # --- faults ---------------------------------------------------------------

    async def drive_faults(self) -> None:
        deadline = trio.current_time() + self.config.seconds
        try:
            await trio.sleep(WARMUP)
            while trio.current_time() < deadline:
                kind = self.rng.choice(self.fault_kinds)
                fault = Fault(kind, trio.current_time())
                self.faults.append(fault)
                if not await self.apply(fault):
                    self.faults.pop()
                    await trio.sleep(0.2)
                    continue
                with trio.move_on_after(RECOVERY_PATIENCE):
                    while not fault.recovered():
                        await trio.sleep(0.05)
                if not fault.recovered():
                    self.problems.append(
                        f"no recovery within {RECOVERY_PATIENCE:g} s from {fault.kind} {fault.target} "
                        f"at {fault.start - self.began:.1f} s ({fault.recovery()} by then)"
                    )
                await trio.sleep(min(self.rng.uniform(*PAUSE), max(0.0, deadline - trio.current_time())))
        finally:
            self.stopping.set()

    async def apply(self, fault: Fault) -> bool:
        if fault.kind == "hub_kill":
            fault.start = fault.lift = trio.current_time()
            self.hub.kill()
            await trio.to_thread.run_sync(self.hub.restart)
            return True
        if fault.kind == "agent_kill":
            now = trio.current_time()
            running = [s for s in self.slots if s.proc is not None and s.fault is None and now - s.started > 0.5]
            if not running:
                return False
            slot = self.rng.choice(running)
            assert slot.proc is not None and slot.run is not None
            slot.run.kill_requested = True
            slot.fault = fault
            fault.target = slot.run.tag
            fault.start = fault.lift = trio.current_time()
            slot.proc.kill()
            return True
        assert fault.kind == "db_refuse" and self.config.admin_dsn is not None
        database = pgpool.database_of(self.config.db)
        refuse_for = self.rng.uniform(*REFUSE_FOR)
        fault.start = trio.current_time()
        try:
            await admin(
                self.config.admin_dsn,
                f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false',
                pgpool.end_sessions(database),
            )
            await trio.sleep(refuse_for)
        finally:
            with trio.CancelScope(shield=True):
                await admin(self.config.admin_dsn, f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
                fault.lift = trio.current_time()
        fault.target = f"{refuse_for:.1f} s"
        return True

    async def monitor(self) -> None:
        """Poll the task list; the first growth of an agent task after a
        fault's lift (over what the first look after it showed) is when the
        agents were back."""
        agent_tasks = set(self.layout.slots)
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as client:
            while True:
                await trio.sleep(MONITOR_EVERY)
                asked = trio.current_time()
                try:
                    resp = await client.get("/api/v1/tasks")
                except httpx.TransportError:
                    continue
                if resp.status_code != 200:
                    continue
                totals = {t["taskId"]: t["totalLogs"] for t in resp.json()["tasks"] if t["taskId"] in agent_tasks}
                for fault in self.faults:
                    if fault.kind == "agent_kill" or fault.agents_back is not None:
                        continue
                    if fault.lift is None or asked <= fault.lift:
                        continue
                    if fault.baseline is None:
                        fault.baseline = totals
                    elif any(n > fault.baseline.get(t, 0) for t, n in totals.items()):
                        fault.agents_back = trio.current_time()

    # --- the verdict ------------------------------------------------------------

    async def read_back(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            resp = await client.get("/api/v1/tasks")
            assert resp.status_code == 200, resp.text
            for task in resp.json()["tasks"]:
                if task["taskId"] != "soak-probe":
                    self.stored[task["taskId"]] = await fetch_all(client, task["taskId"])

    def report(self) -> str:
        cfg = self.config
        store = "sqlite" if cfg.db.startswith("sqlite") else "postgres"
        writers = self.layout.writers
        killed = [r for r in self.runs if r.killed]
        lines = [
            f"soak on {store}: {cfg.seconds:g} s, seed {cfg.seed} (KERUTA_SOAK_SEED={cfg.seed} makes the same random choices; timing still varies)",
            "REST writers "
            + ("share tasks with agents (a REST seq is the producer's own)" if self.shared_rest else
               "on tasks of their own: this hub takes a REST seq for a task seq (the rule before issue 16)"),
            f"stored {sum(len(v) for v in self.stored.values())} records in {len(self.stored)} tasks: "
            f"{len(self.runs)} agent runs ({len(killed)} killed), "
            f"{sum(len(w.answered) for w in writers)} REST records answered 200 "
            f"({sum(w.posts for w in writers)} POSTs, {sum(w.retries for w in writers)} retried)",
        ]
        if killed:
            reached = sum(n + 1 for r in killed for n in r.spooled_max.values())
            lines.append(
                f"the {len(killed)} killed runs' spools had reached {reached} lines, all stored "
                "(what COMMAND printed after its agent died is lost by design)"
            )
        by_kind: dict[str, list[Fault]] = {}
        for fault in self.faults:
            by_kind.setdefault(fault.kind, []).append(fault)
        for kind, faults in sorted(by_kind.items()):
            measures: dict[str, list[float]] = {}
            for fault in faults:
                for what, seconds in fault.recovery().items():
                    measures.setdefault(what, []).append(seconds)
            parts = [
                f"{what} p50 {percentile(v, 50):.2f} s p99 {percentile(v, 99):.2f} s"
                for what, v in measures.items()
            ]
            lines.append(f"  {kind:<10} x{len(faults):<3} recovery: " + "; ".join(parts))
        lines.append("faults, one by one (seconds after the start; recovery in seconds):")
        for fault in self.faults:
            measured = ", ".join(f"{what} {seconds:.2f}" for what, seconds in fault.recovery().items())
            lines.append(f"  {fault.start - self.began:6.1f} {fault.kind:<10} {fault.target:<8} {measured}")
        return "\n".join(lines)

    def diagnostics(self) -> str:
        out = ["--- hub stderr (last 60 lines) ---", *self.hub.output[-60:]]
        for tag, lines in list(self.agent_stderr.items())[-12:]:
            if lines:
                out.append(f"--- agent {tag} stderr ---")
                out.extend(lines)
        return "\n".join(line.rstrip("\n") for line in out)


def agent_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}


async def start_agent(args: list[str]) -> trio.Process:
    """`python -m agent ARGS`, its stderr a pipe the soak reads (keep_stderr)."""
    return await trio.lowlevel.open_process(
        python_m("agent", *args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env=agent_env(),
    )


def spooled_lines(root: Path) -> dict[str, int]:
    """Per stream, the highest index of a soak line in the spools under root."""
    highest = {"out": -1, "err": -1}
    for seg in root.glob(f"*/*{SEGMENT_SUFFIX}"):
        fd = os.open(seg, os.O_RDONLY)
        try:
            for _pos, _seq, payload, _next in scan(fd, 0, os.fstat(fd).st_size):
                line = agent_line(orjson.loads(payload).get("message", ""))
                if line is not None:
                    highest[line[1]] = max(highest[line[1]], line[2])
        finally:
            os.close(fd)
    return highest


async def admin(dsn: str, *statements: str) -> None:
    await trio.to_thread.run_sync(lambda: pgpool.admin(dsn, *statements))


async def run_soak(config: SoakConfig, say: Callable[[str], Any] = print) -> list[str]:
    """Run the soak; print its report; the problems found (empty: all is well)."""
    soak = Soak(config)
    try:
        await soak.run()
    finally:
        say(soak.report())
    for problem in soak.problems[:40]:
        say(f"PROBLEM: {problem}")
    if soak.problems:
        say(soak.diagnostics())
    return soak.problems

