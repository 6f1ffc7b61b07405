"""Who may do what: the admin token also deletes, the agent token writes and
reads, the viewer token reads."""

from __future__ import annotations

import base64
import binascii
import hmac
from enum import Enum


class Role(Enum):
    NONE = 0
    VIEWER = 1
    AGENT = 2
    ADMIN = 3

    @property
    def can_write(self) -> bool:
        return self in (Role.AGENT, Role.ADMIN)

    @property
    def can_delete(self) -> bool:
        # Apart from the agent's: the token a job's command might get hold of
        # must not be able to erase other tasks' history.
        return self is Role.ADMIN


def bearer_token(authorization: str | None, query_token: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_token or None


class Authorizer:
    def __init__(
        self, agent_token: str | None, viewer_token: str | None, admin_token: str | None = None
    ) -> None:
        self.agent_token = agent_token
        self.viewer_token = viewer_token
        self.admin_token = admin_token

    @property
    def open(self) -> bool:
        return not (self.agent_token or self.viewer_token or self.admin_token)

    def role(self, token: str | None) -> Role:
        if self.open:
            return Role.ADMIN
        if token is None:
            return Role.NONE
        # Constant-time comparisons, so a wrong token leaks nothing by timing.
        if self.admin_token and hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return Role.ADMIN
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
