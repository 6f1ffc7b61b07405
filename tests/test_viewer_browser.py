"""The web viewer in a real headless Chromium (selenium), against real hub and agent processes.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); skipped
with the reason when they are missing. Set KERUTA_VIEWER_SCREENSHOT=PATH to save
the task page of the agent run as a PNG (docs/viewer.png is made this way).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio

from agent.http import system_tls
from tests.agentclient import agent_env, run_args
from tests.hubclient import batch_frames, ws_connect
from tests.support import HubProcess, python_m, sqlite_url, wait_for

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.browser,
    # One worker runs them all: one Chromium, started once (--dist loadgroup).
    pytest.mark.xdist_group("browser"),
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

MAX_ROWS_IN_DOM = 300


# --- fixtures ---------------------------------------------------------------


# Session scope, not module: xdist interleaves these tests with other modules'
# on their worker, and a module fixture would start Chromium again each time.
@pytest.fixture(scope="session")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # Selenium Manager must never try to download a browser or driver.
    os.environ["SE_OFFLINE"] = "true"
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-dev-shm-usage", "--no-first-run", "--disable-component-update", "--disable-sync",
        "--window-size=1280,800", "--lang=en-US",
    ):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="session")
def shared_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    hub = HubProcess(sqlite_url(tmp_path_factory.mktemp("viewer") / "keruta.db")).start()
    try:
        yield hub
    finally:
        hub.stop()
        print("--- hub stderr ---\n" + "".join(hub.output))


@pytest.fixture
def page(driver: Any) -> Iterator[Any]:
    yield driver
    # Every test leaves the browser on a blank page with a clean session.
    driver.get("about:blank")
    driver.delete_all_cookies()


# --- helpers ----------------------------------------------------------------


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def settled(read: Callable[[], Any], pause: float = 0.2) -> Any:
    """What `read` gives, if it gives the same again after `pause` (else None):
    a view still filling in as its pages arrive is not yet the view."""
    first = read()
    if not first:
        return None
    time.sleep(pause)
    return first if read() == first else None


def rows(driver: Any) -> list[dict[str, Any]]:
    """The rows in the DOM: seq, classes, text, whether on screen."""
    return js(driver, """
        const box = document.getElementById('scroller').getBoundingClientRect();
        return [...document.querySelectorAll('#rows .row')].map((r) => {
          const b = r.getBoundingClientRect();
          return {seq: r.dataset.seq ? Number(r.dataset.seq) : null, cls: r.className,
                  text: r.querySelector('.m').textContent,
                  visible: b.bottom > box.top && b.top < box.bottom};
        });""")


def visible_seqs(driver: Any) -> list[int]:
    return [r["seq"] for r in rows(driver) if r["visible"] and r["seq"] is not None]


def viewer(driver: Any, name: str) -> Any:
    return js(driver, f"return window.kerutaViewer && window.kerutaViewer.{name}")


def post(hub: HubProcess, task_id: str, records: list[dict[str, Any]], token: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for start in range(0, len(records), 1000):
        resp = httpx.post(f"{hub.url}/api/v1/tasks/{task_id}/logs", json=records[start:start + 1000], headers=headers, timeout=30, verify=system_tls())
        assert resp.status_code == 200, resp.text


def lines(task_id: str, n: int, text: Callable[[int], str] = lambda i: f"plain line {i}") -> list[dict[str, Any]]:
    return [{"message": text(i), "source": "stdout", "level": "INFO"} for i in range(1, n + 1)]


def ws_send(hub: HubProcess, frames: list[str], task_id: str, last_seq: int) -> None:
    """Send frames over one WebSocket and wait for the ack of last_seq (0: no ack awaited)."""

    async def run() -> None:
        async with ws_connect(hub.url.replace("http://", "ws://") + "/api/v1/ws") as ws:
            async with trio.open_nursery() as nursery:
                window = trio.Semaphore(8)

                async def sender() -> None:
                    for frame in frames:
                        await window.acquire()
                        await ws.send(frame)

                nursery.start_soon(sender)
                with trio.fail_after(120):
                    while last_seq and ws.acked.get(task_id, 0) < last_seq:
                        frame = await ws.recv()
                        assert frame["type"] != "error", frame
                        if frame["type"] == "ack":
                            window.release()
                    if not last_seq:
                        await trio.sleep(0.3)
                nursery.cancel_scope.cancel()

    trio.run(run)


def stored_total(hub: HubProcess, task_id: str) -> int:
    resp = httpx.get(f"{hub.url}/api/v1/tasks/{task_id}", timeout=10, verify=system_tls())
    return int(resp.json()["totalLogs"]) if resp.status_code == 200 else 0


def start_agent(hub: HubProcess, task_id: str, spool: Path, code: str, *args: str) -> subprocess.Popen[bytes]:
    args_ = [*run_args(hub.url, task_id, spool, "--quiet"), sys.executable, "-c", code, *args]
    return subprocess.Popen(
        python_m("agent", *args_), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=agent_env(),
    )


# A build as a person would watch it: colours in all three forms, bold and
# underline, a cursor-movement code, WARN and ERROR lines, stderr. It waits for
# a file before its last lines, so the test knows they come after the page opened.
BUILD = r"""
import os, sys, time
E = "\x1b["
out = sys.stdout
def say(s, err=False):
    (sys.stderr if err else sys.stdout).write(s + "\n")
say(E + "1m==> keruta build #1842" + E + "0m  (python 3.11, linux/amd64)")
say(E + "2mcloning " + E + "4mhttps://example.org/keruta.git" + E + "0m")
say("collecting dependencies " + E + "2K" + E + "1G" + E + "32m✓" + E + "0m 38 packages resolved")
for i, name in enumerate(["wire", "records", "spool", "uplink", "writer", "broadcaster"]):
    say(f"  compiling {E}36mkeruta.{name}{E}0m ... {E}32mok{E}0m  ({12 + i * 7} ms)")
say(E + "38;5;208mWARN" + E + "0m deprecated option --legacy-batching, use --batch-size")
say(f"{E}1mtests{E}0m: running 214 tests with {E}38;2;120;160;255mpytest -q{E}0m")
for i in range(1, 9):
    say(f"tests/test_part{i}.py {'.' * (20 + i * 3)} {E}32m[{i * 12}%]{E}0m")
say(f"{E}33mwarning:{E}0m test_slow_io took 4.2 s (budget 2 s)", err=True)
say(f"{E}31;1mERROR{E}0m tests/test_store.py::test_outage - ConnectionRefusedError: [Errno 111]", err=True)
say(f"{E}1;31m1 failed{E}0m, {E}32m213 passed{E}0m in 12.41s")
say("stats: " + E + "4munderlined" + E + "24m " + E + "1mbold" + E + "22m " + E + "7minverse" + E + "27m done")
sys.stdout.flush(); sys.stderr.flush()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
say("after the page opened: uploading artifacts")
say(E + "32mlive line two" + E + "0m")
sys.exit(3)
"""
BUILD_HISTORY_LINES = 23


# --- tests --------------------------------------------------------------------


def test_history_then_live_with_ansi_and_marks(page: Any, shared_hub: HubProcess, tmp_path: Path) -> None:
    task = "build-1842"
    go = tmp_path / "go"
    agent = start_agent(shared_hub, task, tmp_path / "spool", BUILD, str(go))
    try:
        wait_for(lambda: stored_total(shared_hub, task) >= BUILD_HISTORY_LINES, "the history to be stored")
        page.get(f"{shared_hub.url}/tasks/{task}")
        # The history appears.
        wait_for(lambda: any("==> keruta build #1842" in r["text"] for r in rows(page)), "the history")
        shown = rows(page)
        assert len(shown) == BUILD_HISTORY_LINES
        assert all("\x1b" not in r["text"] and "[31m" not in r["text"] and "[2K" not in r["text"] for r in shown)
        # ANSI: the 16-colour palette as classes, 256 and truecolour inline; bold, underline.
        styled = js(page, """
            return [...document.querySelectorAll('#rows .m span')].map((s) => ({
              text: s.textContent, cls: s.className, color: getComputedStyle(s).color,
              weight: getComputedStyle(s).fontWeight, deco: getComputedStyle(s).textDecorationLine}));""")
        by_text = {s["text"]: s for s in styled}
        default = js(page, "return getComputedStyle(document.querySelector('#rows .m')).color")
        assert "ansi-fg2" in by_text["✓"]["cls"] and by_text["✓"]["color"] != default
        assert by_text["WARN"]["color"] == "rgb(255, 135, 0)"  # 256-colour 208
        assert by_text["pytest -q"]["color"] == "rgb(120, 160, 255)"  # truecolour
        assert by_text["==> keruta build #1842"]["weight"] == "700"
        assert by_text["underlined"]["deco"] == "underline"
        assert "ansi-bold" in by_text["1 failed"]["cls"] and "ansi-fg1" in by_text["1 failed"]["cls"]
        # The cursor-movement codes are gone, the text around them kept.
        assert any(r["text"] == "collecting dependencies ✓ 38 packages resolved" for r in shown)
        # stderr, WARN and ERROR are marked.
        def classes(prefix: str) -> str:
            [found] = [r["cls"] for r in shown if r["text"].startswith(prefix)]
            return str(found)

        assert "lvl-WARN" in classes("WARN deprecated option")
        assert "lvl-ERROR" in classes("ERROR tests/test_store.py") and "stderr" in classes("ERROR tests/test_store.py")
        assert "stderr" in classes("warning: test_slow_io")
        assert "stderr" not in classes("tests: running") and "lvl-" + "INFO" in classes("tests: running")
        state = wait_for(lambda: page.find_element(By.ID, "state").text, "the task state")
        assert state == "running"
        # Lines written after the page opened appear live, and the state turns final.
        go.touch()
        wait_for(lambda: rows(page)[-1]["text"] == "live line two", "the live lines")
        assert [r["seq"] for r in rows(page)] == list(range(1, BUILD_HISTORY_LINES + 3))
        wait_for(lambda: page.find_element(By.ID, "state").text == "failed · exit 3", "the final state")
        assert agent.wait(30) == 3
        target = os.environ.get("KERUTA_VIEWER_SCREENSHOT")
        if target:
            page.find_element(By.ID, "show-times").click()
            page.set_window_size(1280, 720)
            time.sleep(0.3)
            page.save_screenshot(target)
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait(10)


def test_search_filters_and_highlights(page: Any, shared_hub: HubProcess) -> None:
    task = "search"
    post(shared_hub, task, lines(task, 600, lambda i: f"line {i} needle here" if i % 50 == 0 else f"line {i} hay"))
    page.get(f"{shared_hub.url}/tasks/{task}")
    wait_for(lambda: viewer(page, "total") == 600, "600 lines")
    # `/` focuses the search box.
    page.find_element(By.TAG_NAME, "body").send_keys("/")
    assert js(page, "return document.activeElement.id") == "search"
    page.switch_to.active_element.send_keys("needle")
    wait_for(lambda: viewer(page, "total") == 12 and visible_seqs(page) == list(range(50, 601, 50)), "the filtered list")
    marks = js(page, "return [...document.querySelectorAll('#rows mark')].map((m) => m.textContent)")
    assert marks == ["needle"] * 12
    assert "q=needle" in page.current_url
    # Next / previous walk the matches.
    page.find_element(By.ID, "search").send_keys(Keys.ENTER)
    current = lambda: js(page, "const r = document.querySelector('#rows .row.current'); return r && Number(r.dataset.seq)")  # noqa: E731
    wait_for(lambda: current() == 50, "the first match to be current")
    page.find_element(By.ID, "next").click()
    wait_for(lambda: current() == 100, "the next match")
    page.find_element(By.ID, "prev").click()
    wait_for(lambda: current() == 50, "the previous match")
    # A live line that matches joins the list; one that does not stays out.
    post(shared_hub, task, [{"message": "late hay"}, {"message": "late needle"}])
    wait_for(lambda: viewer(page, "total") == 13 and rows(page)[-1]["text"] == "late needle", "the live match")
    assert len(rows(page)) == 13
    # Clearing the search shows everything again.
    page.find_element(By.ID, "search").send_keys(Keys.CONTROL, "a", Keys.DELETE)
    wait_for(lambda: viewer(page, "total") == 602, "the unfiltered list")
    # Level and source filters.
    post(shared_hub, task, [{"message": "ERROR boom", "level": "ERROR", "source": "stderr"}])
    page.find_element(By.CSS_SELECTOR, "#level option[value=ERROR]").click()
    wait_for(lambda: viewer(page, "total") == 1 and rows(page)[0]["text"] == "ERROR boom", "the ERROR filter")


def test_permalink_scrolls_to_and_highlights_its_line(page: Any, shared_hub: HubProcess) -> None:
    task = "permalink"
    post(shared_hub, task, lines(task, 3000))
    page.get(f"{shared_hub.url}/tasks/{task}#L1437")

    def target() -> list[dict[str, Any]]:
        return [r for r in rows(page) if "target" in r["cls"]]

    found = wait_for(target, "the highlighted line")
    assert found == [{"seq": 1437, "cls": found[0]["cls"], "text": "plain line 1437", "visible": True}]
    assert not viewer(page, "following")
    # The number of every line is its permalink; the links carry no token.
    href = js(page, "return document.querySelector('#rows .row[data-seq=\"1437\"] a.n').getAttribute('href')")
    assert href == "#L1437"
    js(page, "location.hash = '#L12'")
    wait_for(lambda: [r["seq"] for r in target()] == [12] and target()[0]["visible"], "the line of the new hash")


def test_200k_lines_stay_virtual(page: Any, shared_hub: HubProcess) -> None:
    task = "big"
    n = 200_000
    frames = list(batch_frames(task, 1, n, 1000))
    ws_send(shared_hub, frames, task, n)
    page.get(f"{shared_hub.url}/tasks/{task}")
    wait_for(lambda: viewer(page, "total") == n and visible_seqs(page)[-1:] == [n], "the end of 200,000 lines")
    assert len(rows(page)) <= MAX_ROWS_IN_DOM
    assert viewer(page, "following")
    # The middle: fetched in pages as it comes into view.
    js(page, "const s = document.getElementById('scroller'); s.scrollTop = (s.scrollHeight - s.clientHeight) / 2")
    middle = wait_for(lambda: settled(lambda: (lambda v: v if v and all(r["seq"] for r in rows(page)) else None)(visible_seqs(page))), "the middle")
    assert abs(middle[0] - n // 2) < 1000, middle[:3]
    assert middle == list(range(middle[0], middle[0] + len(middle)))
    assert all(r["text"] == f"line {r['seq']}" for r in rows(page))
    assert len(rows(page)) <= MAX_ROWS_IN_DOM
    # Scrolled up, follow mode pauses: a live line does not move the view.
    assert not viewer(page, "following")
    assert page.find_element(By.ID, "live").is_displayed()
    post(shared_hub, task, [{"message": "the newest line"}])
    wait_for(lambda: viewer(page, "total") == n + 1, "the live line in the model")
    time.sleep(0.2)  # some frames, each of which could have moved the view
    assert visible_seqs(page) == middle
    # A bit further down: the next pages come by cursor.
    js(page, "document.getElementById('scroller').scrollTop += 20 * 2000")
    wait_for(lambda: (lambda v: v and v[0] > middle[0] + 1500 and all(r["seq"] for r in rows(page)))(visible_seqs(page)), "further down")
    # End jumps to live.
    page.find_element(By.ID, "scroller").send_keys(Keys.END)
    wait_for(lambda: visible_seqs(page)[-1:] == [n + 1], "the live end")
    assert viewer(page, "following") and not page.find_element(By.ID, "live").is_displayed()
    assert rows(page)[-1]["text"] == "the newest line"
    assert len(rows(page)) <= MAX_ROWS_IN_DOM


def test_hub_killed_and_restarted_mid_view(page: Any, tmp_path: Path) -> None:
    hub = HubProcess(sqlite_url(tmp_path / "k.db")).start()
    task = "restart"
    total = 150
    code = f"import time\nfor i in range(1, {total + 1}):\n    print(f'tick {{i}}', flush=True)\n    time.sleep(0.02)\n"
    agent = start_agent(hub, task, tmp_path / "spool", code)
    try:
        wait_for(lambda: stored_total(hub, task) >= 15, "the first lines")
        page.get(f"{hub.url}/tasks/{task}")
        wait_for(lambda: viewer(page, "total") >= 20, "lines on the page")
        hub.kill()
        wait_for(lambda: page.find_element(By.ID, "conn").text == "reconnecting…", "the reconnecting state", 10)
        time.sleep(0.5)
        hub.restart()
        wait_for(lambda: page.find_element(By.ID, "conn").text == "live", "the page to resubscribe", 15)
        assert agent.wait(60) == 0
        wait_for(lambda: viewer(page, "total") == total, f"all {total} lines", 30)
        wait_for(lambda: page.find_element(By.ID, "state").text == "succeeded · exit 0", "the final state", 30)
        loaded = js(page, "return kerutaViewer.loaded()")
        assert [seq for _, seq in loaded] == list(range(1, total + 1)), "no missing and no doubled line"
        assert [pos for pos, _ in loaded] == list(range(total))
        wait_for(lambda: rows(page)[-1]["text"] == f"tick {total}", "the last line on screen")
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait(10)
        hub.stop()
        print("--- hub stderr ---\n" + "".join(hub.output))


def test_token_leaves_the_address_bar(page: Any, tmp_path: Path) -> None:
    agent_token, viewer_token = "agent-secret-xyz", "viewer/secret+with=odd chars"
    hub = HubProcess(sqlite_url(tmp_path / "t.db"), "--agent-token", agent_token, "--viewer-token", viewer_token).start()
    try:
        task = "guarded"
        post(hub, task, lines(task, 30), token=agent_token)
        page.get(f"{hub.url}/tasks/{task}?token={quote(viewer_token, safe='')}#L7")
        wait_for(lambda: viewer(page, "total") == 30, "the history, read with the token")
        assert "token" not in page.current_url and "secret" not in page.current_url
        assert page.current_url.endswith(f"/tasks/{task}#L7")
        assert js(page, "return sessionStorage.getItem('keruta.token')") == viewer_token
        hrefs = js(page, "return [...document.querySelectorAll('a')].map((a) => a.href)")
        assert hrefs and not any("secret" in h or "token" in h for h in hrefs)
        # Live over a WebSocket whose URL has no token (it goes as a subprotocol).
        wait_for(lambda: page.find_element(By.ID, "conn").text == "live", "the WebSocket")
        post(hub, task, [{"message": "live with a token"}], token=agent_token)
        wait_for(lambda: viewer(page, "total") == 31, "the live line")
        # The task list reads the kept token too.
        page.get(f"{hub.url}/")
        wait_for(lambda: task in page.find_element(By.ID, "tasks").text, "the task list")
        assert "token" not in page.current_url
        js(page, "sessionStorage.clear()")
    finally:
        hub.stop()


def test_task_list_updates_live(page: Any, shared_hub: HubProcess) -> None:
    post(shared_hub, "list-old", lines("list-old", 3))
    page.get(f"{shared_hub.url}/")
    wait_for(lambda: "list-old" in page.find_element(By.ID, "tasks").text, "the task list")
    js(page, "window.notReloaded = true")

    def table() -> list[list[str]]:
        return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in page.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")]

    time.sleep(0.01)
    post(shared_hub, "list-new", lines("list-new", 5))
    first = wait_for(lambda: (lambda t: t if t and t[0][0] == "list-new" else None)(table()), "the new task, newest first")
    assert first[0][3] == "5"
    status = '{"type": "status", "taskId": "list-new", "state": "%s"%s}'
    ws_send(shared_hub, [status % ("running", "")], "list-new", 0)
    wait_for(lambda: table()[0][1] == "running", "the running state")
    ws_send(shared_hub, [status % ("failed", ', "exitCode": 2')], "list-new", 0)
    wait_for(lambda: table()[0][1:3] == ["failed", "2"], "the final state and exit code")
    assert js(page, "return window.notReloaded") is True
    page.find_element(By.ID, "task-filter").send_keys("old")
    wait_for(lambda: [r[0] for r in table()] == ["list-old"], "the filtered list")
    # The list is drawn again at each 2 s poll: a link found just before one is
    # stale by the click. Find it again and click, as a person clicks what is there.
    def click_list_old() -> bool:
        page.find_element(By.LINK_TEXT, "list-old").click()
        return True

    wait_for(click_list_old, "a click on the link to list-old")
    wait_for(lambda: viewer(page, "total") == 3, "the task page from the list")


# --- verifying a log, and its gaps ----------------------------------------------


def _delete_chunk_behind_the_hubs_back(hub: HubProcess, task_id: str) -> None:
    import sqlite3

    conn = sqlite3.connect(hub.db.removeprefix("sqlite:///"), timeout=30)
    try:
        with conn:
            (last,) = conn.execute(
                "SELECT seq_last FROM keruta_chunks WHERE task_id = ? ORDER BY seq_last LIMIT 1", (task_id,)
            ).fetchone()
            conn.execute("DELETE FROM keruta_chunks WHERE task_id = ? AND seq_last = ?", (task_id, last))
    finally:
        conn.close()


def test_verdict_badge(page: Any, shared_hub: HubProcess, tmp_path: Path) -> None:
    """complete for an agent's finished run, incomplete once a chunk is gone
    behind the hub's back, unverified for a task of REST lines."""
    code = "for i in range(700): print('line', i)"
    for task in ("verdict-ok", "verdict-bad"):
        agent = start_agent(shared_hub, task, tmp_path / "spool", code)
        assert agent.wait(60) == 0
    page.get(f"{shared_hub.url}/tasks/verdict-ok")
    badge = wait_for(lambda: page.find_element(By.ID, "verdict").text == "complete" and page.find_element(By.ID, "verdict"), "the complete badge")
    assert "complete" in badge.get_attribute("class")
    assert badge.get_attribute("title") == "complete: 700 lines, digest ok"

    _delete_chunk_behind_the_hubs_back(shared_hub, "verdict-bad")
    page.get(f"{shared_hub.url}/tasks/verdict-bad")
    badge = wait_for(lambda: page.find_element(By.ID, "verdict").text == "incomplete" and page.find_element(By.ID, "verdict"), "the incomplete badge")
    assert "incomplete" in badge.get_attribute("class")
    assert "missing" in badge.get_attribute("title")

    post(shared_hub, "verdict-rest", lines("verdict-rest", 5))
    page.get(f"{shared_hub.url}/tasks/verdict-rest")
    wait_for(lambda: viewer(page, "total") == 5, "the REST lines")
    assert wait_for(lambda: page.find_element(By.ID, "verdict").text, "the badge") == "unverified"


def test_gap_rows(page: Any, shared_hub: HubProcess) -> None:
    """A gap record is a row of its own with its message and numbers; one
    that arrives live over rows the viewer holds takes them away."""
    task = "gaps"
    old = [{"message": f"old line {i}", "timestamp": f"2026-01-01T00:00:{i:02d}.000000Z"} for i in range(1, 41)]
    post(shared_hub, task, old)
    post(shared_hub, task, [{
        "source": "agent", "level": "WARN", "kind": "gap",
        "message": "1,234 lines (77,784 bytes) not kept: the agent's spool was full",
        "metadata": {"gap": {"reason": "spool_full", "lines": 1234, "bytes": 77784}},
    }])
    post(shared_hub, task, lines(task, 10, lambda i: f"new line {i}"))
    page.get(f"{shared_hub.url}/tasks/{task}")
    wait_for(lambda: viewer(page, "total") == 51, "the history")
    wait_for(lambda: any(r["seq"] == 41 for r in rows(page)), "the gap row on screen")
    (gap,) = [r for r in rows(page) if r["seq"] == 41]
    assert "gap" in gap["cls"].split()
    assert gap["text"] == "\u22ef 1,234 lines (77,784 bytes) not kept: the agent's spool was full \u22ef"
    plain = [r for r in rows(page) if r["seq"] == 42]
    assert plain and "gap" not in plain[0]["cls"].split()
    wait_for(lambda: page.find_element(By.ID, "conn").text == "live", "the WebSocket")

    # An admin deletes the oldest lines: the hub leaves a `deleted` gap at the
    # first seq deleted (the viewer is not told). A gap that then arrives
    # live over seqs the viewer holds takes those rows away: the model is
    # read again, with the hub's gap row where the lines were.
    resp = httpx.delete(f"{shared_hub.url}/api/v1/tasks/{task}/logs", params={"before": "2026-01-01T00:00:31.000000Z"}, timeout=10, verify=system_tls())
    assert resp.status_code == 200 and resp.json()["deletedCount"] == 30
    post(shared_hub, task, [{
        "source": "agent", "level": "WARN", "kind": "gap",
        "message": "30 lines (330 bytes) not kept: retention",
        "metadata": {"gap": {"reason": "retention", "lines": 30, "bytes": 330, "fromSeq": 1, "toSeq": 30}},
    }])
    wait_for(lambda: viewer(page, "total") == 23, "the covered rows dropped")
    seqs = [seq for _pos, seq in js(page, "return window.kerutaViewer.loaded()")]
    assert seqs == [1, *range(31, 53)]
    js(page, "document.getElementById('scroller').scrollTop = 0")
    first = wait_for(lambda: (lambda r: r if r and r[0]["seq"] == 1 else None)(rows(page)), "the deleted gap row")[0]
    assert "gap" in first["cls"].split()
    assert first["text"] == "\u22ef \u2026 30 lines (321 bytes) not kept: deleted by an admin \u22ef (seqs 1\u201330)"
    js(page, "document.getElementById('scroller').scrollTop = 1e9")
    last = wait_for(lambda: (lambda r: r if r and r[-1]["seq"] == 52 else None)(rows(page)), "the new gap row")[-1]
    assert "gap" in last["cls"].split() and last["text"].endswith("(seqs 1\u201330)")


# --- records the hub changes after sending them: a redaction, a cap's gap ---------


def test_a_redacted_line_re_renders_as_stars_without_a_reload(page: Any, shared_hub: HubProcess) -> None:
    task = "browser-redact"
    post(shared_hub, task, lines(task, 60, lambda i: "export TOKEN=hunter2" if i == 30 else f"plain line {i}"))
    page.get(f"{shared_hub.url}/tasks/{task}")
    wait_for(lambda: any(r["text"] == "export TOKEN=hunter2" for r in rows(page)), "the leaked line on screen")
    js(page, "window.notReloaded = true;")
    resp = httpx.post(f"{shared_hub.url}/api/v1/tasks/{task}/redact", json={"values": ["hunter2"]}, timeout=30)
    assert resp.status_code == 200 and resp.json()["redactedRecords"] == 1, resp.text
    wait_for(lambda: any(r["seq"] == 30 and r["text"] == "export TOKEN=***" for r in rows(page)), "the line redacted")
    assert not any("hunter2" in r["text"] for r in rows(page))
    assert js(page, "return window.notReloaded === true")
    # The audit record arrives live, as a row of its own.
    wait_for(lambda: any(r["text"].startswith("1 record redacted by admin") for r in rows(page)), "the redaction row")


def test_a_cap_gap_row_appears_where_the_records_were_cut(page: Any, tmp_path: Path) -> None:
    hub = HubProcess(sqlite_url(tmp_path / "capped.db"), "--max-task-bytes", "20K").start()
    try:
        task = "browser-cap"
        post(hub, task, lines(task, 50, lambda i: f"head line {i:04d} " + "z" * 80))
        page.get(f"{hub.url}/tasks/{task}")
        wait_for(lambda: viewer(page, "total") == 50, "the first lines")
        # Live, past the cap: the cut lines go, and a gap row stands where they were.
        post(hub, task, lines(task, 400, lambda i: f"more line {i:04d} " + "z" * 80))

        def gap_seq() -> int | None:
            resp = httpx.get(f"{hub.url}/api/v1/tasks/{task}/logs", params={"size": 1000}, timeout=10)
            return next((r["seq"] for r in resp.json()["content"] if r.get("kind") == "gap"), None)

        seq = wait_for(gap_seq, "the cap's gap record")
        wait_for(lambda: settled(lambda: viewer(page, "total")) == stored_total(hub, task), "the cut records gone")
        js(page, f"location.hash = '#L{seq}';")
        row = wait_for(
            lambda: next((r for r in rows(page) if r["seq"] == seq and r["visible"]), None), "the gap row on screen"
        )
        assert "not kept: task over its 20 KB cap" in row["text"] and "gap" in row["cls"].split(), row
        held = [s for _, s in js(page, "return window.kerutaViewer.loaded()")]
        assert held == sorted(held) and len(held) == len(set(held))
    finally:
        hub.stop()


def test_a_lines_number_names_who_wrote_it(page: Any, shared_hub: HubProcess) -> None:
    task = "who-wrote"
    post(shared_hub, task, [
        {"message": "named", "producer": "run-7", "seq": 1, "lineNumber": 1},
        {"message": "anonymous", "lineNumber": 2},
    ])
    page.get(f"{shared_hub.url}/tasks/{task}")
    wait_for(lambda: viewer(page, "total") == 2, "the two lines")
    titles = js(page, "return [...document.querySelectorAll('#rows .row a.n')].map((a) => a.title)")
    assert titles == ["stdout line 1 · run-7", "stdout line 2"]
