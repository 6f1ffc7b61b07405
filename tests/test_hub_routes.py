"""The route modules of hub/routes/, each on an app of its own, in-process.

Quart-Trio's test client drives them (no hub process, no socket); the store
is a real SQLite file in tmp_path and, where a route writes, a real Writer
actor commits.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
from quart import Blueprint
from quart_trio import QuartTrio

from hub.access import Access
from hub.actors.broadcaster import Broadcaster
from hub.actors.writer import Writer
from hub.app import create_app
from hub.config import HubConfig
from hub.deps import ConnectionDeps
from hub.errors import ApiError
from hub.messages import WriteRequest
from hub.metrics import Metrics
from hub.routes import hooks, logs, ops, tasks, viewer, ws
from hub.routes.common import int_param, time_param
from hub.shutdown import Shutdown
from hub.store.base import Listens, StoreUnavailable, record_id
from hub.store.sqlite import SQLiteStore
from hub.task_rate_limits import Limiters
from keruta.limits import DEFAULT_LIMITS
from tests.hubclient import logs_frame, make_record

TASK = "build-7"
STAMP = "2025-01-01T00:00:00.000000Z"


@pytest.fixture
def store(sqlite_store: SQLiteStore) -> SQLiteStore:
    return sqlite_store


def deps_for(
    store: SQLiteStore, nursery: trio.Nursery | None, config: HubConfig | None = None, *, limiters: Limiters | None = None
) -> ConnectionDeps:
    """The hub's parts around `store`; with a nursery, a Writer commits what is posted."""
    config = config or HubConfig()
    send, receive = trio.open_memory_channel[WriteRequest](config.writer_inbox)
    broadcaster, metrics = Broadcaster(), Metrics()
    if nursery is not None:
        writer = Writer(store, broadcaster, metrics, batch_size=config.write_batch_size, flush_interval=0)
        nursery.start_soon(writer.run, receive)
    limiters = limiters or Limiters(config.rate_limit, config.rate_burst)
    return ConnectionDeps(
        config=config, store=store, writer_inbox=send, broadcaster=broadcaster, metrics=metrics,
        limiter=limiters.limiter, shutting_down=Shutdown(),
    )


def app_with(blueprint: Blueprint, deps: ConnectionDeps) -> QuartTrio:
    """One route module on an app of its own, with the hub's hooks and error handlers."""
    app = QuartTrio("test")
    app.config["MAX_CONTENT_LENGTH"] = deps.config.limits.max_frame_bytes
    hooks.install(
        app, access=Access.for_config(deps.config), metrics=deps.metrics,
        max_frame_bytes=deps.config.limits.max_frame_bytes,
    )
    app.register_blueprint(blueprint)
    return app


async def json_of(response: Any) -> Any:
    return orjson.loads(await response.get_data())


async def error_of(response: Any) -> str:
    body = await json_of(response)
    assert set(body) == {"error", "message"}, body
    return str(body["error"])


def line(seq: int, message: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"seq": seq, "timestamp": STAMP, "message": message or f"line {seq}", **fields}


# --- tasks -----------------------------------------------------------------


async def test_tasks_lists_every_task_and_shows_one(store: SQLiteStore) -> None:
    await store.set_state(TASK, "running", None)
    await store.set_state("other", "succeeded", 0)
    deps = deps_for(store, None)
    client = app_with(tasks.blueprint(access=Access.for_config(deps.config), store=store), deps).test_client()

    listed = await json_of(await client.get("/api/v1/tasks"))
    assert [t["taskId"] for t in listed["tasks"]] == ["build-7", "other"]
    one = await client.get(f"/api/v1/tasks/{TASK}")
    assert one.status_code == 200
    body = await json_of(one)
    assert body["taskId"] == TASK and body["state"] == "running" and body["exitCode"] is None
    assert set(body) == {
        "taskId", "state", "exitCode", "firstTimestamp", "lastTimestamp", "totalLogs", "durableSeq", "updatedAt",
        "verdict",
    }
    assert body["verdict"] == "unverified"

    missing = await client.get("/api/v1/tasks/nobody")
    assert missing.status_code == 404 and await error_of(missing) == "NOT_FOUND"
    bad = await client.get("/api/v1/tasks/a,b")
    assert bad.status_code == 400 and await error_of(bad) == "INVALID_TASK_ID"


async def test_tasks_need_a_token_once_tokens_are_set(store: SQLiteStore) -> None:
    deps = deps_for(store, None, HubConfig(viewer_token="look", agent_token="write"))
    client = app_with(tasks.blueprint(access=Access.for_config(deps.config), store=store), deps).test_client()

    refused = await client.get("/api/v1/tasks")
    assert refused.status_code == 401 and await error_of(refused) == "UNAUTHORIZED"
    wrong = await client.get("/api/v1/tasks", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert (await client.get("/api/v1/tasks", headers={"Authorization": "Bearer look"})).status_code == 200
    assert (await client.get("/api/v1/tasks", query_string={"token": "write"})).status_code == 200
    assert 'code="UNAUTHORIZED"} 2' in deps.metrics.render()


# --- logs ------------------------------------------------------------------


def logs_app(deps: ConnectionDeps) -> QuartTrio:
    return app_with(logs.blueprint(
        access=Access.for_config(deps.config), store=deps.store, writer_inbox=deps.writer_inbox,
        limiter=deps.limiter, config=deps.config, broadcaster=deps.broadcaster,
    ), deps)


async def test_logs_written_then_paged_counted_and_downloaded(store: SQLiteStore, nursery: trio.Nursery) -> None:
    client = logs_app(deps_for(store, nursery)).test_client()
    path = f"/api/v1/tasks/{TASK}/logs"

    one = await client.post(path, json=line(1, level="WARN"))
    assert one.status_code == 200, await one.get_data()
    assert await json_of(one) == {"id": record_id(TASK, 1), "seq": 1}
    many = await client.post(path, json=[line(2, source="stderr"), line(3, "partial ", partial=True), line(4, "end")])
    assert (await json_of(many))["seqs"] == [2, 3, 4]

    page = await json_of(await client.get(path, query_string={"size": "2"}))
    assert [r["seq"] for r in page["content"]] == [1, 2]
    assert (page["totalElements"], page["totalPages"], page["number"], page["size"]) == (4, 2, 0, 2)
    stderr = await json_of(await client.get(path, query_string={"source": "stderr"}))
    assert [r["seq"] for r in stderr["content"]] == [2]
    after = await json_of(await client.get(path, query_string={"afterSeq": "2"}))
    assert [r["seq"] for r in after["content"]] == [3, 4]

    stats = await json_of(await client.get(f"{path}/stats"))
    assert stats["taskId"] == TASK and stats["totalLogs"] == 4
    assert stats["timeRange"] == {"start": STAMP, "end": STAMP}
    assert (await client.get("/api/v1/tasks/nobody/logs/stats")).status_code == 404

    raw = await client.get(f"{path}/raw")
    assert raw.content_type == "text/plain; charset=utf-8"
    assert await raw.get_data() == b"line 1\nline 2\npartial end\n"

    deleted = await client.delete(path)
    assert await json_of(deleted) == {"deletedCount": 4}
    assert (await json_of(await client.get(path)))["totalElements"] == 0


async def test_logs_parameters_and_bodies_are_refused_with_the_field_named(store: SQLiteStore) -> None:
    client = logs_app(deps_for(store, None, HubConfig(max_page_size=50))).test_client()
    path = f"/api/v1/tasks/{TASK}/logs"
    for params, named in [
        ({"size": "51"}, "between 1 and 50"),
        ({"page": "x"}, "must be an integer"),
        ({"level": "LOUD"}, "one of"),
        ({"from": "yesterday"}, "RFC 3339"),
        ({"afterSeq": "-1"}, "afterSeq"),
    ]:
        refused = await client.get(path, query_string=params)
        assert refused.status_code == 400, params
        body = await json_of(refused)
        assert body["error"] == "INVALID_PARAMETER" and named in body["message"], (params, body)

    for payload, code, status in [
        (b"{", "INVALID_REQUEST", 400),
        (b"[]", "INVALID_REQUEST", 400),
        (b"[1]", "INVALID_REQUEST", 400),
        (b'"text"', "INVALID_REQUEST", 400),
        (orjson.dumps([line(i) for i in range(1, DEFAULT_LIMITS.max_records_per_batch + 2)]), "TOO_LARGE", 413),
    ]:
        refused = await client.post(path, data=payload, headers={"Content-Type": "application/json"})
        assert refused.status_code == status and await error_of(refused) == code, payload[:20]


async def test_logs_over_the_rate_limit_answer_429_with_retry_after(store: SQLiteStore, nursery: trio.Nursery) -> None:
    deps = deps_for(store, nursery, limiters=Limiters(rate=1, burst=2))
    client = logs_app(deps).test_client()
    path = f"/api/v1/tasks/{TASK}/logs"
    assert (await client.post(path, json=[line(1), line(2)])).status_code == 200
    limited = await client.post(path, json=line(3))
    assert limited.status_code == 429 and await error_of(limited) == "RATE_LIMITED"
    assert limited.headers["Retry-After"] == "1"


async def test_logs_post_not_committed_in_time_is_503_and_not_stored(
    store: SQLiteStore, autojump_clock: trio.abc.Clock
) -> None:
    # No writer reads the inbox: the POST withdraws its request after post_timeout.
    client = logs_app(deps_for(store, None, HubConfig(post_timeout=8.0))).test_client()
    started = trio.current_time()
    answer = await client.post(f"/api/v1/tasks/{TASK}/logs", json=line(1))
    assert answer.status_code == 503 and await error_of(answer) == "STORE_UNAVAILABLE"
    assert answer.headers["Retry-After"] == "5"
    assert 8.0 <= trio.current_time() - started < 9.0
    assert await store.task(TASK) is None


async def test_logs_delete_needs_the_admin_token(store: SQLiteStore, nursery: trio.Nursery) -> None:
    client = logs_app(deps_for(store, nursery, HubConfig(agent_token="agent", admin_token="admin"))).test_client()
    path = f"/api/v1/tasks/{TASK}/logs"
    as_agent = {"Authorization": "Bearer agent"}
    assert (await client.post(path, json=line(1), headers=as_agent)).status_code == 200
    refused = await client.delete(path, headers=as_agent)
    assert refused.status_code == 403 and await error_of(refused) == "FORBIDDEN"
    assert (await client.delete(path)).status_code == 401
    done = await client.delete(path, headers={"Authorization": "Bearer admin"})
    assert await json_of(done) == {"deletedCount": 1}


# --- operations ------------------------------------------------------------


async def test_ops_health_metrics_and_openapi(store: SQLiteStore) -> None:
    deps = deps_for(store, None, HubConfig(viewer_token="look", max_page_size=77))
    available = True
    client = app_with(ops.blueprint(
        access=Access.for_config(deps.config), metrics=deps.metrics,
        store_available=lambda: available, max_page_size=77,
    ), deps).test_client()

    assert await json_of(await client.get("/healthz")) == {"status": "ok", "store": "ok"}
    available = False
    assert await json_of(await client.get("/healthz")) == {"status": "ok", "store": "unavailable"}

    assert (await client.get("/metrics")).status_code == 401
    metrics = await client.get("/metrics", headers={"Authorization": "Bearer look"})
    assert metrics.status_code == 200 and metrics.content_type.startswith("text/plain")
    assert "keruta_errors_total" in await metrics.get_data(as_text=True)

    document = await json_of(await client.get("/openapi.json"))
    assert document["openapi"].startswith("3.") and "77" in orjson.dumps(document).decode()


# --- viewer ----------------------------------------------------------------


async def test_viewer_page_and_static_files(store: SQLiteStore) -> None:
    client = app_with(viewer.blueprint(), deps_for(store, None)).test_client()
    for path in ("/", f"/tasks/{TASK}"):
        page = await client.get(path)
        assert page.status_code == 200 and page.content_type == "text/html; charset=utf-8"
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    script = await client.get("/static/viewer.js")
    assert script.content_type == "text/javascript; charset=utf-8"
    assert script.headers["X-Content-Type-Options"] == "nosniff"
    for missing in ("/static/nothing.js", "/static/.hidden.js", "/static/viewer.py"):
        answer = await client.get(missing)
        assert answer.status_code == 404 and await error_of(answer) == "NOT_FOUND", missing
    assert (await client.get("/tasks/a,b")).status_code == 400


# --- hooks and access ------------------------------------------------------


async def test_hooks_refuse_foreign_origins_and_hosts_and_answer_errors_as_json(store: SQLiteStore) -> None:
    deps = deps_for(store, None)
    bp = Blueprint("probe", __name__)

    @bp.route("/probe", methods=["GET", "POST"])
    async def probe() -> str:
        return "fine"

    @bp.get("/broken")
    async def broken() -> str:
        raise RuntimeError("a bug")

    @bp.get("/down")
    async def down() -> str:
        raise StoreUnavailable("gone")

    client = app_with(bp, deps).test_client()
    assert (await client.post("/probe", headers={"Origin": "http://localhost"})).status_code == 200
    foreign = await client.post("/probe", headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403 and await error_of(foreign) == "FORBIDDEN_ORIGIN"
    # Reads from a foreign page are answered: without CORS headers it cannot see them.
    assert (await client.get("/probe", headers={"Origin": "https://evil.example"})).status_code == 200
    rebound = await client.get("/probe", headers={"Host": "attacker.example"})
    assert rebound.status_code == 403 and await error_of(rebound) == "FORBIDDEN_HOST"

    broke = await client.get("/broken")
    assert broke.status_code == 500 and await error_of(broke) == "INTERNAL"
    unavailable = await client.get("/down")
    assert unavailable.status_code == 503 and await error_of(unavailable) == "STORE_UNAVAILABLE"
    assert unavailable.headers["Retry-After"] == "1"
    nowhere = await client.get("/nowhere")
    assert nowhere.status_code == 404 and await error_of(nowhere) == "NOT_FOUND"
    wrong = await client.delete("/probe")
    assert wrong.status_code == 405 and await error_of(wrong) == "METHOD_NOT_ALLOWED"


async def test_hooks_close_the_connection_after_an_oversized_body(store: SQLiteStore) -> None:
    deps = deps_for(store, None)
    client = logs_app(deps).test_client()
    body = b"x" * (deps.config.limits.max_frame_bytes + 1)
    answer = await client.post(f"/api/v1/tasks/{TASK}/logs", data=body)
    assert answer.status_code == 413 and await error_of(answer) == "TOO_LARGE"
    assert answer.headers["Connection"] == "close"


def test_access_host_check_applies_only_to_a_hub_without_tokens() -> None:
    open_hub = Access.for_config(HubConfig())
    assert open_hub.host_refusal("localhost:8080") is None
    assert open_hub.host_refusal("127.0.0.1") is None
    assert "loopback" in str(open_hub.host_refusal("rebind.example:8080"))
    assert Access.for_config(HubConfig(allow_origins=("http://rebind.example:8080",))).host_refusal(
        "rebind.example:8080"
    ) is None
    assert Access.for_config(HubConfig(agent_token="t")).host_refusal("anything.example") is None


async def test_common_params_raise_api_errors() -> None:
    app = QuartTrio("test")
    async with app.test_request_context("/x", query_string={"n": "5", "big": "11", "t": "2025-01-01T00:00:00Z"}):
        assert int_param("n", None, 0, 10) == 5
        assert int_param("absent", 3, 0) == 3
        with pytest.raises(ApiError) as refused:
            int_param("big", None, 0, 10)
        assert (refused.value.status, refused.value.code) == (400, "INVALID_PARAMETER")
        assert time_param("t") == STAMP


# --- WebSocket -------------------------------------------------------------


async def test_ws_without_a_token_gets_one_error_frame(store: SQLiteStore) -> None:
    deps = deps_for(store, None, HubConfig(agent_token="agent"))
    # The WebSocket is served below Quart (hub/ws/endpoint.py): the whole app's ASGI callable.
    client = create_app(deps, store_available=lambda: True).test_client()
    with trio.fail_after(5):
        async with client.websocket("/api/v1/ws") as socket:
            frame = orjson.loads(await socket.receive())
    assert frame["type"] == "error" and frame["code"] == "UNAUTHORIZED"


async def test_ws_accepted_answers_pings_and_acknowledges_writes(store: SQLiteStore, nursery: trio.Nursery) -> None:
    deps = deps_for(store, nursery, HubConfig(agent_token="agent"))
    client = create_app(deps, store_available=lambda: True).test_client()
    with trio.fail_after(5):
        async with client.websocket("/api/v1/ws", headers={"Authorization": "Bearer agent"}) as socket:
            await socket.send('{"type":"ping"}')
            assert orjson.loads(await socket.receive()) == {"type": "pong"}
            await socket.send(logs_frame(TASK, [make_record(TASK, 1), make_record(TASK, 2)]))
            ack = orjson.loads(await socket.receive())
            assert ack["type"] == "ack" and ack["taskId"] == TASK and ack["seq"] == 2
    assert await store.durable_seq(TASK) == 2


async def test_a_plain_get_of_the_ws_path_is_told_to_upgrade(store: SQLiteStore) -> None:
    deps = deps_for(store, None)
    response = await app_with(ws.blueprint(), deps).test_client().get("/api/v1/ws")
    assert response.status_code == 426 and response.headers["Upgrade"] == "websocket"
    assert (await json_of(response))["error"] == "UPGRADE_REQUIRED"


# --- the whole app ---------------------------------------------------------


async def test_create_app_wires_every_route_module(store: SQLiteStore, nursery: trio.Nursery) -> None:
    deps = deps_for(store, nursery)
    client = create_app(deps, store_available=lambda: True).test_client()
    assert (await client.post(f"/api/v1/tasks/{TASK}/logs", json=line(1))).status_code == 200
    assert (await client.get(f"/api/v1/tasks/{TASK}")).status_code == 200
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/")).status_code == 200
    assert (await client.options("/api/v1/tasks")).status_code == 200


async def test_apps_built_one_after_another_build_their_own_urls(store: SQLiteStore, nursery: trio.Nursery) -> None:
    # tests/inprocess.py shares werkzeug's compiled URL builders between the
    # apps of one test process: each app's builders still use its own rules.
    import tests.inprocess  # noqa: F401  (the sharing is installed on import)

    apps = [create_app(deps_for(store, nursery), store_available=lambda: True) for _ in range(2)]
    for app in apps:
        urls = app.url_map.bind("hub.example")
        assert urls.build("logs.get_logs", {"task_id": "a b", "page": 2}) == "/api/v1/tasks/a%20b/logs?page=2"
        assert urls.build("viewer.static_file", {"name": "viewer.js"}) == "/static/viewer.js"
        assert urls.build("ops.healthz", force_external=True) == "http://hub.example/healthz"


async def test_only_a_postgresql_store_listens(store: SQLiteStore) -> None:
    # The hub runs a notifier only for a store that tells of other hubs' commits.
    from hub.store.postgres import PostgresStore

    assert not isinstance(store, Listens)
    assert isinstance(PostgresStore.from_url("postgresql://nobody@127.0.0.1:1/none"), Listens)
