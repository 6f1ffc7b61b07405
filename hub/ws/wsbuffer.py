"""Oversized WebSocket messages: refused with an error frame, not a broken connection.

Hypercorn's own buffer answers a message over its limit with close 1009 and
then stops processing that connection's events, so the client's close reply
can go unread and the TCP connection stays open for good (an unbounded leak
per bad frame). This buffer instead counts and discards the rest of an
oversized message and hands the app a placeholder, which the connection
answers with a TOO_LARGE `error` frame; memory stays bounded by the limit.
"""

from __future__ import annotations

from io import BytesIO, StringIO
from typing import Any

from hypercorn.protocol import ws_stream

# Not valid JSON, so it can never be mistaken for a frame a client sent.
OVERSIZED = "\x00oversized"


class DiscardingWebsocketBuffer(ws_stream.WebsocketBuffer):
    def __init__(self, max_length: int) -> None:
        super().__init__(max_length)
        self.oversized = False

    def extend(self, event: Any) -> None:
        if self.value is None:
            self.value = StringIO() if isinstance(event, ws_stream.TextMessage) else BytesIO()
        if self.oversized or self.length + len(event.data) > self.max_length:
            self.oversized = True
            self.length += len(event.data)
            self.value = StringIO() if isinstance(self.value, StringIO) else BytesIO()
            return
        self.length += self.value.write(event.data)

    def clear(self) -> None:
        super().clear()
        self.oversized = False

    def to_message(self) -> dict[str, Any]:
        if self.oversized:
            return {"type": "websocket.receive", "bytes": None, "text": OVERSIZED}
        return super().to_message()  # type: ignore[no-any-return]


def install() -> None:
    ws_stream.WebsocketBuffer = DiscardingWebsocketBuffer  # type: ignore[misc]
