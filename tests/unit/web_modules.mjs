// The UI's pure modules (src/netstatd/web/store.js, rows.js, filters.js) under Node, no browser: run by
// tests/unit/test_web_modules.py (`node tests/unit/web_modules.mjs`; a failure exits non-zero).
// tests/integration/web_store_scenario.js, which test_web_ui.py runs in Chromium, runs here too.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

const WEB = new URL("../../src/netstatd/web/", import.meta.url);
const { DNS_FAILED_KEEP_MS, DNS_FAILED_MAX, Store, UDP_EXPIRE_MS, isFailed } = await import(new URL("store.js", WEB));
const rows = await import(new URL("rows.js", WEB));
const { formatBytes, formatRate, formatRtt } = await import(new URL("format.js", WEB));
const { FILTERS, VIEWS, contains, fromQuery, subscriptionOf, subscriptionQuery, toQuery, widens } = await import(
  new URL("filters.js", WEB)
);

const T0 = 1_000_000;
const defaults = () => fromQuery("").filters;

function conn(node, cookie, extra = {}) {
  return {
    type: "connection.event",
    nodeName: node,
    protocol: "TCP",
    family: "IPv4",
    state: "ESTABLISHED",
    states: ["ESTABLISHED"],
    localIP: "10.0.0.1",
    localPort: 40000 + cookie,
    remoteIP: "93.184.216.34",
    remotePort: 443,
    pid: 10,
    exe: "/usr/bin/curl",
    comm: "curl",
    netns: 1,
    sockCookie: cookie,
    direction: "outbound",
    host: true,
    ...extra,
  };
}

function port(node, cookie, extra = {}) {
  return {
    type: "port.listening",
    nodeName: node,
    protocol: "TCP",
    family: "IPv4",
    ip: "0.0.0.0",
    port: 8080,
    netns: 1,
    pid: 20,
    exe: "/usr/sbin/nginx",
    comm: "nginx",
    sockCookie: cookie,
    host: true,
    ...extra,
  };
}

const keys = (map) => [...map.keys()].sort();

// -- store.js -------------------------------------------------------------------------------------

test("the shared store scenario gives what test_web_ui.py asserts in Chromium", async () => {
  const source = readFileSync(new URL("../integration/web_store_scenario.js", import.meta.url), "utf8");
  // its imports are relative to the page (/web/...): point them at the files
  const scenario = (0, eval)(source.replaceAll('import("./web/', `import("${WEB.href}`));
  const out = await scenario();
  assert.deepEqual(out.kinds, {
    "n1/1": ["host", "pod", "shop/web"],
    "n1/2": ["host", "external", "example.com"],
    "n1/3": ["host", "external", "one.one"],
    "n2/9": ["pod", "host", "node n1"],
  });
  assert.deepEqual(out.dedup, ["n1/1", "n1/2", "n1/3"]);
  assert.equal(out.noExternal, 2);
  assert.equal(out.byNamespace, 2);
  assert.deepEqual(out.ipTypes["10.244.1.5"], ["pod", ""]);
  assert.deepEqual(out.ipTypes["10.0.0.2"], ["host", ""]);
  assert.deepEqual(out.ipTypes["93.184.216.34"], ["external", "example.com"]);
  assert.deepEqual(out.afterExpiry, ["", "one.one"]);
  assert.deepEqual(out.duringReset, [["n1", 3, 0], ["n2", 1, 1]]);
  assert.deepEqual(out.afterReset, [["n1", 3, 0], ["n2", 0, 0]]);
  assert.equal(out.lingering, 2);
  assert.deepEqual(out.afterLinger, ["2", "3"]);
  assert.deepEqual(out.afterSession, [["n1", ["4"]]]);
  assert.deepEqual(out.muxNodes, [["n1", 1, ["10.0.0.1"]], ["n2", 1, ["10.0.0.2"]]]);
  assert.deepEqual(out.afterRemoved, [["n1"], []]);
});

test("connection.event: one row per TCP socket and per UDP flow, updated in place", () => {
  const s = new Store();
  s.apply([conn("n1", 1, { state: "SYN_SENT", states: ["SYN_SENT"], localPort: 0 })], T0);
  s.dirty.conn = false;
  s.apply([conn("n1", 1)], T0 + 100);
  const row = s.node("n1").conns.get("1");
  assert.equal(row.id, "n1|1");
  assert.equal(row.state, "ESTABLISHED");
  assert.equal(row.firstSeen, T0); // kept from the first event
  assert.equal(row.lastSeen, T0 + 100);
  assert.equal(row.closedAt, 0);
  assert.equal(s.dirty.conn, true);
  // a later event without the local port keeps the known one; a close is stamped once
  s.apply([conn("n1", 1, { state: "CLOSE", states: ["FIN_WAIT1", "CLOSE"], localPort: 0 })], T0 + 200);
  s.apply([conn("n1", 1, { state: "CLOSE", states: ["CLOSE"] })], T0 + 300);
  const closed = s.node("n1").conns.get("1");
  assert.equal(closed.localPort, 40001);
  assert.equal(closed.closedAt, T0 + 200);
  // UDP: the same socket talking to two peers is two flows
  s.apply([
    conn("n1", 7, { protocol: "UDP", state: "ACTIVE", states: ["ACTIVE"], remoteIP: "10.0.0.53", remotePort: 53 }),
    conn("n1", 7, { protocol: "UDP", state: "ACTIVE", states: ["ACTIVE"], remoteIP: "10.0.0.54", remotePort: 53 }),
  ]);
  assert.deepEqual(keys(s.node("n1").conns), ["1", "7|10.0.0.53|53", "7|10.0.0.54|53"]);
  assert.equal(s.eventCount, 6);
});

test("port.listening and port.closed keep the node's listeners by socket cookie", () => {
  const s = new Store();
  s.apply([port("n1", 5), port("n1", 6, { protocol: "UDP", port: 53 }), port("n2", 5)]);
  assert.equal(s.node("n1").ports.get("5").id, "n1|5");
  assert.equal(s.node("n1").ports.get("5").node, "n1");
  s.dirty.ports = false;
  s.apply([{ ...port("n1", 5), type: "port.closed" }]);
  assert.deepEqual(keys(s.node("n1").ports), ["6"]);
  assert.deepEqual(keys(s.node("n2").ports), ["5"]);
  assert.equal(s.dirty.ports, true);
});

test("stream.reset: each node's rows stay until they are sent again; those not sent go at snapshot.complete", () => {
  const s = new Store();
  s.apply([{ type: "host.info", nodeName: "n2", hostIPs: ["10.0.0.2"] }]);
  s.apply([conn("n1", 1), conn("n1", 4), conn("n2", 2), port("n1", 3)]);
  s.apply([{ type: "stream.reset", nodeName: "mux-node", reason: "subscribe", filter: { port: [443] } }]);
  assert.equal(s.snapshotDone, false);
  assert.deepEqual(keys(s.node("n1").conns), ["1", "4"]); // still on screen
  s.apply([conn("n1", 4)]); // n1's first event of the new snapshot replaces all it had
  assert.deepEqual(keys(s.node("n1").conns), ["4"]);
  assert.equal(s.node("n1").ports.size, 0);
  assert.deepEqual(keys(s.node("n2").conns), ["2"]);
  s.apply([{ type: "snapshot.complete", nodeName: "mux-node", count: 1 }]);
  assert.equal(s.snapshotDone, true);
  assert.equal(s.node("n2").conns.size, 0); // nothing of n2 matches now: it is empty, not gone
  assert.deepEqual(s.node("n2").hostInfo.hostIPs, ["10.0.0.2"]);
  assert.deepEqual(keys(s.node("n1").conns), ["4"]);
  assert.equal(s.nodes.has("mux-node"), false);
});

test("the Connections filters become the subscription; free text and the rest stay local", () => {
  const f = { ...defaults().conn, q: "curl", ns: "shop, bank", pod: "", node: "n1", proto: "TCP", port: "443" };
  const s = subscriptionOf({ ...f, state: "open", lo: false, side: "remote", ext: false });
  assert.deepEqual(s, {
    namespace: ["shop", "bank"],
    nodeName: ["n1"],
    protocol: ["TCP"],
    state: ["open"],
    port: [443],
    loopback: false,
  });
  assert.equal(subscriptionQuery(s), "?namespace=shop%2Cbank&nodeName=n1&protocol=TCP&state=open&port=443&loopback=false");
  assert.deepEqual(subscriptionOf(defaults().conn), {});
  assert.equal(subscriptionQuery({}), "");
  assert.deepEqual(subscriptionOf({ ...defaults().conn, port: "99999" }), {});
});

test("node.removed drops the node; the mux's own events do not start a node's session", () => {
  const s = new Store();
  s.apply([{ type: "host.info", nodeName: "mux-node", mux: true }, conn("n1", 1), conn("n2", 2)]);
  assert.equal(s.mux.nodeName, "mux-node");
  assert.deepEqual(keys(s.nodes), ["n1", "n2"]);
  s.apply([
    { type: "mux.status", fanoutService: "netstatd-headless", peers: ["10.0.0.2"], message: null },
    { type: "peer.status", peer: "10.0.0.2", nodeName: "n2", status: "connected", hostInfo: { hostIPs: ["10.0.0.2"] } },
  ]);
  assert.equal(s.muxStatus.fanoutService, "netstatd-headless");
  assert.deepEqual(s.node("n2").hostInfo, { hostIPs: ["10.0.0.2"] });
  assert.equal(s.node("n2").conns.size, 1); // peer.status carries host.info but clears nothing
  s.apply([{ type: "node.removed", nodeName: "n2" }, { type: "peer.status", peer: "10.0.0.2", status: "gone" }]);
  assert.deepEqual(keys(s.nodes), ["n1"]);
  assert.equal(s.peers.size, 0);
});

test("a node's host.info starts its state afresh; a new session drops nodes that are not sent again", () => {
  const s = new Store();
  s.apply([conn("n1", 1), conn("n2", 2)]);
  s.apply([{ type: "host.info", nodeName: "n1", hostIPs: ["10.0.0.1"] }]);
  assert.equal(s.node("n1").conns.size, 0);
  assert.deepEqual(s.node("n1").hostInfo.hostIPs, ["10.0.0.1"]);
  s.beginSession();
  s.apply([conn("n1", 3)]);
  assert.equal(s.node("n2").stale, "session"); // still shown until the snapshot ends
  s.apply([{ type: "snapshot.complete", nodeName: "n1", count: 1 }]);
  assert.equal(s.snapshotDone, true);
  assert.deepEqual(keys(s.nodes), ["n1"]);
  assert.deepEqual(keys(s.node("n1").conns), ["3"]);
});

test("after a stream.reset a node's connections stay until its first connection event; a partial one drops nothing", () => {
  const s = new Store();
  s.apply([conn("n1", 1), conn("n2", 2)]);
  s.apply([{ type: "stream.reset", reason: "subscribe" }]);
  s.apply([{ type: "container.added", nodeName: "n1", containerId: "c1" }]);
  assert.deepEqual(keys(s.node("n1").conns), ["1"]); // the inventory comes first: the rows stay shown
  s.apply([conn("n1", 3)]);
  assert.deepEqual(keys(s.node("n1").conns), ["3"]);
  s.apply([{ type: "container.added", nodeName: "n2", containerId: "c2" }, { type: "snapshot.complete", count: 3 }]);
  assert.equal(s.node("n2").conns.size, 0); // sent no connection again: none matches now
  assert.equal(s.loading, false);
  s.apply([{ type: "stream.reset", reason: "subscribe", partial: true, subscription: 1 }, conn("n2", 4)]);
  assert.equal(s.loading, true);
  assert.deepEqual(keys(s.node("n1").conns), ["3"]);
  assert.deepEqual(keys(s.node("n2").conns), ["4"]);
  s.apply([{ type: "snapshot.complete", partial: true, subscription: 1, count: 1 }]);
  assert.equal(s.loading, false);
  assert.equal(s.connCount(), 2);
});

test("indexes: a pod IP wins over the host's, dns.expired forgets the name", () => {
  const s = new Store();
  s.apply([
    { type: "host.info", nodeName: "n1", hostIPs: ["10.0.0.1"] },
    { type: "ip.added", nodeName: "n1", ip: "127.0.0.1", kind: "loopback" },
    { type: "ip.added", nodeName: "n1", ip: "10.0.0.1", kind: "pod", podName: "hostpod", namespace: "kube-system", podUID: "u" },
    { type: "dns.resolved", nodeName: "n1", ip: "1.1.1.1", hostname: "one.one", aliases: [], ttl: 30, clientIP: "" },
  ]);
  const ips = s.ipIndex();
  assert.equal(ips.get("127.0.0.1").kind, "loopback");
  assert.equal(ips.get("10.0.0.1").kind, "pod");
  assert.equal(ips.get("10.0.0.1").podName, "hostpod");
  assert.equal(s.dnsIndex().get("1.1.1.1"), "one.one");
  const version = s.indexVersion;
  s.apply([{ type: "dns.expired", nodeName: "n1", ip: "1.1.1.1", hostname: "one.one" }]);
  assert.equal(s.dnsIndex().has("1.1.1.1"), false);
  assert.equal(s.indexVersion, version + 1);
  s.apply([{ type: "ip.removed", nodeName: "n1", ip: "10.0.0.1", kind: "pod", podUID: "u" }]);
  assert.equal(s.ipIndex().get("10.0.0.1").kind, "host"); // host.info's IP again
});

test("sweep: closed rows linger, then go; a silent UDP flow expires", () => {
  const s = new Store();
  s.apply([conn("n1", 1, { state: "CLOSE", states: ["CLOSE"] })], T0);
  s.apply([conn("n1", 2, { protocol: "UDP", state: "ACTIVE", states: ["ACTIVE"] })], T0);
  assert.equal(s.sweep(T0 + 1000, 5000), 1); // the close lingers
  const expired = T0 + UDP_EXPIRE_MS + 1;
  assert.equal(s.sweep(expired, 5000), 1); // the close is gone, the flow is closed and lingers
  const flow = [...s.node("n1").conns.values()][0];
  assert.equal(flow.closeReason, "expired");
  assert.equal(flow.state, "CLOSE");
  assert.equal(s.sweep(expired + 5000, 5000), 0);
  assert.equal(s.node("n1").conns.size, 0);
});

// -- rows.js with filters.js's filters ------------------------------------------------------------

function filteredStore() {
  const s = new Store();
  s.apply([
    { type: "host.info", nodeName: "n1", hostIPs: ["10.0.0.1"] },
    { type: "ip.added", nodeName: "n1", ip: "10.244.0.5", kind: "pod", podName: "api", namespace: "shop", podUID: "u1" },
    conn("n1", 1), // host -> external, TCP 443
    conn("n1", 2, { protocol: "UDP", state: "ACTIVE", states: ["ACTIVE"], remoteIP: "10.244.0.5", remotePort: 53 }),
    conn("n1", 3, { localIP: "127.0.0.1", remoteIP: "127.0.0.1", remotePort: 5432, comm: "psql", exe: "/usr/bin/psql" }),
    conn("n1", 4, { family: "IPv6", localIP: "fd00::1", remoteIP: "fd00::9", state: "CLOSE", states: ["CLOSE"] }),
    conn("n1", 5, {
      localIP: "10.244.0.5",
      localPort: 8080,
      remoteIP: "10.0.0.1",
      remotePort: 50000,
      direction: "inbound",
      podName: "api",
      namespace: "shop",
      host: false,
    }),
  ]);
  return s;
}

function cookies(store, change) {
  const f = { ...defaults().conn, ...change };
  return rows
    .connectionRows(store, f)
    .rows.map((r) => r.sockCookie)
    .sort();
}

test("connection rows: every filter of the Connections view", () => {
  const s = filteredStore();
  assert.deepEqual(cookies(s, {}), [1, 2, 3, 4, 5]);
  assert.deepEqual(cookies(s, { proto: "UDP" }), [2]);
  assert.deepEqual(cookies(s, { fam: "IPv6" }), [4]);
  assert.deepEqual(cookies(s, { state: "open" }), [1, 2, 3, 5]);
  assert.deepEqual(cookies(s, { state: "closed" }), [4]);
  assert.deepEqual(cookies(s, { state: "ACTIVE" }), [2]);
  assert.deepEqual(cookies(s, { port: "443" }), [1, 4]);
  assert.deepEqual(cookies(s, { port: "8080", side: "local" }), [5]);
  assert.deepEqual(cookies(s, { port: "8080", side: "remote" }), []);
  assert.deepEqual(cookies(s, { lo: false }), [1, 2, 4, 5]);
  assert.deepEqual(cookies(s, { ext: false }), [2, 3, 5]);
  assert.deepEqual(cookies(s, { pods: false }), [1, 3, 4]);
  assert.deepEqual(cookies(s, { host: false }), [3]); // a local side outside any pod is the host's
  assert.deepEqual(cookies(s, { ns: "SHOP" }), [2, 5]); // case-insensitive, either side
  assert.deepEqual(cookies(s, { pod: "api" }), [2, 5]);
  assert.deepEqual(cookies(s, { node: "n2" }), []);
  assert.deepEqual(cookies(s, { q: "PSQL" }), [3]);
  assert.deepEqual(cookies(s, { q: "shop/api" }), [2, 5]);
  const { total } = rows.connectionRows(s, { ...defaults().conn, proto: "UDP" });
  assert.equal(total, 5);
});

test("dedup keeps one row per link, the side that connected", () => {
  const s = new Store();
  const out = conn("n1", 1, { remoteIP: "10.0.0.2", remotePort: 80 });
  const inn = conn("n2", 2, {
    localIP: "10.0.0.2",
    localPort: 80,
    remoteIP: "10.0.0.1",
    remotePort: 40001,
    direction: "inbound",
  });
  s.apply([inn, out]);
  assert.deepEqual(
    rows.connectionRows(s, { ...defaults().conn, dedup: true }).rows.map((r) => r.id),
    ["n1|1"],
  );
});

test("a connection pass can stop and resume", () => {
  const s = new Store();
  s.apply(Array.from({ length: 1100 }, (_, i) => conn("n1", i + 1)));
  const pass = rows.connectionPass(s, defaults().conn);
  assert.equal(pass.step(0), false); // the deadline has passed: stops after 512 rows
  assert.equal(pass.rows.length, 512);
  assert.equal(pass.step(), true);
  assert.equal(pass.rows.length, 1100);
  assert.equal(pass.total, 1100);
});

test("port rows: protocol, port, IP, node and executable filters", () => {
  const s = new Store();
  s.apply([
    port("n1", 1),
    port("n1", 2, { protocol: "UDP", port: 53, ip: "10.0.0.1", exe: "/usr/sbin/unbound", comm: "unbound" }),
    port("n2", 3, { podName: "web", namespace: "shop", host: false, exe: "", comm: "gunicorn" }),
  ]);
  const ids = (change) =>
    rows
      .portRows(s, { ...defaults().ports, ...change })
      .rows.map((r) => r.id)
      .sort();
  assert.deepEqual(ids({}), ["n1|1", "n1|2", "n2|3"]);
  assert.deepEqual(ids({ proto: "UDP" }), ["n1|2"]);
  assert.deepEqual(ids({ port: "8080" }), ["n1|1", "n2|3"]);
  assert.deepEqual(ids({ ip: "10.0" }), ["n1|2"]);
  assert.deepEqual(ids({ node: "n2" }), ["n2|3"]);
  assert.deepEqual(ids({ exe: "GUNI" }), ["n2|3"]); // the comm when the exe says nothing
  const web = rows.portRows(s, defaults().ports).rows.find((r) => r.id === "n2|3");
  assert.equal(web.pod, "shop/web");
  assert.equal(web.network, "pod");
});

test("IP rows: the inventory, then peers and DNS names no inventory has", () => {
  const s = filteredStore();
  s.apply([{ type: "dns.resolved", nodeName: "n1", ip: "9.9.9.9", hostname: "quad9", aliases: [], ttl: 5, clientIP: "" }]);
  const all = rows.ipRows(s, defaults().ips);
  const byIp = Object.fromEntries(all.rows.map((r) => [r.ip, [r.type, r.source, r.hostname]]));
  assert.deepEqual(byIp["10.0.0.1"], ["host", "host.info", ""]);
  assert.deepEqual(byIp["10.244.0.5"], ["pod", "", ""]);
  assert.deepEqual(byIp["93.184.216.34"], ["external", "connection", ""]);
  assert.deepEqual(byIp["9.9.9.9"], ["external", "dns", "quad9"]);
  assert.equal("127.0.0.1" in byIp, false); // loopback peers are not listed
  const ips = (change) =>
    rows
      .ipRows(s, { ...defaults().ips, ...change })
      .rows.map((r) => r.ip)
      .sort();
  assert.deepEqual(ips({ type: "pod" }), ["10.244.0.5"]);
  assert.deepEqual(ips({ fam: "IPv6" }), ["fd00::9"]);
  assert.deepEqual(ips({ ip: "9.9" }), ["9.9.9.9"]);
});

function failed(node, clientIP, name, extra = {}) {
  return {
    type: "dns.failed",
    nodeName: node,
    timestamp: new Date(T0).toISOString(),
    name,
    qtype: "A",
    rcode: "NXDOMAIN",
    clientIP,
    count: 1,
    total: 1,
    latencyMs: 0.25,
    ...extra,
  };
}

test("dns.failed: the latest per client and name, bounded, until its time is over", () => {
  const s = new Store();
  s.apply([failed("n1", "10.244.0.5", "a.test"), failed("n1", "10.244.0.5", "b.test"), failed("n2", "10.244.0.5", "a.test")], T0);
  s.apply([failed("n1", "10.244.0.5", "a.test", { rcode: "SERVFAIL", total: 4, timestamp: new Date(T0 + 5000).toISOString() })], T0);
  const n1 = s.node("n1").dnsFailed;
  assert.deepEqual([...n1.keys()], ["10.244.0.5|b.test", "10.244.0.5|a.test"]); // replaced, and last
  assert.equal(n1.get("10.244.0.5|a.test").rcode, "SERVFAIL");
  assert.equal(s.dirty.dns, true);
  for (let i = 0; i < DNS_FAILED_MAX; i++) s.apply([failed("n3", "10.0.0.9", `n${i}.test`)], T0);
  s.apply([failed("n3", "10.0.0.9", "one-more.test")], T0);
  assert.equal(s.node("n3").dnsFailed.size, DNS_FAILED_MAX);
  assert.equal(s.node("n3").dnsFailed.has("10.0.0.9|n0.test"), false); // the least recently received went
  s.sweep(T0 + DNS_FAILED_KEEP_MS, 5000); // ten minutes after their timestamp
  assert.deepEqual([...n1.keys()], ["10.244.0.5|a.test"]); // 5 s younger: still there
  s.sweep(T0 + 5000 + DNS_FAILED_KEEP_MS, 5000);
  assert.equal(n1.size, 0);
  // a node's new session replaces them, like every table
  s.apply([failed("n2", "10.244.0.5", "c.test")], T0);
  s.apply([{ type: "host.info", nodeName: "n2", hostIPs: [] }]);
  assert.equal(s.node("n2").dnsFailed.size, 0);
});

test("DNS rows: failing names per client pod, with the RCODE, node and search filters", () => {
  const s = filteredStore(); // 10.244.0.5 is pod shop/api in n1's inventory; 10.0.0.1 is n1's host IP
  s.apply([
    failed("n1", "10.244.0.5", "db.shop.svc", { rcode: "SERVFAIL", latencyMs: 1500 }),
    failed("n1", "10.244.0.5", "api.example.com.shop.svc"),
    failed("n1", "10.0.0.1", "gone.test", { latencyMs: undefined }),
    failed("n2", "10.244.9.9", "x.test", { podName: "web", namespace: "bank", podUID: "u9", rcode: "REFUSED" }),
    failed("n2", "192.0.2.1", "y.test", { rcode: "NOTIMP" }),
  ]);
  const dns = (change = {}) => rows.dnsRows(s, { ...defaults().dns, ...change }).rows.map((r) => `${r.client} ${r.name}`);
  assert.deepEqual(dns(), [
    "192.0.2.1 y.test",
    "bank/web x.test", // the pod from the event
    "node n1 gone.test",
    "shop/api api.example.com.shop.svc", // the pod from the inventory; its names together
    "shop/api db.shop.svc",
  ]);
  assert.deepEqual(dns({ rcode: "SERVFAIL" }), ["shop/api db.shop.svc"]);
  assert.deepEqual(dns({ rcode: "other" }), ["192.0.2.1 y.test"]);
  assert.deepEqual(dns({ node: "n2" }), ["192.0.2.1 y.test", "bank/web x.test"]);
  assert.deepEqual(dns({ q: "SHOP/" }), ["shop/api api.example.com.shop.svc", "shop/api db.shop.svc"]);
  assert.deepEqual(dns({ q: "gone" }), ["node n1 gone.test"]);
  const all = rows.dnsRows(s, defaults().dns);
  assert.equal(all.total, 5);
  assert.deepEqual(all.rows.map((r) => r.latency), [0.25, 0.25, null, 0.25, 1500]);
});

// -- filters.js -----------------------------------------------------------------------------------

test("fromQuery: defaults, values from the URL, unknown keys and bad values ignored", () => {
  const empty = fromQuery("");
  assert.equal(empty.view, "conn");
  assert.deepEqual(Object.keys(empty.filters), VIEWS);
  assert.equal(empty.filters.conn.lo, true);
  assert.equal(empty.filters.conn.dedup, false);
  assert.equal(empty.filters.conn.linger, "5");
  assert.equal(empty.filters.conn.sort, null);
  assert.equal(empty.filters.ports.q, undefined); // not a filter of that view
  const q = fromQuery("?view=ports&conn.ext=0&conn.dedup=1&ports.port=53&conn.sort=pid:desc&conn.bogus=1");
  assert.equal(q.view, "ports");
  assert.equal(q.filters.conn.ext, false);
  assert.equal(q.filters.conn.dedup, true);
  assert.equal(q.filters.ports.port, "53");
  assert.deepEqual(q.filters.conn.sort, { field: "pid", dir: "desc" });
  assert.equal("bogus" in q.filters.conn, false);
  assert.equal(fromQuery("?view=nope").view, "conn");
  assert.equal(fromQuery("?conn.sort=pid;alert(1):asc").filters.conn.sort, null);
  assert.equal(fromQuery("?conn.sort=pid:sideways").filters.conn.sort, null);
});

test("toQuery writes only what differs from the defaults, and fromQuery reads it back", () => {
  assert.equal(toQuery("conn", defaults()), "?view=conn");
  const filters = defaults();
  Object.assign(filters.conn, { q: "curl", ext: false, dedup: true, failed: true, port: "443", sort: { field: "pid", dir: "asc" } });
  Object.assign(filters.ips, { type: "pod", fam: "IPv6" });
  filters.deploy.q = "DaemonSet";
  const search = toQuery("ips", filters);
  const params = new URLSearchParams(search);
  assert.equal(params.get("conn.ext"), "0");
  assert.equal(params.get("conn.failed"), "1");
  assert.equal(params.get("conn.sort"), "pid:asc");
  assert.equal(params.has("conn.lo"), false); // a default: left out
  assert.deepEqual(fromQuery(search), { view: "ips", filters });
  for (const view of VIEWS) {
    for (const spec of FILTERS[view]) assert.ok(spec.key in fromQuery(search).filters[view], `${view}.${spec.key}`);
  }
});

test("contains: case-insensitive substring; an empty needle matches everything", () => {
  assert.equal(contains("Payments-API", "api"), true);
  assert.equal(contains("payments", "API"), false);
  assert.equal(contains(null, ""), true);
  assert.equal(contains(null, "x"), false);
  assert.equal(contains(5432, "43"), true);
});

test("widens: a key dropped or values added (the page then re-subscribes without waiting for typing)", () => {
  assert.equal(widens({ namespace: ["shop"] }, {}), true);
  assert.equal(widens({ namespace: ["shop"] }, { namespace: ["shop", "bank"] }), true);
  assert.equal(widens({ namespace: ["shop"], loopback: false }, { loopback: false }), true);
  assert.equal(widens({}, { namespace: ["shop"] }), false);
  assert.equal(widens({ namespace: ["shop"] }, { namespace: ["sho"] }), false);
  assert.equal(widens({ loopback: false }, { loopback: false, port: [443] }), false);
});

test("past maxConns the store holds no new connection and counts what it left out, by namespace and node", () => {
  const s = new Store();
  s.maxConns = 2;
  s.apply([conn("n1", 1, { namespace: "shop" }), conn("n1", 2), conn("n1", 3, { namespace: "shop" }), conn("n2", 4)]);
  assert.equal(s.connCount(), 2);
  assert.equal(s.left.rows, 2);
  assert.deepEqual([...s.left.byNamespace], [["shop", 1], ["", 1]]);
  assert.deepEqual([...s.left.byNode], [["n1", 1], ["n2", 1]]);
  s.apply([conn("n1", 1, { state: "FIN_WAIT1" })]); // a held row still changes
  assert.equal(s.node("n1").conns.get("1").state, "FIN_WAIT1");
  s.apply([{ type: "snapshot.complete", nodeName: "n1" }, conn("n1", 3, { state: "CLOSE" })]);
  assert.equal(s.left.laterEvents, 1); // after the snapshot, events of rows not held are only counted
  s.apply([{ type: "stream.reset", nodeName: "n1", reason: "subscribe" }, conn("n1", 9)]);
  assert.equal(s.left.rows, 0); // a new snapshot: counted afresh
  assert.deepEqual(keys(s.node("n1").conns), ["9"]);
  assert.equal(s.connCount(), 1); // n1's rows replaced (the count follows the clear)
});

// -- the traffic columns: counters, Rate, failed connections, units, sorting ------------------------

const at = (ms) => new Date(T0 + ms).toISOString();

test("units: bytes, rates and round-trip times in human units, at their boundaries", () => {
  const bytes = [
    [0, "0 B"],
    [950, "950 B"],
    [999, "999 B"],
    [1000, "1.0 kB"],
    [1049, "1.0 kB"],
    [12_500, "12.5 kB"],
    [99_940, "99.9 kB"],
    [99_960, "100 kB"],
    [999_400, "999 kB"],
    [999_600, "1.0 MB"], // not "1000 kB"
    [1_000_000, "1.0 MB"],
    [1_234_567, "1.2 MB"],
    [5_368_709_120, "5.4 GB"],
    [2e21, "2000 EB"],
  ];
  for (const [n, shown] of bytes) assert.equal(formatBytes(n), shown, String(n));
  for (const missing of [undefined, null, NaN, -1, "12", Infinity]) assert.equal(formatBytes(missing), "", String(missing));
  assert.equal(formatRate(12_500), "12.5 kB/s");
  assert.equal(formatRate(950.4), "950 B/s");
  assert.equal(formatRate(0.4), "0.4 B/s"); // a rate, unlike a count, may be a fraction of a byte
  assert.equal(formatRate(0), "0 B/s");
  assert.equal(formatRate(null), "");
  const rtts = [
    [45, "45 µs"],
    [99.4, "99 µs"],
    [99.6, "0.1 ms"],
    [400, "0.4 ms"],
    [9_940, "9.9 ms"],
    [9_960, "10 ms"],
    [35_000, "35 ms"],
    [999_400, "999 ms"],
    [999_600, "1.0 s"],
    [125_000_000, "125 s"],
  ];
  for (const [us, shown] of rtts) assert.equal(formatRtt(us), shown, String(us));
  for (const missing of [0, undefined, null, NaN, -5]) assert.equal(formatRtt(missing), "", String(missing)); // 0: never measured
});

test("Rate: bytes/s between the last two samples of a row's totals, from their timestamps", () => {
  const s = new Store();
  const row = () => s.node("n1").conns.get("1");
  s.apply([conn("n1", 1, { timestamp: at(0) })], T0); // no counters yet
  assert.equal(row().rate, null);
  assert.equal(row().bytesSent, undefined);
  s.apply([{ type: "snapshot.complete", nodeName: "n1" }]);
  s.apply([conn("n1", 1, { timestamp: at(1000), states: [], bytesSent: 1000, bytesReceived: 500 })], T0 + 1000);
  assert.equal(row().rate, null); // one sample: no rate yet
  s.apply([conn("n1", 1, { timestamp: at(6000), states: [], bytesSent: 41_000, bytesReceived: 10_500 })], T0 + 6000);
  assert.equal(row().rate, 10_000); // (51,500 - 1,500) bytes in 5 s
  // an event without counters (a state change) keeps the totals and the rate
  s.apply([conn("n1", 1, { timestamp: at(7000), state: "FIN_WAIT1", states: ["FIN_WAIT1"] })], T0 + 7000);
  assert.deepEqual([row().bytesSent, row().bytesReceived, row().rate], [41_000, 10_500, 10_000]);
  // the close's totals: the last interval, from the previous sample's timestamp
  const end = { state: "CLOSE", states: ["CLOSE"], bytesSent: 43_000, bytesReceived: 10_500, rttUs: 420, retransmits: 2 };
  s.apply([conn("n1", 1, { timestamp: at(8000), ...end })], T0 + 8000);
  assert.equal(row().rate, 1000);
  assert.equal(row().rtt, 420);
  assert.equal(row().failed, false);

  // the same totals later (only the RTT changed): nothing moved, 0 B/s; totals that went back start afresh
  s.apply([conn("n1", 2, { timestamp: at(0), states: [], bytesSent: 10, bytesReceived: 0 })], T0);
  s.apply([conn("n1", 2, { timestamp: at(5000), states: [], bytesSent: 5010, bytesReceived: 0 })], T0 + 5000);
  assert.equal(s.node("n1").conns.get("2").rate, 1000);
  s.apply([conn("n1", 2, { timestamp: at(10_000), states: [], bytesSent: 5010, bytesReceived: 0, rttUs: 900 })], T0 + 10_000);
  assert.equal(s.node("n1").conns.get("2").rate, 0);
  s.apply([conn("n1", 2, { timestamp: at(11_000), states: [], bytesSent: 3, bytesReceived: 0 })], T0 + 11_000);
  assert.equal(s.node("n1").conns.get("2").rate, null);

  // UDP flows: the same with their bytes (packets are only shown on hover)
  const udp = { protocol: "UDP", state: "ACTIVE", states: ["ACTIVE"], remoteIP: "10.0.0.53", remotePort: 53 };
  const first = { bytesSent: 100, bytesReceived: 300, packetsSent: 1, packetsReceived: 1 };
  s.apply([conn("n1", 7, { ...udp, timestamp: at(0), ...first })], T0);
  const next = { bytesSent: 2100, bytesReceived: 4300, packetsSent: 20, packetsReceived: 20 };
  s.apply([conn("n1", 7, { ...udp, timestamp: at(2000), ...next })], T0 + 2000);
  const flow = s.node("n1").conns.get("7|10.0.0.53|53");
  assert.equal(flow.rate, 3000);
  assert.equal(flow.failed, false);
});

test("Rate: a live row whose totals stop coming drops to 0; a stream.reset keeps the samples", () => {
  const s = new Store();
  s.apply([{ type: "snapshot.complete", nodeName: "n1" }]);
  s.apply([conn("n1", 1, { timestamp: at(0), states: [], bytesSent: 0, bytesReceived: 0 })], T0);
  s.apply([conn("n1", 1, { timestamp: at(5000), states: [], bytesSent: 50_000, bytesReceived: 0 })], T0 + 5000);
  const live = s.node("n1").conns.get("1");
  assert.equal(live.rate, 10_000);
  s.sweep(T0 + 5000 + 11_000, 5000); // two of its 5 s intervals and a second: not yet
  assert.equal(s.node("n1").conns.get("1"), live);
  s.dirty.conn = false;
  s.sweep(T0 + 5000 + 11_001, 5000);
  const idle = s.node("n1").conns.get("1");
  assert.notEqual(idle, live); // a new object: the grid redraws changed rows by identity
  assert.equal(idle.rate, 0);
  assert.equal(s.dirty.conn, true);
  s.apply([conn("n1", 1, { timestamp: at(25_000), states: [], bytesSent: 70_000, bytesReceived: 0 })], T0 + 25_000);
  assert.equal(s.node("n1").conns.get("1").rate, 1000); // since the last totals, 20 s before

  // a new subscription: the row sent again with the same totals keeps its rate (a snapshot is no
  // sample), and its next totals are measured from the last ones before the reset
  s.apply([{ type: "stream.reset", nodeName: "n1", reason: "subscribe" }]);
  s.apply([conn("n1", 1, { timestamp: at(26_000), bytesSent: 70_000, bytesReceived: 0 })], T0 + 26_000);
  assert.equal(s.node("n1").conns.get("1").rate, 1000);
  s.apply([{ type: "snapshot.complete", nodeName: "n1" }]);
  assert.equal(s.node("n1").former, null);
  s.apply([conn("n1", 1, { timestamp: at(30_000), states: [], bytesSent: 90_000, bytesReceived: 0 })], T0 + 30_000);
  assert.equal(s.node("n1").conns.get("1").rate, 4000);
});

test("failed: an error, a reset, or a TCP connection closed before ESTABLISHED; the Error text", () => {
  const s = new Store();
  const close = { state: "CLOSE", states: ["CLOSE"] };
  s.apply([
    conn("n1", 1, { state: "SYN_SENT", states: ["SYN_SENT"] }),
    conn("n1", 1, { ...close, error: "ECONNREFUSED", bytesSent: 0, bytesReceived: 0, rttUs: 0 }),
    conn("n1", 2, { states: ["ESTABLISHED"] }),
    conn("n1", 2, { ...close, reset: "received", error: "ECONNRESET", bytesSent: 6, bytesReceived: 0 }),
    conn("n1", 3, { states: ["ESTABLISHED"] }),
    conn("n1", 3, { ...close, reset: "sent", bytesReceived: 6 }),
    conn("n1", 4, { state: "SYN_SENT", states: ["SYN_SENT"] }),
    conn("n1", 4, close), // the application gave up first: no error, never established
    conn("n1", 5, { state: "CLOSE", states: ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"] }),
    conn("n1", 6, { ...close, states: ["FIN_WAIT1", "FIN_WAIT2", "CLOSE"] }), // the first event seen
    conn("n1", 7, { ...close, bytesSent: 10, bytesReceived: 20, rttUs: 300 }), // counters only a connection has
    conn("n1", 8, { state: "SYN_SENT", states: ["SYN_SENT"] }), // still trying
    conn("n1", 9, { protocol: "UDP", ...close, remoteIP: "10.0.0.53", remotePort: 53 }),
    conn("n1", 10, { state: "SYN_SENT", states: ["SYN_SENT"] }),
    conn("n1", 10, { ...close, closeReason: "gone" }), // the agent missed its end: maybe its handshake too
  ]);
  const by = Object.fromEntries([...s.node("n1").conns.values()].map((r) => [r.sockCookie, [r.failed, r.failure]]));
  assert.deepEqual(by, {
    1: [true, "ECONNREFUSED"],
    2: [true, "ECONNRESET, reset received"],
    3: [true, "reset sent"],
    4: [true, "not established"],
    5: [false, ""],
    6: [false, ""],
    7: [false, ""],
    8: [false, ""],
    9: [false, ""],
    10: [false, ""],
  });
  assert.equal(isFailed({ protocol: "TCP", closedAt: 0 }), false);
  assert.equal(isFailed({ protocol: "UDP", closedAt: 1, error: "ECONNREFUSED" }), true);
  // the "failed only" toggle, and the search box finds the error's name
  assert.deepEqual(cookies(s, { failed: true }), [1, 2, 3, 4]);
  assert.deepEqual(cookies(s, { failed: true, q: "reset" }), [2, 3]);
  assert.deepEqual(cookies(s, { q: "econnrefused" }), [1]);
  assert.equal(cookies(s, {}).length, 10);
});

test("sortBy: numbers and text, a missing value last in either direction, ties in order", () => {
  const list = [
    { id: "a", bytesSent: 10, failure: "" },
    { id: "b", failure: "reset sent" },
    { id: "c", bytesSent: 1_000_000, failure: "ECONNREFUSED" },
    { id: "d", bytesSent: 0, failure: null },
    { id: "e", bytesSent: 10, failure: "not established" },
    { id: "f", bytesSent: NaN },
  ];
  const ids = (field, dir, numeric) => rows.sortBy(list, field, dir, numeric).map((r) => r.id).join("");
  assert.equal(ids("bytesSent", "desc", true), "caedbf"); // the top talker first
  assert.equal(ids("bytesSent", "asc", true), "daecbf");
  assert.equal(ids("failure", "asc", false), "cebadf"); // empty text is missing too
  assert.equal(ids("failure", "desc", false), "becadf");
  assert.deepEqual(list.map((r) => r.id), ["a", "b", "c", "d", "e", "f"]); // left alone
  // the store's rows, by bytes: rows without counters after every row with some
  const s = new Store();
  s.apply([conn("n1", 1), conn("n1", 2, { bytesSent: 5 }), conn("n1", 3, { bytesSent: 500 })]);
  const view = rows.connectionRows(s, defaults().conn).rows;
  assert.deepEqual(rows.sortBy(view, "bytesSent", "desc", true).map((r) => r.sockCookie), [3, 2, 1]);
  assert.deepEqual(rows.sortBy(view, "bytesSent", "asc", true).map((r) => r.sockCookie), [2, 3, 1]);
});

test("the failed-only toggle round-trips through the URL and is not part of the subscription", () => {
  assert.equal(fromQuery("").filters.conn.failed, false);
  const q = fromQuery("?view=conn&conn.failed=1&conn.sort=bytesSent:desc");
  assert.equal(q.filters.conn.failed, true);
  assert.deepEqual(q.filters.conn.sort, { field: "bytesSent", dir: "desc" });
  assert.equal(toQuery("conn", q.filters), "?view=conn&conn.failed=1&conn.sort=bytesSent%3Adesc");
  assert.deepEqual(fromQuery(toQuery("conn", q.filters)), q);
  assert.equal(toQuery("conn", { ...q.filters, conn: { ...q.filters.conn, failed: false, sort: null } }), "?view=conn");
  assert.deepEqual(subscriptionOf(q.filters.conn), {});
});
