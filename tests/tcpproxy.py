"""A TCP proxy a test puts between a hub and PostgreSQL, to break the link the
ways networks do.

- `freeze()`: the flows open now stop forwarding, both ways, and their
  sockets stay open: no FIN, no RST, as after a partition or lost NAT
  state. Connections made afterwards pass.
- `thaw()`: frozen flows forward again (what they held goes through).
- `refuse()`: an ordinary outage: every open flow is cut and new connections
  are closed as soon as they are accepted, until `restore()`.
- `cut_after_commit()`: the next COMMIT a client sends reaches the server,
  whose answer never comes back: the flow is cut first. The server committed;
  the client cannot know.

Each flow is two pumps (client to server, server to client) in the proxy's
own nursery; `aclose` ends them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import attrs
import trio


@attrs.define(eq=False)
class Flow:
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    # Set while the flow forwards; cleared while it is frozen.
    forwarding: trio.Event = attrs.field(factory=trio.Event)
    # Once set, nothing more goes from the server to the client.
    answers_held: bool = False


class TcpProxy:
    def __init__(self, nursery: trio.Nursery, listener: trio.SocketListener, target: tuple[str, int]) -> None:
        self._nursery = nursery
        self._listener = listener
        self._target = target
        self.flows: set[Flow] = set()
        self.refusing = False
        self.commit_cut_armed = False
        self.commits_cut = 0
        self.commit_freeze_armed = False
        self.commits_frozen = 0

    @property
    def port(self) -> int:
        return int(self._listener.socket.getsockname()[1])

    def url_for(self, dsn: str) -> str:
        """`dsn` with its host and port replaced by the proxy's."""
        parts = urlsplit(dsn)
        netloc = parts.netloc.rsplit("@", 1)
        where = f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{where}" if len(netloc) == 2 else where))

    def freeze(self) -> int:
        """Stop forwarding on every flow open now; how many were frozen."""
        frozen = 0
        for flow in self.flows:
            if flow.forwarding.is_set():
                flow.forwarding = trio.Event()
                frozen += 1
        return frozen

    def thaw(self) -> None:
        for flow in self.flows:
            flow.forwarding.set()

    def refuse(self) -> None:
        """Cut every flow and turn new connections away until `restore()`."""
        self.refusing = True
        for flow in list(self.flows):
            flow.scope.cancel()

    def restore(self) -> None:
        self.refusing = False

    def cut_after_commit(self) -> None:
        """Arm the cut of the flow that sends the next COMMIT (module docstring)."""
        self.commit_cut_armed = True

    def freeze_at_commit(self) -> None:
        """Arm the freeze of the flow that sends the next COMMIT, before it
        goes: the server holds that transaction open, its locks taken."""
        self.commit_freeze_armed = True

    async def _serve(self) -> None:
        while True:
            client = await self._listener.accept()
            if self.refusing:
                await client.aclose()
                continue
            self._nursery.start_soon(self._carry, client)

    async def _carry(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                server = await trio.open_tcp_stream(*self._target)
            except OSError:
                return
            async with server:
                flow = Flow()
                flow.forwarding.set()
                self.flows.add(flow)
                try:
                    with flow.scope:
                        async with trio.open_nursery() as pumps:
                            pumps.start_soon(self._pump, flow, client, server, pumps.cancel_scope, True)
                            pumps.start_soon(self._pump, flow, server, client, pumps.cancel_scope, False)
                finally:
                    self.flows.discard(flow)

    async def _pump(
        self, flow: Flow, source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope, upstream: bool
    ) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                if upstream and self.commit_freeze_armed and b"COMMIT" in data:
                    self.commit_freeze_armed = False
                    flow.forwarding = trio.Event()
                    self.commits_frozen += 1
                # Frozen: what arrives is held, not forwarded, and nothing closes.
                while not flow.forwarding.is_set():
                    await flow.forwarding.wait()
                if not data:
                    break
                if not upstream and flow.answers_held:
                    break
                cut = upstream and self.commit_cut_armed and b"COMMIT" in data
                if cut:
                    # Held before the COMMIT goes: its answer cannot slip through.
                    self.commit_cut_armed = False
                    flow.answers_held = True
                await sink.send_all(data)
                if cut:
                    self.commits_cut += 1
                    await trio.sleep(0.3)  # the server reads it and commits
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()


@asynccontextmanager
async def tcp_proxy(host: str, port: int) -> AsyncIterator[TcpProxy]:
    """A proxy to host:port listening on a free loopback port, for the block's length."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0], trio.open_nursery() as nursery:
        proxy = TcpProxy(nursery, listeners[0], (host, port))
        nursery.start_soon(proxy._serve)
        try:
            yield proxy
        finally:
            # No checkpoint after this: it would replace the block's exception.
            nursery.cancel_scope.cancel()


def target_of(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432
