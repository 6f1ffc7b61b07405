"""GET /api/v1/tasks/{taskId}/sections in pages: `afterSeq` and `size`, and
`nextAfterSeq` saying where an answer was cut (never a silent truncation)."""

from __future__ import annotations

from typing import Any

from hub.openapi import openapi_document
from hub.store.sections import MAX_DEPTH
from tests import hubclient
from tests.hubclient import InProcessHub, assert_error, logs_path
from tests.test_openapi import problems

hub, hub_factory = hubclient.hub, hubclient.hub_factory


def marker(kind: str, name: str) -> dict[str, Any]:
    text = f"::group::{name}" if kind == "section_start" else "::endgroup::"
    return {"source": "stdout", "level": "INFO", "message": text, "kind": kind,
            "metadata": {"section": {"style": "github", "name": name, "title": name}}}


def sections_path(task: str) -> str:
    return f"/api/v1/tasks/{task}/sections"


async def test_sections_come_in_pages_that_say_where_the_next_starts(hub: InProcessHub) -> None:
    task = "paged"
    body = [m for k in range(5) for m in (marker("section_start", f"s{k}"), marker("section_end", f"s{k}"))]
    async with hub.http() as client:
        assert (await client.post(logs_path(task), json=body)).status_code in (200, 201)
        whole = (await client.get(sections_path(task))).json()
        assert problems(openapi_document(), "TaskSections", whole) == []
        assert whole["nextAfterSeq"] is None and [s["startSeq"] for s in whole["sections"]] == [1, 3, 5, 7, 9]
        seen: list[int] = []
        after: int | None = 0
        while after is not None:
            answer = (await client.get(sections_path(task), params={"afterSeq": after, "size": 2})).json()
            assert problems(openapi_document(), "TaskSections", answer) == []
            seen += [s["startSeq"] for s in answer["sections"]]
            assert len(answer["sections"]) <= 2
            after = answer["nextAfterSeq"]
            if after is not None:
                assert after == answer["sections"][-1]["startSeq"]
        assert seen == [1, 3, 5, 7, 9]
        for params in ({"size": 0}, {"size": 10_001}, {"afterSeq": -1}, {"afterSeq": "x"}):
            assert_error(await client.get(sections_path(task), params=params), 400, "INVALID_PARAMETER")


async def test_sections_nested_past_the_deepest_listed_are_listed_beside_each_other(hub: InProcessHub) -> None:
    """A REST producer may open sections and never close them: the answer
    nests them MAX_DEPTH deep and lists the deeper ones at that depth (it
    was a 500 past orjson's nesting limit)."""
    task = "deep"
    async with hub.http() as client:
        body = [marker("section_start", f"s{k}") for k in range(MAX_DEPTH + 200)]
        assert (await client.post(logs_path(task), json=body)).status_code in (200, 201)
        resp = await client.get(sections_path(task))
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert problems(openapi_document(), "TaskSections", answer) == []
    level = answer["sections"]
    for depth in range(1, MAX_DEPTH):
        assert len(level) == 1 and level[0]["startSeq"] == depth
        level = level[0]["sections"]
    assert [s["startSeq"] for s in level] == list(range(MAX_DEPTH, MAX_DEPTH + 201))
    assert all(s["sections"] == [] for s in level)
