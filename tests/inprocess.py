"""A real hub run inside the test's own trio run: `hub.server.serve` on loopback.

The same hub as `python -m hub` (same `serve`, same flags parsed by the CLI's
own parser, real sockets, real SQLite or PostgreSQL), without a process start
per test. Tests where the process is the point (SIGKILL, SIGTERM, CLI flags,
exit codes, environment fallbacks) use `tests.hubclient.TestHub` instead.

The hub runs in a nursery owned by the `hub_factory` fixture: if it crashes,
the test fails with the hub's exception. Its log (what a process hub prints on
stderr) is captured from the logging module for `stderr_text`.
"""

from __future__ import annotations

import gc
import logging
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio
from werkzeug.routing.rules import Rule

from hub.cli import build_parser, check_config, config_from_args, tune_gc
from hub.config import HubConfig


class LogCapture(logging.Handler):
    """What a hub process would print on stderr at its default WARNING level."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record) + "\n")
        except Exception:  # a handler must not raise into the code that logs
            self.lines.append("".join(traceback.format_exc()))


def hub_config(db: str, args: list[str], port: int) -> HubConfig:
    """The config `python -m hub --host 127.0.0.1 --port PORT --db DB ARGS` would run."""
    parsed = build_parser().parse_args(["--host", "127.0.0.1", "--port", str(port), "--db", db, *args])
    config = config_from_args(parsed)
    problem = check_config(config)
    if problem:
        raise ValueError(problem)
    return config


class InProcessHub:
    """A hub served in the test's trio run; the same test-facing API as TestHub."""

    __test__ = False

    def __init__(self, factory: InProcessHubFactory, db: str, *args: str) -> None:
        self.factory = factory
        self.db = db
        self.args = list(args)
        self.port = 0
        self.url = ""
        self._scope: trio.CancelScope | None = None
        self._ended: trio.Event | None = None

    # --- the same helpers as a process hub ---

    @property
    def store(self) -> str:
        return "sqlite" if self.db.startswith("sqlite://") else "postgres"

    @property
    def db_path(self) -> Path:
        assert self.store == "sqlite", f"{self.db} is not a SQLite file"
        return Path(self.db.removeprefix("sqlite:///"))

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/api/v1/ws"

    def http(self, token: str | None = None, **kwargs: Any) -> Any:
        from tests.hubclient import http_client

        return http_client(self.url, token, **kwargs)

    def ws(self, token: str | None = None, query_token: str | None = None, **kwargs: Any) -> Any:
        from tests.hubclient import ws_for

        return ws_for(self.ws_url, token, query_token, **kwargs)

    @property
    def stderr_text(self) -> str:
        return "".join(self.factory.log.lines)

    @property
    def alive(self) -> bool:
        """Serving: started and not ended (a crash would also fail the test)."""
        return self._ended is not None and not self._ended.is_set()

    # --- life ---

    async def astart(self) -> InProcessHub:
        config = hub_config(self.db, self.args, self.port)
        binds: list[str] = await self.factory.nursery.start(self._serve, config)
        self.url = binds[0]
        # Kept so a restart listens where clients reconnect to.
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    async def _serve(self, config: HubConfig, task_status: trio.TaskStatus[list[str]]) -> None:
        from hub.server import serve

        self._ended = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                await serve(config, task_status=task_status)
        finally:
            self._ended.set()

    async def astop(self) -> None:
        """Stop serving (cancelled: no graceful shutdown); the store is closed."""
        if self._scope is not None:
            self._scope.cancel()
        if self._ended is not None:
            await self._ended.wait()

    async def arestart(self) -> InProcessHub:
        await self.astop()
        return await self.astart()


class InProcessHubFactory:
    """Starts in-process hubs, each on a new database from `new_db`; stops them at teardown.

    Like HubFactory, a watchdog stops the test's hubs after `deadline` seconds,
    so a test stuck waiting on a hub fails instead of hanging the suite.
    """

    def __init__(self, new_db: Callable[[], str], nursery: trio.Nursery, deadline: float) -> None:
        self.new_db = new_db
        self.nursery = nursery
        self.hubs: list[InProcessHub] = []
        self.log = LogCapture()
        self.expired = False
        token = trio.lowlevel.current_trio_token()

        def expire() -> None:
            try:
                trio.from_thread.run_sync(self._expire, trio_token=token)
            except trio.RunFinishedError:
                pass

        # A thread, not a trio sleep: under autojump_clock a sleep would end at once.
        self._watchdog = threading.Timer(deadline, expire)
        self._watchdog.daemon = True

    def _expire(self) -> None:
        self.expired = True
        for hub in self.hubs:
            if hub._scope is not None:
                hub._scope.cancel()

    def make(self, *args: str, db: str | None = None) -> InProcessHub:
        hub = InProcessHub(self, db or self.new_db(), *args)
        self.hubs.append(hub)
        return hub

    async def astart(self, *args: str, db: str | None = None) -> InProcessHub:
        return await self.make(*args, db=db).astart()

    async def aclose(self) -> None:
        self._watchdog.cancel()
        if self.expired:
            print("--- the watchdog stopped this test's hubs: the test was stuck ---")
        with trio.CancelScope(shield=True):
            for hub in self.hubs:
                await hub.astop()
        # Shown by pytest only when the test failed: the hubs' own account.
        print(f"--- in-process hubs' log ---\n{''.join(self.log.lines)}")


def _share_url_builders() -> None:
    """Compile each of werkzeug's URL builders once per test process, not once per hub.

    For every route, werkzeug generates and compiles two small Python functions
    (`Rule._compile_builder`) that build its URL; that is ~20 ms of CPU per
    `create_app`, half of an in-process hub's start, and a run starts hundreds.
    A builder depends only on the route's parsed parts (it reaches the route's
    converters through the `self` it is bound to), so the same function serves
    every hub's copy of the route. Rules with defaults, whose values are baked
    into the code, are compiled as before.
    """
    original = Rule._compile_builder
    compiled: dict[tuple[Any, ...], Any] = {}

    def compile_builder(self: Rule, append_unknown: bool = True) -> Any:
        if self.defaults:
            return original(self, append_unknown)
        key = (tuple(self._trace), append_unknown)
        if key not in compiled:
            compiled[key] = original(self, append_unknown)
        return compiled[key]

    Rule._compile_builder = compile_builder  # type: ignore[method-assign]


_share_url_builders()


@contextmanager
def hub_gc_settings() -> Iterator[None]:
    """The collector as `keruta-hub` sets it (hub.cli.tune_gc), while hubs run here.

    Without it an in-process hub pays for the test process's much larger heap
    (pytest, hypothesis, schemathesis...) in every full collection, and is
    slower than the hub it stands for.
    """
    threshold = gc.get_threshold()
    tune_gc()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


@asynccontextmanager
async def in_process_hubs(new_db: Callable[[], str], deadline: float) -> AsyncIterator[InProcessHubFactory]:
    root = logging.getLogger()
    with hub_gc_settings():
        async with _serving(new_db, deadline, root) as factory:
            yield factory


@asynccontextmanager
async def _serving(
    new_db: Callable[[], str], deadline: float, root: logging.Logger
) -> AsyncIterator[InProcessHubFactory]:
    async with trio.open_nursery() as nursery:
        factory = InProcessHubFactory(new_db, nursery, deadline)
        root.addHandler(factory.log)
        factory._watchdog.start()
        try:
            yield factory
        finally:
            root.removeHandler(factory.log)
            await factory.aclose()
