"""A bare server on the card's stack, for the floors (bench/idle_floor.py,
bench/frame_floor.py): what a connection or a frame costs before any keruta
code. Started in a process of its own; writes its port to `port_file`.

- `trio`: `trio.serve_tcp` with `trio_handler`, one task per connection.
- `hypercorn`: hypercorn's Trio worker with keruta's patches
  (hub/hypercorn_patches.py) and the hub's WebSocket settings, serving
  tests/support.py's `websocket_app(body)`.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KINDS = ("hypercorn", "trio")


async def serve_trio(port_file: str, trio_handler: Callable[[Any], Awaitable[None]]) -> None:
    """`trio.serve_tcp` with `trio_handler`, its port written to `port_file` once it listens."""
    import trio

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, trio_handler, 0, host="127.0.0.1"))
        Path(port_file).write_text(str(listeners[0].socket.getsockname()[1]))


def serve(
    kind: str,
    port_file: str,
    trio_handler: Callable[[Any], Awaitable[None]],
    body: Callable[[Any, Any, Any], Awaitable[None]],
) -> None:
    import trio

    async def main() -> None:
        if kind == "trio":
            await serve_trio(port_file, trio_handler)
            return
        import hypercorn.trio
        from hypercorn.config import Config

        from hub import hypercorn_patches
        from hub.config import HubConfig
        from tests.support import websocket_app

        hypercorn_patches.install()
        hub = HubConfig()
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.websocket_ping_interval = hub.ping_interval
        config.websocket_max_message_size = hub.limits.max_frame_bytes + 1024
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn.trio.serve, websocket_app(body), config)
            Path(port_file).write_text(binds[0].rsplit(":", 1)[1])

    trio.run(main)
