"""The hub's settings: CLI flags, their environment fallbacks and defaults."""

from __future__ import annotations

import ipaddress

import attrs

from keruta.limits import DEFAULT_LIMITS, Limits


@attrs.frozen
class HubConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    db: str = "sqlite:///keruta.db"
    agent_token: str | None = None
    viewer_token: str | None = None
    admin_token: str | None = None
    # Origins (scheme://host[:port]) besides the hub's own whose browser pages
    # may open a WebSocket or change something.
    allow_origins: tuple[str, ...] = ()
    retention_days: float | None = None
    # Message bytes a task keeps at most, its first half and its last half
    # (an agent's --max-bytes may ask for less); None: no cap.
    max_task_bytes: int | None = None
    retention_interval: float = 3600.0
    # Records per second per task on ingest; 0 is unlimited (the seed's RateLimiter).
    rate_limit: float = 0.0
    rate_burst: int = 5000
    # Frames queued per subscriber before it is told SLOW_CONSUMER.
    subscriber_queue: int = 256
    # ... and bytes: frames can be megabytes each (escaping, metadata), so a
    # frame count alone does not bound a subscriber's memory.
    subscriber_queue_bytes: int = 16 * 1024 * 1024
    # Subscriptions one connection may hold.
    max_subscriptions: int = 100
    # A subscriber catching up from the store whose queue stays full this long
    # is a slow consumer too.
    slow_consumer_after: float = 10.0
    max_page_size: int = 1000
    # The writer commits whatever is waiting, up to this many records a transaction
    # (the seed's batchSize/bufferSize) ...
    write_batch_size: int = 2000
    # ... and, when it is above zero, waits this long for more before a commit
    # (the seed's flushInterval). Zero commits as soon as the writer is idle.
    write_flush_interval: float = 0.0
    # While commits follow each other, at most one starts per this many seconds,
    # gathering what arrives meanwhile; after a quiet spell a commit starts at
    # once (hub/actors/pacing.py). Zero: every commit as soon as the writer is idle.
    write_pace: float = 0.01
    # Requests waiting for the writer across all connections; a full inbox slows
    # senders (their bytes are bounded by `ingest_queue_bytes`): enough slots
    # that a fleet's one-record frames go in without waiting.
    writer_inbox: int = 1024
    # Bytes of writes the hub holds, WebSocket frames and REST bodies, read and
    # not yet answered, across all connections (hub/ingest_budget.py,
    # hub/admission.py); past it the hub stops reading its sockets.
    ingest_queue_bytes: int = 8 * 1024 * 1024
    # Hypercorn pings each WebSocket this often, so a vanished peer is noticed on
    # the write; a closed socket's ping task lingers this long, which bounds how
    # long a shutdown waits for it.
    ping_interval: float = 5.0
    shutdown_timeout: float = 10.0
    # A REST POST not committed after this long is withdrawn and answered 503
    # (not stored; safe to retry), so it answers within 10 s even while the
    # store is down. See hub/actors/writer.py write_within.
    post_timeout: float = 8.0
    # A request admitted on its token (hub/admission.py) whose body has not all
    # arrived after this long is answered 408 and its connection closed: a
    # client that stalls mid-body holds its buffer no longer. Generous enough
    # for a 4 MiB body over a slow link.
    body_timeout: float = 30.0
    # While the store is unavailable the writer tries its commit again after
    # waits growing from 0.2 s up to this: the longest a recovered store goes
    # unnoticed.
    store_retry_max: float = 5.0
    # PostgreSQL: the longest the hub waits for the database to answer (a
    # command, a new connection); a connection that does not answer in time is
    # judged dead and terminated. The LISTEN connection is pinged after this
    # long without a notice (and must answer within the smaller of the two).
    db_timeout: float = 30.0
    db_ping_interval: float = 15.0
    limits: Limits = DEFAULT_LIMITS

    @property
    def auth_enabled(self) -> bool:
        return bool(self.agent_token or self.viewer_token or self.admin_token)

    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    """An address only this machine can reach: 127.0.0.0/8, ::1 or `localhost`.

    Parsed, not prefix-matched: `127.example.com` is a name anyone's DNS may
    point anywhere.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
