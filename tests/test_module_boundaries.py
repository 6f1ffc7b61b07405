"""Where the layers meet: the sans-IO cores import nothing that does I/O.

Checked in a fresh interpreter, so what another test imported first does not
hide an import."""

from __future__ import annotations

import subprocess
import sys

import orjson

# What doing I/O means here: an event loop, sockets, HTTP, the agent's Trio
# pipeline and its disk spool.
IO_MODULES = ("trio", "trio_websocket", "httpx", "wsproto", "agent.pipeline", "agent.spool")


def modules_loaded_by(*modules: str) -> list[str]:
    script = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True, timeout=60)
    return list(orjson.loads(done.stdout))


def test_the_uplink_protocol_imports_no_io() -> None:
    loaded = modules_loaded_by("agent.link.protocol", "agent.link.batcher", "agent.link.framing")
    io = [m for m in loaded if any(m == p or m.startswith(p + ".") for p in IO_MODULES)]
    assert io == []
