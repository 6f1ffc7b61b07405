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


def _hub_import_graph() -> dict[str, set[str]]:
    """hub's runtime imports (not those under TYPE_CHECKING) between its
    parts: each subpackage (hub.actors, hub.ws, ...) one node, each top-level
    module one node."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "hub"

    def node(module: str) -> str:
        parts = module.split(".")
        if len(parts) >= 2 and (root / parts[1]).is_dir():
            return "hub." + parts[1]
        return ".".join(parts[:2])

    edges: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        typing_only = {
            id(inner)
            for n in ast.walk(tree)
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
            for inner in ast.walk(n)
        }
        for n in ast.walk(tree):
            if id(n) in typing_only:
                continue
            if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "hub":
                targets = [f"hub.{a.name}" for a in n.names] if n.module == "hub" else [n.module]
            elif isinstance(n, ast.Import):
                targets = [a.name for a in n.names if a.name.split(".")[0] == "hub"]
            else:
                continue
            for target in targets:
                if node(module) != node(target):
                    edges.setdefault(node(module), set()).add(node(target))
    return edges


def test_no_import_cycle_between_hub_packages() -> None:
    edges = _hub_import_graph()
    # The parts the architecture names are all in the graph.
    assert {"hub.actors", "hub.ws", "hub.store", "hub.routes"} <= set(edges)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = sorted(a for a in edges if reaches(a, a))
    assert cycles == []
