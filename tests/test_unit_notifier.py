"""hub/actors/notifier.py on PostgreSQL: another hub's commits and state changes reach
this hub's broadcaster through LISTEN, for the tasks it has subscribers of;
its own commits do not come back that way (the writer already published them)."""

from __future__ import annotations

import pytest
import trio

from hub.actors.broadcaster import Broadcaster
from hub.actors.notifier import run_notifier
from hub.store.base import Incoming
from hub.store.postgres import PostgresStore
from keruta.records import TaskInfo

pytestmark = pytest.mark.pg

TS = "2026-01-01T00:00:00.000000Z"


class RecordingBroadcaster(Broadcaster):
    """A real broadcaster whose watermark and status publishes are also recorded."""

    def __init__(self, followed: list[str]) -> None:
        super().__init__()
        for task_id in followed:
            self.subs[task_id] = set()  # tasks with (here: no live) subscribers
        self.durable: dict[str, int] = {}
        self.states: dict[str, str] = {}
        self.changed = trio.Event()

    def notify_durable(self, task_id: str, through: int) -> None:
        self.durable[task_id] = max(self.durable.get(task_id, 0), through)
        self.changed.set()
        super().notify_durable(task_id, through)

    def publish_status(self, task: TaskInfo) -> None:
        self.states[task.task_id] = task.state
        self.changed.set()
        super().publish_status(task)

    async def until(self, check: object) -> None:
        with trio.fail_after(30):
            while not check():  # type: ignore[operator]
                self.changed = trio.Event()
                await self.changed.wait()


def rows(task: str, first: int, last: int) -> list[Incoming]:
    return [Incoming(task, seq, TS, "stdout", "INFO", f"line {seq}") for seq in range(first, last + 1)]


async def test_other_hubs_commits_and_states_reach_followed_tasks(pg_url: str) -> None:
    ours, theirs = PostgresStore.from_url(pg_url), PostgresStore.from_url(pg_url)
    await ours.open()
    await theirs.open()
    broadcaster = RecordingBroadcaster(["followed"])
    try:
        await theirs.set_state("followed", "running", None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_notifier, ours, broadcaster)
            # The session's first catch-up (done while it listens) publishes the
            # state: from then on only notices can tell it about new commits.
            await broadcaster.until(lambda: broadcaster.states.get("followed") == "running")
            assert "followed" not in broadcaster.durable or broadcaster.durable["followed"] == 0
            await theirs.append(rows("followed", 1, 3) + rows("ignored", 1, 2))
            await broadcaster.until(lambda: broadcaster.durable.get("followed") == 3)
            await theirs.set_state("followed", "succeeded", 0)
            await broadcaster.until(lambda: broadcaster.states.get("followed") == "succeeded")
            nursery.cancel_scope.cancel()
        assert "ignored" not in broadcaster.durable, "only tasks with subscribers are followed"
    finally:
        await ours.close()
        await theirs.close()


async def test_a_new_listen_session_catches_up_what_it_missed(pg_url: str) -> None:
    ours, theirs = PostgresStore.from_url(pg_url), PostgresStore.from_url(pg_url)
    await ours.open()
    await theirs.open()
    try:
        # Committed before the notifier listens: only the catch-up can tell it.
        await theirs.append(rows("followed", 1, 5))
        await theirs.set_state("followed", "running", None)
        broadcaster = RecordingBroadcaster(["followed"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_notifier, ours, broadcaster)
            await broadcaster.until(
                lambda: broadcaster.durable.get("followed") == 5 and broadcaster.states.get("followed") == "running"
            )
            nursery.cancel_scope.cancel()
    finally:
        await ours.close()
        await theirs.close()
