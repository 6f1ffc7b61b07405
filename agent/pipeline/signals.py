"""The signal router: an actor whose inbox is the agent's SIGINT/SIGTERM
receiver. While the command runs, a signal goes to its process group (the
first one starting the group's `kill_grace`); after the command has exited, a
signal cuts the wait for the hub short."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import trio

from agent import exits, process
from agent.voice import say


class SignalRouter:
    """The agent's SIGINT/SIGTERM: passed to the command's process group while
    the command runs, the first one starting the group's `kill_grace` (SIGKILL
    for what is left of it then); after the command has exited, they cut the
    wait for the hub short."""

    def __init__(self, kill_grace: float = process.KILL_GRACE, say: Callable[[str], None] = say) -> None:
        self.child: process.Child | None = None
        self.drain: trio.CancelScope | None = None
        self.after_exit = 0
        self.kill_grace = kill_grace
        self.say = say
        # Set once the group a passed-on signal is stopping has ended.
        self._group_ended: trio.Event | None = None

    async def run(self, signals: object, early: Iterable[int] = ()) -> None:
        """Route `signals` (a trio signal receiver), after `early`: those the
        agent got before the receiver was there."""
        async with trio.open_nursery() as nursery:
            for signum in early:
                self._route(signum, nursery)
            async for signum in signals:  # type: ignore[attr-defined]
                self._route(signum, nursery)

    def _route(self, signum: int, nursery: trio.Nursery) -> None:
        if self.child is not None:
            if process.forward(self.child, signum) and self._group_ended is None:
                self._group_ended = trio.Event()
                nursery.start_soon(self._stop, self.child, self._group_ended)
        else:
            self.after_exit += 1
            if self.drain is not None:
                self.drain.cancel()

    async def _stop(self, child: process.Child, ended: trio.Event) -> None:
        try:
            if await exits.stop(child, self.kill_grace):
                what = "process group" if child.own_group else "process"
                self.say(
                    f"the command's {what} was still running {self.kill_grace:g} s "
                    "after the signal passed on to it; killed it (SIGKILL)"
                )
        finally:
            ended.set()

    async def stopped(self) -> None:
        """Wait until what a passed-on signal is stopping has ended: at most
        `kill_grace`, then KILL_WAIT after the SIGKILL."""
        if self._group_ended is not None:
            await self._group_ended.wait()
