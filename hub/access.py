"""Who may do what: the request's role from its token, and the Origin and Host checks."""

from __future__ import annotations

import attrs
from quart import request
from werkzeug.sansio.request import Request as RequestHead

from hub.auth import Authorizer, Role, bearer_token
from hub.config import HubConfig
from hub.errors import ApiError
from hub.origin import OriginPolicy

UNAUTHORIZED = "a valid token is required (Authorization: Bearer TOKEN or ?token=)"
# Methods that change nothing: a foreign Origin may use them (hub/origin.py).
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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

    def role(self, head: RequestHead | None = None) -> Role:
        """The role of `head` (a request's method, URL and headers), by default the current request's."""
        head = request if head is None else head
        return self.authorizer.role(bearer_token(head.headers.get("Authorization"), head.args.get("token")))

    def need(self, write: bool) -> None:
        demand(self.role(), write=write)

    def need_admin(self) -> None:
        demand(self.role(), admin=True)

    def host_refusal(self, host: str) -> str | None:
        """Why a request addressed to `host` is refused (DNS rebinding), or None."""
        if not self.authorizer.open or self.origins.host_permitted(host):
            return None
        return (
            f"this hub has no tokens and answers only requests addressed to it by a loopback "
            f"name (localhost, 127.0.0.1, [::1]), not {host!r}; start it with --allow-origin "
            "for another name"
        )

    def place_refusal(self, head: RequestHead) -> ApiError | None:
        """Why `head` is refused for where it is addressed (Host) or comes from (Origin), or None."""
        refusal = self.host_refusal(head.host)
        if refusal is not None:
            return ApiError(403, "FORBIDDEN_HOST", refusal)
        # Reads are not refused: without CORS headers the page cannot see the answer.
        if head.method in READ_METHODS:
            return None
        origin = head.headers.get("Origin")
        if not self.origins.permits(origin, head.scheme, head.host):
            return ApiError(403, "FORBIDDEN_ORIGIN", origin_refusal(str(origin)))
        return None

    def body_refusal(self, head: RequestHead) -> ApiError | None:
        """Why a request that may carry a body is refused on its head alone, or None.

        Decided before a byte of the body is read (hub/admission.py), by the
        method, since no route has been chosen yet: a DELETE or a redaction
        needs the admin's token, any other change what writing needs, and a
        read that sends a body any valid token. The routes check again, for
        themselves.
        """
        refusal = self.place_refusal(head)
        if refusal is not None:
            return refusal
        try:
            demand(
                self.role(head),
                write=head.method not in READ_METHODS,
                admin=head.method == "DELETE" or is_redaction(head),
            )
        except ApiError as exc:
            return exc
        return None


def is_redaction(head: RequestHead) -> bool:
    return head.method == "POST" and head.path.rstrip("/").endswith("/redact")


def demand(role: Role, *, write: bool = False, admin: bool = False) -> None:
    """Raise the ApiError (401 or 403) for a request of `role` that must write or be the admin's."""
    if role is Role.NONE:
        raise ApiError(401, "UNAUTHORIZED", UNAUTHORIZED)
    if admin and not role.can_delete:
        raise ApiError(403, "FORBIDDEN", "deleting or redacting logs needs the admin token (--admin-token)")
    if write and not role.can_write:
        raise ApiError(403, "FORBIDDEN", "the viewer token may only read")


def origin_refusal(origin: str) -> str:
    return (
        f"requests from a page on {origin} may not change anything here or open a WebSocket; "
        "start the hub with --allow-origin to permit that origin"
    )
