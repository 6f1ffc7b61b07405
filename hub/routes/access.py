"""Who may do what: the request's role from its token, and the Origin and Host checks."""

from __future__ import annotations

import attrs
from quart import request

from hub.auth import Authorizer, Role, bearer_token
from hub.config import HubConfig
from hub.origin import OriginPolicy
from hub.routes.common import ApiError

UNAUTHORIZED = "a valid token is required (Authorization: Bearer TOKEN or ?token=)"


@attrs.frozen
class Access:
    authorizer: Authorizer
    origins: OriginPolicy

    @classmethod
    def for_config(cls, config: HubConfig) -> Access:
        return cls(
            Authorizer(config.agent_token, config.viewer_token, config.admin_token),
            OriginPolicy(config.allow_origins),
        )

    def role(self) -> Role:
        """The current request's role."""
        return self.authorizer.role(bearer_token(request.headers.get("Authorization"), request.args.get("token")))

    def need(self, write: bool) -> None:
        r = self.role()
        if r is Role.NONE:
            raise ApiError(401, "UNAUTHORIZED", UNAUTHORIZED)
        if write and not r.can_write:
            raise ApiError(403, "FORBIDDEN", "the viewer token may only read")

    def need_admin(self) -> None:
        self.need(write=False)
        if not self.role().can_delete:
            raise ApiError(403, "FORBIDDEN", "deleting logs needs the admin token (--admin-token)")

    def host_refusal(self, host: str) -> str | None:
        """Why a request addressed to `host` is refused (DNS rebinding), or None."""
        if not self.authorizer.open or self.origins.host_permitted(host):
            return None
        return (
            f"this hub has no tokens and answers only requests addressed to it by a loopback "
            f"name (localhost, 127.0.0.1, [::1]), not {host!r}; start it with --allow-origin "
            "for another name"
        )


def origin_refusal(origin: str) -> str:
    return (
        f"requests from a page on {origin} may not change anything here or open a WebSocket; "
        "start the hub with --allow-origin to permit that origin"
    )
