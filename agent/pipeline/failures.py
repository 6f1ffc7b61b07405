"""Why an uplink session ended, and whether another one is worth it: a
transient failure is waited out (backoff, new session), a permanent one
(the hub's PERMANENT_CODES, 401/403, a close with 1008, a bug) ends delivery."""

from __future__ import annotations

import h11
import trio
import wsproto.utilities
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from agent.link.protocol import HubRefused

# The hub closes with 1008 (policy) after UNAUTHORIZED.
CLOSE_POLICY = 1008


class UplinkFailed(Exception):
    """Delivery stopped for good: retrying as it is cannot succeed.
    Raised `from` the error; the records are still in the spool."""

    def __init__(self, reason: str, internal: bool) -> None:
        super().__init__(reason)
        self.internal = internal


_TRANSIENT = (
    OSError,  # refused, reset, timeouts
    HandshakeError,
    ConnectionClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    # What answers at the hub's address does not speak HTTP or WebSocket as a
    # hub does (another service, a proxy's error page, a hub restarting behind
    # a balancer): waited out as a refused connection is, the records kept.
    h11.ProtocolError,
    wsproto.utilities.ProtocolError,
)


def is_transient(error: BaseException) -> bool:
    """Worth another session after a backoff (see PERMANENT_CODES)?"""
    if isinstance(error, HubRefused):
        return not error.permanent
    if isinstance(error, ConnectionRejected):
        return error.status_code not in (401, 403)
    if isinstance(error, ConnectionClosed):
        return error.reason is None or error.reason.code != CLOSE_POLICY
    return isinstance(error, _TRANSIENT)


def first_permanent(error: BaseException) -> BaseException:
    """The error that ended delivery; the hub's own words first (its error
    frame and the close that follows it can both be in the group)."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    leaves = [first_permanent(e) for e in error.exceptions]
    permanent = [e for e in leaves if not is_transient(e)] or leaves
    return next((e for e in permanent if isinstance(e, HubRefused)), permanent[0])


def describe(error: BaseException) -> str:
    """A one-line reason for a failed session, for humans."""
    if isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        return describe(error.exceptions[0])
    if isinstance(error, ConnectionRejected):
        hint = " (check --token / KERUTA_TOKEN)" if error.status_code in (401, 403) else ""
        return f"refused the connection: HTTP {error.status_code}{hint}"
    if isinstance(error, HandshakeError):
        cause = error.__cause__ or error.__context__
        return f"cannot connect ({describe(cause) if cause else type(error).__name__})"
    if isinstance(error, ConnectionClosed):
        reason = error.reason
        if reason is None:
            return "connection closed"
        hint = " (check --token / KERUTA_TOKEN)" if reason.code == CLOSE_POLICY else ""
        return f"connection closed ({reason.code} {reason.reason or ''})".replace(" )", ")") + hint
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if isinstance(error, h11.ProtocolError | wsproto.utilities.ProtocolError):
        return f"what answers there does not speak to us as a keruta hub does ({error})"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
