"""A WebSocket client for the bench's load processes: websockets' sans-I/O
client protocol on an asyncio transport, many per process without a task
each (bench/viewer.py, bench/fleet.py)."""

from __future__ import annotations

import asyncio


class WsClient(asyncio.Protocol):
    """Opens the handshake when connected; `flush` writes whatever the
    protocol has to send. Subclasses read `self.ws` in `data_received`."""

    def __init__(self, url: str) -> None:
        # Imported here: the bench's driver imports its modules without needing websockets.
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.ws = ClientProtocol(parse_uri(url), max_size=None)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.ws.send_request(self.ws.connect())
        self.flush()

    def flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = b"".join(self.ws.data_to_send())
        if data:
            self.transport.write(data)
