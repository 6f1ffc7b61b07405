"""The hub's graceful shutdown, as each open connection sees it."""

from __future__ import annotations

from collections.abc import Callable

import trio


class Shutdown:
    """Set once, when the hub starts its graceful shutdown (SIGTERM, SIGINT).

    A connection registers a callback rather than keeping a task that waits
    for it: a fleet's idle connections each held one (hypercorn's
    `shutdown_trigger` still waits, once for the hub)."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._callbacks: set[Callable[[], None]] = set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def set(self) -> None:
        self._event.set()
        callbacks, self._callbacks = self._callbacks, set()
        for callback in callbacks:
            callback()

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Calls `callback` when the shutdown starts (at once if it has)."""
        if self._event.is_set():
            callback()
        else:
            self._callbacks.add(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.discard(callback)
