"""Running real `python -m hub` and `python -m agent` processes for tests
(start, wait until the hub listens, stop, kill), and how many examples the
fuzz tests generate.

A process is started as a user's shell would start it: `sys.executable -m
MODULE`, through subprocess (sync) or trio (async). Only tests where the
process is the point start one; the others serve the hub in their own trio
run (tests/inprocess.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

# The fuzz tests' budget. The default keeps the suite (and `.ci/run`) bounded;
# `KERUTA_FUZZ=deep` (`tox -e fuzz`) generates ten times as many examples.
FUZZ_SCALE = 10 if os.environ.get("KERUTA_FUZZ") == "deep" else 1


def fuzz_examples(default: int) -> int:
    return default * FUZZ_SCALE


def python_m(module: str, *args: str) -> list[str]:
    """The command line that starts `python -m MODULE ARGS` with this interpreter."""
    return [sys.executable, "-m", module, *args]


async def exited(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> int:
    """Wait in trio for a subprocess.Popen child to end; its exit status."""
    return await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)


_LISTENING = re.compile(r"keruta-hub: listening on (http://\S+)")


class HubProcess:
    """A `python -m hub` child. `url` is its http://host:port once it listens."""

    def __init__(self, db: str, *args: str, port: int = 0, env: dict[str, str] | None = None) -> None:
        self.db = db
        self.args = list(args)
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.output: list[str] = []

    def start(self, timeout: float = 30.0) -> HubProcess:
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--db", self.db, *self.args]
        self.proc = subprocess.Popen(
            python_m("hub", *args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=self.env, encoding="utf-8", errors="replace",
        )
        found = threading.Event()
        stderr = self.proc.stderr
        assert stderr is not None

        def pump() -> None:
            with stderr:
                for line in stderr:
                    self.output.append(line)
                    m = _LISTENING.search(line)
                    if m and not found.is_set():
                        self.url = m.group(1)
                        found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("hub did not start:\n" + "".join(self.output))
        # Keep the port so a restart listens where clients reconnect to.
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/api/v1/ws"

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> HubProcess:
        """Start again on the same port and database (after kill or terminate)."""
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def websocket_app(body: Callable[[Any, Any, Any], Awaitable[None]]) -> Any:
    """A bare ASGI app for hypercorn: lifespan answered, a WebSocket accepted,
    then `body(receive, send, link)` with the connection's InlineLink
    (hub/hypercorn_patches.py, patch 6). tests/test_hypercorn_patches.py and
    bench/idle_floor.py serve it."""
    from hub import hypercorn_patches

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "websocket":
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await body(receive, send, hypercorn_patches.current_link())

    return app


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Ask `check` until it answers something true (a browser page, a file
    between states), for at most `timeout` s: a hang guard, not a timing."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # the page may be between states; keep asking
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")
