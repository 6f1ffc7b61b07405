"""`keruta-hub`: parse flags (with environment fallbacks) and run the hub."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

import trio

from hub.config import HubConfig
from hub.origin import normalize_origin
from hub.store.base import DurabilityLost, StoreRefused
from keruta.cliargs import number, size

T = TypeVar("T")
# --retention-days further back than this would reach before year 1 (a
# datetime's range) and end the hub with a traceback at its first pass.
MAX_RETENTION_DAYS = 365_000
# A non-zero --rate-limit below this (a denormal float) makes 1/rate
# infinite: a Retry-After that cannot be written.
MIN_RATE_LIMIT = 1e-6

DESCRIPTION = """\
Run the keruta hub: receives log records from keruta-agent over WebSocket
(/api/v1/ws) and REST, stores them (SQLite by default, PostgreSQL for
production and for several hubs sharing one database), and serves them over
REST, WebSocket subscriptions and a web viewer.
"""

EPILOG = """\
environment fallbacks: KERUTA_HOST, KERUTA_PORT, KERUTA_DB, KERUTA_AGENT_TOKEN,
KERUTA_VIEWER_TOKEN, KERUTA_ADMIN_TOKEN. Flags win over the environment.

The hub refuses to listen on a non-loopback address unless a token is set.
Without tokens (loopback only) anyone on this machine may read, write and
delete. A browser page from another origin (an Origin header that is neither
the hub's own nor given with --allow-origin) may not open a WebSocket nor
POST/PUT/PATCH/DELETE: 403 FORBIDDEN_ORIGIN.
SIGTERM or Ctrl-C: stop accepting, commit and acknowledge what was received,
close WebSockets with 1001, exit 0.
"""


def _env_number(name: str, flag: str, parse: Callable[[str], T], default: T) -> T:
    """An environment fallback for a numeric flag, checked as the flag is: exit 2 naming both."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return parse(raw)
    except argparse.ArgumentTypeError as exc:
        print(f"keruta-hub: error: {name}={raw[:40]!r} (the default of {flag}): {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _log_level(text: str) -> str:
    if text.upper() not in logging.getLevelNamesMapping() or text.upper() == "NOTSET":
        raise argparse.ArgumentTypeError(f"not a log level: {text[:40]!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return text.upper()


_PORT = number(int, 0, high=65535)

# GET /logs reads `page * size` rows into the store's offset: keep it in int64.
MAX_PAGE_SIZE = 100_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="keruta-hub", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default=os.environ.get("KERUTA_HOST") or "127.0.0.1",
                   help="address to listen on (default 127.0.0.1; env KERUTA_HOST)")
    p.add_argument("--port", type=_PORT, default=_env_number("KERUTA_PORT", "--port", _PORT, 8080),
                   help="port to listen on; 0 picks a free one (default 8080; env KERUTA_PORT)")
    p.add_argument("--db", default=os.environ.get("KERUTA_DB") or "sqlite:///keruta.db",
                   help="store URL: sqlite:///PATH (default sqlite:///keruta.db) or "
                        "postgresql://USER@HOST:PORT/DB (env KERUTA_DB)")
    p.add_argument("--agent-token", default=os.environ.get("KERUTA_AGENT_TOKEN") or None,
                   help="token that may write and read (env KERUTA_AGENT_TOKEN)")
    p.add_argument("--viewer-token", default=os.environ.get("KERUTA_VIEWER_TOKEN") or None,
                   help="token that may only read (env KERUTA_VIEWER_TOKEN)")
    p.add_argument("--admin-token", default=os.environ.get("KERUTA_ADMIN_TOKEN") or None,
                   help="token that may read, write and delete logs; with tokens set, DELETE "
                        "needs it (env KERUTA_ADMIN_TOKEN)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="a browser origin (scheme://host[:port]) besides the hub's own whose "
                        "pages may open WebSockets and send POST/DELETE; repeatable")
    p.add_argument("--retention-days", type=number(float, 0, strict=True, high=MAX_RETENTION_DAYS), default=None,
                   help="delete records older than this many days (default: keep everything)")
    p.add_argument("--retention-interval", type=number(float, 0, strict=True), default=3600.0,
                   help="seconds between retention passes (default 3600)")
    p.add_argument("--max-task-bytes", type=size, default=None, metavar="SIZE",
                   help="keep at most SIZE of a task's messages (e.g. 100MB): its first half and its last "
                        "half, with one gap record saying what lies between (default: no cap; an agent's "
                        "--max-bytes asks for less)")
    p.add_argument("--rate-limit", type=number(float, 0), default=0.0,
                   help="records per second per task on ingest; WebSocket senders are slowed, "
                        "REST gets 429 with Retry-After; 0 = unlimited (default)")
    p.add_argument("--rate-burst", type=number(int, 1), default=5000,
                   help="records a task may send at once above the rate (default 5000)")
    p.add_argument("--subscriber-queue", type=number(int, 1), default=256,
                   help="frames queued per WebSocket before a slow subscriber is told "
                        "SLOW_CONSUMER and closed (default 256)")
    p.add_argument("--subscriber-queue-bytes", type=number(int, 1), default=16 * 1024 * 1024,
                   help="bytes of frames queued per WebSocket, replies to its writes included, "
                        "before a slow subscriber is told SLOW_CONSUMER and closed (default 16 MiB)")
    p.add_argument("--max-subscriptions", type=number(int, 1), default=100,
                   help="subscriptions one WebSocket may hold; past it a subscribe gets "
                        "TOO_MANY_SUBSCRIPTIONS (default 100)")
    p.add_argument("--max-page-size", type=number(int, 1, high=MAX_PAGE_SIZE), default=1000,
                   help=f"largest `size` GET /logs accepts (default 1000, at most {MAX_PAGE_SIZE})")
    p.add_argument("--ingest-queue-bytes", type=number(int, 1), default=8 * 1024 * 1024,
                   help="bytes of writes the hub holds (WebSocket frames and REST bodies), read and not yet "
                        "answered, across all connections; past it the hub stops reading its sockets "
                        "(default 8 MiB)")
    p.add_argument("--write-batch-size", type=number(int, 1), default=2000,
                   help="most records committed in one transaction (default 2000)")
    p.add_argument("--write-flush-interval", type=number(float, 0), default=0.0,
                   help="seconds the writer waits for more records before committing; "
                        "0 commits as soon as it is idle (default 0)")
    p.add_argument("--write-pace", type=number(float, 0), default=0.01,
                   help="while commits follow each other (one ended with requests waiting), at most one "
                        "starts per this many seconds; otherwise the next starts at once (default 0.01)")
    p.add_argument("--post-timeout", type=number(float, 0, strict=True), default=8.0,
                   help="seconds a REST POST waits for its commit before it is withdrawn and "
                        "answered 503 (not stored; safe to retry) (default 8)")
    p.add_argument("--body-timeout", type=number(float, 0, strict=True), default=30.0,
                   help="seconds a request body (after its token was checked) may take to "
                        "arrive; then the request is answered 408 and its connection "
                        "closed (default 30)")
    p.add_argument("--store-retry-max", type=number(float, 0, strict=True), default=5.0,
                   help="longest wait, in seconds, between the writer's attempts to commit "
                        "while the store is unavailable; the waits grow from 0.2 s up to it "
                        "(default 5)")
    p.add_argument("--db-timeout", type=number(float, 0, strict=True), default=30.0,
                   help="PostgreSQL: seconds the hub waits for the database to answer a command "
                        "or a new connection; a connection silent for longer is judged dead and "
                        "dropped (default 30)")
    p.add_argument("--db-ping-interval", type=number(float, 0, strict=True), default=15.0,
                   help="PostgreSQL: seconds without a notice after which the hub checks that its "
                        "LISTEN connection still answers (default 15)")
    p.add_argument("--ping-interval", type=number(float, 0, strict=True), default=5.0,
                   help="seconds between the pings sent on each WebSocket, which notice a "
                        "peer that vanished without closing (default 5)")
    p.add_argument("--log-level", type=_log_level, default="WARNING", help="hub's own log level (default WARNING)")
    return p


def config_from_args(args: argparse.Namespace) -> HubConfig:
    return HubConfig(
        host=args.host, port=args.port, db=args.db,
        agent_token=args.agent_token, viewer_token=args.viewer_token, admin_token=args.admin_token,
        allow_origins=tuple(args.allow_origin),
        retention_days=args.retention_days, retention_interval=args.retention_interval,
        max_task_bytes=args.max_task_bytes,
        rate_limit=args.rate_limit, rate_burst=args.rate_burst,
        subscriber_queue=args.subscriber_queue, max_page_size=args.max_page_size,
        subscriber_queue_bytes=args.subscriber_queue_bytes,
        ingest_queue_bytes=args.ingest_queue_bytes, max_subscriptions=args.max_subscriptions,
        write_batch_size=args.write_batch_size, write_flush_interval=args.write_flush_interval, write_pace=args.write_pace,
        post_timeout=args.post_timeout, body_timeout=args.body_timeout, store_retry_max=args.store_retry_max,
        db_timeout=args.db_timeout, db_ping_interval=args.db_ping_interval,
        ping_interval=args.ping_interval,
    )


def check_config(config: HubConfig) -> str | None:
    """A reason the hub must not start, or None."""
    if not config.host.strip():
        return "--host '': give an address to listen on (e.g. 127.0.0.1)"
    if not config.is_loopback() and not config.auth_enabled:
        return (
            f"refusing to listen on {config.host} without tokens: anyone who can reach it could "
            "read and write logs. Set --agent-token (and --viewer-token, --admin-token), or "
            "listen on 127.0.0.1."
        )
    for origin in config.allow_origins:
        if normalize_origin(origin) is None:
            return f"--allow-origin {origin!r}: give an origin, scheme://host[:port] (http or https)"
        if "*" in origin:
            # Taken as a name, a wildcard would match no browser's origin.
            return f"--allow-origin {origin!r}: wildcards are not origins; give each origin, scheme://host[:port]"
        if not origin.isascii():
            # A browser's Origin carries the name in its ASCII (IDNA, xn--) form:
            # this one would be accepted here and never match.
            return (f"--allow-origin {origin!r}: give the host name in its ASCII form "
                    f"({_idna_hint(origin)}), as a browser sends it")
    if config.subscriber_queue_bytes < 1 or config.max_subscriptions < 1:
        return "--subscriber-queue-bytes and --max-subscriptions must be >= 1"
    if not 0 <= config.port <= 65535:
        return f"--port {config.port} is not a port number"
    if config.subscriber_queue < 1 or config.max_page_size < 1 or config.write_batch_size < 1:
        return "--subscriber-queue, --max-page-size and --write-batch-size must be >= 1"
    if config.retention_days is not None and config.retention_days <= 0:
        return "--retention-days must be > 0"
    if 0 < config.rate_limit < MIN_RATE_LIMIT:
        return f"--rate-limit {config.rate_limit:g}: give 0 (off) or at least {MIN_RATE_LIMIT:g} records/s"
    return _token_problem(config) or _db_problem(config.db)


def _idna_hint(origin: str) -> str:
    parts = urllib.parse.urlsplit(origin.strip())
    try:
        ascii_host = (parts.hostname or "").encode("idna").decode()
    except UnicodeError:
        return "xn--..."
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{ascii_host}{port}"


_ROLE_FLAGS = ("--agent-token", "--viewer-token", "--admin-token")


def _token_problem(config: HubConfig) -> str | None:
    """Tokens travel in an `Authorization` header, which carries ASCII and
    loses the blanks at its ends; one token given to two roles gives the
    lesser role the greater's rights."""
    given: dict[str, str] = {}
    for flag, token in zip(_ROLE_FLAGS, (config.agent_token, config.viewer_token, config.admin_token), strict=True):
        if not token:
            continue  # empty: not set
        if not token.isascii() or not token.isprintable() or token != token.strip():
            return (f"{flag}: a token is printable ASCII without blanks at its ends (it is sent in an "
                    "Authorization header, which carries neither); this one is not")
        for other, value in given.items():
            if value == token:
                return f"{other} and {flag} are the same token: give each role its own"
        given[flag] = token
    return None


def _db_problem(db: str) -> str | None:
    usage = f"--db {db[:200]!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
    if db.startswith("sqlite://"):
        path = db.removeprefix("sqlite:///").split("?", 1)[0] if db.startswith("sqlite:///") else ""
        if not path or path == ":memory:" or path.startswith("file:") or path.endswith("/"):
            return f"{usage} (the store needs a file: no path, a directory or :memory: will not do)"
        return None
    if db.startswith(("postgresql://", "postgres://")):
        try:
            urllib.parse.urlsplit(db).port  # noqa: B018  (raises on a port that is no port)
        except ValueError as exc:
            return f"{usage} ({exc})"
        return None
    return usage


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_args(args)
    problem = check_config(config)
    if problem:
        print(f"keruta-hub: {problem}", file=sys.stderr)
        return 2
    from hub.server import serve

    tune_gc()
    try:
        trio.run(serve, config)
    except KeyboardInterrupt:
        return 130
    except (OSError, StoreRefused, DurabilityLost, BaseExceptionGroup) as exc:
        # Port taken, database unreachable or of another schema at start, the
        # disk lost commits...: one clear line, no traceback (those are for bugs).
        failure = _first_of(exc, (StoreRefused, DurabilityLost, OSError))
        if failure is None:
            raise
        if isinstance(failure, DurabilityLost):
            print(f"keruta-hub: stopped: {failure}", file=sys.stderr)
            return 1
        where = f" ({config.host}:{config.port})" if isinstance(failure, OSError) and failure.errno else ""
        print(f"keruta-hub: cannot start{where}: {failure}", file=sys.stderr)
        return 1
    return 0


def tune_gc() -> None:
    """The cyclic collector's settings for a hub process.

    A frame of 500 records allocates thousands of short-lived tracked objects
    (dicts, records, tuples) that refcounting frees, but at the default
    threshold of 700 the collector would run several times per frame over
    the records still in flight, promote them, and rescan them in the older
    generations: work that finds nothing to collect. What is loaded at start
    (modules, classes) is frozen out of every collection.
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _first_of(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of `kinds` in `exc` or the groups it holds, by the kinds' order."""
    for kind in kinds:
        found = _find(exc, kind)
        if found is not None:
            return found
    return None


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find(sub, kind)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
