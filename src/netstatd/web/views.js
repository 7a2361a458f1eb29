// The grids: Tabulator (vendor/tabulator, virtual rendering) with our columns. Every column has a
// formatter from this file that returns DOM nodes: a formatter that returns a string is written with
// innerHTML by Tabulator, and event data must never be parsed as HTML.

import { TabulatorFull as Tabulator } from "./vendor/tabulator/tabulator_esm.min.js";
import { el } from "./dom.js";
import { basename } from "./net.js";

function text(cell) {
  const v = cell.getValue();
  return document.createTextNode(v === null || v === undefined ? "" : String(v));
}

function yesNo(cell) {
  return document.createTextNode(cell.getValue() ? "yes" : "");
}

function time(cell) {
  const v = cell.getValue();
  return document.createTextNode(v ? new Date(v).toLocaleTimeString() : "");
}

function state(cell) {
  const v = cell.getValue() || "";
  return el("span", { class: `state state-${v.replace(/[^A-Z_]/g, "")}`, text: v });
}

// IP coloured by kind, with the pod/namespace or DNS name beside it.
function endpoint(side) {
  return (cell) => {
    const r = cell.getRow().getData();
    const kind = r[`${side}Kind`] || "external";
    const label = r[`${side}Label`];
    return el(
      "span",
      { class: `ep kind-${kind}`, title: `${kind}${label ? ": " + label : ""}` },
      el("span", { class: "ip", text: cell.getValue() ?? "" }),
      label ? el("span", { class: "label", text: label }) : null,
    );
  };
}

function kindBadge(cell) {
  const v = cell.getValue() || "";
  return el("span", { class: `badge kind-${v}`, text: v });
}

// The executable's name (full path on hover), and the kernel's comm when it says something else.
function exe(cell) {
  const r = cell.getRow().getData();
  const name = basename(r.exe);
  return el(
    "span",
    { class: "exe", title: r.exe || "" },
    name || r.comm || "",
    name && r.comm && r.comm !== name && !name.startsWith(r.comm) ? el("span", { class: "comm", text: ` (${r.comm})` }) : null,
  );
}

function withTitle(titleField) {
  return (cell) => {
    const r = cell.getRow().getData();
    return el("span", { title: r[titleField] || "", text: cell.getValue() ?? "" });
  };
}

function portList(cell) {
  return document.createTextNode((cell.getValue() || []).map((p) => `${p.name} ${p.port}`).join(", "));
}

const num = { sorter: "number", hozAlign: "right" };

export const COLUMNS = {
  conn: [
    { title: "Node", field: "node", width: 110 },
    { title: "Proto", field: "protocol", width: 70 },
    { title: "State", field: "state", formatter: state, width: 120 },
    { title: "Local", field: "localIP", formatter: endpoint("local"), minWidth: 160 },
    { title: "L port", field: "localPort", ...num, width: 75 },
    { title: "Remote", field: "remoteIP", formatter: endpoint("remote"), minWidth: 160 },
    { title: "R port", field: "remotePort", ...num, width: 75 },
    { title: "Dir", field: "direction", width: 85 },
    { title: "PID", field: "pid", ...num, width: 80 },
    { title: "Executable", field: "exe", formatter: exe, minWidth: 120 },
    { title: "Container", field: "container", formatter: withTitle("containerId"), minWidth: 100 },
    { title: "Family", field: "family", width: 70 },
    { title: "Last event", field: "lastSeen", formatter: time, sorter: "number", width: 100 },
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
  deploy: [
    { title: "Kind", field: "kind", width: 120 },
    { title: "Name", field: "name", minWidth: 140 },
    { title: "Namespace", field: "namespace", width: 120 },
    { title: "Ports", field: "ports", formatter: portList, headerSort: false, minWidth: 200 },
    { title: "File", field: "file", width: 160 },
  ],
};

// A grid in `container`. onSort(sorter|null) fires when the user sorts by a column.
// height "100%" fills the container and renders only the rows on screen (virtual DOM); false fits the
// grid to its rows (the Deployment view's few resources).
export function createGrid(container, view, { initialSort, onSort, rowFormatter, height = "100%" }) {
  const columns = COLUMNS[view].map((c) => ({ formatter: text, ...c }));
  const table = new Tabulator(container, {
    height,
    layout: "fitColumns",
    index: "id",
    data: [],
    columns,
    initialSort: initialSort ? [{ column: initialSort.field, dir: initialSort.dir }] : [],
    placeholder: "No rows match",
    rowFormatter,
  });
  const grid = { table, built: false, shown: null }; // shown: the rows last handed to the grid
  table.on("tableBuilt", () => {
    grid.built = true;
  });
  table.on("dataSorted", (sorters) => {
    const s = sorters[0];
    onSort(s ? { field: s.field, dir: s.dir } : null);
  });
  return grid;
}

// Tabulator finds a row by id with a linear scan and re-processes the table for each row added,
// deleted or updated in place (measured at 100k rows: 20 in-place updates took over a second), while
// replaceData rebuilds every row in one pass (~300 ms at 100k). So the grid is always rebuilt, but
// not when the rows it would show are the very same objects in the same order (the store replaces an
// object whenever its connection changes).
export function showRows(grid, rows, full) {
  const prev = grid.shown;
  if (!full && prev && prev.length === rows.length && rows.every((r, i) => r === prev[i])) return false;
  grid.table.replaceData(rows); // keeps the scroll position and the user's sort
  grid.shown = rows;
  return true;
}
