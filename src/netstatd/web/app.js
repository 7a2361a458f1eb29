// Boot: stream -> store -> (at most every ~200 ms) the visible view's grid. Filters and the view live in
// the URL. Modules: stream.js (WebSocket), store.js (state, no DOM), rows.js (filters, no DOM),
// views.js (grids), deployment.js, filters.js (filter specs, URL), dom.js (the only element factory).

import { deploymentRows, loadDeployment, renderDeployment } from "./deployment.js";
import { el } from "./dom.js";
import { FILTERS, VIEWS, fromQuery, subscriptionOf, subscriptionQuery, toQuery, widens } from "./filters.js";
import { connectionPass, connectionRows, dnsRows, ipRows, portRows } from "./rows.js";
import { MAX_CONNS, Store, tally } from "./store.js";
import { Stream, streamURL } from "./stream.js";
import { createGrid, showRows, shownRows, sortRows } from "./views.js";

// Redraws are coalesced: events only mark the store dirty, and the visible grid is rebuilt at most
// every MIN_REDRAW_MS, or less often when a rebuild is slow (huge tables): rebuilding may take at
// most a fifth of the time, so the page stays responsive at cluster scale. What the user does (a
// filter, a sort, a tab) is drawn at the next frame instead, without waiting for the loop.
const MIN_REDRAW_MS = 200;
// While a snapshot comes in (after a connect or a new subscription), its rows are drawn as they come,
// redrawing at most a third of the time instead of a fifth: they are what the user is waiting for.
const LOADING_REDRAW_GAP = 2; // x the last redraw's time
// A text filter that is part of the subscription re-subscribes once typing pauses this long.
const SUBSCRIBE_TYPING_MS = 400;
const LOOP_MS = 100;
const SWEEP_MS = 500;
const FADE_TO = 0.25; // opacity of a closed connection just before it leaves
// A redraw of the Connections view for new events is spread over frames, at most this much work per
// frame, so scrolling, typing and the fade stay smooth while 50k rows are filtered (bench/ui.py).
const SLICE_MS = 8;

// A subscription too wide for the page (past its Max rows) gets a banner with what was left out by
// namespace and by node, the largest first, each a button that narrows the subscription to it.
const TOO_WIDE_CHOICES = 12;
const TOO_WIDE_EVERY_MS = 1000; // the banner counts every held row: at most once a second

const ROWS = { conn: connectionRows, ports: portRows, ips: ipRows, dns: dnsRows, deploy: deploymentRows };
const DATA_OF = { conn: "conn", ports: "ports", ips: "ips", dns: "dns", deploy: null }; // store.dirty keys

const ui = fromQuery(window.location.search);
const store = new Store();
const grids = {};
let viewDirty = true; // filters, sort or view changed
let lastRenderAt = 0;
let lastRenderMs = 0;
let lastSweep = 0;
let lingering = 0;
let counts = { shown: 0, total: 0 };
let link = { state: "connecting", attempt: 0 };
let frameRequested = false;
let pass = null; // a sliced redraw of the Connections view in progress: {p, work, startedAt}
let stream = null;
let subscribeTimer = 0;
let firstScreenOf = -1; // the store's load whose first rows were drawn at once
let tooWide = { version: -1, at: 0 }; // what the too-wide banner shows: store.left's version, when

const $ = (id) => document.getElementById(id);

function maxRows() {
  const n = Number(ui.filters.conn.max);
  return Number.isFinite(n) && n > 0 ? n : MAX_CONNS;
}

function lingerMs() {
  const s = Number(ui.filters.conn.linger);
  return Number.isFinite(s) && s >= 0 ? s * 1000 : 5000;
}

function saveURL() {
  const query = toQuery(ui.view, ui.filters);
  if (query !== window.location.search) window.history.replaceState(null, "", query + window.location.hash);
}

// Closed connections fade towards FADE_TO over the linger delay, then sweep() removes them.
function fade(row, now) {
  if (!row.closedAt) return "";
  const age = Math.min(1, (now - row.closedAt) / Math.max(lingerMs(), 1));
  return String(1 - (1 - FADE_TO) * age);
}

function styleRow(elem, data) {
  elem.classList.toggle("closed", !!data.closedAt);
  elem.classList.toggle("failed", !!data.failed); // an error, a reset, or never established: red-tinted
  elem.style.opacity = fade(data, Date.now());
}

// Only the rows on screen need their opacity stepped; the grid is not rebuilt for a fade.
function fadeVisible(now) {
  const grid = grids.conn;
  if (!grid?.built) return;
  for (const [elem, data] of shownRows(grid)) {
    if (data.closedAt) elem.style.opacity = fade(data, now);
  }
}

function gridFor(view) {
  if (!grids[view]) {
    grids[view] = createGrid($(`grid-${view}`), view, {
      initialSort: ui.filters[view].sort,
      rowStyle: view === "conn" ? styleRow : undefined,
      windowed: view !== "deploy", // the live views can be huge: the grid holds only the rows on screen
      onSort(sort) {
        const old = ui.filters[view].sort;
        if (sort?.field === old?.field && sort?.dir === old?.dir) return; // also fires after each redraw
        if (!FILTERS[view].some((s) => s.kind === "sort")) return; // Tabulator sorts the few rows itself
        // Tabulator sorted only the rows on screen: the whole view is sorted by render()
        ui.filters[view].sort = sort;
        saveURL();
        renderSoon();
      },
    });
    grids[view].table.on("tableBuilt", () => {
      viewDirty = true;
    });
  }
  return grids[view];
}

// The visible view at once (what the user just did must show in the next frame).
function render(now) {
  const view = ui.view;
  const grid = gridFor(view);
  if (!grid.built) return;
  pass = null; // a sliced redraw in progress is out of date
  const t0 = performance.now();
  if (DATA_OF[view]) store.dirty[DATA_OF[view]] = false;
  const { rows, total } = ROWS[view](store, ui.filters[view]);
  finish(view, grid, rows, total, viewDirty);
  lastRenderMs = performance.now() - t0;
  lastRenderAt = now;
}

function finish(view, grid, matching, total, dirtyView) {
  const f = ui.filters[view];
  const rows = f.sort !== undefined ? sortRows(view, matching, f.sort) : matching;
  // Derived fields (endpoint kinds, names) are recomputed in place when the indexes changed, so the
  // same row objects may show something new: redraw every row then; otherwise only changed rows.
  const full = dirtyView || store.indexVersion !== grid.indexVersion;
  grid.indexVersion = store.indexVersion;
  showRows(grid, rows, full);
  counts = { shown: rows.length, total };
  viewDirty = false;
}

// A redraw of the Connections view for new events, SLICE_MS of work per frame. Events that arrive
// meanwhile mark the store dirty again, for the next redraw.
function startPass(now) {
  store.dirty.conn = false;
  pass = { p: connectionPass(store, ui.filters.conn), work: 0, startedAt: now };
  stepPass(pass);
}

function stepPass(mine) {
  if (pass !== mine) return; // replaced by an immediate render
  if (ui.view !== "conn") {
    pass = null; // the view was left: it is redrawn in full when shown again
    return;
  }
  const t0 = performance.now();
  const done = mine.p.step(t0 + SLICE_MS);
  if (done) finish("conn", grids.conn, mine.p.rows, mine.p.total, false);
  mine.work += performance.now() - t0;
  if (!done) {
    requestAnimationFrame(() => stepPass(mine));
    return;
  }
  pass = null;
  lastRenderMs = mine.work; // the throttle counts work, not the frames it was spread over
  lastRenderAt = mine.startedAt;
  renderStatus(Date.now());
}

// A redraw at the next frame, for what the user just did (typing in a filter must feel immediate).
function renderSoon() {
  viewDirty = true;
  if (frameRequested) return;
  frameRequested = true;
  requestAnimationFrame(() => {
    frameRequested = false;
    render(Date.now());
    renderStatus(Date.now());
  });
}

function loop() {
  const now = Date.now();
  if (now - lastSweep >= SWEEP_MS) {
    lingering = store.sweep(now, lingerMs());
    lastSweep = now;
  }
  const dirty = viewDirty || (DATA_OF[ui.view] && store.dirty[DATA_OF[ui.view]]);
  // (not when a redraw is due at the next frame anyway: that would draw the same thing twice)
  if (dirty && !pass && !frameRequested && now - lastRenderAt >= Math.max(MIN_REDRAW_MS, 4 * lastRenderMs)) {
    if (ui.view === "conn" && !viewDirty && gridFor("conn").built) startPass(now);
    else render(now);
  }
  if (lingering && ui.view === "conn") fadeVisible(now);
  renderStatus(now);
}

function setText(id, value) {
  const node = $(id);
  if (node.textContent !== value) node.textContent = value;
}

function renderStatus(now) {
  let text;
  if (link.state === "reconnecting") {
    const secs = Math.max(0, Math.ceil((link.retryAt - now) / 1000));
    text = `reconnecting in ${secs} s (attempt ${link.attempt})`;
  } else if (link.state === "connected") {
    text = store.loading ? "connected, loading snapshot…" : "connected";
  } else {
    text = "connecting…";
  }
  setText("status-link", text);
  $("status").dataset.link = link.state;
  setText("status-events", `${store.eventCount.toLocaleString()} events`);
  setText("status-rows", `${counts.shown.toLocaleString()} of ${counts.total.toLocaleString()} rows`);
  const names = [...store.nodes.keys()].filter(Boolean);
  setText("status-nodes", names.length === 1 ? `node ${names[0]}` : `${names.length} nodes`);
  renderMuxStatus();
  renderTooWide(now);
}

// The page holds at most maxRows() connections; past that it says so, with an aggregated view of the
// subscription (rows per namespace and per node, held or left out) whose entries narrow it.
function renderTooWide(now) {
  const left = store.left;
  const banner = $("too-wide");
  if (left.version === tooWide.version || (left.version && now - tooWide.at < TOO_WIDE_EVERY_MS)) return;
  tooWide = { version: left.version, at: now };
  if (!left.rows && !left.laterEvents) {
    banner.hidden = true;
    banner.replaceChildren();
    return;
  }
  const byNamespace = new Map(left.byNamespace);
  const byNode = new Map(left.byNode);
  for (const node of store.nodes.values()) {
    if (node.conns.size) tally(byNode, node.name, node.conns.size);
    for (const row of node.conns.values()) tally(byNamespace, row.namespace || "");
  }
  const held = store.connCount().toLocaleString();
  const more = left.rows ? ` and left out ${left.rows.toLocaleString()} more of the snapshot` : "";
  const later = left.laterEvents ? ` (${left.laterEvents.toLocaleString()} later events not shown)` : "";
  const choices = (counts, key) =>
    [...counts]
      .filter(([name]) => name)
      .sort((a, b) => b[1] - a[1])
      .slice(0, TOO_WIDE_CHOICES)
      .map(([name, n]) => el("button", { type: "button", text: `${name} (${n.toLocaleString()})`, onclick: () => narrowTo(key, name) }));
  banner.replaceChildren(
    el("p", { text: `Too many connections for this page: it holds ${held} (Max rows)${more}${later}. Narrow the view to one of these:` }),
    el("div", { class: "choices", "data-key": "ns" }, el("span", { text: "Namespace" }), ...choices(byNamespace, "ns")),
    el("div", { class: "choices", "data-key": "node" }, el("span", { text: "Node" }), ...choices(byNode, "node")),
  );
  banner.hidden = false;
}

function narrowTo(key, value) {
  ui.filters.conn[key] = value;
  const input = document.querySelector(`[name="conn.${key}"]`);
  if (input) input.value = value;
  saveURL();
  resubscribe();
  renderSoon();
}

// The multiplexer's discovery problem (FANOUT_SERVICE unset or resolving to nothing) in a banner, and
// its upstreams in the status bar.
function renderMuxStatus() {
  const banner = $("mux-message");
  const message = store.muxStatus?.message || "";
  setText("mux-message", message ? `Cluster view: ${message}` : "");
  banner.hidden = !message;
  if (!store.mux) return;
  const counts = {};
  for (const p of store.peers.values()) counts[p.status] = (counts[p.status] || 0) + 1;
  const parts = Object.entries(counts).map(([status, n]) => `${n} ${status}`);
  setText("status-peers", `cluster view (${store.mux.fanoutService || "no FANOUT_SERVICE"}): ${parts.join(", ") || "no peers"}`);
}

function filterInput(view, spec) {
  const value = ui.filters[view][spec.key];
  const update = (v) => {
    ui.filters[view][spec.key] = v;
    saveURL();
    if (view === "conn" && spec.key === "max") {
      // Rows left out are only sent again with a new snapshot: ask for one if the page now holds more.
      const cut = store.left.rows || store.left.laterEvents;
      store.maxConns = maxRows();
      clearTimeout(subscribeTimer);
      if (cut) subscribeTimer = setTimeout(() => stream.subscribe(subscriptionOf(ui.filters.conn), true), SUBSCRIBE_TYPING_MS);
    } else if (view === "conn") {
      // Narrowed: the page's own filter shows the rows at once, and the server may wait for a pause in
      // the typing. Widened: only the server has the rows, so ask at once.
      clearTimeout(subscribeTimer);
      const widened = widens(stream.filter, subscriptionOf(ui.filters.conn));
      subscribeTimer = setTimeout(resubscribe, spec.kind === "text" && !widened ? SUBSCRIBE_TYPING_MS : 0);
    }
    // Typing redraws at the next frame, not after the throttle. (Redrawing inside the input event
    // instead measured no faster with bench/ui.py, and a frame coalesces fast keystrokes.)
    renderSoon();
  };
  const name = `${view}.${spec.key}`;
  if (spec.kind === "toggle") {
    return el(
      "label",
      { class: "toggle" },
      el("input", { type: "checkbox", name, checked: value, onchange: (e) => update(e.target.checked) }),
      spec.label,
    );
  }
  let input;
  if (spec.kind === "select") {
    input = el("select", { name, onchange: (e) => update(e.target.value) });
    for (const [v, label] of spec.options) input.append(el("option", { value: v, text: label }));
    input.value = value;
  } else {
    input = el("input", {
      name,
      type: spec.kind === "number" ? "number" : "search",
      min: spec.kind === "number" ? 0 : undefined,
      placeholder: spec.placeholder || "",
      oninput: (e) => update(e.target.value.trim()),
    });
    input.value = value;
  }
  return el("label", { class: "filter" }, el("span", { text: spec.label }), input);
}

// The Connections filters that the server applies (filters.js subscriptionOf); the server answers a
// change with the rows it adds (a widening) or a stream.reset and the matching snapshot.
function resubscribe() {
  stream?.subscribe(subscriptionOf(ui.filters.conn));
}

function buildFilters() {
  for (const view of VIEWS) {
    const bar = $(`filters-${view}`);
    bar.replaceChildren(...FILTERS[view].filter((s) => s.kind !== "sort").map((s) => filterInput(view, s)));
  }
}

function show(view) {
  ui.view = view;
  for (const v of VIEWS) {
    const active = v === view;
    $(`view-${v}`).hidden = !active;
    $(`filters-${v}`).hidden = !active;
    document.querySelector(`#tabs [data-view="${v}"]`).setAttribute("aria-selected", String(active));
  }
  const grid = gridFor(view);
  if (grid.built) grid.table.redraw(); // it was sized while hidden
  saveURL();
  renderSoon();
  if (view === "deploy") {
    loadDeployment()
      .then((data) => {
        renderDeployment($("deploy-commands"), $("deploy-manifests"), data);
        viewDirty = true;
      })
      .catch((err) => setText("deploy-commands", `Could not load the manifests: ${err.message}`));
  }
}

// With authentication on: a "Log out" button, and back to the login page (the URL, filters included,
// is kept) once the session is gone, instead of reconnecting for ever.
async function checkSession() {
  let resp;
  try {
    resp = await fetch(new URL("api/whoami", window.location.href));
  } catch {
    return; // the agent is down: the stream retries
  }
  if (resp.status === 401) {
    window.location.reload();
    return;
  }
  const who = resp.ok ? await resp.json() : {};
  if (who.authRequired && who.name && !$("logout")) {
    const form = el("form", { id: "logout", method: "post", action: "logout" });
    form.append(el("button", { type: "submit", text: `Log out ${who.name}` }));
    document.querySelector("header").append(form);
  }
}

function boot() {
  buildFilters();
  for (const button of document.querySelectorAll("#tabs [data-view]")) {
    button.addEventListener("click", () => show(button.dataset.view));
  }
  show(ui.view);
  store.maxConns = maxRows();
  const handlers = {
    onSession: () => store.beginSession(),
    onEvents: (events) => {
      store.apply(events);
      // The first rows after a (re)connect, a stream.reset or a widening (a new subscription) are drawn
      // at the next frame, not at the loop's next turn: the page does not wait for the whole snapshot.
      if (store.loadRows && store.loads !== firstScreenOf) {
        firstScreenOf = store.loads;
        renderSoon();
      } else if (store.loading && Date.now() - lastRenderAt >= LOADING_REDRAW_GAP * lastRenderMs) {
        renderSoon();
      }
    },
    onStatus: (s) => {
      link = s;
      if (s.refused) checkSession();
    },
  };
  stream = new Stream((filter) => streamURL(window.location, subscriptionQuery(filter)), handlers, subscriptionOf(ui.filters.conn));
  stream.start();
  checkSession();
  setInterval(loop, LOOP_MS);
  // For the browser console and for load tests: inject events, read the state.
  globalThis.netstatd = { store, ui, grids, lastRenderMs: () => lastRenderMs };
}

boot();
