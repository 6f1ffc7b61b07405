"""A store call in a worker thread, for less than `trio.to_thread.run_sync` costs.

Every commit and read of the SQLite store runs in a worker thread
(nothing that can block on the event loop), and at 100 lines a second each
line's commit is one such hop on its way to a viewer. `to_thread.run_sync`
also names the OS thread and names it back on every call, takes the
capacity limiter and copies the context: on an idle machine ~0.1 ms of its
~0.3 ms round trip (bench/wakeups.py), none of which the store's own calls
need (they are bounded already: one writer, a fixed number of readers, one
checkpoint at a time). Work whose count clients decide (a verification's
decoding, the fsync after a REST delete) stays on `to_thread.run_sync` and
its limiter. This is trio's own thread cache (`start_thread_soon`) and the
task's wake-up, nothing else. Like `to_thread.run_sync`'s default, a call
is not abandoned when its task is cancelled: it runs to its end (a
transaction commits or rolls back whole) and the cancellation is delivered
at the task's next checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")


async def run_in_thread(fn: Callable[..., T], *args: Any) -> T:
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver)

    def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.FAILED

    result: T = await trio.lowlevel.wait_task_rescheduled(abort)
    return result
