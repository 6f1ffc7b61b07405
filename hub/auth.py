"""Who may do what: the agent token writes and reads, the viewer token reads."""

from __future__ import annotations

import base64
import binascii
import hmac
from enum import Enum


class Role(Enum):
    NONE = 0
    VIEWER = 1
    AGENT = 2

    @property
    def can_read(self) -> bool:
        return self is not Role.NONE

    @property
    def can_write(self) -> bool:
        return self is Role.AGENT


def bearer_token(authorization: str | None, query_token: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_token or None


class Authorizer:
    def __init__(self, agent_token: str | None, viewer_token: str | None) -> None:
        self.agent_token = agent_token
        self.viewer_token = viewer_token

    @property
    def open(self) -> bool:
        return not (self.agent_token or self.viewer_token)

    def role(self, token: str | None) -> Role:
        if self.open:
            return Role.AGENT
        if token is None:
            return Role.NONE
        # Constant-time comparisons, so a wrong token leaks nothing by timing.
        if self.agent_token and hmac.compare_digest(token.encode(), self.agent_token.encode()):
            return Role.AGENT
        if self.viewer_token and hmac.compare_digest(token.encode(), self.viewer_token.encode()):
            return Role.VIEWER
        return Role.NONE


# A browser cannot set headers on a WebSocket, and a token in the URL ends up in
# logs and history; it can offer subprotocols, so the viewer offers
# "keruta" and "bearer.<token as unpadded base64url>" (base64url because a
# subprotocol may only hold RFC 7230 token characters).
WS_SUBPROTOCOL = "keruta"
_BEARER_PREFIX = "bearer."


def subprotocol_token(offered: list[str]) -> str | None:
    for protocol in offered:
        if protocol.startswith(_BEARER_PREFIX):
            encoded = protocol[len(_BEARER_PREFIX):]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8") or None
            except (binascii.Error, ValueError):
                return None
    return None
