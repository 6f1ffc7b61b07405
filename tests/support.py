"""Running a real hub process for tests: start, wait until it listens, stop,
kill; and how many examples the fuzz tests generate."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

from tests.launch import DEVNULL, Child, spawn

# The fuzz tests' budget. The default keeps the suite (and `.ci/run`) bounded;
# `KERUTA_FUZZ=deep` (`tox -e fuzz`) generates ten times as many examples.
FUZZ_SCALE = 10 if os.environ.get("KERUTA_FUZZ") == "deep" else 1


def fuzz_examples(default: int) -> int:
    return default * FUZZ_SCALE


_LISTENING = re.compile(r"keruta-hub: listening on (http://\S+)")


class HubProcess:
    """A `python -m hub` child. `url` is its http://host:port once it listens."""

    def __init__(
        self, db: str, *args: str, port: int = 0, env: dict[str, str] | None = None, exec_: bool | None = None
    ) -> None:
        self.db = db
        self.args = list(args)
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.proc: Child | None = None
        self.url = ""
        self.output: list[str] = []
        # True: always a `python -m hub` start (tests/launch.py spawn), e.g. for an LD_PRELOAD.
        self.exec_ = exec_

    def start(self, timeout: float = 30.0) -> HubProcess:
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--db", self.db, *self.args]
        self.proc = spawn("hub", args, stdout=DEVNULL, env=self.env, exec_=self.exec_)
        found = threading.Event()
        stderr = self.proc.file("stderr", text=True)

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
