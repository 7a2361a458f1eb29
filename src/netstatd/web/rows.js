// Store -> the rows a view shows: derived fields (endpoint kinds, labels) and the view's filters.
// Runs once per redraw of the visible view, never per event. No DOM here.

import { contains } from "./filters.js";
import { familyOf, hostPort, isLoopback } from "./net.js";

function podLabel(namespace, podName) {
  return podName ? `${namespace || ""}/${podName}` : "";
}

// Endpoint kinds, which the views colour: pod = green, host = blue, external = red, loopback = grey.
// The local side is on the node, so it is a pod's or the host's (a non-pod network namespace).
function localKind(r, info) {
  if (isLoopback(r.localIP)) return "loopback";
  if (r.podName && !r.usesHostNetwork) return "pod";
  return info?.kind === "pod" ? "pod" : "host";
}

function remoteKind(r, info) {
  if (isLoopback(r.remoteIP)) return "loopback";
  if (r.remotePodName) return "pod";
  return info?.kind || "external";
}

// Sets the derived fields in place (rows are our own objects; the next event replaces them anyway).
// They depend only on the row and the indexes, so a row already decorated against the current
// indexes is skipped: at 50k rows, most rows did not change between two redraws.
function decorateConn(r, ips, dns, version) {
  if (r._iv === version) return;
  r._iv = version;
  const li = ips.get(r.localIP);
  const ri = ips.get(r.remoteIP);
  r.localKind = localKind(r, li);
  r.remoteKind = remoteKind(r, ri);
  r.remoteNs = r.remoteNamespace || (r.remoteKind === "pod" ? ri?.namespace : "") || "";
  r.remotePod = r.remotePodName || (r.remoteKind === "pod" ? ri?.podName : "") || "";
  r.localLabel = podLabel(r.namespace, r.podName) || r.localHostname || "";
  r.remoteLabel =
    podLabel(r.remoteNs, r.remotePod) ||
    r.remoteHostname ||
    dns.get(r.remoteIP) ||
    (r.remoteKind === "host" && ri?.node ? `node ${ri.node}` : "");
  r.container = r.containerName || (r.containerId ? r.containerId.slice(0, 12) : "");
  // what the search box looks in, lower-cased once (lower-casing nine fields of every row at every
  // keystroke took ~100 ms at 50k rows); "\n" keeps a match from spanning two fields
  r._text = [r.localIP, r.remoteIP, r.exe, r.comm, r.pid, r.localLabel, r.remoteLabel, r.container, r.state, r.failure]
    .map((v) => (v == null ? "" : String(v)))
    .join("\n")
    .toLowerCase();
}

function matchConn(r, f, port, q) {
  if (f.failed && !r.failed) return false;
  if (f.proto && r.protocol !== f.proto) return false;
  if (f.fam && r.family !== f.fam) return false;
  if (f.state === "open" ? r.closedAt : f.state === "closed" ? !r.closedAt : f.state && r.state !== f.state) return false;
  if (port !== null) {
    const local = r.localPort === port;
    const remote = r.remotePort === port;
    if (f.side === "local" ? !local : f.side === "remote" ? !remote : !(local || remote)) return false;
  }
  const kinds = [r.localKind, r.remoteKind];
  if (!f.lo && kinds.includes("loopback")) return false;
  if (!f.host && kinds.includes("host")) return false;
  if (!f.pods && kinds.includes("pod")) return false;
  if (!f.ext && kinds.includes("external")) return false;
  if (f.ns && !contains(r.namespace, f.ns) && !contains(r.remoteNs, f.ns)) return false;
  if (f.pod && !contains(r.podName, f.pod) && !contains(r.remotePod, f.pod)) return false;
  if (f.node && !contains(r.node, f.node)) return false;
  if (q && !r._text.includes(q)) return false;
  return true;
}

// The same connection seen from both ends (two sockets on this node, or two nodes through the
// multiplexer) has the same endpoints; dedup keeps one row, preferring the side that connected.
function dedupKey(r) {
  const a = hostPort(r.localIP, r.localPort);
  const b = hostPort(r.remoteIP, r.remotePort);
  // loopback addresses repeat in every network namespace: only the same namespace is the same link
  const scope = r.localKind === "loopback" ? `${r.node}|${r.netns}` : "";
  return `${r.protocol}|${a < b ? a + "|" + b : b + "|" + a}|${scope}`;
}

function toPort(value) {
  return value === "" || value == null || Number.isNaN(Number(value)) ? null : Number(value);
}

// A pass over every connection that can stop and resume, so a redraw of a huge table can be spread
// over several frames (app.js): step(until) works until performance.now() passes `until` (checked
// every 512 rows) and returns true once done; pass.rows and pass.total then hold the result.
// Between two steps the store may change: Map iterators visit entries added meanwhile and skip
// deleted ones, so the result is at worst one redraw behind for rows that changed mid-pass.
export function connectionPass(store, f) {
  const ips = store.ipIndex();
  const dns = store.dnsIndex();
  const port = toPort(f.port);
  const q = f.q ? f.q.toLowerCase() : "";
  const version = store.indexVersion;
  const firstOf = f.dedup ? new Map() : null;
  const nodes = [...store.nodes.values()];
  const pass = { rows: [], total: 0, done: false };
  const rows = pass.rows;
  let at = 0; // index in nodes
  let it = null; // iterator over nodes[at].conns
  pass.step = (until = Infinity) => {
    for (; at < nodes.length; at++, it = null) {
      it ??= nodes[at].conns.values();
      let n = 0;
      for (let next = it.next(); !next.done; next = it.next()) {
        const r = next.value;
        pass.total++;
        decorateConn(r, ips, dns, version);
        if (matchConn(r, f, port, q)) {
          if (firstOf) {
            const key = dedupKey(r);
            const i = firstOf.get(key);
            if (i !== undefined) {
              if (r.direction === "outbound" && rows[i].direction !== "outbound") rows[i] = r;
              continue;
            }
            firstOf.set(key, rows.length);
          }
          rows.push(r);
        }
        if (++n % 512 === 0 && performance.now() > until) return false;
      }
    }
    pass.done = true;
    return true;
  };
  return pass;
}

export function connectionRows(store, f) {
  const pass = connectionPass(store, f);
  pass.step();
  return { rows: pass.rows, total: pass.total };
}

export function portRows(store, f) {
  const port = toPort(f.port);
  const rows = [];
  let total = 0;
  for (const n of store.nodes.values()) {
    for (const r of n.ports.values()) {
      total++;
      r.pod = podLabel(r.namespace, r.podName);
      r.container = r.containerName || (r.containerId ? r.containerId.slice(0, 12) : "");
      r.network = r.usesHostNetwork ? "host-network pod" : r.podName ? "pod" : r.host === false ? "container" : "host";
      if (f.proto && r.protocol !== f.proto) continue;
      if (port !== null && r.port !== port) continue;
      if (f.ip && !contains(r.ip, f.ip)) continue;
      if (f.node && !contains(r.node, f.node)) continue;
      if (f.exe && !contains(r.exe, f.exe) && !contains(r.comm, f.exe)) continue;
      rows.push(r);
    }
  }
  return { rows, total };
}

// Every IP seen: each node's inventory (and host.info's host IPs), then peers of connections and
// names from the DNS cache that no inventory has, classified by the other nodes' inventories.
export function ipRows(store, f) {
  const ips = store.ipIndex();
  const dns = store.dnsIndex();
  const all = [];
  const listed = new Set();
  const add = (row) => {
    row.family = familyOf(row.ip);
    row.hostname = dns.get(row.ip) || "";
    listed.add(row.ip);
    all.push(row);
  };
  for (const n of store.nodes.values()) {
    for (const e of n.ips.values()) {
      add({
        id: `${n.name}|${e.ip}|${e.podUID || ""}`,
        node: n.name,
        ip: e.ip,
        type: e.kind,
        iface: e.interface || "",
        source: e.source || "",
        pod: podLabel(e.namespace, e.podName),
        hostNetwork: !!e.usesHostNetwork,
      });
    }
    for (const ip of n.hostInfo?.hostIPs || []) {
      if (!n.ips.has(`${ip}|`)) add({ id: `${n.name}|${ip}|`, node: n.name, ip, type: "host", source: "host.info", iface: "", pod: "" });
    }
  }
  const seen = (node, ip, source) => {
    if (!ip || listed.has(ip) || isLoopback(ip)) return;
    const info = ips.get(ip);
    add({
      id: `|${ip}`,
      node,
      ip,
      type: info?.kind || "external",
      source,
      iface: "",
      pod: podLabel(info?.namespace, info?.podName),
      hostNetwork: !!info?.usesHostNetwork,
    });
  };
  for (const n of store.nodes.values()) {
    for (const c of n.conns.values()) seen(n.name, c.remoteIP, "connection");
    for (const ip of n.dns.keys()) seen(n.name, ip, "dns");
  }
  const rows = all.filter(
    (r) =>
      (!f.type || r.type === f.type) &&
      (!f.fam || r.family === f.fam) &&
      contains(r.ip, f.ip) &&
      contains(r.node, f.node),
  );
  return { rows, total: all.length };
}

// DNS failures: one row per node, client and name (the latest dns.failed), the client named by its pod
// (from the event, else from any node's inventory), ordered by client then name: the failing names of
// each client pod together, until the user sorts by a column.
export function dnsRows(store, f) {
  const ips = store.ipIndex();
  const q = f.q ? f.q.toLowerCase() : "";
  const rows = [];
  let total = 0;
  for (const n of store.nodes.values()) {
    for (const r of n.dnsFailed.values()) {
      total++;
      const info = ips.get(r.clientIP);
      const pod = podLabel(r.namespace, r.podName) || (info?.kind === "pod" ? podLabel(info.namespace, info.podName) : "");
      r.client = pod || (info?.kind === "host" && info.node ? `node ${info.node}` : r.clientIP || "");
      r.latency = typeof r.latencyMs === "number" ? r.latencyMs : null;
      if (f.rcode && (f.rcode === "other" ? ["NXDOMAIN", "SERVFAIL", "REFUSED"].includes(r.rcode) : r.rcode !== f.rcode)) continue;
      if (f.node && !contains(r.node, f.node)) continue;
      if (q && !contains(r.name, q) && !contains(r.client, q) && !contains(r.clientIP, q)) continue;
      rows.push(r);
    }
  }
  rows.sort((a, b) => byText(a.client, b.client) || byText(a.name, b.name) || byText(a.node, b.node));
  return { rows, total };
}

function byText(a, b) {
  return a < b ? -1 : a > b ? 1 : 0;
}

// rows sorted by field (a new array; rows itself is left alone), as numbers or as text, ascending or
// descending (dir "desc"); a missing value (no number; empty text) sorts last either way, so sorting
// by a column that most rows lack (a connection's bytes before its counters came) still puts the
// rows that have one first. Text compares lower-cased, by code point: localeCompare costs ~100 ns a
// call, too slow for 50k rows at every redraw. The keys are extracted once into arrays and row
// indexes are sorted (ties by index, so the order is stable): a comparator that reads row objects
// costs ~60 ms at 50k rows, this about a third of that.
export function sortBy(rows, field, dir, numeric) {
  const n = rows.length;
  const sign = dir === "desc" ? -1 : 1;
  const order = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  if (numeric) {
    const keys = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      const v = rows[i][field];
      keys[i] = typeof v === "number" ? v : parseFloat(v); // NaN: empty or not a number
    }
    order.sort((i, j) => {
      const x = keys[i];
      const y = keys[j];
      if (x !== x) return y !== y ? i - j : 1; // eslint-disable-line no-self-compare (NaN: missing, last)
      if (y !== y) return -1; // eslint-disable-line no-self-compare
      return x === y ? i - j : sign * (x - y);
    });
  } else {
    const keys = new Array(n);
    for (let i = 0; i < n; i++) {
      const v = rows[i][field];
      keys[i] = v === undefined || v === null ? "" : String(v).toLowerCase();
    }
    order.sort((i, j) => {
      const x = keys[i];
      const y = keys[j];
      if (x === "") return y === "" ? i - j : 1;
      if (y === "") return -1;
      return x < y ? -sign : x > y ? sign : i - j;
    });
  }
  const out = new Array(n);
  for (let i = 0; i < n; i++) out[i] = rows[order[i]];
  return out;
}
