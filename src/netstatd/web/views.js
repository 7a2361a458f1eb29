// The grids: Tabulator (vendor/tabulator) with our columns. Every column has a formatter from this
// file that returns DOM nodes: a formatter that returns a string is written with innerHTML by
// Tabulator, and event data must never be parsed as HTML. Formatters take (value, row data), so the
// same ones serve Tabulator's cells and the cells we rewrite ourselves (windowed grids, below).

import { TabulatorFull as Tabulator } from "./vendor/tabulator/tabulator_esm.min.js";
import { el } from "./dom.js";
import { formatBytes, formatRate, formatRtt } from "./format.js";
import { basename } from "./net.js";
import { sortBy } from "./rows.js";

function text(v) {
  return document.createTextNode(v === null || v === undefined ? "" : String(v));
}

function yesNo(v) {
  return document.createTextNode(v ? "yes" : "");
}

function time(v) {
  return document.createTextNode(v ? new Date(v).toLocaleTimeString() : "");
}

function state(v) {
  v = v || "";
  return el("span", { class: `state state-${v.replace(/[^A-Z_]/g, "")}`, text: v });
}

// IP coloured by kind, with the pod/namespace or DNS name beside it.
function endpoint(side) {
  return (v, r) => {
    const kind = r[`${side}Kind`] || "external";
    const label = r[`${side}Label`];
    return el(
      "span",
      { class: `ep kind-${kind}`, title: `${kind}${label ? ": " + label : ""}` },
      el("span", { class: "ip", text: v ?? "" }),
      label ? el("span", { class: "label", text: label }) : null,
    );
  };
}

function rcode(v) {
  v = v || "";
  return el("span", { class: `rcode rcode-${v.replace(/[^A-Z0-9]/g, "")}`, text: v });
}

function kindBadge(v) {
  v = v || "";
  return el("span", { class: `badge kind-${v}`, text: v });
}

// The executable's name (full path on hover), and the kernel's comm when it says something else.
function exe(_v, r) {
  const name = basename(r.exe);
  return el(
    "span",
    { class: "exe", title: r.exe || "" },
    name || r.comm || "",
    name && r.comm && r.comm !== name && !name.startsWith(r.comm) ? el("span", { class: "comm", text: ` (${r.comm})` }) : null,
  );
}

function withTitle(titleField) {
  return (v, r) => el("span", { title: r[titleField] || "", text: v ?? "" });
}

// A byte count in human units ("1.2 MB"); the exact count and the segments (TCP) or packets (UDP) on hover.
function bytes(direction) {
  return (v, r) => {
    if (typeof v !== "number") return text("");
    const units = r.protocol === "UDP" ? "packets" : "segments";
    const count = r[`${units}${direction}`];
    const title = `${v.toLocaleString()} bytes${typeof count === "number" ? ` in ${count.toLocaleString()} ${units}` : ""}`;
    return el("span", { title, text: formatBytes(v) });
  };
}

function rate(v) {
  return text(formatRate(v));
}

function rtt(v) {
  return text(formatRtt(v));
}

// Retransmitted segments, of how many sent on hover.
function retransmits(v, r) {
  if (typeof v !== "number") return text("");
  const sent = typeof r.segmentsSent === "number" ? ` of ${r.segmentsSent.toLocaleString()} segments sent` : "";
  return el("span", { title: `${v.toLocaleString()} retransmitted${sent}`, text: v });
}

function failure(v) {
  return v ? el("span", { class: "failure", title: v, text: v }) : text("");
}

function portList(v) {
  return document.createTextNode((v || []).map((p) => `${p.name} ${p.port}`).join(", "));
}

const num = { sorter: "number", hozAlign: "right" };

export const COLUMNS = {
  conn: [
    // 19 columns that fit a 1600 px window (its scrollbar included); narrower, the grid scrolls sideways
    { title: "Node", field: "node", width: 76 },
    { title: "Proto", field: "protocol", width: 62 },
    { title: "State", field: "state", formatter: state, width: 105 },
    { title: "Local", field: "localIP", formatter: endpoint("local"), minWidth: 130 },
    { title: "L port", field: "localPort", ...num, width: 66 },
    { title: "Remote", field: "remoteIP", formatter: endpoint("remote"), minWidth: 130 },
    { title: "R port", field: "remotePort", ...num, width: 66 },
    { title: "Dir", field: "direction", width: 78 },
    // docs/ui.md "Traffic": the counters of connection.event, the rate between their last two samples
    { title: "Sent", field: "bytesSent", formatter: bytes("Sent"), ...num, width: 66 },
    { title: "Received", field: "bytesReceived", formatter: bytes("Received"), ...num, width: 97 },
    { title: "Rate", field: "rate", formatter: rate, ...num, width: 74 },
    { title: "RTT", field: "rtt", formatter: rtt, ...num, width: 62 },
    { title: "Retrans", field: "retransmits", formatter: retransmits, ...num, width: 87 },
    { title: "Error", field: "failure", formatter: failure, minWidth: 84 },
    { title: "PID", field: "pid", ...num, width: 68 },
    { title: "Executable", field: "exe", formatter: exe, minWidth: 95 },
    { title: "Container", field: "container", formatter: withTitle("containerId"), minWidth: 78 },
    { title: "Family", field: "family", width: 60 },
    { title: "Last event", field: "lastSeen", formatter: time, sorter: "number", width: 92 },
  ],
  ports: [
    { title: "Node", field: "node", width: 110 },
    { title: "Proto", field: "protocol", width: 70 },
    { title: "Family", field: "family", width: 70 },
    { title: "IP", field: "ip", minWidth: 120 },
    { title: "Port", field: "port", ...num, width: 80 },
    { title: "PID", field: "pid", ...num, width: 80 },
    { title: "Executable", field: "exe", formatter: exe, minWidth: 120 },
    { title: "Pod", field: "pod", minWidth: 120 },
    { title: "Container", field: "container", formatter: withTitle("containerId"), minWidth: 100 },
    { title: "Network", field: "network", width: 130 },
    { title: "Netns", field: "netns", ...num, width: 110 },
  ],
  ips: [
    { title: "Node", field: "node", width: 110 },
    { title: "IP", field: "ip", minWidth: 140 },
    { title: "Type", field: "type", formatter: kindBadge, width: 90 },
    { title: "Family", field: "family", width: 70 },
    { title: "Hostname (DNS)", field: "hostname", minWidth: 140 },
    { title: "Pod", field: "pod", minWidth: 120 },
    { title: "Host network", field: "hostNetwork", formatter: yesNo, width: 110 },
    { title: "Interface", field: "iface", width: 100 },
    { title: "Source", field: "source", width: 100 },
  ],
  dns: [
    { title: "Node", field: "node", width: 110 },
    { title: "Client", field: "client", formatter: withTitle("clientIP"), minWidth: 140 },
    { title: "Name", field: "name", minWidth: 200 },
    { title: "Type", field: "qtype", width: 75 },
    { title: "RCODE", field: "rcode", formatter: rcode, width: 105 },
    { title: "Failures", field: "total", ...num, width: 90 },
    { title: "Latency (ms)", field: "latency", ...num, width: 110 },
    { title: "Last failure", field: "at", formatter: time, sorter: "number", width: 110 },
  ],
  deploy: [
    { title: "Kind", field: "kind", width: 120 },
    { title: "Name", field: "name", minWidth: 140 },
    { title: "Namespace", field: "namespace", width: 120 },
    { title: "Ports", field: "ports", formatter: portList, headerSort: false, minWidth: 200 },
    { title: "File", field: "file", width: 160 },
  ],
};

// Sorting is ours for the windowed grids (below): the whole view is sorted by rows.js sortBy, numbers
// as numbers and text by code point, a missing value last whichever the direction.
export function sortRows(view, rows, sort) {
  if (!sort) return rows;
  const col = COLUMNS[view].find((c) => c.field === sort.field);
  if (!col) return rows;
  return sortBy(rows, sort.field, sort.dir, col.sorter === "number");
}

// A grid in `container`. onSort(sorter|null) fires when the user sorts by a column; rowStyle(element,
// row data) styles a row's element whenever it shows a row.
//
// windowed (the live views): Tabulator only draws a screenful of rows, and never learns about the
// view's rows. Measured on the 2-core test VM, handing it a 50k-row view costs 150-300 ms per redraw
// (replaceData builds a row object per item and runs its whole data pipeline, although only the
// visible rows are drawn), its in-place updates are slower still (a linear scan per row), and even
// replaceData with the ~37 rows on screen costs 40-100 ms (a forced layout per row). So:
// - the grid is our own scroll box: a spacer gives the scrollbar the height of every row, and the
//   Tabulator table sits sticky at its top, one screen tall;
// - its rows are "slots" ({id: k}): slot k shows row start+k of the view. Tabulator builds the slots
//   only when their number changes (a resize, or a view shorter than the screen);
// - a redraw or a scroll writes the cells of the slots whose row changed (a different object: the
//   store replaces a row's object whenever its connection changes), with the same formatters;
// - sorting is ours (sortRows, on the whole view); Tabulator keeps its header arrows and click
//   handling, and its slot sorters return 0, so it never reorders the slots.
// Not windowed (the Deployment view's few resources): a plain Tabulator that fits its rows.
export function createGrid(container, view, { initialSort, onSort, rowStyle, windowed = true }) {
  const grid = { table: null, built: false, windowed, view, all: [], slice: [], written: [], start: 0, rowHeight: 0 };
  grid.rowStyle = rowStyle;
  let target = container;
  if (windowed) {
    grid.scroller = el("div", { class: "vscroll" });
    grid.holder = el("div", { class: "vholder" });
    grid.spacer = el("div", { class: "vspacer" });
    grid.scroller.append(grid.holder, grid.spacer);
    // never narrower than its columns: in a narrow window the grid scrolls sideways (header and rows
    // together), instead of Tabulator clipping the last columns
    grid.holder.style.minWidth = `${COLUMNS[view].reduce((n, c) => n + (c.width || c.minWidth || 0), 2)}px`;
    container.replaceChildren(grid.scroller);
    target = el("div");
    grid.holder.append(target);
    // A scroll or resize redraws the slice at the next frame (once, however many events came). The
    // scroll position and the box's height are kept from these events, so that a redraw reads no
    // layout: reading them after changing the DOM would force a layout in the middle of a redraw.
    grid.scrollTop = 0;
    grid.viewport = 0;
    grid.header = 0;
    let pending = false;
    const schedule = () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        paint(grid, false);
      });
    };
    grid.scroller.addEventListener(
      "scroll",
      () => {
        grid.scrollTop = grid.scroller.scrollTop;
        schedule();
      },
      { passive: true },
    );
    new ResizeObserver((entries) => {
      grid.viewport = entries[entries.length - 1].contentRect.height;
      grid.header = 0; // measured again (the header may wrap at another width)
      schedule();
    }).observe(grid.scroller);
  }
  // A slot's cells are drawn from the row it shows; Tabulator calls this when it (re)builds a slot.
  const rowOf = (cell) => (windowed ? grid.slice[cell.getRow().getData().id] : cell.getRow().getData());
  const columns = COLUMNS[view].map((c) => {
    const fmt = c.formatter || text;
    return {
      headerTooltip: true, // the title on hover, where the column is too narrow for it
      ...c,
      formatter: (cell) => {
        const r = rowOf(cell);
        return r ? fmt(r[c.field], r) : text("");
      },
      sorter: c.headerSort === false ? undefined : windowed ? () => 0 : c.sorter === "number" ? "number" : "string",
    };
  });
  const table = new Tabulator(target, {
    height: false, // as tall as its rows: a screenful of slots, or the Deployment view's resources
    renderVertical: "basic",
    layout: "fitColumns",
    index: "id",
    data: [],
    columns,
    initialSort: initialSort ? [{ column: initialSort.field, dir: initialSort.dir }] : [],
    placeholder: "No rows match",
    rowFormatter: rowStyle
      ? (row) => {
          const r = windowed ? grid.slice[row.getData().id] : row.getData();
          if (r) rowStyle(row.getElement(), r);
        }
      : undefined,
  });
  grid.table = table;
  table.on("tableBuilt", () => {
    grid.built = true;
  });
  table.on("dataSorted", (sorters) => {
    const s = sorters[0];
    onSort(s ? { field: s.field, dir: s.dir } : null);
  });
  return grid;
}

// rows: the view's rows, filtered and sorted. A windowed grid shows the slice at its scroll position;
// full: redraw even the rows that are the very same objects (derived fields changed in place).
export function showRows(grid, rows, full) {
  grid.all = rows;
  if (grid.windowed) return paint(grid, full);
  const prev = grid.slice;
  if (!full && prev.length === rows.length && rows.every((r, i) => r === prev[i])) return false;
  grid.slice = rows;
  grid.table.replaceData(rows);
  return true;
}

// The rows a windowed grid shows, with their row elements: for stepping the fade of closed rows.
export function shownRows(grid) {
  if (!grid.windowed) return grid.table.getRows().map((row) => [row.getElement(), row.getData()]);
  const slots = grid.table.getRows();
  return grid.slice.map((r, k) => [slots[k]?.getElement(), r]).filter(([elem]) => elem);
}

// Sizes the scroll box for grid.all and shows the rows at the scroll position in the slots.
function paint(grid, full) {
  if (!grid.built) return false;
  const { holder, spacer } = grid;
  const viewport = grid.viewport;
  if (!viewport) return false; // hidden: drawn when shown
  grid.header ||= holder.querySelector(".tabulator-header")?.offsetHeight || 0;
  const header = grid.header;
  const rowHeight = grid.rowHeight || 24; // measured once a row is drawn
  const fit = Math.max(1, Math.floor((viewport - header) / rowHeight));
  const total = grid.all.length;
  // The holder is exactly one screen tall and sticky, so the spacer alone decides how far one can
  // scroll: to the row that puts the last row at the bottom of the screen.
  holder.style.height = `${viewport}px`;
  spacer.style.height = `${Math.max(0, total - fit) * rowHeight}px`;
  const start = Math.min(Math.max(0, total - fit), Math.floor(grid.scrollTop / rowHeight));
  // one row more than fits, so a partly hidden last row is not blank
  const slice = grid.all.slice(start, start + fit + 1);
  grid.start = start;
  const slots = grid.table.getRows();
  if (slots.length !== slice.length) {
    // (re)build the slots: Tabulator draws each from grid.slice through the formatters
    grid.slice = slice;
    grid.table.replaceData(slice.map((_, k) => ({ id: k })));
    grid.written = slice.slice();
    if (!grid.rowHeight && slice.length) {
      const row = holder.querySelector(".tabulator-row");
      if (row?.offsetHeight) {
        grid.rowHeight = row.offsetHeight;
        if (grid.rowHeight !== rowHeight) return paint(grid, true); // re-fit with the real height
      }
    }
    return true;
  }
  grid.slice = slice;
  const columns = COLUMNS[grid.view];
  let changed = false;
  for (let k = 0; k < slice.length; k++) {
    const r = slice[k];
    if (!full && grid.written[k] === r) continue;
    grid.written[k] = r;
    changed = true;
    const cells = slots[k].getCells();
    for (let c = 0; c < columns.length && c < cells.length; c++) {
      const col = columns[c];
      cells[c].getElement().replaceChildren((col.formatter || text)(r[col.field], r));
    }
    if (grid.rowStyle) grid.rowStyle(slots[k].getElement(), r);
  }
  return changed;
}
