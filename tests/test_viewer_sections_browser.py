"""Folded sections in the web viewer, in a real headless Chromium against a real
hub process (the fixtures and helpers of tests/test_viewer_browser.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from hub.store.base import MAX_SECTIONS
from tests import test_viewer_browser as browser
from tests.support import HubProcess
from tests.test_viewer_browser import js, post, rows, settled, viewer, wait_for

driver, page, shared_hub = browser.driver, browser.page, browser.shared_hub  # fixtures

pytestmark = [
    pytest.mark.browser,
    pytest.mark.xdist_group("browser"),
]

BIG = 2000  # lines in the closed section: four of the viewer's pages


def ts(second: float) -> str:
    whole = int(second)
    return f"2026-03-01T10:{whole // 60:02d}:{whole % 60:02d}.{round((second - whole) * 1e6):06d}Z"


def start(title: str, at: float, *, collapsed: bool = True, style: str = "github") -> dict[str, Any]:
    section = {"style": style, "name": title, "title": title, "collapsed": collapsed, "depth": 0}
    return {"message": f"::group::{title}", "kind": "section_start", "timestamp": ts(at), "metadata": {"section": section}}


def end(title: str, at: float) -> dict[str, Any]:
    return {"message": "::endgroup::", "kind": "section_end", "timestamp": ts(at), "metadata": {"section": {"name": title}}}


def line(text: str, at: float, level: str = "INFO") -> dict[str, Any]:
    return {"message": text, "level": level, "timestamp": ts(at)}


def task_with_sections() -> list[dict[str, Any]]:
    return [
        line("before", 0),                                              # 1
        start("Build", 1),                                              # 2
        *[line(f"compiling unit {i}", 2) for i in range(1, BIG + 1)],   # 3 .. 2002
        end("Build", 13.3),                                             # 2003
        start("Tests", 14),                                             # 2004
        line("test_a ok", 15),                                          # 2005
        line("test_b failed", 15, "ERROR"),                             # 2006
        line("test_c ok", 15),                                          # 2007
        end("Tests", 16.5),                                             # 2008
        start("Summary", 17, collapsed=False, style="buildkite"),       # 2009
        line("1 failed, 2 passed", 17),                                 # 2010
    ]


def shown_seqs(driver: Any) -> list[int]:
    return [r["seq"] for r in rows(driver) if r["seq"] is not None]


def toggle(driver: Any, seq: int) -> bool:
    """Click a section header's toggle (in one script: rows are re-rendered)."""
    return bool(js(driver, f"""
        const b = document.querySelector('.row.section[data-seq="{seq}"] .fold');
        if (!b) return false;
        b.click();
        return true;"""))


def loaded_seqs(driver: Any) -> set[int]:
    return {seq for _, seq in viewer(driver, "loaded()")}


def test_sections_fold_closed_open_on_error_and_load_lazily(page: Any, shared_hub: HubProcess) -> None:
    task = "sections-view-1"
    post(shared_hub, task, task_with_sections())
    page.get(f"{shared_hub.url}/tasks/{quote(task)}")
    expected = [1, 2, 2004, 2005, 2006, 2007, 2008, 2009, 2010]
    wait_for(lambda: settled(lambda: shown_seqs(page)) == expected, "the closed section folded")
    assert viewer(page, "shown") == len(expected) and viewer(page, "total") == 2010

    heads = {r["seq"]: r for r in rows(page) if "section" in r["cls"].split()}
    assert set(heads) == {2, 2004, 2009}
    # Closed by default; open when it holds an ERROR; `+++` (collapsed false) open.
    assert "closed" in heads[2]["cls"] and "open" in heads[2004]["cls"] and "open" in heads[2009]["cls"]
    assert "has-error" in heads[2004]["cls"]
    assert heads[2]["text"] == "\u25b8Build 12.3 s \u00b7 2,000 lines"
    assert heads[2004]["text"] == "\u25beTests 2.5 s \u00b7 3 lines \u00b7 1 error"
    # Left open (nothing ended it): listed open, its lines shown.
    assert heads[2009]["text"] == "\u25beSummary open \u00b7 1 line"

    # The closed section's lines past the first page were never fetched.
    assert not loaded_seqs(page) & set(range(501, 2001))

    # Opening it shows its lines, fetched as they come on screen.
    wait_for(lambda: toggle(page, 2), "a click on the header's toggle")
    wait_for(lambda: shown_seqs(page)[:4] == [1, 2, 3, 4], "the section opened")
    assert viewer(page, "shown") == 2010
    js(page, "document.getElementById('scroller').scrollTop = 1200 * 20;")
    wait_for(lambda: 1200 in loaded_seqs(page), "a page inside the opened section loaded")

    # And closed again.
    js(page, "document.getElementById('scroller').scrollTop = 0;")
    wait_for(lambda: toggle(page, 2), "a click on the header's toggle")
    wait_for(lambda: settled(lambda: shown_seqs(page)) == expected, "the section closed again")


def test_a_filter_shows_every_matching_line_unfolded(page: Any, shared_hub: HubProcess) -> None:
    task = "sections-view-2"
    post(shared_hub, task, task_with_sections())
    page.get(f"{shared_hub.url}/tasks/{quote(task)}?q=compiling%20unit%201999")
    wait_for(lambda: settled(lambda: shown_seqs(page)) == [2001], "the match inside the closed section")


def test_a_live_section_stays_open_until_it_ends_then_folds(page: Any, shared_hub: HubProcess) -> None:
    task = "sections-view-3"
    post(shared_hub, task, [line("before", 0), start("Deploy", 1), *[line(f"step {i}", 2) for i in range(1, 4)]])
    page.get(f"{shared_hub.url}/tasks/{quote(task)}")
    wait_for(lambda: settled(lambda: shown_seqs(page)) == [1, 2, 3, 4, 5], "the open section's lines")
    assert "open" in [r for r in rows(page) if r["seq"] == 2][0]["cls"].split()
    post(shared_hub, task, [end("Deploy", 4), line("after", 5)])
    wait_for(lambda: settled(lambda: shown_seqs(page)) == [1, 2, 7], "the ended section folded")


def test_sections_past_one_answer_are_fetched_and_nested_where_they_belong(page: Any, shared_hub: HubProcess) -> None:
    """More sections than GET .../sections lists at once: the viewer follows
    `nextAfterSeq`, and a section of the second page goes inside the section
    of the first page that encloses it (else its fold would overlap)."""
    task = "sections-view-many"
    many = MAX_SECTIONS  # tiny sections inside Outer: Last comes on the second page
    records = [line("before", 0), start("Outer", 1)]
    for k in range(many):
        records += [start(f"s{k}", 2), end(f"s{k}", 2)]
    records += [start("Last", 3), line("inside last", 3), line("inside last", 3), end("Last", 4), end("Outer", 5),
                line("after", 6)]
    post(shared_hub, task, records)
    last_seq = 2 + 2 * many + 1
    total = last_seq + 5
    page.get(f"{shared_hub.url}/tasks/{quote(task)}")
    wait_for(lambda: any(s["startSeq"] == last_seq for s in viewer(page, "sections()") or []), "the second page's section")
    # Outer, closed, hides all it holds once, Last's lines among them.
    wait_for(lambda: settled(lambda: shown_seqs(page)) == [1, 2, total], "Outer folded")
    assert viewer(page, "shown") == 3 and viewer(page, "total") == total
