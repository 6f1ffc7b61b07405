"""A task's sections as both stores keep them (hub/store/sections.py): written
with the records, listed without opening a chunk, nested, with durations,
line counts and ERROR counts; a section left open is listed open."""

from __future__ import annotations

from typing import Any

from hub.store.base import MAX_SECTIONS, Incoming
from tests.storedata import rec, ts


def start(seq: int, name: str, *, at: float | None = None, ends: list[str] | None = None, **meta: Any) -> Incoming:
    section: dict[str, Any] = {"style": "github", "name": name, "title": f"Title {name}", "collapsed": True, **meta}
    if ends:
        section["ends"] = [{"name": n, "title": n, "durationMs": 0} for n in ends]
    return rec(seq, f"::group::{name}", at=at, kind="section_start", metadata={"section": section})


def end(seq: int, name: str | None, *, at: float | None = None) -> Incoming:
    metadata = {} if name is None else {"section": {"name": name}}
    return rec(seq, "::endgroup::", at=at, kind="section_end", metadata=metadata)


def shape(sections: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (s["name"], s["startSeq"], s["endSeq"], s["lines"], s["errors"], s["durationMs"], shape(s["sections"]))
        for s in sections
    ]


async def test_nested_sections_with_durations_lines_and_errors(store):
    await store.append([
        rec(1, "before"),
        start(2, "outer", at=10),
        rec(3, "a"),
        start(4, "inner", at=11.5),
        rec(5, "boom", level="ERROR"),
        end(6, "inner", at=12),
        end(7, "outer", at=13.25),
        start(8, "last", at=14),
        rec(9, "fine"),
        end(10, "last", at=15),
    ])
    got = (await store.sections("t1")).sections
    assert shape(got) == [
        ("outer", 2, 7, 4, 1, 3250, [("inner", 4, 6, 1, 1, 500, [])]),
        ("last", 8, 10, 1, 0, 1000, []),
    ]
    outer = got[0]
    assert outer["title"] == "Title outer" and outer["collapsed"] is True and outer["style"] == "github"
    assert outer["startedAt"] == ts(10) and outer["endedAt"] == ts(13.25) and outer["hasError"] is True
    assert got[1]["hasError"] is False


async def test_sections_across_batches_and_one_left_open(store):
    await store.append([start(1, "build", at=1), rec(2, "x")])
    await store.append([rec(3, "err", level="ERROR"), end(4, "build", at=5), start(5, "deploy", at=6)])
    await store.append([rec(6, "y"), rec(7, "z", level="ERROR")])
    got = (await store.sections("t1")).sections
    assert shape(got) == [("build", 1, 4, 2, 1, 4000, []), ("deploy", 5, None, 2, 1, None, [])]
    assert got[1]["endedAt"] is None


async def test_an_end_closes_the_innermost_open_section_of_its_name(store):
    await store.append([
        start(1, "a"), start(2, "a"), end(3, "a"), end(4, "a"),
        # No name (a REST producer that said nothing more): the innermost open one.
        start(5, "b"), start(6, "c"), end(7, None), end(8, None),
        # Nothing open of that name: nothing changes.
        end(9, "nobody"),
    ])
    assert shape((await store.sections("t1")).sections) == [
        ("a", 1, 4, 2, 0, 3000, [("a", 2, 3, 0, 0, 1000, [])]),
        ("b", 5, 8, 2, 0, 3000, [("c", 6, 7, 0, 0, 1000, [])]),
    ]


async def test_a_start_that_ends_others_makes_siblings(store):
    """A Buildkite header closes the section before it at its own seq."""
    await store.append([start(1, "one", at=0), rec(2, "x"), start(3, "two", at=2, ends=["one"]), rec(4, "y")])
    assert shape((await store.sections("t1")).sections) == [("one", 1, 3, 1, 0, 2000, []), ("two", 3, None, 1, 0, None, [])]


async def test_a_resent_record_changes_no_section(store):
    batch = [start(1, "s"), rec(2, "e", level="ERROR"), end(3, "s")]
    await store.append(batch)
    await store.append(batch)
    assert shape((await store.sections("t1")).sections) == [("s", 1, 3, 1, 1, 2000, [])]


async def test_sections_of_a_task_without_any_and_of_no_task(store):
    await store.append([rec(1, "plain")])
    assert (await store.sections("t1")).sections == []
    assert await store.sections("nobody") is None


async def test_deleting_records_drops_the_sections_they_started(store):
    await store.append([start(1, "old", at=1), end(2, "old", at=2), start(3, "new", at=10), end(4, "new", at=11)])
    await store.delete("t1", ts(5))
    assert [s["name"] for s in (await store.sections("t1")).sections] == ["new"]
    await store.delete("t1", None)
    assert (await store.sections("t1")).sections == []


async def test_metadata_a_producer_got_wrong_is_not_trusted(store):
    await store.append([
        rec(1, "--- x", kind="section_start", metadata={"section": "nonsense"}),
        rec(2, "y" * 600, kind="section_start", metadata={"section": {"name": 3, "ends": [1, {"name": None}]}}),
    ])
    got = (await store.sections("t1")).sections
    assert [(s["name"], s["title"], s["style"]) for s in got] == [("--- x", "--- x", None)]
    inner = got[0]["sections"][0]
    assert inner["name"] == "y" * 64 and inner["title"] == "y" * 256


async def test_a_page_of_sections_says_where_the_next_starts(store):
    # outer(1..8) holds a(2..3), b(4..5), c(6..7); last(9..) is left open.
    await store.append([
        start(1, "outer"), start(2, "a"), end(3, "a"), start(4, "b"), end(5, "b"),
        start(6, "c"), end(7, "c"), end(8, "outer"), start(9, "last"), rec(10, "x"),
    ])
    whole = await store.sections("t1")
    assert whole.next_after_seq is None and [s["name"] for s in whole.sections] == ["outer", "last"]
    # A limit counts nested sections too; the page is cut after b, and says so.
    first = await store.sections("t1", 0, 3)
    assert shape(first.sections) == [("outer", 1, 8, 6, 0, 7000, [("a", 2, 3, 0, 0, 1000, []), ("b", 4, 5, 0, 0, 1000, [])])]
    assert first.next_after_seq == 4
    # The next page nests only among its own: c, whose outer section was on
    # the page before, is at its top.
    second = await store.sections("t1", first.next_after_seq, 3)
    assert [s["name"] for s in second.sections] == ["c", "last"] and second.next_after_seq is None
    # Exactly as many as asked for, and none after: not cut.
    assert (await store.sections("t1", 5, 2)).next_after_seq is None
    assert (await store.sections("t1", 9, 5)).sections == []


async def test_more_sections_than_one_answer_lists_by_default(store):
    await store.append([r for k in range(MAX_SECTIONS + 1) for r in (start(2 * k + 1, f"s{k}"), end(2 * k + 2, f"s{k}"))])
    page = await store.sections("t1")
    last = 2 * MAX_SECTIONS - 1
    assert len(page.sections) == MAX_SECTIONS and page.next_after_seq == last
    rest = await store.sections("t1", page.next_after_seq)
    assert [s["startSeq"] for s in rest.sections] == [last + 2] and rest.next_after_seq is None
