// The keruta web viewer: the task list (/) and one task's log (/tasks/{taskId}).
// Plain script, no build step; talks to its own hub only (REST + WebSocket).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "keruta.token";

  // --- the token: read once from ?token=, kept in sessionStorage, never in a URL again ---

  function takeToken() {
    const url = new URL(location.href);
    if (url.searchParams.has("token")) {
      const t = url.searchParams.get("token");
      if (t) sessionStorage.setItem(TOKEN_KEY, t);
      url.searchParams.delete("token");
      history.replaceState(history.state, "", url.pathname + url.search + url.hash);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }
  const token = takeToken();

  class ApiError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  async function api(path, params) {
    const url = new URL(path, location.origin);
    for (const [k, v] of Object.entries(params || {})) if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
    const res = await fetch(url, { headers: token ? { Authorization: "Bearer " + token } : {}, cache: "no-store" });
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    if (!res.ok) throw new ApiError(res.status, body && body.error, (body && body.message) || res.statusText);
    return body;
  }

  // A subprotocol may hold only RFC 7230 token characters: the token goes base64url-encoded.
  function b64url(text) {
    const bytes = new TextEncoder().encode(text);
    let bin = "";
    for (const b of bytes) bin += String.fromCharCode(b);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function openSocket() {
    const url = (location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host + "/api/v1/ws";
    return new WebSocket(url, token ? ["keruta", "bearer." + b64url(token)] : ["keruta"]);
  }

  function backoff(attempt) {
    const base = Math.min(8000, 400 * Math.pow(2, attempt));
    return base / 2 + Math.random() * base / 2;
  }

  function setBadge(el, text, cls) {
    el.hidden = !text;
    el.textContent = text || "";
    el.className = "badge" + (cls ? " " + cls : "");
  }

  const fmtInt = (n) => n.toLocaleString("en-US");

  function relTime(ts) {
    if (!ts) return "";
    const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
    if (s < 60) return Math.floor(s) + "s ago";
    if (s < 3600) return Math.floor(s / 60) + "m ago";
    if (s < 86400) return Math.floor(s / 3600) + "h ago";
    return new Date(ts).toLocaleString();
  }

  const inInput = (el) => el && (el.tagName === "INPUT" || el.tagName === "SELECT" || el.tagName === "TEXTAREA");

  // --- the task list ---------------------------------------------------------

  function listPage() {
    $("list-page").hidden = false;
    $("title").textContent = "tasks";
    document.title = "keruta · tasks";
    const filter = $("task-filter");
    const tbody = document.querySelector("#tasks tbody");
    let tasks = [];
    let attempt = 0;

    function render() {
      const f = filter.value.trim().toLowerCase();
      const shown = tasks.filter((t) => !f || t.taskId.toLowerCase().includes(f) || (t.state || "").includes(f));
      const frag = document.createDocumentFragment();
      for (const t of shown) {
        const tr = document.createElement("tr");
        tr.dataset.taskId = t.taskId;
        const a = document.createElement("a");
        a.href = "/tasks/" + encodeURIComponent(t.taskId);
        a.textContent = t.taskId;
        const last = t.lastTimestamp || t.updatedAt || t.firstTimestamp;
        const cells = [
          [a, ""], [t.state || "", "state-" + (t.state || "")], [t.exitCode ?? "", ""],
          [fmtInt(t.totalLogs || 0), "num"], [relTime(last), ""],
        ];
        for (const [content, cls] of cells) {
          const td = document.createElement("td");
          if (cls) td.className = cls;
          td.append(content);
          tr.append(td);
        }
        tr.lastChild.title = last || "";
        frag.append(tr);
      }
      tbody.replaceChildren(frag);
      $("no-tasks").hidden = tasks.length > 0;
      $("count").textContent = f ? shown.length + " of " + tasks.length + " tasks" : tasks.length + " tasks";
    }

    async function poll() {
      let delay = 2000;
      try {
        const body = await api("/api/v1/tasks");
        const key = (t) => t.lastTimestamp || t.updatedAt || t.firstTimestamp || "";
        tasks = body.tasks.sort((a, b) => (key(a) < key(b) ? 1 : key(a) > key(b) ? -1 : a.taskId.localeCompare(b.taskId)));
        attempt = 0;
        setBadge($("conn"), "", "");
        $("list-status").textContent = "";
        render();
      } catch (e) {
        if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
          setBadge($("conn"), e.message, "error");
          delay = 10000;
        } else {
          setBadge($("conn"), "reconnecting…", "reconnecting");
          delay = backoff(attempt++);
        }
      }
      setTimeout(poll, delay);
    }

    filter.addEventListener("input", render);
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "/" && !inInput(ev.target)) { ev.preventDefault(); filter.focus(); }
    });
    poll();
  }

  // --- the task page ---------------------------------------------------------

  function taskPage(taskId) {
    const PAGE = 500;            // records per history request
    const ROW_H = 20;            // px, fixed: rows are one line each (long lines scroll sideways)
    const OVERSCAN = 15;         // rows rendered beyond the viewport on each side
    const MAX_PX = 8000000;      // spacer height cap, below every browser's element size limit
    const MAX_PAGES = 80;        // pages kept in memory; farther ones are fetched again when needed
    const MAX_INFLIGHT = 3;

    $("task-page").hidden = false;
    $("title").textContent = taskId;
    document.title = "keruta · " + taskId;
    const scroller = $("scroller"), spacer = $("spacer"), rowsEl = $("rows");
    const search = $("search"), sourceSel = $("source"), levelSel = $("level");
    const liveBtn = $("live"), countEl = $("count"), matchInfo = $("match-info");
    const logsUrl = "/api/v1/tasks/" + encodeURIComponent(taskId) + "/logs";

    // The list model. Positions 0..total-1 are the records matching the filter, in
    // seq order; a position is also the record's offset in the hub's filtered
    // query, so any page can be fetched again. `known`: every record with a seq
    // up to it that matches is in the model (what a resubscription resumes after).
    let gen = 0;                 // bumps on every filter change; stale answers are dropped
    let filter = { source: "", level: "", q: "" };
    let total = 0;
    let pages = new Map();       // page number → array of records (sparse), with .filled
    let lastSeq = 0;             // highest seq in the model
    let known = 0;
    let ready = false;           // the snapshot of the current filter is in
    let snapshotRun = 0;
    let pending = [];            // live records that came before the snapshot
    const inflight = new Map();  // page number → promise
    const failedAt = new Map();  // page number → time of the last failed fetch
    let following = true;
    let target = null;           // seq from #L<seq>
    let current = -1;            // position of the current search match
    let renderQueued = false;
    const rowCache = new Map();  // position → {el, rec, deco}
    let deco = 0;                // bumps when row decorations (search, target) change

    // --- sections: folded ranges of positions ----------------------------------
    // GET .../sections gives the task's sections by seq. Without a filter a
    // position is its seq minus the seq at position 0 (a task's seqs have no
    // holes), so a closed section hides the positions of its lines: the rows on
    // screen are "display rows", and a hidden line is never rendered, so its
    // page is never fetched until its section is opened. With a filter, or
    // if the seqs turn out not to be consecutive, nothing folds.
    const sectionsUrl = "/api/v1/tasks/" + encodeURIComponent(taskId) + "/sections";
    let sectionTree = [];
    const sectionAt = new Map(); // startSeq → {s, depth}
    const openState = new Map(); // startSeq → open (what the reader chose)
    let folds = [];              // [{a, b, before}] hidden positions a..b, sorted; `before` hidden ahead of it
    let hiddenRows = 0;
    let foldBroken = false;
    let sectionsTimer = null;

    function isOpen(s) {
      if (openState.has(s.startSeq)) return openState.get(s.startSeq);
      return s.endSeq === null || s.hasError || !s.collapsed;
    }

    function foldable() {
      return ready && !foldBroken && !filter.q && !filter.source && !filter.level && total > 0;
    }

    function computeFolds() {
      folds = [];
      hiddenRows = 0;
      sectionAt.clear();
      const index = (list, depth) => {
        for (const s of list) { sectionAt.set(s.startSeq, { s, depth }); index(s.sections, depth + 1); }
      };
      index(sectionTree, 0);
      if (!foldable()) return;
      const base = lastSeq - total + 1;
      const hide = (list) => {
        for (const s of list) {
          if (isOpen(s)) { hide(s.sections); continue; }
          // Its end marker goes with it, unless that record starts the next section.
          const last = sectionAt.has(s.endSeq) ? s.endSeq - 1 : s.endSeq;
          const a = Math.max(0, s.startSeq + 1 - base), b = Math.min(total - 1, last - base);
          if (b >= a) { folds.push({ a, b, before: hiddenRows }); hiddenRows += b - a + 1; }
        }
      };
      hide(sectionTree);
    }

    function shownRows() { return total - hiddenRows; }

    // The position shown at display row d.
    function posOfRow(d) {
      let lo = 0, hi = folds.length - 1, k = -1;
      while (lo <= hi) {
        const mid = (lo + hi) >> 1;
        if (folds[mid].a - folds[mid].before <= d) { k = mid; lo = mid + 1; } else hi = mid - 1;
      }
      return k < 0 ? d : d + folds[k].before + folds[k].b - folds[k].a + 1;
    }

    // The display row of a position (a hidden one: its section's header row).
    function rowOfPos(pos) {
      let lo = 0, hi = folds.length - 1, k = -1;
      while (lo <= hi) {
        const mid = (lo + hi) >> 1;
        if (folds[mid].a <= pos) { k = mid; lo = mid + 1; } else hi = mid - 1;
      }
      if (k < 0) return pos;
      const f = folds[k];
      if (pos <= f.b) return f.a - 1 - f.before;
      return pos - f.before - (f.b - f.a + 1);
    }

    // The task's sections, or null when the hub did not answer (nothing folds
    // then). An answer lists at most 10,000; the next page starts after its
    // `nextAfterSeq`. Up to SECTION_PAGES pages: past that, the rest do not fold.
    const SECTION_PAGES = 10;
    async function fetchSections() {
      try {
        const tree = [];
        let afterSeq = 0;
        for (let page = 0; page < SECTION_PAGES; page++) {
          const body = await api(sectionsUrl, { afterSeq: afterSeq || null });
          graftSections(tree, body.sections || []);
          if (body.nextAfterSeq === null || body.nextAfterSeq === undefined) break;
          afterSeq = body.nextAfterSeq;
        }
        return tree;
      } catch (e) {
        return null;
      }
    }

    // A page nests its sections only among themselves: one whose enclosing
    // section came on an earlier page goes inside it here (the hub's own rule,
    // hub/store/sections.py tree: inside the last one still open at its start,
    // at most SECTION_DEPTH deep).
    const SECTION_DEPTH = 64;
    function graftSections(tree, more) {
      for (const s of more) {
        let list = tree;
        for (let depth = 1; depth < SECTION_DEPTH; depth++) {
          const last = list[list.length - 1];
          if (!last || (last.endSeq !== null && last.endSeq <= s.startSeq)) break;
          list = last.sections;
        }
        list.push(s);
      }
    }

    async function loadSections() {
      const tree = await fetchSections();
      if (tree === null) return;
      sectionTree = tree;
      computeFolds();
      deco++;
      scheduleRender();
    }

    function sectionsChanged() {
      clearTimeout(sectionsTimer);
      sectionsTimer = setTimeout(loadSections, 300);
    }

    function toggleSection(startSeq) {
      const info = sectionAt.get(startSeq);
      if (!info) return;
      openState.set(startSeq, !isOpen(info.s));
      // The header stays where it is on screen (the rows that come and go are below it).
      following = false;
      computeFolds();
      deco++;
      scheduleRender();
    }

    function fmtDuration(ms) {
      if (ms === null || ms === undefined) return "";
      const s = ms / 1000;
      if (s < 60) return s.toFixed(1) + " s";
      const m = Math.floor(Math.round(s) / 60);
      return m < 60 ? m + " min " + (Math.round(s) % 60) + " s" : Math.floor(m / 60) + " h " + (m % 60) + " min";
    }

    // --- filters: from the address bar, reflected back into it (never the token) ---
    {
      const params = new URLSearchParams(location.search);
      filter = {
        source: params.get("source") || "",
        level: params.get("level") || "",
        q: params.get("q") || "",
      };
      search.value = filter.q;
      sourceSel.value = filter.source;
      levelSel.value = filter.level;
    }

    function filterParams() {
      return { source: filter.source, level: filter.level, q: filter.q };
    }

    function matches(rec) {
      return (!filter.source || rec.source === filter.source) &&
        (!filter.level || rec.level === filter.level) &&
        (!filter.q || rec.message.includes(filter.q));
    }

    function setFilter(next) {
      if (next.source === filter.source && next.level === filter.level && next.q === filter.q) return;
      filter = next;
      const url = new URL(location.href);
      for (const k of ["q", "source", "level"]) {
        if (filter[k]) url.searchParams.set(k, filter[k]); else url.searchParams.delete(k);
      }
      history.replaceState(history.state, "", url.pathname + url.search + url.hash);
      forgetModel();
      pendingMove = 0;
      computeFolds();
      if (!following) scroller.scrollTop = 0;
      startSnapshot();
      scheduleRender();
    }

    // --- the model -----------------------------------------------------------

    // Everything held of the task, dropped before a new snapshot (a new
    // filter, or records the hub changed under us); `gen` makes answers to
    // the requests already sent stale.
    function forgetModel() {
      gen++;
      ready = false;
      pending = [];
      total = 0;
      lastSeq = 0;
      pages = new Map();
      inflight.clear();
      failedAt.clear();
      current = -1;
      deco++;
    }

    function pageOf(p) {
      let page = pages.get(p);
      if (!page) { page = new Array(PAGE); page.filled = 0; pages.set(p, page); }
      return page;
    }

    function recAt(pos) {
      const page = pages.get(Math.floor(pos / PAGE));
      return page ? page[pos % PAGE] : undefined;
    }

    function complete(p) {
      const page = pages.get(p);
      return !!page && page.filled >= Math.min(PAGE, total - p * PAGE);
    }

    function install(p, content) {
      const page = pageOf(p);
      for (let k = 0; k < content.length && k < PAGE; k++) {
        if (p * PAGE + k >= total) break;   // later records come over the WebSocket
        if (page[k] === undefined) { page[k] = content[k]; page.filled++; }
      }
    }

    function append(rec) {
      if (rec.seq <= lastSeq || !matches(rec)) return;
      if (rec.seq !== lastSeq + 1 && folds.length) { foldBroken = true; computeFolds(); }
      const pos = total++;
      const page = pageOf(Math.floor(pos / PAGE));
      page[pos % PAGE] = rec;
      page.filled++;
      lastSeq = rec.seq;
    }

    function evict(keep) {
      if (pages.size <= MAX_PAGES) return;
      const last = Math.floor(Math.max(0, total - 1) / PAGE);
      const order = [...pages.keys()].filter((p) => p !== last && !keep.has(p))
        .sort((a, b) => Math.abs(b - [...keep][0]) - Math.abs(a - [...keep][0]));
      for (const p of order) {
        if (pages.size <= MAX_PAGES) break;
        pages.delete(p);
      }
    }

    // History up to now: the last page and the count from one consistent answer.
    async function startSnapshot() {
      const run = ++snapshotRun;
      const g = gen;
      let p = 0;
      for (let attempt = 0; ; attempt++) {
        let body;
        try {
          body = await api(logsUrl, { ...filterParams(), page: p, size: PAGE });
        } catch (e) {
          if (run !== snapshotRun || g !== gen) return;
          if (e instanceof ApiError && (e.status === 401 || e.status === 403)) { setBadge($("conn"), e.message, "error"); return; }
          await new Promise((r) => setTimeout(r, backoff(Math.min(attempt, 5))));
          if (run !== snapshotRun || g !== gen) return;
          continue;
        }
        if (run !== snapshotRun || g !== gen) return;
        const n = body.totalElements;
        const lastPage = n > 0 ? Math.floor((n - 1) / PAGE) : 0;
        const consistent = lastPage === p && body.content.length === n - p * PAGE;
        if (consistent || attempt >= 8) {
          // The folds before the first render: a closed section's lines are
          // never rendered, so their pages are never fetched.
          const tree = await fetchSections();
          if (run !== snapshotRun || g !== gen) return;
          if (tree !== null) sectionTree = tree;
          total = consistent ? n : p * PAGE + body.content.length;
          pages = new Map();
          install(p, body.content);
          lastSeq = body.content.length ? body.content[body.content.length - 1].seq : 0;
          known = Math.max(known, lastSeq);
          ready = true;
          for (const rec of pending) append(rec);
          pending = [];
          computeFolds();
          deco++;
          if (target !== null) goToTarget();
          if (pendingMove) { const d = pendingMove; pendingMove = 0; moveMatch(d); }
          scheduleRender();
          return;
        }
        p = lastPage;
      }
    }

    async function fetchPage(p) {
      const g = gen;
      const params = { ...filterParams(), size: PAGE };
      const prev = pages.get(p - 1);
      if (p > 0 && prev && complete(p - 1)) {
        // A cursor from the page before: an index seek instead of an offset scan.
        params.afterSeq = prev[PAGE - 1].seq;
        params.page = 0;
      } else {
        params.page = p;
      }
      try {
        const body = await api(logsUrl, params);
        if (g !== gen) return;
        install(p, body.content);
        failedAt.delete(p);
      } catch (e) {
        if (g !== gen) return;
        failedAt.set(p, Date.now());
        setTimeout(scheduleRender, 1500);
      } finally {
        if (g === gen) inflight.delete(p);
      }
      scheduleRender();
    }

    function ensurePage(p) {
      if (complete(p)) return Promise.resolve();
      if (inflight.has(p)) return inflight.get(p);
      const promise = fetchPage(p);
      inflight.set(p, promise);
      return promise;
    }

    // --- records the hub changed after sending them -------------------------------

    // seq -> position of the loaded records among `seqs`.
    function heldPositions(seqs) {
      const want = new Set(seqs), out = new Map();
      for (const [p, page] of pages) {
        for (let k = 0; k < PAGE; k++) {
          const rec = page[k];
          if (rec !== undefined && want.has(rec.seq)) out.set(rec.seq, p * PAGE + k);
        }
      }
      return out;
    }

    // A redaction rewrote these records: read those held again and show them anew.
    async function reread(seqs) {
      const g = gen;
      const held = heldPositions(seqs);
      const order = [...held.keys()].sort((a, b) => a - b);
      let i = 0;
      while (i < order.length) {
        let body;
        try {
          body = await api(logsUrl, { afterSeq: order[i] - 1, size: Math.min(PAGE, order[order.length - 1] - order[i] + 1) });
        } catch (e) {
          return;
        }
        if (g !== gen) return;
        const fresh = new Map(body.content.map((r) => [r.seq, r]));
        const through = body.content.length ? body.content[body.content.length - 1].seq : Infinity;
        while (i < order.length && order[i] <= through) {
          const pos = held.get(order[i]);
          const page = pages.get(Math.floor(pos / PAGE));
          const rec = fresh.get(order[i]);
          if (rec && page && page[pos % PAGE] && page[pos % PAGE].seq === rec.seq) page[pos % PAGE] = rec;
          i++;
        }
      }
      scheduleRender();
    }

    // A cap's gap record appeared or grew where records were: those records are
    // gone, and positions after them moved. Take the snapshot again (at most
    // twice a second while a task streams past its cap).
    let resyncTimer = null;
    function resync() {
      if (resyncTimer !== null) return;
      resyncTimer = setTimeout(() => {
        resyncTimer = null;
        forgetModel();
        startSnapshot();
        scheduleRender();
      }, 500);
    }

    // --- geometry and rendering ------------------------------------------------

    function spacerHeight() { return Math.min(shownRows() * ROW_H, MAX_PX); }

    function viewRows() { return scroller.clientHeight / ROW_H; }

    // Fractional row at the top of the viewport; scaled when the list is taller than MAX_PX.
    function firstRow() {
      const full = shownRows() * ROW_H;
      if (full <= MAX_PX) return scroller.scrollTop / ROW_H;
      const maxScroll = spacerHeight() - scroller.clientHeight;
      const ratio = maxScroll > 0 ? Math.min(1, scroller.scrollTop / maxScroll) : 0;
      return ratio * Math.max(0, shownRows() - viewRows());
    }

    function scrollTopFor(row) {
      const full = shownRows() * ROW_H;
      if (full <= MAX_PX) return row * ROW_H;
      const maxScroll = spacerHeight() - scroller.clientHeight;
      return (row / Math.max(1, shownRows() - viewRows())) * maxScroll;
    }

    function scrollToRow(pos) {
      following = false;
      if (folds.length) {
        // A line inside closed sections: open them.
        const base = lastSeq - total + 1;
        let opened = false;
        for (const [start, info] of sectionAt) {
          const end = info.s.endSeq === null ? Infinity : info.s.endSeq;
          if (start - base < pos && pos <= end - base && !isOpen(info.s)) { openState.set(start, true); opened = true; }
        }
        if (opened) { computeFolds(); deco++; }
      }
      const row = Math.max(0, rowOfPos(pos) - Math.floor(viewRows() / 2) + 1);
      spacer.style.height = spacerHeight() + "px";
      scroller.scrollTop = scrollTopFor(row);
      scheduleRender();
    }

    function atBottom() {
      return scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - ROW_H;
    }

    function scheduleRender() {
      if (renderQueued) return;
      renderQueued = true;
      requestAnimationFrame(render);
    }

    function render() {
      renderQueued = false;
      spacer.style.height = spacerHeight() + "px";
      if (following) scroller.scrollTop = scroller.scrollHeight;
      const fr = firstRow();
      const top = Math.floor(fr);
      const start = Math.max(0, top - OVERSCAN);
      const end = Math.min(shownRows(), Math.ceil(fr + viewRows()) + OVERSCAN);
      // History for what is on screen (visible pages first); a closed
      // section's lines are not on screen, so not fetched.
      const wanted = new Set();
      for (let row = start; row < end; row++) wanted.add(Math.floor(posOfRow(row) / PAGE));
      if (ready) {
        for (const p of wanted) {
          if (complete(p) || inflight.has(p) || inflight.size >= MAX_INFLIGHT) continue;
          if (failedAt.has(p) && Date.now() - failedAt.get(p) < 1000) continue;
          ensurePage(p);
        }
        if (wanted.size) evict(wanted);
      }
      const keep = new Map();
      const frag = [];
      const base = lastSeq - total + 1;
      for (let row = start; row < end; row++) {
        const pos = posOfRow(row);
        const rec = recAt(pos);
        if (rec && folds.length && rec.seq !== pos + base) {
          // Seqs with holes (records deleted): positions are not seqs, nothing folds.
          foldBroken = true;
          computeFolds();
          scheduleRender();
          return;
        }
        const cached = rowCache.get(pos);
        let el;
        if (cached && cached.rec === rec && cached.deco === deco) el = cached.el;
        else el = rowElement(pos, rec);
        keep.set(pos, { el, rec, deco });
        frag.push(el);
      }
      rowCache.clear();
      for (const [k, v] of keep) rowCache.set(k, v);
      // Only the rows around the viewport are in the DOM.
      rowsEl.replaceChildren(...frag);
      const last = recAt(end - 1);
      if (last) rowsEl.style.setProperty("--digits", Math.max(4, String(last.seq).length));
      const y = scroller.scrollTop + (start - fr) * ROW_H;
      rowsEl.style.transform = "translateY(" + Math.max(0, y) + "px)";
      liveBtn.hidden = following;
      const filtered = filter.q || filter.source || filter.level;
      countEl.textContent = ready ? fmtInt(total) + (filtered ? " matching lines" : " lines") : "loading…";
      matchInfo.textContent = filter.q && ready ? (current >= 0 ? fmtInt(current + 1) + " / " : "") + fmtInt(total) + " matches" : "";
    }

    function fmtTime(ts) {
      const d = new Date(ts);
      if (isNaN(d)) return ts;
      const pad = (n, w) => String(n).padStart(w || 2, "0");
      return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()) + "." + pad(d.getMilliseconds(), 3);
    }

    function rowElement(pos, rec) {
      const row = document.createElement("div");
      row.className = "row";
      if (rec && rec.kind === "section_start") return sectionRow(row, pos, rec);
      if (!rec) {
        row.classList.add("loading");
        const m = document.createElement("span");
        m.className = "m";
        m.textContent = "…";
        row.append(m);
        return row;
      }
      row.dataset.seq = rec.seq;
      row.dataset.pos = pos;
      if (rec.source !== "stdout") row.classList.add(rec.source);
      row.classList.add("lvl-" + rec.level);
      if (rec.kind === "gap") row.classList.add("gap");
      if (target === rec.seq) row.classList.add("target");
      if (pos === current) row.classList.add("current");
      const n = document.createElement("a");
      n.className = "n";
      n.href = "#L" + rec.seq;
      n.textContent = rec.seq;
      // Who wrote it, when a producer was named (an agent run's id): a task
      // written by several runs or clients tells them apart.
      n.title = rec.source + " line " + rec.lineNumber + (rec.producer ? " · " + rec.producer : "");
      const t = document.createElement("span");
      t.className = "t";
      t.textContent = fmtTime(rec.timestamp);
      t.title = rec.timestamp;
      const lv = document.createElement("span");
      lv.className = "lv";
      lv.textContent = rec.level !== "INFO" ? rec.level : rec.source !== "stdout" ? rec.source : "";
      const m = document.createElement("span");
      m.className = "m";
      if (rec.kind === "gap") {
        lv.textContent = "GAP";
        m.textContent = gapText(rec);
        m.title = JSON.stringify((rec.metadata || {}).gap || {}, null, 1);
      } else {
        renderMessage(m, rec.message, filter.q);
      }
      row.append(n, t, lv, m);
      return row;
    }

    // A section's first line: a toggle, its title, how long it took, how many
    // lines; the line as printed in the tooltip.
    function sectionRow(row, pos, rec) {
      row.dataset.seq = rec.seq;
      row.dataset.pos = pos;
      row.classList.add("section");
      if (target === rec.seq) row.classList.add("target");
      const info = sectionAt.get(rec.seq);
      const n = document.createElement("a");
      n.className = "n";
      n.href = "#L" + rec.seq;
      n.textContent = rec.seq;
      const t = document.createElement("span");
      t.className = "t";
      t.textContent = fmtTime(rec.timestamp);
      const lv = document.createElement("span");
      lv.className = "lv";
      const m = document.createElement("span");
      m.className = "m";
      m.title = rec.message;
      const meta = (rec.metadata && rec.metadata.section) || {};
      const title = info ? info.s.title : (meta.title || rec.message);
      if (info) {
        const s = info.s;
        const open = !foldable() || isOpen(s);
        row.classList.add(open ? "open" : "closed");
        if (s.hasError) row.classList.add("has-error");
        m.style.paddingLeft = (info.depth * 2) + "ch";
        const toggle = document.createElement("button");
        toggle.type = "button";
        toggle.className = "fold";
        toggle.textContent = open ? "\u25BE" : "\u25B8";
        toggle.disabled = !foldable();
        toggle.setAttribute("aria-expanded", String(open));
        toggle.addEventListener("click", () => toggleSection(rec.seq));
        const name = document.createElement("span");
        name.className = "sec-title";
        name.textContent = title;
        name.addEventListener("click", () => toggleSection(rec.seq));
        const about = document.createElement("span");
        about.className = "sec-about";
        const bits = [];
        if (s.durationMs !== null) bits.push(fmtDuration(s.durationMs));
        else if (s.endSeq === null) bits.push("open");
        bits.push(fmtInt(s.lines) + (s.lines === 1 ? " line" : " lines"));
        if (s.errors) bits.push(fmtInt(s.errors) + (s.errors === 1 ? " error" : " errors"));
        about.textContent = " " + bits.join(" \u00B7 ");
        m.append(toggle, name, about);
      } else {
        m.textContent = title;
      }
      row.append(n, t, lv, m);
      return row;
    }

    // A gap record: its message for people, and where its numbers are not in
    // it, the seqs it stands for.
    function gapText(rec) {
      const gap = (rec.metadata || {}).gap || {};
      let text = "\u22ef " + rec.message + " \u22ef";
      if (Number.isInteger(gap.fromSeq) && Number.isInteger(gap.toSeq)) {
        text += " (seqs " + fmtInt(gap.fromSeq) + "\u2013" + fmtInt(gap.toSeq) + ")";
      }
      return text;
    }

    // A record with a seq already held replaces it (a gap that grew); a gap
    // over seqs held drops them: the model is read again from the hub, which
    // no longer has them (at most once a second while a cap's tail slides).
    function replaceHeld(rec) {
      for (const page of pages.values()) {
        for (let k = 0; k < PAGE; k++) {
          if (page[k] !== undefined && page[k].seq === rec.seq) { page[k] = rec; deco++; return; }
        }
      }
    }

    let reloadQueued = false;
    function dropCovered(rec) {
      const gap = (rec.metadata || {}).gap || {};
      if (rec.kind !== "gap" || !Number.isInteger(gap.fromSeq) || !Number.isInteger(gap.toSeq)) return;
      let covers = false;
      for (const page of pages.values()) {
        for (let k = 0; k < PAGE && !covers; k++) {
          const held = page[k];
          covers = held !== undefined && held.seq !== rec.seq && held.seq >= gap.fromSeq && held.seq <= gap.toSeq;
        }
        if (covers) break;
      }
      if (!covers || reloadQueued) return;
      reloadQueued = true;
      setTimeout(() => {
        reloadQueued = false;
        gen++;
        ready = false;
        pending = [];
        inflight.clear();
        failedAt.clear();
        deco++;
        startSnapshot();
      }, 1000 * (Date.now() - lastReload < 1000));
      lastReload = Date.now();
    }
    let lastReload = 0;

    // ANSI-styled spans, with search hits wrapped in <mark>.
    function renderMessage(into, message, q) {
      const segments = window.KerutaAnsi.parse(message);
      const plain = segments.map((s) => s.text).join("");
      const hits = [];
      if (q) for (let i = plain.indexOf(q); i >= 0; i = plain.indexOf(q, i + q.length)) hits.push([i, i + q.length]);
      let offset = 0;
      for (const seg of segments) {
        let parent = into;
        if (seg.style) {
          const span = document.createElement("span");
          const { classes, css } = window.KerutaAnsi.styleClasses(seg.style);
          if (classes.length) span.className = classes.join(" ");
          Object.assign(span.style, css);
          into.append(span);
          parent = span;
        }
        const segEnd = offset + seg.text.length;
        let at = offset;
        for (const [hs, he] of hits) {
          if (he <= at || hs >= segEnd) continue;
          const s = Math.max(hs, at), e = Math.min(he, segEnd);
          if (s > at) parent.append(seg.text.slice(at - offset, s - offset));
          const mark = document.createElement("mark");
          mark.textContent = seg.text.slice(s - offset, e - offset);
          parent.append(mark);
          at = e;
        }
        if (at < segEnd) parent.append(seg.text.slice(at - offset));
        offset = segEnd;
      }
    }

    // --- permalinks: #L<seq> --------------------------------------------------

    function readHash() {
      const m = location.hash.match(/^#L(\d+)$/);
      target = m ? parseInt(m[1], 10) : null;
      deco++;
      if (target !== null) { following = false; if (ready) goToTarget(); }
      scheduleRender();
    }

    // The position of a seq: interpolation search over pages, narrowing each step.
    async function locate(seq) {
      const g = gen;
      let lo = 0, hi = total - 1;
      let guess = Math.max(lo, Math.min(hi, total - 1 - (lastSeq - seq)));
      for (let step = 0; step < 60 && lo <= hi; step++) {
        const p = Math.floor(guess / PAGE);
        await ensurePage(p);
        if (g !== gen) return null;
        if (!complete(p)) { await new Promise((r) => setTimeout(r, 500)); continue; }
        const start = p * PAGE, count = Math.min(PAGE, total - start);
        const page = pages.get(p);
        const first = page[0].seq, last = page[count - 1].seq;
        if (seq < first) hi = start - 1;
        else if (seq > last) lo = start + count;
        else {
          for (let k = 0; k < count; k++) if (page[k].seq >= seq) return start + k;
        }
        if (lo > hi) return Math.min(lo, total - 1);
        guess = step < 3
          ? (seq < first ? start - 1 - (first - seq) : start + count + (seq - last) - 1)
          : Math.floor((lo + hi) / 2);
        guess = Math.max(lo, Math.min(hi, guess));
      }
      return null;
    }

    async function goToTarget() {
      const seq = target;
      const pos = await locate(seq);
      if (pos === null || seq !== target) return;
      scrollToRow(pos);
    }

    // --- search: next / previous match ------------------------------------------

    let pendingMove = 0;         // Enter pressed before the search's snapshot came in

    function moveMatch(delta) {
      if (filter.q && !ready) { pendingMove = delta; return; }
      if (!filter.q || total === 0) return;
      if (current < 0) current = delta > 0 ? Math.floor(firstRow()) : Math.min(total - 1, Math.floor(firstRow() + viewRows()) - 1);
      else current = Math.max(0, Math.min(total - 1, current + delta));
      deco++;
      const fr = firstRow();
      if (current < fr || current >= fr + viewRows() - 1) scrollToRow(current);
      else { following = false; scheduleRender(); }
    }

    function jumpToLive() {
      following = true;
      scheduleRender();
    }

    // --- live: the WebSocket --------------------------------------------------

    let ws = null;
    let wsAttempt = 0;
    let subscribedOnce = false;
    const conn = $("conn"), stateEl = $("state");

    function showState(state, exitCode) {
      if (!state) { setBadge(stateEl, "no such task yet", ""); return; }
      setBadge(stateEl, state + (exitCode !== null && exitCode !== undefined ? " · exit " + exitCode : ""), state);
    }

    // Guarantee 7: is the stored log what the agent sent? The task answer holds
    // the verdict last computed; a finished task without one asks the hub
    // (which reads the whole log) once.
    const verdictEl = $("verdict");
    let verdictAsked = false;
    function showVerdict(verdict, message) {
      setBadge(verdictEl, verdict || "", verdict || "");
      verdictEl.title = message || "";
    }
    function checkVerdict(task) {
      const finished = task.state === "succeeded" || task.state === "failed";
      if (task.verdict && task.verdict !== "unverified") showVerdict(task.verdict, "");
      else showVerdict("unverified", "no run of this task has sent its summary yet");
      if (finished && !verdictAsked && task.verdict !== "complete" && task.verdict !== "incomplete") askVerdict();
    }
    async function askVerdict() {
      verdictAsked = true;
      try {
        const v = await api("/api/v1/tasks/" + encodeURIComponent(taskId) + "/verify");
        showVerdict(v.verdict, v.message);
      } catch (e) {
        verdictAsked = false;
      }
    }

    function connect() {
      setBadge(conn, subscribedOnce ? "reconnecting…" : "connecting…", subscribedOnce ? "reconnecting" : "");
      const sock = openSocket();
      ws = sock;
      sock.onopen = () => {
        const frame = { type: "subscribe", taskId };
        // Without a snapshot there is nothing to resume after: live from now, and
        // the snapshot is taken once subscribed. Otherwise: from the last seq held.
        if (ready) frame.fromSeq = known + 1;
        sock.anchored = ready;
        sock.send(JSON.stringify(frame));
      };
      sock.onmessage = (ev) => {
        if (sock !== ws) return;
        let f;
        try { f = JSON.parse(ev.data); } catch (e) { return; }
        if (f.type === "subscribed") {
          subscribedOnce = true;
          wsAttempt = 0;
          setBadge(conn, "live", "live");
          // Live from now: only a snapshot taken after this point joins it without a gap.
          if (!sock.anchored) { ready = false; startSnapshot(); }
        } else if (f.type === "logs" && f.taskId === taskId) {
          for (const rec of f.records) {
            if (rec.kind === "section_start" || rec.kind === "section_end") sectionsChanged();
            // A gap record at a seq already passed: a cap cut records out here.
            if (rec.kind === "gap" && rec.seq <= known) { resync(); continue; }
            if (ready) dropCovered(rec);
            if (rec.seq <= known && ready) { replaceHeld(rec); continue; }
            if (rec.seq > known) known = rec.seq;
            if (ready) append(rec); else pending.push(rec);
          }
          scheduleRender();
        } else if (f.type === "redacted" && f.taskId === taskId) {
          reread(f.seqs);
        } else if (f.type === "status" && f.taskId === taskId) {
          showState(f.state, f.exitCode);
          sectionsChanged();
          if (f.state === "succeeded" || f.state === "failed") { verdictAsked = false; checkVerdict(f); }
        } else if (f.type === "error") {
          // SLOW_CONSUMER: the hub closes; we resume from the last seq we hold.
          if (f.code === "UNAUTHORIZED") setBadge(conn, f.message, "error");
        }
      };
      sock.onclose = (ev) => {
        if (sock !== ws) return;
        ws = null;
        const delay = ev.code === 1008 ? 10000 : backoff(wsAttempt++);
        if (ev.code !== 1008) setBadge(conn, "reconnecting…", "reconnecting");
        setTimeout(connect, delay);
      };
    }

    // --- wiring ---------------------------------------------------------------

    document.body.classList.toggle("hide-numbers", localStorage.getItem("keruta.numbers") === "0");
    document.body.classList.toggle("hide-times", localStorage.getItem("keruta.times") !== "1");
    $("show-numbers").checked = localStorage.getItem("keruta.numbers") !== "0";
    $("show-times").checked = localStorage.getItem("keruta.times") === "1";
    $("show-numbers").addEventListener("change", (ev) => {
      localStorage.setItem("keruta.numbers", ev.target.checked ? "1" : "0");
      document.body.classList.toggle("hide-numbers", !ev.target.checked);
    });
    $("show-times").addEventListener("change", (ev) => {
      localStorage.setItem("keruta.times", ev.target.checked ? "1" : "0");
      document.body.classList.toggle("hide-times", !ev.target.checked);
    });

    let searchTimer = null;
    const readFilter = () => ({ source: sourceSel.value, level: levelSel.value, q: search.value });
    search.addEventListener("input", () => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => setFilter(readFilter()), 250);
    });
    search.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") {
        ev.preventDefault();
        clearTimeout(searchTimer);
        setFilter(readFilter());
        moveMatch(ev.shiftKey ? -1 : 1);
      } else if (ev.key === "Escape") {
        search.blur();
        scroller.focus();
      }
    });
    sourceSel.addEventListener("change", () => setFilter(readFilter()));
    levelSel.addEventListener("change", () => setFilter(readFilter()));
    $("next").addEventListener("click", () => moveMatch(1));
    $("prev").addEventListener("click", () => moveMatch(-1));
    liveBtn.addEventListener("click", jumpToLive);

    scroller.addEventListener("wheel", (ev) => {
      if (ev.deltaY < 0 && scroller.scrollHeight > scroller.clientHeight) following = false;
    }, { passive: true });
    scroller.addEventListener("scroll", () => {
      following = atBottom();
      scheduleRender();
    }, { passive: true });
    window.addEventListener("resize", scheduleRender);
    window.addEventListener("hashchange", readHash);
    document.addEventListener("keydown", (ev) => {
      if (inInput(ev.target)) return;
      if (ev.key === "/") { ev.preventDefault(); search.focus(); search.select(); }
      else if (ev.key === "End") { ev.preventDefault(); jumpToLive(); }
      else if (ev.key === "Home") { ev.preventDefault(); following = false; scroller.scrollTop = 0; scheduleRender(); }
    });

    const raw = $("raw");
    raw.hidden = false;
    raw.href = logsUrl + "/raw";
    raw.addEventListener("click", async (ev) => {
      if (!token) return;   // the plain link works on an open hub
      ev.preventDefault();
      // With a token the link stays token-free: fetch with the header, show the text as a blob.
      const win = window.open("", "_blank");
      const res = await fetch(logsUrl + "/raw", { headers: { Authorization: "Bearer " + token } });
      const blob = new Blob([await res.arrayBuffer()], { type: "text/plain; charset=utf-8" });
      const url = URL.createObjectURL(blob);
      if (win) win.location = url; else location.href = url;
    });

    api("/api/v1/tasks/" + encodeURIComponent(taskId))
      .then((t) => { showState(t.state, t.exitCode); checkVerdict(t); })
      .catch((e) => { if (e instanceof ApiError && e.status === 404) showState(null); });

    // A read-only view for tests and debugging.
    window.kerutaViewer = {
      get total() { return total; },
      get ready() { return ready; },
      get following() { return following; },
      get known() { return known; },
      get shown() { return shownRows(); },
      sections() { return [...sectionAt.values()].map(({ s }) => ({ startSeq: s.startSeq, open: isOpen(s) })); },
      loaded() {
        const out = [];
        for (const [p, page] of [...pages.entries()].sort((a, b) => a[0] - b[0])) {
          for (let k = 0; k < PAGE; k++) if (page[k] !== undefined) out.push([p * PAGE + k, page[k].seq]);
        }
        return out;
      },
    };

    readHash();
    connect();
    // Without a WebSocket (a proxy that drops it) history still shows.
    setTimeout(() => { if (!ready && !subscribedOnce) startSnapshot(); }, 3000);
    scheduleRender();
  }

  const match = location.pathname.match(/^\/tasks\/([A-Za-z0-9._:-]{1,128})\/?$/);
  if (match) taskPage(decodeURIComponent(match[1]));
  else listPage();
})();
