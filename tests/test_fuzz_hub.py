"""Generated hostile input against one real hub process (issue 7, "Done when").

Hypothesis builds WebSocket frames and REST requests from the contract's
shapes with wrong types, integer edges, deep nesting, odd unicode and
timestamps that overflow. Whatever it sends: no 500, no traceback in the
hub's log, the hub stays up, and the connection that carried a bad frame
answers a `ping` right after it.
"""

from __future__ import annotations

import itertools
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

from agent.http import system_tls
from tests.support import HubProcess, fuzz_examples, sqlite_url

EXAMPLES = settings(
    max_examples=fuzz_examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
# A hang guard per answer; the hub answers at once.
WAIT = 10.0
# Error codes that mean the hub failed, not that the input was refused.
HUB_FAILURES = {"INTERNAL", "STORE_ERROR"}


@pytest.fixture(scope="module")
def fuzz_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One hub for all examples (SQLite): starting one per example would be the whole budget."""
    path: Path = tmp_path_factory.mktemp("fuzz") / "hub.db"
    hub = HubProcess(sqlite_url(path), "--log-level", "ERROR").start()
    try:
        yield hub
    finally:
        alive = hub.proc is not None and hub.proc.poll() is None
        hub.stop()
        print("--- fuzz hub stderr ---\n" + "".join(hub.output))
        assert alive, "the hub died during the fuzz run"


def assert_alive(hub: HubProcess) -> None:
    assert hub.proc is not None and hub.proc.poll() is None, "the hub exited:\n" + "".join(hub.output)
    log = "".join(hub.output)
    assert "Traceback" not in log, log


# --- strategies ----------------------------------------------------------------

EDGE_INTS = st.sampled_from(
    [0, 1, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**53 - 1, 2**53, 2**62 + 1, 2**63 - 1, 2**63,
     -(2**63), -(2**63) - 1, 2**64, 10**30]
)
INTS = EDGE_INTS | st.integers()
EDGE_TIMES = st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0999-06-01T00:00:00Z"])
TIMES = st.sampled_from(
    ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0999-06-01T00:00:00Z", "2026-11-28T10:00:00Z",
     "2026-11-28T10:00:00.123456Z", "2026-02-30T00:00:00Z", "2026-11-28", "yesterday", "", "0000-01-01T00:00:00Z"]
) | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()) | st.text(max_size=40)
TASK_IDS = st.sampled_from([".", "..", "...", "fuzz-task", "fuzz:2", "", "a" * 129, "x/y", "ünï", "a b"]) | st.from_regex(
    r"[A-Za-z0-9._:-]{1,12}", fullmatch=True
)
TEXT = st.text(max_size=30) | st.sampled_from(["\x00", "\u2028", "🙂" * 5, "\ufeff", "a\r\nb"])


def nested(depth: int) -> Any:
    value: Any = {}
    for i in range(depth):
        value = {"a": value} if i % 2 else [value]
    return value


SCALARS = st.none() | st.booleans() | INTS | st.floats(allow_nan=False, allow_infinity=False) | TEXT
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
) | st.integers(1, 400).map(nested)


GOOD_TASK_IDS = st.sampled_from(["fuzz-task", "fuzz:2", "F.3"])
DELETE = object()
# For each field: what a producer normally sends, and what a hostile one might.
GOOD = {
    "taskId": GOOD_TASK_IDS,
    "seq": st.integers(1, 10**6),
    "timestamp": st.sampled_from(["2026-11-28T10:00:00.123456Z", "2026-11-28T10:00:00+09:00"]),
    "source": st.sampled_from(["stdout", "stderr", "agent"]),
    "level": st.sampled_from(["DEBUG", "INFO", "WARN", "ERROR"]),
    "message": TEXT,
    "lineNumber": st.integers(0, 10**6),
    "metadata": st.dictionaries(TEXT, SCALARS, max_size=3),
    "partial": st.booleans(),
}
# Edges first, then anything: a frame that is valid but for one edge reaches
# deeper into the hub than one that is wrong everywhere.
HOSTILE = {
    "taskId": TASK_IDS | JSON,
    "seq": EDGE_INTS | EDGE_INTS | INTS | JSON,
    "timestamp": EDGE_TIMES | EDGE_TIMES | TIMES | JSON,
    "source": TEXT | JSON,
    "level": TEXT | JSON,
    "message": st.sampled_from(["x" * 65_537, "é" * 32_769, "🙂" * 16_385]) | JSON,
    "lineNumber": EDGE_INTS | EDGE_INTS | INTS | JSON,
    "metadata": st.integers(30, 400).map(lambda n: {"deep": nested(n)}) | JSON,
    "partial": JSON,
    "exitCode": EDGE_INTS | INTS | JSON,
    "fromSeq": EDGE_INTS | INTS | JSON,
    "state": TEXT | JSON,
    "records": JSON,
}


@st.composite
def mutated(draw: st.DrawFn, good: dict[str, Any]) -> dict[str, Any]:
    """`good` with up to two of its fields replaced by hostile values or left out."""
    out = dict(good)
    names = sorted(set(HOSTILE) & set(good))
    for _ in range(draw(st.sampled_from([0, 1, 1, 2])) if names else 0):
        name = draw(st.sampled_from(names))
        value = draw(st.just(DELETE) | HOSTILE[name])
        if value is DELETE:
            out.pop(name, None)
        else:
            out[name] = value
    return out


@st.composite
def records(draw: st.DrawFn, task_id: Any, with_task_id: bool = True) -> dict[str, Any]:
    good = {k: draw(v) for k, v in GOOD.items() if k != "taskId"}
    if with_task_id and draw(st.booleans()):
        good["taskId"] = task_id
    return draw(mutated(good))


@st.composite
def frames(draw: st.DrawFn, kinds: tuple[str, ...] = ("logs", "log", "status", "subscribe", "unsubscribe",
                                                      "ping", "other")) -> Any:
    kind = draw(st.sampled_from(kinds))
    task_id = draw(GOOD_TASK_IDS)
    if kind == "logs":
        recs = draw(st.lists(records(task_id), min_size=1, max_size=4))
        return draw(mutated({"type": "logs", "taskId": task_id, "records": recs}))
    if kind == "log":
        return {"type": "log", **draw(records(task_id)), "taskId": task_id} if draw(st.booleans()) else {
            "type": "log", **draw(records(task_id))}
    if kind == "status":
        good = {"type": "status", "taskId": task_id, "state": draw(st.sampled_from(["running", "failed"])),
                "exitCode": draw(st.integers(-255, 255))}
        return draw(mutated(good))
    if kind in ("subscribe", "unsubscribe"):
        return draw(mutated({"type": kind, "taskId": task_id, "fromSeq": draw(st.integers(1, 100))}))
    if kind == "ping":
        return {"type": "ping", **draw(st.dictionaries(TEXT, JSON, max_size=2))}
    return draw(JSON | st.fixed_dictionaries({"type": JSON}))


FRAMES = frames()
LOGS_FRAMES = frames(("logs",)).map(lambda f: json.dumps(f, ensure_ascii=False))
RAW_FRAMES = st.one_of(
    FRAMES.map(lambda f: json.dumps(f, ensure_ascii=False)),
    FRAMES.map(lambda f: json.dumps(f)),
    st.text(max_size=50),
    st.binary(max_size=50),
    st.integers(500, 1500).map(lambda n: "[" * n + "]" * n),
    st.sampled_from(['{"type": "ping", "n": 1e400}', '{"type": "logs", "taskId": "t", "records": [{"seq": NaN}]}',
                     '{"type": "ping"', '\ufeff{"type": "ping"}', '{"type": "ping", "type": "bogus"}']),
)


# --- WebSocket -------------------------------------------------------------------


BARRIER_TASK = "fuzz-barrier"
_barrier_seqs = itertools.count(1)


def _checked(raw: str | bytes, reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("type") != "error" or reply.get("code") not in HUB_FAILURES, (raw[:300], reply)
    return reply


async def _ws_session(url: str, frames: list[str | bytes]) -> None:
    async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:

        async def answer(raw: str | bytes, done: Any) -> None:
            with trio.fail_after(WAIT):
                while True:
                    try:
                        reply = _checked(raw, json.loads(await ws.get_message()))
                    except ConnectionClosed as exc:
                        raise AssertionError(f"{raw[:300]!r} closed the connection: {exc.reason}") from None
                    if done(reply):
                        return

        for raw in frames:
            await ws.send_message(raw)
            await ws.send_message('{"type": "ping"}')
            # Any pong will do: a generated ping is answered too.
            await answer(raw, lambda reply: reply == {"type": "pong"})
        # The writer answers in order: once a good record sent last is acked,
        # every earlier commit's outcome (a STORE_ERROR...) has been sent too.
        seq = next(_barrier_seqs)
        barrier = {"type": "logs", "taskId": BARRIER_TASK, "records": [
            {"seq": seq, "timestamp": "2026-11-28T10:00:00.000000Z", "source": "stdout", "level": "INFO",
             "message": "barrier", "lineNumber": seq, "metadata": {}}]}
        await ws.send_message(json.dumps(barrier))
        await answer(frames[-1], lambda r: r.get("type") == "ack" and r["taskId"] == BARRIER_TASK and r["seq"] >= seq)


@EXAMPLES
@given(batch=LOGS_FRAMES, frames=st.lists(RAW_FRAMES, max_size=5))
def test_fuzz_websocket_frames(fuzz_hub: HubProcess, batch: str, frames: list[str | bytes]) -> None:
    # Every example carries a `logs` frame: the agent's frame reaches the deepest.
    trio.run(_ws_session, fuzz_hub.ws_url, [batch, *frames])
    assert_alive(fuzz_hub)


# --- REST ----------------------------------------------------------------------

BODIES = st.one_of(
    records(None, with_task_id=False),
    st.lists(records(None, with_task_id=False), max_size=4),
    JSON,
).map(lambda b: json.dumps(b, ensure_ascii=False).encode()) | st.binary(max_size=100)
PARAM_VALUES = INTS.map(str) | TIMES | TEXT
PARAMS = st.dictionaries(
    st.sampled_from(["page", "size", "afterSeq", "from", "to", "before", "q", "source", "level"]), PARAM_VALUES, max_size=4
)
PATHS = st.sampled_from(["/logs", "/logs/stats", "/logs/raw", ""])


def _check_answer(resp: httpx.Response, what: str) -> None:
    assert resp.status_code < 500, f"{what}: {resp.status_code} {resp.text[:500]}"
    if resp.status_code >= 400:
        body = resp.json()
        assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str), (what, body)


@EXAMPLES
@given(task_id=GOOD_TASK_IDS | TASK_IDS, body=BODIES, params=PARAMS, suffix=PATHS, method=st.sampled_from(["POST", "GET", "DELETE"]))
def test_fuzz_rest_requests(
    fuzz_hub: HubProcess, task_id: str, body: bytes, params: dict[str, str], suffix: str, method: str
) -> None:
    path = f"/api/v1/tasks/{urllib.parse.quote(task_id, safe='')}{suffix}"
    with httpx.Client(base_url=fuzz_hub.url, timeout=WAIT, verify=system_tls()) as client:
        if method == "POST":
            resp = client.post(f"/api/v1/tasks/{urllib.parse.quote(task_id, safe='')}/logs", content=body,
                               headers={"content-type": "application/json"}, params=params)
        else:
            resp = client.request(method, path if method == "GET" else path.removesuffix("/stats").removesuffix("/raw"),
                                  params=params)
        _check_answer(resp, f"{method} {path} {params}")
        # The same keep-alive connection still answers.
        assert client.get("/healthz").status_code == 200
    assert_alive(fuzz_hub)
