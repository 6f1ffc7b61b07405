"""Clients and fixtures for integration tests against a real hub.

Everything here talks to a real hub over real sockets and reads its real
database (SQLite file or PostgreSQL); nothing is mocked. `hub_factory` and
`hub` serve the hub inside the test's trio run (tests/inprocess.py);
`hub_process_factory` and `hub_process` run `python -m hub` children, for tests
where the process is the point (SIGKILL, signals, CLI flags, exit codes). All
run each test once per store; the PostgreSQL half needs KERUTA_TEST_PG_DSN and
gives every test its own database. Import the fixtures into a test module with
`hub, hub_factory = hubclient.hub, hubclient.hub_factory`.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sqlite3
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

from agent.http import system_tls
from keruta.frames import LogsFrame
from keruta.records import LogRecord
from keruta.timefmt import now_ts
from keruta.wire import decode_hub_frame, encode_bytes, record_to_wire
from tests import pgpool
from tests.inprocess import InProcessHub, InProcessHubFactory, in_process_hubs
from tests.support import HubProcess, sqlite_url

# The canonical wire form of a timestamp: UTC, six fractional digits, `Z`.
CANONICAL_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
# Replay frames can be large; trio-websocket's 1 MiB default would cut us off.
MAX_WS_MESSAGE = 64 * 1024 * 1024
# Hang guard for waits on the hub: not a performance assertion, only a way to
# turn "the hub never answered" into a failure instead of a stuck suite.
PATIENCE = 60.0
# After this long a test's hubs are killed (see HubFactory).
TEST_DEADLINE = 180.0


class TestHub(HubProcess):
    """A hub child on its own database (SQLite file or PostgreSQL), with async helpers for trio tests."""

    __test__ = False  # a helper, not a test class, though test modules import it

    def __init__(self, db: str, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(db, *args, env=env)

    @property
    def store(self) -> str:
        """Which store this hub's `--db` selects: "sqlite" or "postgres"."""
        return "sqlite" if self.db.startswith("sqlite://") else "postgres"

    @property
    def db_path(self) -> Path:
        """The SQLite file (only for hubs on SQLite)."""
        assert self.store == "sqlite", f"{self.db} is not a SQLite file"
        return Path(self.db.removeprefix("sqlite:///"))

    def start(self, timeout: float = 30.0) -> TestHub:
        super().start(timeout)
        return self

    def restart(self) -> TestHub:
        return self.start()

    async def astart(self) -> TestHub:
        # Starting blocks until the child prints its address: keep it off the trio loop.
        return await trio.to_thread.run_sync(self.start)

    async def arestart(self) -> TestHub:
        return await trio.to_thread.run_sync(self.restart)

    async def aterminate(self, timeout: float = 30.0) -> int:
        return await trio.to_thread.run_sync(lambda: self.terminate(timeout))

    def http(self, token: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        return http_client(self.url, token, **kwargs)

    def ws(self, token: str | None = None, query_token: str | None = None, **kwargs: Any) -> Any:
        return ws_for(self.ws_url, token, query_token, **kwargs)

    @property
    def stderr_text(self) -> str:
        return "".join(self.output)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def http_client(url: str, token: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs.setdefault("timeout", 30.0)
    # One CA store per process (agent/http.py): httpx would load it (~40 ms of CPU) per client.
    kwargs.setdefault("verify", system_tls())
    return httpx.AsyncClient(base_url=url, headers=headers, **kwargs)


def ws_for(ws_url: str, token: str | None = None, query_token: str | None = None, **kwargs: Any) -> Any:
    if query_token is not None:
        ws_url += "?" + urllib.parse.urlencode({"token": query_token})
    return ws_connect(ws_url, token=token, **kwargs)


class SqliteFiles:
    """New databases for one test: a fresh SQLite file each, under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.made = 0

    def __call__(self) -> str:
        path = self.tmp_path / f"keruta-{self.made}.db"
        self.made += 1
        return sqlite_url(path)

    def drop(self) -> None:
        pass  # tmp_path is pytest's to clean


class PgDatabases:
    """Empty databases for one test: the test's own PostgreSQL database first,
    then one more per call from the worker's pool (tests/pgpool.py), given
    back at teardown."""

    def __init__(self, first_url: str, admin_dsn: str) -> None:
        self.first_url: str | None = first_url
        self.pool = pgpool.pool_for(admin_dsn)
        self.taken: list[str] = []

    def __call__(self) -> str:
        if self.first_url is not None:
            url, self.first_url = self.first_url, None
            return url
        url = self.pool.acquire()
        self.taken.append(url)
        return url

    def drop(self) -> None:
        for url in self.taken:
            self.pool.release(url)


class HubFactory:
    """Starts hubs, each on a new database from `new_db`; stops them all at teardown.

    `make(db=other.db)` starts a hub on an existing hub's database instead.
    A watchdog kills the test's hubs after TEST_DEADLINE seconds, so a test
    stuck waiting on a hub fails (its connections break) instead of hanging
    the suite.
    """

    def __init__(self, new_db: Callable[[], str]) -> None:
        self.new_db = new_db
        self.hubs: list[TestHub] = []
        self.expired = False
        self._watchdog = threading.Timer(TEST_DEADLINE, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        self.expired = True
        for hub in self.hubs:
            if hub.proc is not None and hub.proc.poll() is None:
                hub.proc.kill()

    def make(self, *args: str, db: str | None = None, env: dict[str, str] | None = None) -> TestHub:
        hub = TestHub(db or self.new_db(), *args, env=env)
        self.hubs.append(hub)
        return hub

    def start(self, *args: str, db: str | None = None, env: dict[str, str] | None = None) -> TestHub:
        return self.make(*args, db=db, env=env).start()

    async def astart(self, *args: str, db: str | None = None, env: dict[str, str] | None = None) -> TestHub:
        return await self.make(*args, db=db, env=env).astart()

    def close(self) -> None:
        self._watchdog.cancel()
        if self.expired:
            print(f"--- the watchdog killed this test's hubs after {TEST_DEADLINE} s: the test was stuck ---")
        for hub in self.hubs:
            hub.stop()
            # Shown by pytest only when the test failed: the hub's own account.
            print(f"--- hub on {hub.db} stderr ---\n{hub.stderr_text}")


@pytest.fixture
def hub_process_factory(hub_databases: SqliteFiles | PgDatabases) -> Iterator[HubFactory]:
    """Hub processes for one test, once per store: for tests where the process
    is the point (signals, SIGKILL, CLI flags and environment, exit codes, stderr)."""
    factory = HubFactory(hub_databases)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def hub_process(hub_process_factory: HubFactory) -> TestHub:
    """A hub process on a fresh database of the test's store, default settings, no tokens."""
    return hub_process_factory.start()


@pytest.fixture
async def hub_factory(hub_databases: SqliteFiles | PgDatabases) -> AsyncIterator[InProcessHubFactory]:
    """In-process hubs for one test (tests/inprocess.py), once per store."""
    async with in_process_hubs(hub_databases, TEST_DEADLINE) as factory:
        yield factory


@pytest.fixture
async def sqlite_hub_factory(tmp_path: Path) -> AsyncIterator[InProcessHubFactory]:
    """In-process hubs on SQLite only, for tests about the hub's edges rather than its store."""
    async with in_process_hubs(SqliteFiles(tmp_path), TEST_DEADLINE) as factory:
        yield factory


@pytest.fixture
async def hub(hub_factory: InProcessHubFactory) -> InProcessHub:
    """An in-process hub on a fresh database of the test's store, default settings, no tokens."""
    return await hub_factory.astart()


# --- records and frames ------------------------------------------------------


def make_record(
    task_id: str,
    seq: int,
    message: str | None = None,
    *,
    source: str = "stdout",
    level: str = "INFO",
    timestamp: str | None = None,
    line_number: int | None = None,
    metadata: dict[str, Any] | None = None,
    partial: bool = False,
) -> LogRecord:
    return LogRecord(
        task_id=task_id,
        seq=seq,
        timestamp=timestamp or now_ts(),
        source=source,
        level=level,
        message=f"line {seq}" if message is None else message,
        line_number=seq if line_number is None else line_number,
        metadata=metadata or {},
        partial=partial,
    )


def logs_frame(task_id: str, records: Iterable[LogRecord]) -> str:
    return encode_bytes(LogsFrame(task_id, list(records))).decode()


def encode_record(record: LogRecord) -> dict[str, Any]:
    return record_to_wire(record)


def batch_frames(
    task_id: str, first: int, last: int, batch: int, make: Callable[[str, int], LogRecord] = make_record
) -> Iterator[str]:
    """`logs` frames carrying seq first..last, `batch` records each, made by `make`
    (by default one timestamp per frame, as a batch made at one moment has)."""
    for start in range(first, last + 1, batch):
        stop = min(start + batch - 1, last)
        if make is make_record:
            ts = now_ts()
            records: Iterable[LogRecord] = (make_record(task_id, s, timestamp=ts) for s in range(start, stop + 1))
        else:
            records = (make(task_id, s) for s in range(start, stop + 1))
        yield logs_frame(task_id, records)


# --- WebSocket --------------------------------------------------------------


# What a connection to a hub that was killed or closed it raises.
GONE = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def send_until_gone(ws: Ws, frames: Iterable[Any]) -> None:
    """Send `frames` in order; stop quietly where the connection is gone."""
    try:
        for frame in frames:
            await ws.send(frame)
    except GONE:
        pass


class HubError(AssertionError):
    """The hub sent an `error` frame where the test expected none."""


class Ws:
    """A WebSocket client that speaks the contract's JSON frames."""

    def __init__(self, conn: WebSocketConnection) -> None:
        self.conn = conn
        self.acked: dict[str, int] = {}

    async def send(self, frame: Any) -> None:
        if isinstance(frame, str):
            text = frame
        elif isinstance(frame, dict | list):
            text = orjson.dumps(frame).decode()
        else:
            text = encode_bytes(frame).decode()
        await self.conn.send_message(text)

    async def recv(self) -> dict[str, Any]:
        """The next frame, checked against the contract's hub frames."""
        message = await self.conn.get_message()
        assert isinstance(message, str), f"hub sent a binary frame: {message[:200]!r}"
        data = orjson.loads(message)
        decode_hub_frame(message)  # raises if the frame breaks the contract
        if data["type"] == "ack":
            previous = self.acked.get(data["taskId"], 0)
            self.acked[data["taskId"]] = max(previous, data["seq"])
        return data

    async def recv_type(self, kind: str, skip: tuple[str, ...] = ("ack",)) -> dict[str, Any]:
        """The next frame of `kind`, skipping only frames whose type is in `skip`."""
        while True:
            frame = await self.recv()
            if frame["type"] == kind:
                return frame
            if frame["type"] not in skip:
                raise HubError(f"expected a {kind!r} frame, got {frame}")

    async def wait_ack(self, task_id: str, seq: int) -> None:
        """Read until an ack for task_id covers seq; any `error` frame fails."""
        while self.acked.get(task_id, 0) < seq:
            frame = await self.recv()
            if frame["type"] == "error":
                raise HubError(f"error frame while waiting for ack {seq}: {frame}")

    async def subscribe(self, task_id: str, from_seq: int | None = None, **filters: str) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "subscribe", "taskId": task_id}
        if from_seq is not None:
            frame["fromSeq"] = from_seq
        frame.update(filters)
        await self.send(frame)
        return await self.recv_type("subscribed")

    async def collect(self, task_id: str, last_seq: int) -> list[int]:
        """Seqs from `logs` frames until last_seq arrives; `status`/`ack` ignored."""
        seqs: list[int] = []
        while not seqs or seqs[-1] < last_seq:
            frame = await self.recv()
            if frame["type"] == "logs":
                assert frame["taskId"] == task_id
                seqs.extend(r["seq"] for r in frame["records"])
            elif frame["type"] == "error":
                raise HubError(f"subscriber got an error frame after {len(seqs)} records: {frame}")
        return seqs


@asynccontextmanager
async def ws_connect(url: str, token: str | None = None, **kwargs: Any) -> AsyncIterator[Ws]:
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
    kwargs.setdefault("max_message_size", MAX_WS_MESSAGE)
    kwargs.setdefault("receive_buffer_size", 64 * 1024)
    async with open_websocket_url(url, extra_headers=headers, **kwargs) as conn:
        yield Ws(conn)


@asynccontextmanager
async def open_stalled_ws(url: str) -> AsyncIterator[Ws]:
    """A client whose socket holds almost nothing, so not reading stalls the hub's sends.

    trio-websocket reads in the background; with a one-message queue and a tiny
    kernel receive buffer, a client that stops calling recv() stops the flow
    after a few KiB instead of after megabytes of kernel buffering.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, port))
    stream = trio.SocketStream(sock)
    try:
        async with trio.open_nursery() as nursery:
            conn = await wrap_client_stream(
                nursery,
                stream,
                f"{host}:{port}",
                resource,
                message_queue_size=1,
                max_message_size=MAX_WS_MESSAGE,
                receive_buffer_size=4096,
            )
            try:
                yield Ws(conn)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        # Closed outside the cancelled nursery: a checkpoint inside it would raise
        # a Cancelled that the nursery swallows, and the test's own error with it.
        await trio.aclose_forcefully(stream)


async def drain_until_closed(ws: Ws) -> tuple[list[dict[str, Any]], int | None]:
    """Every frame until the hub closes the connection, and the close code."""
    frames: list[dict[str, Any]] = []
    try:
        while True:
            frames.append(await ws.recv())
    except ConnectionClosed as closed:
        return frames, closed.reason.code if closed.reason else None


# --- REST -------------------------------------------------------------------


def logs_path(task_id: str, suffix: str = "") -> str:
    return f"/api/v1/tasks/{task_id}/logs{suffix}"


async def fetch_all(client: httpx.AsyncClient, task_id: str, **params: Any) -> list[dict[str, Any]]:
    """Every record of a task (matching params), following the afterSeq cursor."""
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        resp = await client.get(logs_path(task_id), params={**params, "afterSeq": after, "size": 1000})
        assert resp.status_code == 200, resp.text
        content = resp.json()["content"]
        if not content:
            return out
        out.extend(content)
        after = content[-1]["seq"]


def assert_error(resp: httpx.Response, status: int, code: str, mentions: str | None = None) -> dict[str, Any]:
    """The response is the contract's JSON error with this status and code."""
    assert resp.status_code == status, (
        f"{resp.request.method} {resp.request.url}: expected {status} {code}, "
        f"got {resp.status_code}: {resp.text[:500]}"
    )
    body = resp.json()
    assert body.get("error") == code, body
    assert isinstance(body.get("message"), str) and body["message"], body
    if mentions is not None:
        assert mentions in body["message"], f"error message should name {mentions!r}: {body}"
    return body


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {series name: value summed over labels}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC.match(line)
        if m:
            values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(2))
    return values


# --- the database itself ----------------------------------------------------


async def stored(hub: TestHub, task_id: str, **params: str) -> list[dict[str, Any]]:
    """Every record of a task, as REST answers them."""
    async with hub.http() as client:
        return await fetch_all(client, task_id, **params)


async def task_state(hub: TestHub, task_id: str) -> dict[str, Any]:
    """A task as GET /api/v1/tasks/{taskId} answers it (it must exist)."""
    async with hub.http() as client:
        resp = await client.get(f"/api/v1/tasks/{task_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]


def _seqs_of_chunks(rows: list) -> list[int]:
    """The seqs the chunk rows (seq_first, lines, body) hold, in the stores' format (hub/store/chunk.py)."""
    from hub.store import chunk

    return [seq for first, lines, body in rows for seq in chunk.seqs_of(chunk.columns(lines, body), first)]


def read_stored_seqs(db: str, task_id: str) -> list[int]:
    """The seqs stored for a task, read straight from the database (hub stopped or not)."""
    if db.startswith("sqlite://"):
        conn = sqlite3.connect(db.removeprefix("sqlite:///"), timeout=30)
        try:
            rows = conn.execute(
                "SELECT seq_first, lines, body FROM keruta_chunks WHERE task_id = ? ORDER BY seq_last", (task_id,)
            ).fetchall()
        finally:
            conn.close()
        return _seqs_of_chunks(rows)

    import asyncpg

    async def query() -> list[int]:
        conn = await asyncpg.connect(db)
        try:
            rows = await conn.fetch(
                "SELECT seq_first, lines, body FROM keruta_chunks WHERE task_id = $1 ORDER BY seq_last", task_id
            )
        finally:
            await conn.close()
        return _seqs_of_chunks(rows)

    # Plain asyncio, in a worker thread: no trio-asyncio loop needed in the test.
    return asyncio.run(query())


async def stored_seqs(hub: TestHub, task_id: str) -> list[int]:
    """The seqs the hub's database holds for a task, read without the hub."""
    return await trio.to_thread.run_sync(read_stored_seqs, hub.db, task_id)
