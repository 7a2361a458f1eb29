// Each view's filters, and how they live in the URL: `?view=conn&conn.port=443&conn.ext=0`, so a
// filtered view can be shared and reloaded. No DOM here (app.js builds the inputs from these specs).

import { MAX_CONNS } from "./store.js";

export const VIEWS = ["conn", "ports", "ips", "dns", "deploy"];

const ANY = ["", "any"];

// kind: text (substring, case-insensitive), number (exact), select, toggle (on/off), sort (column)
export const FILTERS = {
  conn: [
    { key: "q", kind: "text", label: "Search", placeholder: "IP, exe, pod, hostname…" },
    { key: "ns", kind: "text", label: "Namespace" },
    { key: "pod", kind: "text", label: "Pod" },
    { key: "node", kind: "text", label: "Node" },
    { key: "proto", kind: "select", label: "Protocol", options: [ANY, ["TCP", "TCP"], ["UDP", "UDP"]] },
    {
      key: "state",
      kind: "select",
      label: "State",
      options: [
        ANY,
        ["open", "open"],
        ["closed", "closed"],
        ...["SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK", "CLOSING", "ACTIVE"].map(
          (s) => [s, s],
        ),
      ],
    },
    { key: "port", kind: "number", label: "Port" },
    { key: "side", kind: "select", label: "Port side", options: [["", "any"], ["local", "local"], ["remote", "remote"]] },
    { key: "fam", kind: "select", label: "Family", options: [ANY, ["IPv4", "IPv4"], ["IPv6", "IPv6"]] },
    { key: "lo", kind: "toggle", label: "loopback", def: true },
    { key: "host", kind: "toggle", label: "host", def: true },
    { key: "pods", kind: "toggle", label: "pod", def: true },
    { key: "ext", kind: "toggle", label: "external", def: true },
    { key: "dedup", kind: "toggle", label: "dedup", def: false },
    // connections that failed (store.js isFailed): the page's own filter, not the subscription's
    { key: "failed", kind: "toggle", label: "failed only", def: false },
    { key: "linger", kind: "number", label: "Closed linger (s)", def: "5" },
    { key: "max", kind: "number", label: "Max rows", def: String(MAX_CONNS) },
    { key: "sort", kind: "sort" },
  ],
  ports: [
    { key: "ip", kind: "text", label: "IP" },
    { key: "proto", kind: "select", label: "Protocol", options: [ANY, ["TCP", "TCP"], ["UDP", "UDP"]] },
    { key: "port", kind: "number", label: "Port" },
    { key: "node", kind: "text", label: "Node" },
    { key: "exe", kind: "text", label: "Executable" },
    { key: "sort", kind: "sort" },
  ],
  ips: [
    { key: "ip", kind: "text", label: "IP" },
    {
      key: "type",
      kind: "select",
      label: "Type",
      options: [ANY, ["pod", "pod"], ["host", "host"], ["loopback", "loopback"], ["external", "external"]],
    },
    { key: "fam", kind: "select", label: "Family", options: [ANY, ["IPv4", "IPv4"], ["IPv6", "IPv6"]] },
    { key: "node", kind: "text", label: "Node" },
    { key: "sort", kind: "sort" },
  ],
  dns: [
    { key: "q", kind: "text", label: "Search", placeholder: "name, client pod or IP…" },
    {
      key: "rcode",
      kind: "select",
      label: "RCODE",
      options: [ANY, ["NXDOMAIN", "NXDOMAIN"], ["SERVFAIL", "SERVFAIL"], ["REFUSED", "REFUSED"], ["other", "other"]],
    },
    { key: "node", kind: "text", label: "Node" },
    { key: "sort", kind: "sort" },
  ],
  deploy: [{ key: "q", kind: "text", label: "Find", placeholder: "kind, name, port…" }],
};

function defaultOf(spec) {
  if (spec.def !== undefined) return spec.def;
  return spec.kind === "sort" ? null : "";
}

// {view, filters: {conn: {...}, ports: {...}, ...}} from a query string; unknown keys are ignored.
export function fromQuery(search) {
  const params = new URLSearchParams(search);
  const view = VIEWS.includes(params.get("view")) ? params.get("view") : "conn";
  const filters = {};
  for (const v of VIEWS) {
    filters[v] = {};
    for (const spec of FILTERS[v]) {
      const raw = params.get(`${v}.${spec.key}`);
      let value = defaultOf(spec);
      if (raw !== null) {
        if (spec.kind === "toggle") value = raw !== "0";
        else if (spec.kind === "sort") value = parseSort(raw);
        else value = raw;
      }
      filters[v][spec.key] = value;
    }
  }
  return { view, filters };
}

// Only values that differ from the defaults, so a plain URL stays plain.
export function toQuery(view, filters) {
  const params = new URLSearchParams();
  params.set("view", view);
  for (const v of VIEWS) {
    for (const spec of FILTERS[v]) {
      const value = filters[v][spec.key];
      const def = defaultOf(spec);
      if (spec.kind === "toggle") {
        if (value !== def) params.set(`${v}.${spec.key}`, value ? "1" : "0");
      } else if (spec.kind === "sort") {
        if (value) params.set(`${v}.sort`, `${value.field}:${value.dir}`);
      } else if (value !== def && value !== "") {
        params.set(`${v}.${spec.key}`, value);
      }
    }
  }
  return "?" + params.toString();
}

function parseSort(raw) {
  const [field, dir] = raw.split(":");
  return /^[A-Za-z]+$/.test(field) && (dir === "asc" || dir === "desc") ? { field, dir } : null;
}

// Case-insensitive "contains"; an empty needle matches everything.
export function contains(haystack, needle) {
  if (!needle) return true;
  return haystack != null && String(haystack).toLowerCase().includes(needle.toLowerCase());
}

// What the server filters for this page (docs/protocol.md, "Subscriptions"): the Connections view's
// namespace, pod and node (exact names, comma-separated), protocol, state, port and the loopback
// toggle. The page receives only that, in every view. The rest stays in the browser, over what was
// received: free text, the port side, the family, "failed only", and the host, pod and external
// toggles (they are about an endpoint's kind, which the page knows from the IP inventory; the
// server's `host` key is about the socket's owner).
export function subscriptionOf(f) {
  const names = (v) => v.split(",").map((x) => x.trim()).filter(Boolean);
  const s = {};
  if (names(f.ns).length) s.namespace = names(f.ns);
  if (names(f.pod).length) s.podName = names(f.pod);
  if (names(f.node).length) s.nodeName = names(f.node);
  if (f.proto) s.protocol = [f.proto];
  if (f.state) s.state = [f.state];
  if (/^\d+$/.test(f.port) && Number(f.port) <= 65535) s.port = [Number(f.port)];
  if (!f.lo) s.loopback = false;
  return s;
}

// The same as /netstat query parameters.
export function subscriptionQuery(s) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(s)) params.set(key, Array.isArray(value) ? value.join(",") : String(value));
  const query = params.toString();
  return query ? "?" + query : "";
}

// True when subscription `wider` lets through everything `narrower` does (and more or the same): a key
// dropped, or values added. The page cannot show what it widens to until the server sends it.
export function widens(narrower, wider) {
  return Object.entries(wider).every(([key, value]) => {
    const old = narrower[key];
    if (old === undefined) return false;
    return Array.isArray(value) ? old.every((v) => value.includes(v)) : old === value;
  });
}
