"""Hostile clients against the hub's REST surface (hub/routes/, hub/admission.py,
hub/access.py, hub/origin.py, hypercorn behind hub/listener.py): attacks at the
HTTP level on a real in-process hub over real sockets, most of them written
byte by byte so that what is on the wire is what is tested.

Every attack checks three things: the hub's answer to the attacker (the right
4xx, with the contract's JSON error `{"error", "message"}` wherever the
request reached the app; never a 500, a redirect, a hang or a traceback in the
hub's log), that nothing else changed (every task's stored records read back
the same), and that the hub still serves a well-behaved client afterwards (a
fresh POST is stored and read back, and no INTERNAL error was counted).

Catalogues are sent to one hub and every case that went wrong is reported at
once, as tests/test_hub_bad_input.py does. Where the hub misbehaves the test
stays, marked xfail(strict=True) with the bug it shows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import pytest
import trio

from keruta.limits import DEFAULT_LIMITS, INT64_MAX
from tests import hubclient
from tests.hubclient import InProcessHub, InProcessHubFactory, fetch_all, logs_path

sqlite_hub_factory = hubclient.sqlite_hub_factory  # a fixture

AGENT, VIEWER, ADMIN = "agent-secret-1", "viewer-secret-2", "admin-secret-3"
TOKENS = ("--agent-token", AGENT, "--viewer-token", VIEWER, "--admin-token", ADMIN)
MAX_BODY = DEFAULT_LIMITS.max_frame_bytes  # 4 MiB: the largest body the hub takes
VICTIM = "victim"
# Hang guard per exchange: every answer here should come at once. Not a
# performance assertion: it turns "the hub never answered" into a failure.
ANSWER = 10.0


# --- raw HTTP ----------------------------------------------------------------------


class Answer:
    """One HTTP/1.1 answer as it came off the wire."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self) -> str:
        return f"<{self.status} {self.headers} {self.body[:300]!r}>"

    def json(self) -> Any:
        return orjson.loads(self.body)


def _chunked(data: bytes) -> tuple[bytes, bytes] | None:
    """A chunked body's content and what follows it, or None while incomplete."""
    body = b""
    while True:
        end = data.find(b"\r\n")
        if end < 0:
            return None
        size = int(data[:end].split(b";")[0], 16)
        data = data[end + 2 :]
        if size == 0:
            trailer = data.find(b"\r\n")
            return (body, data[trailer + 2 :]) if trailer >= 0 else None
        if len(data) < size + 2:
            return None
        body, data = body + data[:size], data[size + 2 :]


def parse_answers(data: bytes) -> tuple[list[Answer], bytes]:
    """The whole answers in `data` (never to a HEAD), and what is left over."""
    answers: list[Answer] = []
    while (end := data.find(b"\r\n\r\n")) >= 0:
        status_line, *lines = data[:end].decode("latin1").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = data[end + 4 :]
        if 100 <= status < 200:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parsed = _chunked(rest)
            if parsed is None:
                break
            body, rest = parsed
        else:
            length = int(headers.get("content-length", "0"))
            if len(rest) < length:
                break
            body, rest = rest[:length], rest[length:]
        answers.append(Answer(status, headers, body))
        data = rest
    return answers, data


class Exchange:
    """What one connection got: the answers, how it ended ("eof", "reset" or
    "open" when `until` answers came first) and how many bytes the client
    managed to send."""

    def __init__(self, answers: list[Answer], ended: str, sent: int, leftover: bytes) -> None:
        self.answers, self.ended, self.sent, self.leftover = answers, ended, sent, leftover

    def __repr__(self) -> str:
        return f"<{self.ended}, sent {self.sent}: {self.answers} + {self.leftover[:200]!r}>"

    @property
    def only(self) -> Answer:
        assert len(self.answers) == 1, self
        return self.answers[0]

    @property
    def statuses(self) -> list[int]:
        """The answers' statuses, a last answer cut short after its head included."""
        statuses = [a.status for a in self.answers]
        if self.leftover.startswith(b"HTTP/1.1 ") and b"\r\n\r\n" in self.leftover:
            statuses.append(int(self.leftover.split(b" ")[1]))
        return statuses


async def exchange(
    hub: InProcessHub, data: bytes | Iterable[bytes], *, until: int | None = None, seconds: float = ANSWER
) -> Exchange:
    """Opens a connection, sends `data` (one piece or an iterable of pieces,
    while reading), and reads answers until the hub ends the connection or
    `until` answers came. Sending stops quietly where the hub closed."""
    pieces: Iterable[bytes] = [data] if isinstance(data, bytes) else data
    stream = await trio.open_tcp_stream("127.0.0.1", hub.port)
    received = b""
    sent = 0
    ended = "open"

    async def send() -> None:
        nonlocal sent
        try:
            for piece in pieces:
                await stream.send_all(piece)
                sent += len(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the hub answered and closed: that may be the point

    try:
        with trio.fail_after(seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while until is None or len(parse_answers(received)[0]) < until:
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        ended = "reset"
                        break
                    if not chunk:
                        ended = "eof"
                        break
                    received += chunk
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)
    answers, leftover = parse_answers(received)
    return Exchange(answers, ended, sent, leftover)


def request(
    method: str, path: str, body: bytes = b"", *, token: str | None = ADMIN, host: str | None = "127.0.0.1",
    headers: Iterable[tuple[str, str]] = (), version: str = "HTTP/1.1", length: int | None = None,
    close: bool = True,
) -> bytes:
    """A request, byte by byte: `length` overrides Content-Length (None: the body's)."""
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name}: {value}" for name, value in headers]
    if not any(name.lower() == "transfer-encoding" for name, _ in headers):
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1") + body


def record_body(message: str = "hostile") -> bytes:
    return orjson.dumps({"message": message, "source": "stdout", "level": "INFO"})


def json_error(answer: Answer, status: int | tuple[int, ...], code: str | None = None) -> str | None:
    """Why `answer` is not the contract's JSON error with this status (and code), or None."""
    statuses = (status,) if isinstance(status, int) else status
    if answer.status not in statuses:
        return f"expected {statuses}, got {answer!r}"
    if not answer.headers.get("content-type", "").startswith("application/json"):
        return f"the error is not JSON: {answer!r}"
    try:
        payload = answer.json()
    except orjson.JSONDecodeError:
        return f"the error's body is not JSON: {answer!r}"
    if set(payload) != {"error", "message"} or not isinstance(payload["message"], str) or not payload["message"]:
        return f"not {{error, message}}: {payload}"
    if code is not None and payload["error"] != code:
        return f"expected {code}, got {payload}"
    return None


def report(failures: list[str]) -> None:
    assert not failures, f"{len(failures)} case(s) went wrong:\n" + "\n".join(failures)


# --- the hub's state, before and after -------------------------------------------


async def seed(hub: InProcessHub, token: str | None = ADMIN) -> None:
    """The victim task: a few lines with a secret in them, and a section."""
    lines: list[dict[str, Any]] = [
        {"message": "first line", "source": "stdout", "level": "INFO"},
        {"message": "the password is hunter2", "source": "stderr", "level": "ERROR"},
        {"message": "build", "kind": "section_start", "name": "build"},
        {"message": "compiling", "source": "stdout", "level": "INFO"},
        {"message": "build", "kind": "section_end", "name": "build"},
        {"message": "100% done_", "source": "stdout", "level": "INFO"},
    ]
    async with hub.http(token) as http:
        resp = await http.post(logs_path(VICTIM), json=lines)
        assert resp.status_code == 200, resp.text


async def snapshot(hub: InProcessHub, token: str | None = ADMIN) -> dict[str, Any]:
    """Every task and every record the hub holds, as REST reads them back."""
    async with hub.http(token) as http:
        resp = await http.get("/api/v1/tasks")
        assert resp.status_code == 200, resp.text
        tasks = sorted(t["taskId"] for t in resp.json()["tasks"])
        return {task: await fetch_all(http, task) for task in tasks}


def assert_clean_log(hub: InProcessHub) -> None:
    log = hub.stderr_text
    for sign in ("Traceback", "handler failed", "unexpected error"):
        assert sign not in log, log


_probes = iter(range(1, 1_000_000))


async def assert_serves(hub: InProcessHub, token: str | None = ADMIN) -> None:
    """A well-behaved client's POST is stored and read back; no INTERNAL error
    was ever counted and the hub's log holds no traceback."""
    task = f"probe-{next(_probes)}"
    with trio.fail_after(ANSWER):
        async with hub.http(token) as http:
            resp = await http.post(logs_path(task), json={"message": "well-behaved"})
            assert resp.status_code == 200, resp.text
            assert [r["message"] for r in await fetch_all(http, task)] == ["well-behaved"]
            metrics = (await http.get("/metrics")).text
    assert not re.search(r'^keruta_errors_total\{code="INTERNAL"\} [1-9]', metrics, re.M), metrics
    assert_clean_log(hub)


async def tokened_hub(factory: InProcessHubFactory, *args: str) -> tuple[InProcessHub, dict[str, Any]]:
    hub = await factory.astart(*TOKENS, *args)
    await seed(hub)
    return hub, await snapshot(hub)


# --- 1. query parameters at their edges ---------------------------------------------

# (route, parameter): the integer parameters the contract and README name.
INT_PARAMS = [("logs", "afterSeq"), ("logs", "page"), ("logs", "size"), ("sections", "afterSeq"), ("sections", "size")]
NOT_INTEGERS = [
    "-1", str(2**63), str(2**64), str(10**30), "9" * 5000, "1e3", "0x10", "0o7", "1.5", "1.0", "abc", "\x00", "5\x00",
    "NaN", "Infinity", "--1",
]


def route_path(route: str, task: str = VICTIM) -> str:
    return logs_path(task) if route == "logs" else f"/api/v1/tasks/{task}/sections"


async def test_integer_parameters_beyond_their_range_or_not_integers_are_400(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    failures: list[str] = []
    async with hub.http(VIEWER) as http:
        for route, name in INT_PARAMS:
            bad = [*NOT_INTEGERS, "0"] if name == "size" else NOT_INTEGERS
            for value in bad:
                resp = await http.get(route_path(route), params={name: value})
                answer = Answer(resp.status_code, dict(resp.headers), resp.content)
                why = json_error(answer, 400, "INVALID_PARAMETER")
                if why is None and name not in resp.json()["message"]:
                    why = f"the error does not name {name!r}: {resp.text}"
                if why:
                    failures.append(f"{route} {name}={value[:20]!r}: {why}")
        # The edges that are in range are served, and mean what they say.
        everything = (await http.get(logs_path(VICTIM), params={"afterSeq": 0, "page": 0, "size": 1})).json()
        assert everything["totalElements"] == len(before[VICTIM]) and len(everything["content"]) == 1, everything
        for params in ({"afterSeq": INT64_MAX}, {"page": 10_000_000}):
            page = (await http.get(logs_path(VICTIM), params=params)).json()
            assert page["content"] == [], (params, page)
        resp = await http.get(route_path("sections"), params={"afterSeq": INT64_MAX, "size": 1})
        assert resp.status_code == 200 and resp.json()["sections"] == [], resp.text
        # Empty is "absent": the default.
        page = (await http.get(logs_path(VICTIM), params={"afterSeq": "", "page": "", "size": ""})).json()
        assert (page["number"], page["size"], len(page["content"])) == (0, 100, len(before[VICTIM])), page
    report(failures)
    assert await snapshot(hub) == before
    await assert_serves(hub)


async def test_integer_parameters_take_only_ascii_digits(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    served: list[str] = []
    async with hub.http(VIEWER) as http:
        for route, name in INT_PARAMS:
            for value in ("５", "٣", "1_000", " 5", "5 ", "+5"):
                resp = await http.get(route_path(route), params={name: value})
                assert resp.status_code < 500, resp.text
                if resp.status_code != 400:
                    served.append(f"{route} {name}={value!r}: {resp.status_code} {resp.text[:120]}")
    assert await snapshot(hub) == before
    await assert_serves(hub)
    assert not served, "lax integers were taken:\n" + "\n".join(served)


NOT_TIMES = [
    "-1", "0", str(2**63), str(2**64), str(10**30), "1e3", "0x10", "", " ", "５", "\x00", "now", "yesterday",
    "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-01-01T25:00:00Z", "2026-01-01T00:00:00+25:00",
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-01-01T00:00:00Z" + "0" * 100,
]


async def test_time_parameters_that_are_not_timestamps_are_400_and_delete_nothing(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    failures: list[str] = []
    async with hub.http(ADMIN) as http:
        for value in NOT_TIMES:
            for method, name in (("GET", "from"), ("GET", "to"), ("DELETE", "before")):
                resp = await http.request(method, logs_path(VICTIM), params={name: value})
                answer = Answer(resp.status_code, dict(resp.headers), resp.content)
                why = json_error(answer, 400, "INVALID_PARAMETER")
                if why is None and name not in resp.json()["message"]:
                    why = f"the error does not name {name!r}: {resp.text}"
                if why:
                    failures.append(f"{method} {name}={value[:30]!r}: {why}")
        # A repeated `before` whose other value is empty (refused alone, never
        # "no before: everything") deletes nothing either way.
        resp = await http.delete(f"{logs_path(VICTIM)}?before=2000-01-01T00:00:00Z&before=")
        assert resp.status_code == 400 or resp.json() == {"deletedCount": 0}, resp.text
        resp = await http.delete(f"{logs_path(VICTIM)}?before=&before=2000-01-01T00:00:00Z")
        assert resp.status_code == 400 or resp.json() == {"deletedCount": 0}, resp.text
    report(failures)
    assert await snapshot(hub) == before, "a refused DELETE changed the stored records"
    await assert_serves(hub)


async def test_repeated_and_garbage_query_strings_are_answered_never_500(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    path = logs_path(VICTIM)
    queries = [
        "page=1&page=0&size=1", "size=1&size=0", "afterSeq=0&afterSeq=-1", "source=stdout&source=nope",
        "%%%=&&&==", "=", "&", "q=%FF", "q=%ED%A0%80", "q=%00", "q=%", "q=%G0", "afterSeq=%00", "afterSeq=%FF",
        "source=%00", "level=info", "limit=-1&offset=99999999999999999999", "token=", "token=%FF",
        "&".join(f"p{i}=1" for i in range(2000)), "q=" + "a" * 12_000, "page=1;size=1",
    ]
    failures: list[str] = []
    for query in queries:
        got = await exchange(hub, request("GET", f"{path}?{query}", token=VIEWER))
        answer = got.answers[0] if got.answers else None
        if answer is None:
            failures.append(f"?{query[:40]}: no answer ({got!r})")
        elif answer.status == 200:
            page = answer.json()
            if set(page) != {"content", "totalElements", "totalPages", "number", "size"}:
                failures.append(f"?{query[:40]}: not a page: {page}")
            elif "page=1&page=0" in query and page["number"] not in (0, 1):
                failures.append(f"?{query[:40]}: page {page['number']} is neither value given")
        elif (why := json_error(answer, 400)) is not None:
            failures.append(f"?{query[:40]}: {why}")
    # `q` is a literal substring: LIKE's wildcards and escapes match only themselves.
    async with hub.http(VIEWER) as http:
        for q, expected in (("%", ["100% done_"]), ("_", ["100% done_"]), ("\\", []), ("'", []), ("%d%", [])):
            messages = [r["message"] for r in await fetch_all(http, VICTIM, q=q)]
            if messages != expected:
                failures.append(f"q={q!r} matched {messages}, not {expected}")
    report(failures)
    assert await snapshot(hub) == before
    await assert_serves(hub)


# --- 2. task ids ------------------------------------------------------------------------

# Every route that takes a task id, and a body it would take.
TASK_ROUTES: list[tuple[str, str, bytes]] = [
    ("GET", "/logs", b""),
    ("GET", "/logs/stats", b""),
    ("GET", "/logs/raw", b""),
    ("GET", "/verify", b""),
    ("GET", "/sections", b""),
    ("GET", "", b""),
    ("DELETE", "/logs", b""),
    ("POST", "/logs", record_body("planted")),
    ("POST", "/redact", b'{"values": ["hunter2"]}'),
]
# As written in the request line (percent escapes are the client's).
BAD_TASK_IDS = [
    "a" * 129, "a" * 4000, ".", "..", "%2E", "%2e%2E", "a%00b", "%00", "%FF", "a%FFb", "%C0%AE%C0%AE", "%C3%A9",
    "%ED%A0%80", "%EF%BC%95", "a%20b", "a%09b", "a%0Ab", "a%0D%0AX-Injected:%201", "t%3Fx", "t%23x", "t;x", "~x",
    "a%5Cb", "a%25b", "a%252Fb", "*", "a,b", "a+b", "a@b", "a!b", "(a)", "'a'", "%22a%22", "a$b",
]
# A "/" makes another path: no route, or a 400.
# ("%2F" alone makes an empty id: test_an_empty_task_id_is_400_not_a_redirect_to_another_task.)
SLASHED_TASK_IDS = ["a/b", "a%2Fb", "a%2fb", "..%2F..%2Fetc", "a%2F..%2Fb"]


async def test_bad_task_ids_are_400_on_every_route_and_change_nothing(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    failures: list[str] = []
    for task_id in BAD_TASK_IDS + SLASHED_TASK_IDS:
        for method, suffix, body in TASK_ROUTES:
            got = await exchange(hub, request(method, f"/api/v1/tasks/{task_id}{suffix}", body))
            what = f"{method} /api/v1/tasks/{task_id[:24]}{suffix}"
            if not got.answers:
                failures.append(f"{what}: no answer {got!r}")
                continue
            if task_id in SLASHED_TASK_IDS:
                why = json_error(got.answers[0], (400, 404))
            else:
                why = json_error(got.answers[0], 400, "INVALID_TASK_ID")
            if why:
                failures.append(f"{what}: {why}")
    report(failures)
    assert await snapshot(hub) == before, "a request to a bad task id changed the store"
    # The boundary: 128 characters of the allowed set is a task id.
    longest = ("A-z.0:9_" * 16)[:128]
    got = await exchange(hub, request("POST", logs_path(longest), record_body("longest id")))
    assert got.only.status == 200, got
    async with hub.http(VIEWER) as http:
        assert [r["message"] for r in await fetch_all(http, longest)] == ["longest id"]
    await assert_serves(hub)


async def test_an_empty_task_id_is_400_not_a_redirect_to_another_task(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    failures: list[str] = []
    for empty in ("", "%2F"):  # "%2F" is decoded to "/" before routing: an empty id too
        for method, suffix, body in TASK_ROUTES:
            if suffix == "":
                continue  # `/api/v1/tasks/` is another route's trailing slash
            got = await exchange(hub, request(method, f"/api/v1/tasks/{empty}{suffix}", body))
            why = json_error(got.answers[0], (400, 404)) if got.answers else f"no answer {got!r}"
            if why:
                failures.append(f"{method} /api/v1/tasks/{empty}{suffix}: {why}")
    assert await snapshot(hub) == before
    await assert_serves(hub)
    report(failures)


# --- 3. POST bodies -----------------------------------------------------------------------


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + close * depth


# (what, body, status, code): bodies POST .../logs must refuse whole.
BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("not JSON", b"hello", 400, "INVALID_REQUEST"),
    ("empty", b"", 400, "INVALID_REQUEST"),
    ("whitespace", b" \r\n\t", 400, "INVALID_REQUEST"),
    ("a string", b'"x"', 400, "INVALID_REQUEST"),
    ("null", b"null", 400, "INVALID_REQUEST"),
    ("true", b"true", 400, "INVALID_REQUEST"),
    ("a number", b"5", 400, "INVALID_REQUEST"),
    ("an empty object", b"{}", 400, "INVALID_REQUEST"),
    ("an empty array", b"[]", 400, "INVALID_REQUEST"),
    ("an array of numbers", b"[1, 2]", 400, "INVALID_REQUEST"),
    ("an array of arrays", b"[[{\"message\": \"x\"}]]", 400, "INVALID_REQUEST"),
    ("an array, its last item bad", b'[{"message": "ok"}, {"message": "ok"}, {"message": 2}]', 400, "INVALID_REQUEST"),
    ("seq 2**64", b'{"message": "x", "producer": "p", "seq": 18446744073709551616}', 400, "INVALID_REQUEST"),
    ("seq 2**64 - 1", b'{"message": "x", "producer": "p", "seq": 18446744073709551615}', 400, "INVALID_REQUEST"),
    ("seq 2**63", b'{"message": "x", "producer": "p", "seq": 9223372036854775808}', 400, "INVALID_REQUEST"),
    ("seq 10**30", b'{"message": "x", "seq": 1000000000000000000000000000000}', 400, "INVALID_REQUEST"),
    ("seq -1", b'{"message": "x", "seq": -1}', 400, "INVALID_REQUEST"),
    ("seq -2**63 - 1", b'{"message": "x", "seq": -9223372036854775809}', 400, "INVALID_REQUEST"),
    ("seq 0", b'{"message": "x", "seq": 0}', 400, "INVALID_REQUEST"),
    ("seq 1.5", b'{"message": "x", "seq": 1.5}', 400, "INVALID_REQUEST"),
    ("seq 1e400", b'{"message": "x", "seq": 1e400}', 400, "INVALID_REQUEST"),
    ("seq true", b'{"message": "x", "seq": true}', 400, "INVALID_REQUEST"),
    ("seq a string", b'{"message": "x", "seq": "1"}', 400, "INVALID_REQUEST"),
    ("lineNumber 2**64", b'{"message": "x", "lineNumber": 18446744073709551616}', 400, "INVALID_REQUEST"),
    ("lineNumber -1", b'{"message": "x", "lineNumber": -1}', 400, "INVALID_REQUEST"),
    ("NaN", b'{"message": "x", "seq": NaN}', 400, "INVALID_REQUEST"),
    ("Infinity", b'{"message": "x", "lineNumber": Infinity}', 400, "INVALID_REQUEST"),
    ("-Infinity", b'{"message": "x", "metadata": {"a": -Infinity}}', 400, "INVALID_REQUEST"),
    ("a lone high surrogate", b'{"message": "a\\ud800b"}', 400, "INVALID_REQUEST"),
    ("a lone low surrogate", b'{"message": "a\\udc00b"}', 400, "INVALID_REQUEST"),
    ("a surrogate as UTF-8 bytes", b'{"message": "a\xed\xa0\x80b"}', 400, "INVALID_REQUEST"),
    ("bytes that are not UTF-8", b'{"message": "a\xff\xfeb"}', 400, "INVALID_REQUEST"),
    ("an overlong UTF-8 NUL", b'{"message": "a\xc0\x80b"}', 400, "INVALID_REQUEST"),
    ("a raw NUL in a string", b'{"message": "a\x00b"}', 400, "INVALID_REQUEST"),
    ("a raw newline in a string", b'{"message": "a\nb"}', 400, "INVALID_REQUEST"),
    ("a BOM", b'\xef\xbb\xbf{"message": "x"}', 400, "INVALID_REQUEST"),
    ("UTF-16", '{"message": "x"}'.encode("utf-16"), 400, "INVALID_REQUEST"),
    ("two documents", b'{"message": "x"} {"message": "y"}', 400, "INVALID_REQUEST"),
    ("a truncated document", b'{"message": "x"', 400, "INVALID_REQUEST"),
    ("a trailing comma", b'{"message": "x",}', 400, "INVALID_REQUEST"),
    ("single quotes", b"{'message': 'x'}", 400, "INVALID_REQUEST"),
    ("a comment", b'{"message": "x" /* hi */}', 400, "INVALID_REQUEST"),
    ("100k nested arrays", nested(100_000), 400, "INVALID_REQUEST"),
    ("100k nested objects in metadata",
     b'{"message": "x", "metadata": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}", 400, "INVALID_REQUEST"),
    ("metadata 500 deep", b'{"message": "x", "metadata": ' + b'{"a": ' * 500 + b"1" + b"}" * 500 + b"}",
     400, "INVALID_REQUEST"),
    ("metadata an array", b'{"message": "x", "metadata": [1]}', 400, "INVALID_REQUEST"),
    ("message an object", b'{"message": {"a": 1}}', 400, "INVALID_REQUEST"),
    ("source unknown", b'{"message": "x", "source": "evil"}', 400, "INVALID_REQUEST"),
    ("producer with a NUL", b'{"message": "x", "producer": "a\\u0000b", "seq": 1}', 400, "INVALID_REQUEST"),
    ("producer 10 KB", b'{"message": "x", "producer": "' + b"p" * 10_000 + b'", "seq": 1}', 400, "INVALID_REQUEST"),
    ("a redaction record", b'{"message": "x", "kind": "redaction"}', 400, "INVALID_REQUEST"),
    ("a timestamp in year 0", b'{"message": "x", "timestamp": "0001-01-01T00:00:00+14:00"}', 400, "INVALID_REQUEST"),
    ("1001 items", b"[" + b",".join([b'{"message": "b"}'] * 1001) + b"]", 413, "TOO_LARGE"),
    ("a line over 64 KiB", b'{"message": "' + b"x" * (64 * 1024 + 1) + b'"}', 413, "TOO_LARGE"),
]


async def test_bad_post_bodies_are_refused_whole_and_store_nothing(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    failures: list[str] = []
    for what, body, status, code in BAD_BODIES:
        got = await exchange(
            hub, request("POST", logs_path(VICTIM), body, token=AGENT, headers=[("Content-Type", "application/json")])
        )
        why = json_error(got.answers[0], status, code) if got.answers else f"no answer {got!r}"
        if why:
            failures.append(f"{what}: {why}")
    report(failures)
    assert await snapshot(hub) == before, "a refused POST stored something"
    await assert_serves(hub)


BAD_REDACTIONS: list[tuple[str, bytes]] = [
    ("not JSON", b"hunter2"),
    ("empty", b""),
    ("an array", b'["hunter2"]'),
    ("no values", b"{}"),
    ("values empty", b'{"values": []}'),
    ("values a string", b'{"values": "hunter2"}'),
    ("an empty value", b'{"values": [""]}'),
    ("a number", b'{"values": [2]}'),
    ("a null", b'{"values": [null]}'),
    ("an extra key", b'{"values": ["hunter2"], "also": 1}'),
    ("a lone surrogate", b'{"values": ["hunter\\ud800"]}'),
    ("bytes that are not UTF-8", b'{"values": ["hunter\xff"]}'),
    ("NaN", b'{"values": [NaN]}'),
    ("100k nested arrays", b'{"values": ' + nested(100_000) + b"}"),
    ("101 values", b'{"values": [' + b",".join(b'"v%d"' % i for i in range(101)) + b"]}"),
    ("a value over 4096 characters", b'{"values": ["' + b"h" * 4097 + b'"]}'),
]


async def test_bad_redaction_bodies_are_400_and_redact_nothing(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    failures: list[str] = []
    for what, body in BAD_REDACTIONS:
        got = await exchange(hub, request("POST", f"/api/v1/tasks/{VICTIM}/redact", body))
        why = json_error(got.answers[0], 400, "INVALID_REQUEST") if got.answers else f"no answer {got!r}"
        if why:
            failures.append(f"{what}: {why}")
    report(failures)
    assert await snapshot(hub) == before, "a refused redaction changed the stored records"
    await assert_serves(hub)


async def test_odd_but_valid_bodies_are_stored_exactly(sqlite_hub_factory: InProcessHubFactory) -> None:
    """NUL, line and paragraph separators, non-characters and astral characters
    are text like any other: stored and read back as sent (page and raw)."""
    hub, _ = await tokened_hub(sqlite_hub_factory)
    task = "odd-text"
    messages = ["a\x00b", "\u2028\u2029", "\ufeff\uffff", "\U0001f600 emoji", "\x1b[31mred\x1b[0m", "tab\there"]
    async with hub.http(AGENT) as http:
        for message in messages:
            resp = await http.post(logs_path(task), content=orjson.dumps({"message": message}))
            assert resp.status_code == 200, resp.text
        # Duplicate keys: one record, holding one of the two values (the last, as
        # orjson reads them), never two records nor a 500.
        resp = await http.post(logs_path(task), content=b'{"message": "first", "message": "second"}')
        assert resp.status_code in (200, 400), resp.text
        stored = [r["message"] for r in await fetch_all(http, task)]
        raw = (await http.get(logs_path(task, "/raw"))).text
    assert stored[: len(messages)] == messages
    assert stored[len(messages) :] in ([], ["second"], ["first"]), stored
    assert raw == "".join(m + "\n" for m in stored)
    await assert_serves(hub)


async def test_a_body_one_byte_short_is_408_at_the_body_deadline(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory, "--body-timeout", "1")
    body = record_body("never whole")
    got = await exchange(hub, request("POST", logs_path(VICTIM), body[:-1], token=AGENT, length=len(body), close=False))
    answer = got.only
    assert json_error(answer, 408, "REQUEST_TIMEOUT") is None, answer
    assert answer.headers.get("connection") == "close" and got.ended in ("eof", "reset"), got
    assert await snapshot(hub) == before
    await assert_serves(hub)


async def test_a_declared_body_over_the_limit_is_413_before_it_is_read(sqlite_hub_factory: InProcessHubFactory) -> None:
    # --body-timeout 600: an answer that waited for the body would not come within ANSWER.
    hub, before = await tokened_hub(sqlite_hub_factory, "--body-timeout", "600")
    for length in (MAX_BODY + 1, 64 * MAX_BODY, 10**18):
        got = await exchange(hub, request("POST", logs_path(VICTIM), b"[", token=AGENT, length=length, close=False))
        answer = got.only
        assert json_error(answer, 413, "TOO_LARGE") is None, (length, answer)
        assert answer.headers.get("connection") == "close" and got.ended in ("eof", "reset"), got
    # Too many digits to be a length at all: refused by the HTTP layer.
    got = await exchange(hub, request("POST", logs_path(VICTIM), b"[", token=AGENT, length=10**30, close=False))
    assert got.answers and 400 <= got.answers[0].status < 500 and got.ended in ("eof", "reset"), got
    assert await snapshot(hub) == before
    await assert_serves(hub)


def chunked_flood(total: int, chunk: int, *, one_chunk: bool) -> Iterator[bytes]:
    """A chunked body of `total` bytes: one chunk declared huge, or many."""
    piece = b"a" * chunk
    if one_chunk:
        yield b"%x\r\n" % (16**12 - 1)
        for _ in range(total // chunk):
            yield piece
    else:
        for _ in range(total // chunk):
            yield b"%x\r\n" % chunk + piece + b"\r\n"


@pytest.mark.parametrize("one_chunk", [True, False], ids=["one-huge-chunk", "many-chunks"])
async def test_a_chunked_body_over_the_limit_is_413_while_it_streams(
    sqlite_hub_factory: InProcessHubFactory, one_chunk: bool,
) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory, "--body-timeout", "600")
    total = 16 * MAX_BODY  # 64 MiB offered; the hub must stop taking it past 4 MiB
    head = request(
        "POST", logs_path(VICTIM), token=AGENT, headers=[("Transfer-Encoding", "chunked")], close=False
    )
    got = await exchange(hub, [head, *chunked_flood(total, 64 * 1024, one_chunk=one_chunk)], seconds=30)
    answer = got.only
    assert json_error(answer, 413, "TOO_LARGE") is None, answer
    assert got.ended in ("eof", "reset"), got
    # Answered and closed mid-body: the hub did not read (nor buffer) all of it.
    assert got.sent < total, f"the hub took all {got.sent} bytes of an oversized body"
    assert await snapshot(hub) == before
    await assert_serves(hub)


# --- 4. tokens ------------------------------------------------------------------------------

REDACT = f"/api/v1/tasks/{VICTIM}/redact"
# (what, method, path, token, extra headers, status, code): refused on the head alone.
REFUSED_HEADS: list[tuple[str, str, str, str | None, list[tuple[str, str]], int, str]] = [
    ("POST without a token", "POST", logs_path(VICTIM), None, [], 401, "UNAUTHORIZED"),
    ("POST with a wrong token", "POST", logs_path(VICTIM), "wrong", [], 401, "UNAUTHORIZED"),
    ("POST with a wrong query token", "POST", logs_path(VICTIM) + "?token=wrong", None, [], 401, "UNAUTHORIZED"),
    ("POST with an empty query token", "POST", logs_path(VICTIM) + "?token=", None, [], 401, "UNAUTHORIZED"),
    ("POST with Basic auth", "POST", logs_path(VICTIM), None,
     [("Authorization", "Basic YWdlbnQ6YWdlbnQtc2VjcmV0LTE=")], 401, "UNAUTHORIZED"),
    ("POST with a bare Bearer", "POST", logs_path(VICTIM), None, [("Authorization", "Bearer")], 401, "UNAUTHORIZED"),
    ("POST with the token but no scheme", "POST", logs_path(VICTIM), None, [("Authorization", AGENT)],
     401, "UNAUTHORIZED"),
    ("POST with a token prefix", "POST", logs_path(VICTIM), AGENT[:-1], [], 401, "UNAUTHORIZED"),
    ("POST with the token and more", "POST", logs_path(VICTIM), AGENT + "x", [], 401, "UNAUTHORIZED"),
    ("chunked POST without a token", "POST", logs_path(VICTIM), None, [("Transfer-Encoding", "chunked")],
     401, "UNAUTHORIZED"),
    ("GET with a body, without a token", "GET", logs_path(VICTIM), None, [], 401, "UNAUTHORIZED"),
    ("PUT without a token", "PUT", logs_path(VICTIM), None, [], 401, "UNAUTHORIZED"),
    ("POST logs with the viewer token", "POST", logs_path(VICTIM), VIEWER, [], 403, "FORBIDDEN"),
    ("POST redact with the viewer token", "POST", REDACT, VIEWER, [], 403, "FORBIDDEN"),
    ("POST redact with the agent token", "POST", REDACT, AGENT, [], 403, "FORBIDDEN"),
    ("POST redact/ with the agent token", "POST", REDACT + "/", AGENT, [], 403, "FORBIDDEN"),
    ("DELETE with the agent token", "DELETE", logs_path(VICTIM), AGENT, [], 403, "FORBIDDEN"),
    ("DELETE with the viewer token", "DELETE", logs_path(VICTIM), VIEWER, [], 403, "FORBIDDEN"),
    ("DELETE without a token", "DELETE", logs_path(VICTIM), None, [], 401, "UNAUTHORIZED"),
    ("POST from a foreign origin with the admin token", "POST", logs_path(VICTIM), ADMIN,
     [("Origin", "http://evil.example")], 403, "FORBIDDEN_ORIGIN"),
]


@pytest.mark.parametrize(
    ("method", "path", "token", "extra", "status", "code"),
    [case[1:] for case in REFUSED_HEADS],
    ids=[case[0] for case in REFUSED_HEADS],
)
async def test_a_request_without_the_right_token_is_refused_before_its_body(
    sqlite_hub_factory: InProcessHubFactory,
    method: str, path: str, token: str | None, extra: list[tuple[str, str]], status: int, code: str,
) -> None:
    # --body-timeout 600: an answer that waited for the body would not come within ANSWER.
    hub, before = await tokened_hub(sqlite_hub_factory, "--body-timeout", "600")
    chunked = any(name == "Transfer-Encoding" for name, _ in extra)
    # 4 MiB announced (or a huge chunk begun), none of it sent.
    head = request(method, path, token=token, headers=extra, length=None if chunked else MAX_BODY, close=False)
    got = await exchange(hub, head + (b"fffffff\r\n" if chunked else b""))
    answer = got.only
    assert json_error(answer, status, code) is None, answer
    assert answer.headers.get("connection") == "close" and got.ended in ("eof", "reset"), got
    assert await snapshot(hub) == before
    await assert_serves(hub)


async def test_a_second_request_on_a_kept_alive_connection_proves_its_token_too(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory, "--body-timeout", "600")
    first = request("GET", logs_path(VICTIM), token=VIEWER, close=False)
    second = request("POST", logs_path(VICTIM), token="wrong", length=MAX_BODY, close=False)  # no body follows
    got = await exchange(hub, first + second)
    assert [a.status for a in got.answers] == [200, 401] and got.ended in ("eof", "reset"), got
    assert json_error(got.answers[1], 401, "UNAUTHORIZED") is None, got
    assert await snapshot(hub) == before
    await assert_serves(hub)


async def test_reads_need_a_valid_token(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    reads = [
        "/api/v1/tasks", f"/api/v1/tasks/{VICTIM}", logs_path(VICTIM), logs_path(VICTIM, "/stats"),
        logs_path(VICTIM, "/raw"), f"/api/v1/tasks/{VICTIM}/verify", f"/api/v1/tasks/{VICTIM}/sections", "/metrics",
    ]
    failures: list[str] = []
    for path in reads:
        for token, query in ((None, ""), ("wrong", ""), (None, "?token=wrong"), (None, "?token="), (VIEWER[:-1], "")):
            got = await exchange(hub, request("GET", path + query, token=token))
            why = json_error(got.answers[0], 401, "UNAUTHORIZED") if got.answers else f"no answer {got!r}"
            if why:
                failures.append(f"GET {path}{query} with token {token!r}: {why}")
        got = await exchange(hub, request("GET", path, token=VIEWER))
        if not got.answers or got.answers[0].status != 200:
            failures.append(f"GET {path} with the viewer token: {got!r}")
    report(failures)
    assert await snapshot(hub) == before
    await assert_serves(hub)


async def test_expect_100_continue_is_not_granted_before_the_token(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory, "--body-timeout", "600")
    head = request(
        "POST", logs_path(VICTIM), token="wrong", headers=[("Expect", "100-continue")], length=MAX_BODY, close=False
    )
    got = await exchange(hub, head)
    assert got.answers, got
    assert await snapshot(hub) == before
    await assert_serves(hub)
    # The first answer is the refusal: no 100 Continue for a request that will be refused.
    assert [a.status for a in got.answers] == [401], got


async def test_an_authorised_expect_100_continue_is_granted_and_stored(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, _ = await tokened_hub(sqlite_hub_factory)
    body = record_body("expected")
    got = await exchange(hub, request("POST", logs_path("expect"), body, token=AGENT, headers=[("Expect", "100-continue")]))
    assert [a.status for a in got.answers] in ([100, 200], [200]), got
    async with hub.http(VIEWER) as http:
        assert [r["message"] for r in await fetch_all(http, "expect")] == ["expected"]
    await assert_serves(hub)


async def test_each_role_does_only_what_it_may_with_its_body_sent(sqlite_hub_factory: InProcessHubFactory) -> None:
    """Whole requests, token in the header or the query string (the contract
    allows either everywhere): refused ones change nothing."""
    hub, before = await tokened_hub(sqlite_hub_factory)
    redact = b'{"values": ["hunter2"]}'
    refused = [
        (VIEWER, "POST", logs_path(VICTIM), record_body("viewer wrote")),
        (VIEWER, "POST", REDACT, redact),
        (VIEWER, "DELETE", logs_path(VICTIM), b""),
        (AGENT, "POST", REDACT, redact),
        (AGENT, "DELETE", logs_path(VICTIM), b""),
        (AGENT, "DELETE", logs_path(VICTIM) + "?before=9999-01-01T00:00:00Z", b""),
    ]
    failures: list[str] = []
    for token, method, path, body in refused:
        for where in ("header", "query"):
            if where == "header":
                data = request(method, path, body, token=token)
            else:
                data = request(method, path + ("&" if "?" in path else "?") + f"token={token}", body, token=None)
            got = await exchange(hub, data)
            why = json_error(got.answers[0], 403, "FORBIDDEN") if got.answers else f"no answer {got!r}"
            if why:
                failures.append(f"{method} {path} with the {token} token in the {where}: {why}")
    report(failures)
    assert await snapshot(hub) == before
    # What each role may do, it does, with the token in the query string too.
    got = await exchange(hub, request("GET", logs_path(VICTIM) + f"?token={VIEWER}", token=None))
    assert got.only.status == 200 and got.only.json()["totalElements"] == len(before[VICTIM]), got
    got = await exchange(hub, request("POST", logs_path(VICTIM) + f"?token={AGENT}", record_body("agent"), token=None))
    assert got.only.status == 200, got
    got = await exchange(hub, request("POST", REDACT + f"?token={ADMIN}", redact, token=None))
    assert got.only.status == 200 and got.only.json()["redactedRecords"] == 1, got
    got = await exchange(hub, request("DELETE", logs_path(VICTIM) + f"?token={ADMIN}", token=None))
    assert got.only.status == 200 and got.only.json()["deletedCount"] >= len(before[VICTIM]), got
    await assert_serves(hub)


# --- 5. Host and Origin --------------------------------------------------------------------


def foreign_origins(port: int) -> list[str]:
    return [
        "http://evil.example", "null", "", " ", "file://", f"https://127.0.0.1:{port}", f"http://localhost:{port}",
        f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port}.evil.example", f"http://127.0.0.1:{port}@evil.example",
        f"http://evil.example#@127.0.0.1:{port}", f"http://evil.example?@127.0.0.1:{port}", f"http://127.0.0.1:{port}/path",
        f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{port} http://evil.example", f"http://127.0.0.1:{port}\xff",
        "http://127.0.0.1", "http://[::1]", f"http://user@127.0.0.1:{port}",
    ]


async def test_foreign_origins_change_nothing(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()  # no tokens: the Origin rule is all that guards it
    await seed(hub, None)
    before = await snapshot(hub, None)
    host = f"127.0.0.1:{hub.port}"
    changes = [
        ("POST", logs_path(VICTIM), record_body("from evil")),
        ("POST", REDACT, b'{"values": ["hunter2"]}'),
        ("DELETE", logs_path(VICTIM), b""),
        ("PUT", logs_path(VICTIM), record_body("from evil")),
    ]
    failures: list[str] = []
    for origin in foreign_origins(hub.port):
        for method, path, body in changes:
            got = await exchange(
                hub, request(method, path, body, token=None, host=host,
                             headers=[("Origin", origin), ("Content-Type", "text/plain")])
            )
            why = json_error(got.answers[0], 403, "FORBIDDEN_ORIGIN") if got.answers else f"no answer {got!r}"
            if why:
                failures.append(f"{method} {path} from {origin!r}: {why}")
    report(failures)
    assert await snapshot(hub, None) == before, "a foreign origin changed the stored records"
    # The hub's own origin, however it is spelled, may write.
    for origin in (f"http://{host}", f"HTTP://{host}/", f"http://{host.upper()}"):
        got = await exchange(hub, request("POST", logs_path("own"), record_body(origin), token=None, host=host,
                                          headers=[("Origin", origin)]))
        assert got.only.status == 200, (origin, got)
    await assert_serves(hub, None)


async def test_an_open_hub_answers_only_loopback_hosts(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub = await sqlite_hub_factory.astart()
    await seed(hub, None)
    before = await snapshot(hub, None)
    port = hub.port
    foreign = [
        "evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example",
        f"127.0.0.1@evil.example:{port}", "127.1", "0x7f000001", "2130706433", "", f"127.0.0.1:{port}, evil.example",
        "evil.example#@127.0.0.1", f"127.0.0.1:{port}/x", "127.0.0.1:99999", f"localhost.:{port}", "0.0.0.0",
        f"[::ffff:7f00:1]x:{port}", "xn--80ak6aa92e.com",
    ]
    requests = [
        ("GET", "/api/v1/tasks", b""),
        ("GET", logs_path(VICTIM), b""),
        ("POST", logs_path(VICTIM), record_body("rebound")),
        ("DELETE", logs_path(VICTIM), b""),
        ("POST", REDACT, b'{"values": ["hunter2"]}'),
    ]
    failures: list[str] = []
    for host in foreign:
        for method, path, body in requests:
            got = await exchange(hub, request(method, path, body, token=None, host=host))
            why = json_error(got.answers[0], 403, "FORBIDDEN_HOST") if got.answers else f"no answer {got!r}"
            if why:
                failures.append(f"{method} {path} to Host {host!r}: {why}")
    # Two Host headers, or none on HTTP/1.1: refused by the HTTP layer (400).
    for data in (
        request("GET", "/api/v1/tasks", token=None, host="127.0.0.1", headers=[("Host", "evil.example")]),
        request("POST", logs_path(VICTIM), record_body("two hosts"), token=None, host="evil.example",
                headers=[("Host", "127.0.0.1")]),
        request("POST", logs_path(VICTIM), record_body("no host"), token=None, host=None),
    ):
        got = await exchange(hub, data)
        if not got.answers or got.answers[0].status not in (400, 403):
            failures.append(f"{data.splitlines()[0]!r} with 0 or 2 Host headers: {got!r}")
    report(failures)
    assert await snapshot(hub, None) == before, "a request to a foreign Host changed the stored records"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "127.0.0.2"):
        got = await exchange(hub, request("GET", "/api/v1/tasks", token=None, host=host))
        assert got.only.status == 200, (host, got)
    await assert_serves(hub, None)


# --- 6. HTTP oddities ------------------------------------------------------------------------


async def test_absurd_heads_are_refused_and_bounded(sqlite_hub_factory: InProcessHubFactory) -> None:
    """Too many headers, a very long URL, a header that never ends: a 4xx
    (hypercorn's 431/400, bodiless: the request never reached the app) and the
    connection closed; never buffered without bound."""
    hub, before = await tokened_hub(sqlite_hub_factory)
    heads = {
        "3,000 headers": request("GET", "/healthz", headers=[(f"X-H{i}", "v") for i in range(3000)]),
        "20,000 headers": request("GET", "/healthz", headers=[(f"X-H{i}", "v") for i in range(20_000)]),
        "one 1 MB header": request("GET", "/healthz", headers=[("X-Big", "v" * 1_000_000)]),
        "a 100 KB URL": request("GET", logs_path(VICTIM) + "?q=" + "a" * 100_000),
        "a 1 MB URL": request("POST", logs_path("a" * 1_000_000), record_body()),
        "a 100 KB task id": request("DELETE", logs_path("a" * 100_000)),
    }
    failures: list[str] = []
    for what, data in heads.items():
        got = await exchange(hub, data)
        if not got.answers or not 400 <= got.answers[0].status < 500 or got.ended == "open":
            failures.append(f"{what}: {got!r}")
    # Many small headers that fit the head's bound are served.
    got = await exchange(hub, request("GET", "/api/v1/tasks", headers=[(f"X-{i}", "") for i in range(1500)]))
    if not got.answers or got.answers[0].status != 200:
        failures.append(f"1,500 empty headers: {got!r}")
    report(failures)
    assert await snapshot(hub) == before
    await assert_serves(hub)


async def test_malformed_request_lines_and_headers_are_4xx(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    auth = f"Authorization: Bearer {ADMIN}\r\n".encode()
    body = record_body("malformed")
    cases = {
        "a space in the path": b"POST /api/v1/tasks/a b/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth
        + b"Content-Length: %d\r\n\r\n" % len(body) + body,
        "a header without a colon": b"POST /api/v1/tasks/x/logs HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",
        "a header name with a space": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Name: x\r\n\r\n",
        "a NUL in a header": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n",
        "no version": b"GET /healthz\r\nHost: 127.0.0.1\r\n\r\n",
        "TLS to a plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
        "Transfer-Encoding: gzip, chunked": b"POST /api/v1/tasks/x/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth
        + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "two Transfer-Encodings": b"POST /api/v1/tasks/x/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "two different Content-Lengths": b"POST /api/v1/tasks/x/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth
        + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "Content-Length: -1": b"POST /api/v1/tasks/x/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth
        + b"Content-Length: -1\r\n\r\n",
        "Content-Length: 0x10": b"POST /api/v1/tasks/x/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth
        + b"Content-Length: 0x10\r\n\r\n" + b"x" * 16,
        "a bad chunk size": b"POST /api/v1/tasks/x/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    }
    failures: list[str] = []
    for what, data in cases.items():
        got = await exchange(hub, data)
        if got.answers and not 400 <= got.answers[0].status < 502:
            failures.append(f"{what}: {got!r}")
        elif got.ended == "open":
            failures.append(f"{what}: the connection stayed open {got!r}")
    report(failures)
    assert await snapshot(hub) == before, "a malformed request stored something"
    await assert_serves(hub)


async def test_a_head_ending_in_bare_lfs_is_answered_not_dropped(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    # Handed to hypercorn (a CRLF request follows in the same read): both served.
    lf = b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n"
    got = await exchange(hub, lf + request("GET", "/healthz"))
    assert [a.status for a in got.answers] == [200, 200], got
    # Alone: answered one way or the other (served, or a 400), never silence.
    body = record_body("lf")
    alone = (
        f"POST {logs_path('lf')} HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer {AGENT}\n"
        f"Content-Length: {len(body)}\nConnection: close\n\n"
    ).encode() + body
    got = await exchange(hub, alone)
    after = await snapshot(hub)
    assert {k: v for k, v in after.items() if k != "lf"} == before
    await assert_serves(hub)
    assert got.answers and got.answers[0].status in (200, 400), f"no answer to a bare-LF request: {got!r}"


async def test_http_1_0_is_served_and_closed(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    got = await exchange(hub, request("GET", "/healthz", token=None, version="HTTP/1.0", close=False))
    assert got.only.status == 200 and got.ended == "eof", got
    got = await exchange(hub, request("POST", logs_path("old"), record_body("from 1.0"), token=AGENT,
                                      version="HTTP/1.0", close=False))
    assert got.only.status == 200 and got.ended == "eof", got
    # HTTP/1.0 needs no Host; with tokens, the token is what guards the hub.
    got = await exchange(hub, request("GET", logs_path("old"), token=VIEWER, host=None, version="HTTP/1.0", close=False))
    assert got.only.status == 200 and [r["message"] for r in got.only.json()["content"]] == ["from 1.0"], got
    got = await exchange(hub, request("POST", logs_path("old"), record_body("no token"), token=None, host=None,
                                      version="HTTP/1.0", close=False))
    assert json_error(got.only, 401, "UNAUTHORIZED") is None, got
    after = await snapshot(hub)
    assert {k: v for k, v in after.items() if k != "old"} == before
    assert [r["message"] for r in after["old"]] == ["from 1.0"]
    await assert_serves(hub)


async def test_pipelined_requests_stop_at_the_malformed_one(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    first = request("POST", logs_path("piped"), record_body("first"), token=AGENT, close=False)
    malformed = b"POST /api/v1/tasks/piped/logs HTTP/1.1\r\nHost 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}"
    third = request("POST", logs_path("piped"), record_body("third"), token=AGENT)
    got = await exchange(hub, first + malformed + third)
    assert [a.status for a in got.answers] == [200, 400] and got.ended in ("eof", "reset"), got
    # Well-formed pipelining is served in order.
    got = await exchange(hub, request("GET", "/healthz", close=False) * 3 + request("GET", "/api/v1/tasks"))
    assert [a.status for a in got.answers] == [200, 200, 200, 200], got
    after = await snapshot(hub)
    assert [r["message"] for r in after.pop("piped")] == ["first"]
    assert after == before
    await assert_serves(hub)


def embedded(host: str = "127.0.0.1", token: str | None = None) -> bytes:
    """A whole second request, hidden in a first one's body."""
    return request("POST", logs_path("smuggled"), record_body("smuggled"), token=token, host=host)


async def test_a_refused_requests_body_is_never_served_as_a_request(sqlite_hub_factory: InProcessHubFactory) -> None:
    # An open hub: the foreign Origin is what refuses the outer request; the
    # request inside its body has none, and would be taken if it were parsed.
    hub = await sqlite_hub_factory.astart()
    before = await snapshot(hub, None)
    inner = embedded()
    outer = request("POST", logs_path("front"), inner, token=None, headers=[("Origin", "http://evil.example")],
                    close=False)
    got = await exchange(hub, outer)
    assert got.statuses == [403] and got.ended in ("eof", "reset"), got
    # The same body as a chunked one, and the same request again after it.
    # (Its 403 may be cut short after its head: see the xfail test below.)
    chunked = request("POST", logs_path("front"), token=None, close=False,
                      headers=[("Origin", "http://evil.example"), ("Transfer-Encoding", "chunked")])
    got = await exchange(hub, chunked + b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n" + inner)
    assert got.statuses == [403] and got.ended in ("eof", "reset"), got
    assert await snapshot(hub, None) == before, "a request hidden in a refused body was served"
    await assert_serves(hub, None)

    # A tokened hub: a refused request (no token) carrying a viewer's read.
    hub, before = await tokened_hub(sqlite_hub_factory)
    inner = request("GET", "/api/v1/tasks", token=VIEWER)
    got = await exchange(hub, request("POST", logs_path("front"), inner, token=None, close=False))
    assert got.statuses == [401] and got.ended in ("eof", "reset"), got
    assert await snapshot(hub) == before
    await assert_serves(hub)


async def test_a_refusal_is_answered_whole_when_the_client_pipelines(sqlite_hub_factory: InProcessHubFactory) -> None:
    hub, before = await tokened_hub(sqlite_hub_factory)
    following = request("GET", "/healthz", token=None)
    cases = [
        ("a wrong token", request("POST", logs_path(VICTIM), record_body("x"), token="wrong", close=False), 401),
        ("the viewer's token", request("POST", logs_path(VICTIM), record_body("x"), token=VIEWER, close=False), 403),
        ("a foreign origin", request("POST", logs_path(VICTIM), record_body("x"), close=False,
                                     headers=[("Origin", "http://evil.example")]), 403),
    ]
    cut: list[str] = []
    for what, refused, status in cases:
        for attempt in range(20):  # the cut is a race: ~1 in 2 each time
            got = await exchange(hub, refused + following)
            assert got.statuses == [status] and got.ended in ("eof", "reset"), got
            if not got.answers:
                cut.append(f"{what} (attempt {attempt + 1}): {got.leftover!r}")
                break
            assert json_error(got.only, status) is None, got
    assert await snapshot(hub) == before
    await assert_serves(hub)
    assert not cut, "refusals cut short after their head:\n" + "\n".join(cut)


async def test_content_length_with_transfer_encoding_never_serves_a_second_request(
    sqlite_hub_factory: InProcessHubFactory,
) -> None:
    hub = await sqlite_hub_factory.astart()
    body = record_body("front")
    chunked_body = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    smuggled = embedded()
    # Content-Length covers the chunked body and the smuggled request, as a
    # proxy framing by Content-Length would see it: all one body.
    outer = request("POST", logs_path("front"), token=None, close=False,
                    headers=[("Content-Length", str(len(chunked_body) + len(smuggled))),
                             ("Transfer-Encoding", "chunked")])
    got = await exchange(hub, outer + chunked_body + smuggled)
    # Refused (400, hub/admission.py) and closed, as RFC 9112 6.1 asks. The
    # answer may come cut short, as any refusal a client pipelines past
    # (test_a_refusal_is_answered_whole_when_the_client_pipelines).
    assert all(answer.status == 400 for answer in got.answers), got
    assert got.ended in ("eof", "reset"), got
    stored = await snapshot(hub, None)
    await assert_serves(hub, None)
    assert len(got.answers) <= 1, f"the bytes after the chunked body were served as a request: {got!r}"
    assert "smuggled" not in stored and "front" not in stored, stored
