"""Hostile operators and clients against the hub's operations surfaces:
`python -m hub` flags and environment at their edges (hub/cli.py), /metrics
and /healthz (hub/metrics.py, hub/routes/ops.py) under floods of distinct
client-made names, a flood of writes and a held database, the OpenAPI
document against the routes really served (hub/openapi.py, hub/app.py), and
the per-task rate limiter (hub/task_rate_limits.py) under many tasks.

What is checked, every time: the exit code or status, the message (one line
naming the flag, never a traceback), bounds (metrics text, the hub process's
memory), and that other clients are still served. Real processes, sockets
and SQLite files; nothing is mocked.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from hub.app import create_app
from hub.openapi import openapi_document
from keruta.timefmt import now_ts
from tests import hubclient
from tests.hubclient import (
    InProcessHubFactory,
    TestHub,
    assert_error,
    fetch_all,
    logs_path,
    parse_metrics,
)
from tests.support import python_m
from tests.test_store_hostile import SQLITE_HOLDER, holding, wire

sqlite_hub_factory = hubclient.sqlite_hub_factory  # a fixture

# Hang guard for one exchange with a hub that should answer at once.
ANSWER = 10.0
# /healthz and /metrics must answer within this while the hub is flooded or its
# store is held: an operator's probe that times out reads as "hub down".
PROBE_BOUND = 2.0


# --- 1. flags and environment -------------------------------------------------------


def start_verdict(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | None, str]:
    """What `keruta-hub ARGV` decides before it serves: (2, why) when it refuses
    to start, (None, "") when it would serve. The same parser and checks as
    hub/cli.py main, without serving."""
    from hub.cli import build_parser, check_config, config_from_args

    capsys.readouterr()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return (exc.code if isinstance(exc.code, int) else 1), capsys.readouterr().err
    problem = check_config(config_from_args(args))
    return (2, f"keruta-hub: {problem}") if problem else (None, "")


# flag -> (accepts 0, an integer flag, the highest value it takes)
NUMERIC_FLAGS: dict[str, tuple[bool, bool, float | None]] = {
    "--port": (True, True, 65535),
    "--retention-days": (False, False, None),
    "--retention-interval": (False, False, None),
    "--rate-limit": (True, False, None),
    "--rate-burst": (False, True, None),
    "--subscriber-queue": (False, True, None),
    "--subscriber-queue-bytes": (False, True, None),
    "--max-subscriptions": (False, True, None),
    "--max-page-size": (False, True, 100_000),
    "--ingest-queue-bytes": (False, True, None),
    "--write-batch-size": (False, True, None),
    "--write-flush-interval": (True, False, None),
    "--write-pace": (True, False, None),
    "--post-timeout": (False, False, None),
    "--body-timeout": (False, False, None),
    "--store-retry-max": (False, False, None),
    "--db-timeout": (False, False, None),
    "--db-ping-interval": (False, False, None),
    "--ping-interval": (False, False, None),
    "--max-task-bytes": (False, True, None),
}
# Not numbers, or not numbers any flag takes: every numeric flag refuses these.
ALWAYS_BAD = [
    "-1", "-0.5", "nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-1e309", "",
    "ten", "0x10", "1_000", " 5", "5 ", "\u0663", "\uff11\uff10", "\u0967\u0968", "5\u00a0",
]


def bad_flag_values() -> Iterator[tuple[str, str]]:
    for flag, (zero_ok, integer, high) in NUMERIC_FLAGS.items():
        for value in ALWAYS_BAD:
            yield flag, value
        if not zero_ok:
            yield flag, "0"
        if integer and flag != "--max-task-bytes":
            yield flag, "1.5"
        if high is not None:
            yield flag, str(int(high) + 1)
            yield flag, "9" * 30


def test_every_numeric_flag_refuses_what_is_no_number_for_it(capsys: pytest.CaptureFixture[str]) -> None:
    """Zero where zero means nothing, negatives, NaN, infinities, 1e309, other
    scripts' digits, `_` separators, blanks: an argparse error naming the flag, exit 2."""
    wrong: list[str] = []
    for flag, value in bad_flag_values():
        code, said = start_verdict(["--db", "sqlite:///unused.db", f"{flag}={value}"], capsys)
        if code != 2 or flag not in said or "Traceback" in said:
            wrong.append(f"{flag}={value!r}: exit {code}, said {said.strip()[-200:]!r}")
    assert not wrong, "\n".join(wrong)


GOOD_EDGES = [
    ("--port", "0"), ("--port", "65535"), ("--rate-limit", "0"), ("--rate-limit", "0.5"),
    ("--rate-burst", "1"), ("--rate-burst", "9" * 30), ("--max-page-size", "100000"),
    ("--write-flush-interval", "0"), ("--write-pace", "0"), ("--retention-days", "0.0001"),
    ("--retention-days", "365000"), ("--max-task-bytes", "1"), ("--max-task-bytes", "100MB"),
    ("--subscriber-queue", "9" * 30), ("--post-timeout", "1e300"), ("--log-level", "debug"),
]


def test_edge_values_that_are_numbers_are_taken(capsys: pytest.CaptureFixture[str]) -> None:
    wrong = []
    for flag, value in GOOD_EDGES:
        code, said = start_verdict(["--db", "sqlite:///unused.db", flag, value], capsys)
        if code is not None:
            wrong.append(f"{flag} {value}: refused: {said.strip()[-200:]}")
    assert not wrong, "\n".join(wrong)


OTHER_BAD_STARTS = [
    # (args, what the message must name)
    (["--retention-days", "1e300"], "--retention-days"),
    (["--retention-days", "800000"], "--retention-days"),
    (["--rate-limit", "5e-324"], "--rate-limit"),
    (["--rate-limit", "1e-300"], "--rate-limit"),
    (["--log-level", "bogus"], "--log-level"),
    (["--log-level", ""], "--log-level"),
    (["--log-level", "notset"], "--log-level"),
    (["--host", ""], "--host"),
    (["--host", "", "--agent-token", "a-token"], "--host"),
    (["--db", "sqlite://"], "--db"),
    (["--db", "sqlite:///"], "--db"),
    (["--db", "sqlite:///:memory:"], "--db"),
    (["--db", "sqlite:///file:x.db?mode=memory"], "--db"),
    (["--db", "sqlite:///some/dir/"], "--db"),
    (["--db", "sqlite:"], "--db"),
    (["--db", ""], "--db"),
    (["--db", "SQLITE:///x.db"], "--db"),
    (["--db", "mysql://u@h/db"], "--db"),
    (["--db", "postgresql://u@127.0.0.1:99999/db"], "--db"),
    (["--db", "postgresql://u@127.0.0.1:-1/db"], "--db"),
    (["--db", "postgresql://u@127.0.0.1:port/db"], "--db"),
    (["--db", "postgres://u@[::1:5432/db"], "--db"),
    # Tokens: the same one for two roles would give the lesser the greater's rights.
    (["--agent-token", "same-token", "--viewer-token", "same-token"], "--viewer-token"),
    (["--agent-token", "same-token", "--admin-token", "same-token"], "--admin-token"),
    (["--viewer-token", "same-token", "--admin-token", "same-token"], "--admin-token"),
    # ... and a token that an Authorization header cannot carry as given.
    (["--agent-token", "   "], "--agent-token"),
    (["--agent-token", " padded-token "], "--agent-token"),
    (["--admin-token", "t\u00f6k\u00e9n-secret"], "--admin-token"),
    (["--agent-token", "line\nbreak"], "--agent-token"),
    (["--agent-token", "tab\there"], "--agent-token"),
    (["--host", "0.0.0.0", "--agent-token", ""], "token"),
    (["--host", "0.0.0.0", "--agent-token", "   "], "--agent-token"),
]


def test_other_values_a_hub_cannot_run_on_are_refused_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    wrong = []
    for args, mentions in OTHER_BAD_STARTS:
        argv = ["--db", "sqlite:///unused.db", *args] if "--db" not in args else args
        code, said = start_verdict(argv, capsys)
        if code != 2 or mentions not in said or "Traceback" in said:
            wrong.append(f"{args!r}: exit {code}, said {said.strip()[-200:]!r}")
    assert not wrong, "\n".join(wrong)


BAD_ORIGINS = [
    "evil.example", "evil.example/path", "http://a.example/path", "http://a.example/?x=1",
    "http://a.example#frag", "*", "http://*", "http://*.example", "https://*.a.example",
    "http://user@a.example", "http://user:pw@a.example", "http://:pw@a.example", "ws://a.example",
    "wss://a.example", "file:///etc/passwd", "null", "", " ", "http://", "http://a.example:99999",
    "http://a.example:port", "javascript:alert(1)", "http://b\u00fccher.example", "https://\u4f8b\u3048.jp",
    "http://a.example\u200b",
]


def test_allow_origin_values_that_are_not_origins_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """Paths, wildcards, userinfo, other schemes, ports that are no ports, and
    names a browser never sends as they are (non-ASCII: it sends xn--)."""
    wrong = []
    for origin in BAD_ORIGINS:
        code, said = start_verdict(["--db", "sqlite:///unused.db", "--allow-origin", origin], capsys)
        if code != 2 or "--allow-origin" not in said:
            wrong.append(f"{origin!r}: exit {code}, said {said.strip()[-200:]!r}")
    assert not wrong, "\n".join(wrong)
    code, said = start_verdict(["--db", "sqlite:///unused.db", "--allow-origin", "http://b\u00fccher.example"], capsys)
    assert "http://xn--bcher-kva.example" in said, said


def run_hub_briefly(args: list[str], env: dict[str, str] | None, cwd: Path, seconds: float = 15.0) -> tuple[int | None, str]:
    """`python -m hub ARGS` as a shell would run it: (exit code, stderr); None
    when it was still running (serving) after `seconds`, then killed."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}
    full_env.update(env or {})
    proc = subprocess.Popen(
        python_m("hub", *args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=full_env, cwd=cwd, text=True, errors="replace",
    )
    try:
        _, err = proc.communicate(timeout=seconds)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return None, err


# (args, env, what the one line must name)
PROCESS_REFUSALS: list[tuple[list[str], dict[str, str], str]] = [
    (["--port", "\u0663\u0660\u0660\u0660"], {}, "--port"),
    (["--max-task-bytes", "\u0661\u0660"], {}, "--max-task-bytes"),
    (["--rate-limit", "5e-324"], {}, "--rate-limit"),
    (["--retention-days", "1e300"], {}, "--retention-days"),
    (["--log-level", "bogus"], {}, "--log-level"),
    (["--db", "sqlite://"], {}, "--db"),
    (["--db", "postgresql://u@127.0.0.1:99999/db"], {}, "--db"),
    (["--agent-token", "same-token", "--viewer-token", "same-token"], {}, "--viewer-token"),
    (["--admin-token", "t\u00f6k\u00e9n-secret"], {}, "--admin-token"),
    (["--allow-origin", "http://b\u00fccher.example"], {}, "--allow-origin"),
    (["--host", ""], {}, "--host"),
    ([], {"KERUTA_PORT": "eighty"}, "KERUTA_PORT"),
    ([], {"KERUTA_PORT": "\u0663\u0660\u0660\u0660"}, "KERUTA_PORT"),
    ([], {"KERUTA_PORT": "70000"}, "KERUTA_PORT"),
    ([], {"KERUTA_PORT": "-1"}, "KERUTA_PORT"),
    ([], {"KERUTA_AGENT_TOKEN": "same-token", "KERUTA_ADMIN_TOKEN": "same-token"}, "--admin-token"),
    ([], {"KERUTA_DB": "sqlite:///:memory:"}, "--db"),
]


def test_the_process_exits_2_with_one_line_naming_the_flag(tmp_path: Path) -> None:
    """As a user's shell runs it: exit 2 at once, no traceback, never "listening",
    and the last line says what was wrong, naming the flag (or variable)."""

    def one(case: tuple[list[str], dict[str, str], str]) -> str | None:
        args, env, mentions = case
        argv = ["--port", "0", *args] if "--port" not in args and "KERUTA_PORT" not in env else list(args)
        if "--db" not in args and "KERUTA_DB" not in env:
            argv += ["--db", f"sqlite:///{tmp_path / 'unused.db'}"]
        code, err = run_hub_briefly(argv, env, tmp_path)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        if code != 2 or "Traceback" in err or "listening" in err or mentions not in last or not last.startswith("keruta-hub"):
            return f"{args!r} {env!r}: exit {code}, stderr {err[-400:]!r}"
        return None

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        wrong = [w for w in pool.map(one, PROCESS_REFUSALS) if w]
    assert not wrong, "\n".join(wrong)


async def get_status(url: str, path: str, token: str | None = None, *, via: str = "header") -> int:
    if via == "query":
        async with hubclient.http_client(url) as client:
            return (await client.get(path, params={"token": token})).status_code
    async with hubclient.http_client(url, token) as client:
        return (await client.get(path)).status_code


async def test_flags_win_over_the_environment_and_empty_variables_mean_unset(tmp_path: Path) -> None:
    """KERUTA_AGENT_TOKEN/KERUTA_PORT from the environment lose to the flags;
    empty KERUTA_HOST, KERUTA_DB and tokens are as if unset (127.0.0.1, ./keruta.db, no token)."""
    env = {"KERUTA_AGENT_TOKEN": "env-agent-token", "KERUTA_VIEWER_TOKEN": "env-viewer-token", "KERUTA_PORT": "1"}
    hub = TestHub(f"sqlite:///{tmp_path / 'a.db'}", "--agent-token", "flag-agent-token", env=env)
    try:
        await trio.to_thread.run_sync(hub.start)
        assert hub.port != 1
        with trio.fail_after(ANSWER):
            assert await get_status(hub.url, "/api/v1/tasks", "flag-agent-token") == 200
            assert await get_status(hub.url, "/api/v1/tasks", "env-agent-token") == 401
            # The viewer token had no flag: the environment's stands.
            assert await get_status(hub.url, "/api/v1/tasks", "env-viewer-token") == 200
    finally:
        hub.stop()

    empties = {"KERUTA_HOST": "", "KERUTA_DB": "", "KERUTA_AGENT_TOKEN": "", "KERUTA_VIEWER_TOKEN": "",
               "KERUTA_ADMIN_TOKEN": "", "KERUTA_PORT": ""}
    proc = subprocess.Popen(
        python_m("hub", "--port", "0"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env={**os.environ, **empties}, cwd=tmp_path, text=True,
    )
    try:
        assert proc.stderr is not None
        with trio.fail_after(30):
            line = await trio.to_thread.run_sync(proc.stderr.readline)
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        with trio.fail_after(ANSWER):
            assert await get_status(m.group(1), "/api/v1/tasks") == 200  # no token: open
        assert (tmp_path / "keruta.db").exists()
    finally:
        proc.kill()
        proc.wait(10)


async def test_a_10kb_token_works_through_every_channel(sqlite_hub_factory: InProcessHubFactory) -> None:
    """A long token (10 KB) authenticates in the header, in ?token= and as a
    WebSocket subprotocol; a prefix or the token with one byte changed does not."""
    import base64

    from trio_websocket import open_websocket_url

    token = ("k" * 10_239) + "Z"
    hub = await sqlite_hub_factory.astart("--agent-token", token, "--viewer-token", "short-viewer-token")
    with trio.fail_after(ANSWER):
        assert await get_status(hub.url, "/api/v1/tasks", token) == 200
        assert await get_status(hub.url, "/api/v1/tasks", token, via="query") == 200
        assert await get_status(hub.url, "/api/v1/tasks", token[:-1]) == 401
        assert await get_status(hub.url, "/api/v1/tasks", token[:-1] + "Y") == 401
        async with hub.ws(token) as ws:
            await ws.send({"type": "ping"})
            assert (await ws.recv())["type"] == "pong"
        encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
        async with open_websocket_url(hub.ws_url, subprotocols=["keruta", f"bearer.{encoded}"]) as conn:
            await conn.send_message('{"type": "ping"}')
            assert orjson.loads(await conn.get_message())["type"] == "pong"
        assert await get_status(hub.url, "/api/v1/tasks", "short-viewer-token") == 200


async def test_normalised_allow_origins_admit_exactly_their_origin(sqlite_hub_factory: InProcessHubFactory) -> None:
    """A trailing slash, upper case, the default port and blanks around are
    normalised away; another port or scheme is still foreign."""
    hub = await sqlite_hub_factory.astart(
        "--allow-origin", "http://a.example/", "--allow-origin", "HTTPS://B.Example:443",
        "--allow-origin", " http://c.example:8081 ", "--allow-origin", "http://[::1]:9000",
    )
    cases = [
        ("http://a.example", 200), ("http://A.EXAMPLE:80", 200), ("https://b.example", 200),
        ("http://c.example:8081", 200), ("http://[::1]:9000", 200),
        ("http://a.example:8080", 403), ("https://a.example", 403), ("http://b.example", 403),
        ("http://c.example", 403), ("null", 403), ("http://evil.example", 403),
    ]
    wrong = []
    async with hub.http() as client:
        for i, (origin, status) in enumerate(cases):
            with trio.fail_after(ANSWER):
                resp = await client.post(logs_path("origins"), json={"message": f"m{i}"}, headers={"Origin": origin})
            if resp.status_code != status:
                wrong.append(f"{origin}: {resp.status_code}, expected {status}")
        stored = [r["message"] for r in await fetch_all(client, "origins")]
    assert not wrong, wrong
    assert stored == [f"m{i}" for i, (_, status) in enumerate(cases) if status == 200]


# --- 2. /metrics and /healthz ---------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def one_record(task: str, producer: str, seq: int = 1) -> str:
    return orjson.dumps({
        "type": "logs", "taskId": task, "producer": producer,
        "records": [{"seq": seq, "timestamp": now_ts(), "source": "stdout", "level": "INFO",
                     "message": f"{task} says hi", "lineNumber": 1, "metadata": {}}],
    }).decode()


async def flood_distinct_names(hub: Any, prefix: str, n: int, paths: int) -> None:
    """`n` new tasks (one record each, each its own producer), `paths` bogus
    paths, and bad frames and requests made from client input, all distinct.
    (The hub answers some 450 404s a second, so fewer paths than tasks.)"""
    async with hub.ws() as ws:
        acked = 0

        async def read() -> None:
            nonlocal acked
            while acked < n:
                frame = await ws.recv()
                assert frame["type"] == "ack", frame
                acked += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for i in range(n):
                await ws.send(one_record(f"{prefix}-t{i}", f"{prefix}-p{i}"))
        # Frames whose errors are made of client input: unknown types, bad task ids.
        for i in range(200):
            await ws.send({"type": f"{prefix}-type-{i}"})
            assert (await ws.recv_type("error"))["type"] == "error"
            await ws.send({"type": "subscribe", "taskId": f"{prefix} bad id {i}!"})
            assert (await ws.recv_type("error"))["type"] == "error"
    # Pipelined, 900 a connection (hypercorn serves at most 1000 requests on one).
    for start in range(0, paths, 900):
        count = min(900, paths - start)
        requests = b"".join(
            f"GET /{prefix}/no/such/{i}?x={i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            for i in range(start, start + count)
        )
        statuses = await pipelined(hub.port, requests, count)
        assert statuses == {404: count}, statuses
    body = b'{"nope": 1}'
    bad_posts = b"".join(
        f"POST /api/v1/tasks/{prefix}-x{i}/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        for i in range(300)
    )
    statuses = await pipelined(hub.port, bad_posts, 300)
    assert statuses == {400: 300}, statuses


_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


async def pipelined(port: int, requests: bytes, count: int) -> dict[int, int]:
    """Send pipelined requests on one connection; the statuses of the `count`
    answers (their bodies, JSON, never hold a status line)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    statuses: dict[int, int] = {}
    tail = b""
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, requests)
                while sum(statuses.values()) < count:
                    chunk = await stream.receive_some(1 << 16)
                    assert chunk, f"the hub closed after {statuses}"
                    data = tail + chunk
                    # A status line cut at the chunk's end is counted with the next chunk.
                    cut = max(data.rfind(b"\n"), 0)
                    for m in _STATUS_LINE.finditer(data, 0, cut):
                        statuses[int(m.group(1))] = statuses.get(int(m.group(1)), 0) + 1
                    tail = data[cut:]
    finally:
        await trio.aclose_forcefully(stream)
    return statuses


async def metrics_text(hub: Any) -> str:
    async with hub.http() as client:
        with trio.fail_after(ANSWER):
            resp = await client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain"), resp
    return resp.text


def label_values(text: str) -> set[str]:
    return set(re.findall(r"\{([^}]*)\}", text))


async def test_metrics_and_memory_stay_bounded_under_20000_distinct_client_names(tmp_path: Path) -> None:
    """20,000 tasks and producers, 4,000 bogus paths, with the per-task rate limiter
    on: /metrics grows by no label made of client input, and the hub process's
    memory levels off (the second 10,000 cost much less than the first)."""
    hub = TestHub(f"sqlite:///{tmp_path / 'm.db'}", "--rate-limit", "1000", "--rate-burst", "100")
    try:
        await trio.to_thread.run_sync(hub.start)
        assert hub.proc is not None
        await flood_distinct_names(hub, "warm", 300, 300)  # every code path once: imports, caches
        before = await metrics_text(hub)
        rss0 = rss_kib(hub.proc.pid)
        await flood_distinct_names(hub, "one", 10_000, 2_000)
        rss1 = rss_kib(hub.proc.pid)
        await flood_distinct_names(hub, "two", 10_000, 2_000)
        rss2 = rss_kib(hub.proc.pid)
        after = await metrics_text(hub)
        values = parse_metrics(after)
        assert values["keruta_records_ingested_total"] >= 20_300
        # No series, no label value made of a task id, producer, path or frame type.
        assert not any(s in after for s in ("one-", "two-", "warm-", "/no/such")), "client input in /metrics"
        assert len(after) <= len(before) + 2048, (len(before), len(after))
        assert len(label_values(after)) <= len(label_values(before)) + 8, label_values(after) - label_values(before)
        assert len(after) < 16 * 1024, len(after)
        growth1, growth2 = rss1 - rss0, rss2 - rss1
        print(f"RSS KiB: {rss0} -> {rss1} (+{growth1}) -> {rss2} (+{growth2})")
        assert growth2 < 20 * 1024, f"the second 10,000 distinct names grew the hub by {growth2} KiB"
        # Everyone else is still served.
        async with hub.http() as client:
            with trio.fail_after(ANSWER):
                assert (await client.get("/healthz")).json() == {"status": "ok", "store": "ok"}
                resp = await client.post(logs_path("after-flood"), json={"message": "still here"})
                assert resp.status_code == 200, resp.text
                assert [r["message"] for r in await fetch_all(client, "after-flood")] == ["still here"]
    finally:
        hub.stop()
        print(hub.output[-20:])


async def probe_ops(hub: Any, seen: list[tuple[str, int, float, Any]], stop: trio.Event) -> None:
    """/healthz and /metrics, again and again until `stop`: each answer's status and time."""
    async with hub.http(timeout=30) as client:
        while not stop.is_set():
            for path in ("/healthz", "/metrics"):
                started = trio.current_time()
                resp = await client.get(path)
                took = trio.current_time() - started
                body = resp.json() if path == "/healthz" else len(resp.text)
                seen.append((path, resp.status_code, took, body))
            await trio.sleep(0.05)


def assert_probes(seen: list[tuple[str, int, float, Any]], stores: tuple[str, ...]) -> None:
    assert len(seen) >= 10, seen
    slow = [s for s in seen if s[2] > PROBE_BOUND]
    assert not slow, f"probes slower than {PROBE_BOUND} s: {slow[:5]}"
    assert {s[1] for s in seen} == {200}, [s for s in seen if s[1] != 200][:5]
    for path, _, _, body in seen:
        if path == "/healthz":
            assert body["status"] == "ok" and body["store"] in stores, body


async def test_healthz_and_metrics_answer_promptly_under_a_write_flood(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    seen: list[tuple[str, int, float, Any]] = []
    stop = trio.Event()

    async def producer(k: int) -> None:
        async with hub.ws() as ws:
            seq = 0
            for _ in range(30):
                frame = {"type": "logs", "taskId": f"flood-{k}", "producer": f"p{k}",
                         "records": [wire(seq + j, "x" * 200) for j in range(1, 501)]}
                seq += 500
                await ws.send(frame)
            with trio.fail_after(60):
                await ws.wait_ack(f"flood-{k}", 30 * 500)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe_ops, hub, seen, stop)
            async with trio.open_nursery() as producers:
                for k in range(4):
                    producers.start_soon(producer, k)
            stop.set()
    assert_probes(seen, ("ok",))
    counts = parse_metrics(await metrics_text(hub))
    assert counts["keruta_records_ingested_total"] == 4 * 30 * 500


async def test_healthz_and_metrics_answer_while_another_process_holds_the_sqlite_lock(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    """The store is held (BEGIN EXCLUSIVE in another process) while a producer
    writes: the probes still answer within the bound, 200, with `store` ok or
    unavailable; nothing is acked before the lock goes, everything after."""
    hub = await sqlite_hub_factory.astart("--store-retry-max", "0.5")
    seen: list[tuple[str, int, float, Any]] = []
    stop = trio.Event()
    async with hub.ws() as ws:
        async with holding(SQLITE_HOLDER, str(hub.db_path)) as holder:
            await ws.send({"type": "logs", "taskId": "held", "producer": "p",
                           "records": [wire(s, f"held {s}") for s in range(1, 51)]})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe_ops, hub, seen, stop)
                with trio.move_on_after(2.5):
                    while True:
                        frame = await ws.recv()
                        assert frame["type"] not in ("ack", "error"), frame
                stop.set()
            await holder.release()
        with trio.fail_after(30):
            await ws.wait_ack("held", 50)
    assert_probes(seen, ("ok", "unavailable"))
    async with hub.http() as client:
        assert [r["message"] for r in await fetch_all(client, "held")] == [f"held {s}" for s in range(1, 51)]


# --- 3. the OpenAPI document against the routes served -----------------------------------


def served_routes() -> set[tuple[str, str]]:
    """(OpenAPI-style path, method) of every route the hub's app serves."""
    from tests.test_hub_routes import deps_for

    app = create_app(deps_for(None, None), store_available=lambda: True)  # type: ignore[arg-type]
    served = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z_]+:)?([a-z_]+)>", "{}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                served.add((path, method.lower()))
    return served


def documented_routes() -> set[tuple[str, str]]:
    return {
        (re.sub(r"\{[A-Za-z]+\}", "{}", path), method)
        for path, item in openapi_document()["paths"].items()
        for method in item if method in ("get", "post", "put", "patch", "delete")
    }


def test_every_served_route_is_documented_and_every_documented_one_served() -> None:
    served, documented = served_routes(), documented_routes()
    assert served - documented == set(), "served, not in /openapi.json"
    assert documented - served == set(), "in /openapi.json, not served"


async def test_every_documented_operation_answers_on_a_real_hub(sqlite_hub_factory: InProcessHubFactory) -> None:
    """Each documented path and method, on a real socket, gets something other
    than 404/405 (the task exists); every other method gets 405 naming the
    right ones in Allow, and paths near the documented ones are 404."""
    hub = await sqlite_hub_factory.astart()
    task = "oa-task"
    spec_paths = openapi_document()["paths"]
    async with hub.http() as client:
        served_doc = (await client.get("/openapi.json")).json()
        assert served_doc["paths"].keys() == spec_paths.keys()
        assert (await client.post(logs_path(task), json={"message": "a secret here"})).status_code == 200
        bodies = {
            ("/api/v1/tasks/{taskId}/logs", "post"): {"message": "again"},
            ("/api/v1/tasks/{taskId}/redact", "post"): {"values": ["secret"]},
        }
        wrong = []
        for path, item in served_doc["paths"].items():
            url = path.replace("{taskId}", task).replace("{name}", "viewer.js")
            methods = {m for m in item if m in ("get", "post", "put", "patch", "delete")}
            # DELETE last: it would empty the task the others read.
            for method in sorted(methods, key=lambda m: m == "delete"):
                with trio.fail_after(ANSWER):
                    resp = await client.request(method.upper(), url, json=bodies.get((path, method)))
                if resp.status_code in (404, 405) or resp.status_code >= 500:
                    wrong.append(f"{method.upper()} {url}: {resp.status_code} {resp.text[:200]}")
            for method in {"get", "post", "put", "patch", "delete"} - methods:
                with trio.fail_after(ANSWER):
                    resp = await client.request(method.upper(), url, content=b"{}")
                if resp.status_code != 405:
                    wrong.append(f"undocumented {method.upper()} {url}: {resp.status_code}, expected 405")
                else:
                    allowed = {m.strip().lower() for m in resp.headers.get("Allow", "").split(",")} - {"head", "options"}
                    if allowed != methods:
                        wrong.append(f"{method.upper()} {url}: Allow {allowed}, documented {methods}")
        near = [
            "/api/v1", "/api/v1/", "/api/v1/tasks/", f"/api/v1/tasks/{task}/", f"/api/v1/tasks/{task}/logs/",
            f"/api/v1/tasks/{task}/logs/stats/", f"/api/v1/tasks/{task}/status", "/api/v2/tasks",
            "/healthz/", "/metrics/", "/openapi.yaml", "/docs", "/api/v1/ws/", "/static/", "/static/../hub/cli.py",
            f"/api/v1/tasks/{task}/logs/raw/extra", "/api/v1/tasks//logs",
        ]
        for path in near:
            with trio.fail_after(ANSWER):
                resp = await client.get(path)
            if resp.status_code != 404:
                wrong.append(f"GET {path}: {resp.status_code}, expected 404")
            else:
                assert_error(resp, 404, "NOT_FOUND")
    assert not wrong, "\n".join(wrong)


# --- 4. rate limits -------------------------------------------------------------------


async def test_rest_rate_limit_refuses_without_storing_and_spares_other_tasks(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    """A noisy task over its limit gets 429 + Retry-After and those records are
    not stored (never acked); a quiet task's POSTs, interleaved, all pass."""
    hub = await sqlite_hub_factory.astart("--rate-limit", "20", "--rate-burst", "20")
    answers: list[tuple[int, list[str]]] = []
    async with hub.http() as client:
        for i in range(15):
            batch = [f"noisy {i}.{j}" for j in range(5)]
            with trio.fail_after(ANSWER):
                resp = await client.post(logs_path("noisy"), json=[{"message": m} for m in batch])
                quiet = await client.post(logs_path(f"quiet-{i}"), json={"message": f"quiet {i}"})
            assert quiet.status_code == 200, quiet.text
            if resp.status_code == 429:
                assert_error(resp, 429, "RATE_LIMITED")
                retry = resp.headers["Retry-After"]
                assert retry.isascii() and retry.isdigit() and 1 <= int(retry) <= 60, retry
            else:
                assert resp.status_code == 200, resp.text
            answers.append((resp.status_code, batch))
        limited = [b for status, b in answers if status == 429]
        assert limited, "nothing was limited"
        stored = [r["message"] for r in await fetch_all(client, "noisy")]
    assert stored == [m for status, b in answers if status == 200 for m in b], "a 429'd record was stored"
    # A batch larger than the burst is allowed once the bucket is full, never refused forever.
    hub2 = await sqlite_hub_factory.astart("--rate-limit", "1000", "--rate-burst", "1")
    async with hub2.http() as client:
        resp = await client.post(logs_path("big"), json=[{"message": f"b{j}"} for j in range(50)])
        assert resp.status_code == 200, resp.text


async def test_ws_rate_limit_slows_the_noisy_task_only_and_acks_only_what_is_stored(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    rate, burst, total = 200, 50, 450
    hub = await sqlite_hub_factory.astart("--rate-limit", str(rate), "--rate-burst", str(burst))
    quiet_latencies: list[float] = []
    acks: list[tuple[float, int]] = []

    async def noisy() -> None:
        async with hub.ws() as ws:
            for first in range(1, total + 1, 50):
                await ws.send({"type": "logs", "taskId": "noisy", "producer": "n",
                               "records": [wire(s, f"n{s}") for s in range(first, first + 50)]})
            while ws.acked.get("noisy", 0) < total:
                frame = await ws.recv()
                assert frame["type"] in ("ack",), frame
                acks.append((trio.current_time(), frame["seq"]))

    async def quiet(k: int) -> None:
        async with hub.ws() as ws:
            for s in range(1, 11):
                started = trio.current_time()
                await ws.send({"type": "logs", "taskId": f"quiet-{k}", "producer": "q",
                               "records": [wire(s, f"q{s}")]})
                await ws.wait_ack(f"quiet-{k}", s)
                quiet_latencies.append(trio.current_time() - started)
                await trio.sleep(0.05)

    started = trio.current_time()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(noisy)
            await trio.sleep(0.1)
            for k in range(3):
                nursery.start_soon(quiet, k)
    took = trio.current_time() - started
    assert took >= (total - burst) / rate * 0.8, f"{total} records at {rate}/s acked in {took:.2f} s: not limited"
    assert max(quiet_latencies) < 0.5, f"a quiet task waited behind the noisy one: {max(quiet_latencies):.2f} s"
    async with hub.http() as client:
        stored = [r["message"] for r in await fetch_all(client, "noisy")]
        for k in range(3):
            assert len(await fetch_all(client, f"quiet-{k}")) == 10
    assert stored == [f"n{s}" for s in range(1, total + 1)]
    assert [seq for _, seq in acks] == sorted(seq for _, seq in acks)


async def test_a_noisy_task_on_a_shared_connection_does_not_hold_another_tasks_acks(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    """One connection carries a throttled task and a quiet one (a relay, a
    multiplexing client): the quiet task's frame is acked without waiting
    out the noisy task's limit, and the noisy task's own status still comes
    after its records."""
    hub = await sqlite_hub_factory.astart("--rate-limit", "50", "--rate-burst", "10")
    async with hub.ws() as ws:
        await ws.send({"type": "logs", "taskId": "noisy", "producer": "n",
                       "records": [wire(s, f"n{s}") for s in range(1, 111)]})
        await ws.send({"type": "status", "taskId": "noisy", "state": "succeeded", "exitCode": 0, "producer": "n"})
        await ws.send({"type": "logs", "taskId": "quiet", "producer": "q",
                       "records": [wire(1, "q1")]})
        with trio.fail_after(10):
            await ws.wait_ack("quiet", 1)
        # 110 records at 50/s with a burst of 10: the noisy frame's tokens come ~2 s later.
        noisy_when_quiet_acked = ws.acked.get("noisy", 0)
        with trio.fail_after(10):
            await ws.wait_ack("noisy", 110)
    assert noisy_when_quiet_acked == 0, "the quiet task's ack came after the noisy task's limit was waited out"
    async with hub.http() as client:
        assert [r["message"] for r in await fetch_all(client, "noisy")] == [f"n{s}" for s in range(1, 111)]
        task = (await client.get("/api/v1/tasks/noisy")).json()
        assert task["state"] == "succeeded" and task["exitCode"] == 0, task


if sys.platform != "linux":  # /proc
    pytestmark = pytest.mark.skip(reason="reads /proc")
