"""The capper actor: keeps each task within its cap, head and tail.

The writer tells it, without waiting, which tasks a commit took past their
cap (the hub's --max-task-bytes, or the task's agent's --max-bytes where
lower); it cuts each in bounded transactions of the store
(hub/store/trimming.py `cap_step`), off the writer's path, and hands the
task's gap record, new or grown, to the broadcaster for live viewers.
"""

from __future__ import annotations

import logging

import trio

from hub.actors.broadcaster import Broadcaster
from hub.rewrites import announce
from hub.store.base import REPLACED, Store, StoreUnavailable
from hub.store.trimming import over_cap

log = logging.getLogger("keruta.hub.capper")

# Tasks waiting to be cut; one more past this is asked again at its next commit.
CAP_QUEUE = 1024


class Capper:
    def __init__(self, store: Store, broadcaster: Broadcaster, hub_cap: int | None) -> None:
        self.store = store
        self.broadcaster = broadcaster
        self.hub_cap = hub_cap
        self._send, self._receive = trio.open_memory_channel[str](CAP_QUEUE)
        self._waiting: set[str] = set()

    def after_commit(self, sizes: dict[str, tuple[int, int | None]]) -> None:
        """A commit's task sizes (AppendResult.sizes): cut those over their cap. Never blocks."""
        for task_id, (stored, agent_cap) in sizes.items():
            if over_cap(self.hub_cap, stored, agent_cap):
                self.want(task_id)

    def want(self, task_id: str) -> None:
        if task_id in self._waiting:
            return
        try:
            self._send.send_nowait(task_id)
        except trio.WouldBlock:
            return
        self._waiting.add(task_id)

    async def run(self) -> None:
        async with self._receive:
            # A task over its cap asks at its next commit; one whose cut was left
            # undone (the hub stopped, the store was away) may commit no more.
            try:
                for task_id in await self.store.tasks_over_cap(self.hub_cap, CAP_QUEUE):
                    self.want(task_id)
            except StoreUnavailable as exc:
                log.warning("tasks over their cap not looked for: store unavailable (%s)", exc)
            async for task_id in self._receive:
                # Asked again while this cut runs: it runs again after, and finds
                # what the commits meanwhile added.
                self._waiting.discard(task_id)
                try:
                    await self._cut(task_id)
                except StoreUnavailable as exc:
                    log.warning("cap of %s put off: store unavailable (%s)", task_id, exc)

    async def _cut(self, task_id: str) -> None:
        while True:
            step = await self.store.cap_step(task_id, self.hub_cap)
            if step is None:
                return
            self.broadcaster.publish_replaced(task_id, [step.gap])
            await announce(self.store, task_id, REPLACED, [step.gap.seq])
            if not step.more:
                return
