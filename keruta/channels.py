"""What the actors share about memory channels."""

from __future__ import annotations

from typing import TypeVar

import trio

T = TypeVar("T")


def receive_now(channel: trio.MemoryReceiveChannel[T]) -> T | None:
    """The next message if one is waiting; None if none is or the channel ended
    (the caller's `async for` or `receive` then sees the end)."""
    try:
        return channel.receive_nowait()
    except (trio.WouldBlock, trio.EndOfChannel):
        return None
