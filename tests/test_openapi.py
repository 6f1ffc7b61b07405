"""The generated OpenAPI document: built from the wire's attrs models, and the
hub's real answers match its component schemas exactly (jsonschema; answers
allow no field the document does not name)."""

from __future__ import annotations

from typing import Any

import attrs
import jsonschema
import pytest
import trio

from hub import answers
from hub.openapi import MODELS, component_schemas, openapi_document
from keruta.levels import LEVELS
from keruta.records import SOURCES, TASK_STATES, LogRecord, LogRequest, TaskInfo
from keruta.wire import camel
from tests import hubclient
from tests.hubclient import PATIENCE, TestHub, logs_frame, logs_path, make_record

hub, hub_factory = hubclient.hub, hubclient.hub_factory  # fixtures


def validator(spec: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    schema = {"components": spec["components"], "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def problems(spec: dict[str, Any], name: str, body: Any) -> list[str]:
    return [f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(spec, name).iter_errors(body)]


def test_every_model_field_is_in_its_schema_under_its_wire_name() -> None:
    schemas = component_schemas()
    for name, cls in MODELS.items():
        assert set(schemas[name]["properties"]) == {camel(a.name) for a in attrs.fields(cls)}, name
    jsonschema.Draft202012Validator.check_schema({"components": {"schemas": schemas}})


def test_constraints_come_from_the_single_definitions() -> None:
    schemas = component_schemas()
    record = schemas["LogRecord"]["properties"]
    assert record["source"]["enum"] == list(SOURCES)
    assert record["level"]["enum"] == list(LEVELS)
    assert schemas["Task"]["properties"]["state"]["enum"] == list(TASK_STATES)
    # LogRequest.level may be left out or null; anything else is a level.
    assert schemas["LogRequest"]["properties"]["level"]["enum"] == [*LEVELS, None]
    assert schemas["LogRequest"]["required"] == ["message"]
    assert schemas["LogPage"]["properties"]["size"]["minimum"] == 1
    query = {p["name"]: p["schema"] for p in openapi_document()["paths"]["/api/v1/tasks/{taskId}/logs"]["get"]["parameters"]}
    assert query["source"]["enum"] == [*SOURCES, ""] and query["level"]["enum"] == [*LEVELS, ""]


def test_the_schemas_accept_what_the_models_produce_and_refuse_drift() -> None:
    spec = openapi_document()
    record = LogRecord("t-1", 3, "2026-01-01T00:00:00.000001Z", "stderr", "WARN", "hi", 2, {"k": [1]}, True, "t-1:3")
    wire = answers.answer_json(answers.LogPage([record], 1, 1, 0, 100))
    assert problems(spec, "LogPage", wire) == []
    task = answers.answer_json(answers.TaskList([TaskInfo("t-1", "failed", exit_code=3)]))
    assert problems(spec, "TaskList", task) == []
    # A field the document does not name, a missing one, a value out of range.
    assert problems(spec, "LogPage", {**wire, "extra": 1})
    assert problems(spec, "LogPage", {k: val for k, val in wire.items() if k != "totalPages"})
    assert problems(spec, "LogRecord", {**wire["content"][0], "source": "stdin"})
    assert problems(spec, "Task", {**task["tasks"][0], "state": "lost"})
    assert problems(spec, "LogRequest", {"message": "m", "level": None, "seq": 1}) == []
    assert problems(spec, "LogRequest", {"message": "m", "seq": 0})
    assert LogRequest("m").source == spec["components"]["schemas"]["LogRequest"]["properties"]["source"]["default"]


async def test_real_answers_match_the_component_schemas(hub: TestHub) -> None:
    task = "openapi-1"
    async with hub.ws() as ws:
        await ws.send(logs_frame(task, [make_record(task, s, metadata={"processId": 7}) for s in range(1, 6)]))
        await ws.send({"type": "status", "taskId": task, "state": "failed", "exitCode": 3})
        with trio.fail_after(PATIENCE):
            await ws.wait_ack(task, 5)
    async with hub.http() as client:
        spec = (await client.get("/openapi.json")).json()
        one = await client.post(logs_path("openapi-2"), json={"message": "one", "level": "INFO"})
        many = await client.post(logs_path("openapi-2"), json=[{"message": "a"}, {"message": "b", "partial": True}])
        answers_seen = [
            ("StoredId", one),
            ("StoredIds", many),
            ("LogPage", await client.get(logs_path(task))),
            ("LogPage", await client.get(logs_path("openapi-2"), params={"afterSeq": 2})),
            ("LogPage", await client.get(logs_path("nothing-here"))),
            ("LogStats", await client.get(logs_path(task, "/stats"))),
            ("TaskList", await client.get("/api/v1/tasks")),
            ("Task", await client.get(f"/api/v1/tasks/{task}")),
            ("Task", await client.get("/api/v1/tasks/openapi-2")),
            ("Health", await client.get("/healthz")),
            ("Deleted", await client.delete(logs_path("openapi-2"))),
        ]
        errors = [
            await client.get("/api/v1/tasks/nope"),
            await client.get(logs_path(task), params={"size": "many"}),
            await client.post(logs_path(task), json={"seq": 1}),
            await client.get("/no/such/path"),
        ]
    found: list[str] = []
    for name, resp in answers_seen:
        assert resp.status_code == 200, (name, resp.status_code, resp.text)
        found += problems(spec, name, resp.json())
    for resp in errors:
        assert resp.status_code >= 400, resp.text
        found += problems(spec, "Error", resp.json())
    assert not found, "\n".join(found)
    # The answers carried the optional parts too, so those were checked.
    page = (answers_seen[2][1]).json()
    assert page["content"] and all("id" in r for r in page["content"])
    assert [r.get("partial") for r in answers_seen[3][1].json()["content"]] == [True]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_component_is_a_valid_schema(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(component_schemas()[name])
