// Run by test_web_ui.py in the page (page.evaluate): the UI's store and rows modules on synthetic
// events from several nodes, as the multiplexer would send them. Returns what the test asserts on.
async () => {
  const { Store } = await import("./web/store.js");
  const rows = await import("./web/rows.js");
  const { fromQuery } = await import("./web/filters.js");
  const f = fromQuery("").filters.conn;
  const s = new Store();
  const conn = (node, cookie, extra) => ({ type: "connection.event", nodeName: node, protocol: "TCP", family: "IPv4",
    state: "ESTABLISHED", states: ["ESTABLISHED"], localIP: "10.0.0.1", localPort: 40000 + cookie, remoteIP: "10.244.1.5",
    remotePort: 80, pid: 10, exe: "/usr/bin/curl", comm: "curl", netns: 1, sockCookie: cookie, direction: "outbound",
    host: true, ...extra });
  s.apply([
    { type: "host.info", nodeName: "n1", hostIPs: ["10.0.0.1"] },
    { type: "host.info", nodeName: "n2", hostIPs: ["10.0.0.2"] },
    { type: "ip.added", nodeName: "n2", ip: "10.244.1.5", kind: "pod", podName: "web", namespace: "shop", podUID: "u1" },
    { type: "dns.resolved", nodeName: "n1", ip: "93.184.216.34", hostname: "example.com", aliases: [], ttl: 60, clientIP: "10.0.0.1" },
    conn("n1", 1),
    conn("n1", 2, { remoteIP: "93.184.216.34", remotePort: 443 }),
    conn("n1", 3, { remoteIP: "1.1.1.1", remotePort: 443, remoteHostname: "one.one" }),
    // the same link as cookie 1, seen from the pod's side on n2
    conn("n2", 9, { localIP: "10.244.1.5", localPort: 80, remoteIP: "10.0.0.1", remotePort: 40001, direction: "inbound",
      host: false, podName: "web", namespace: "shop" }),
    { type: "snapshot.complete", nodeName: "n1" },
  ]);
  const out = {};
  const all = rows.connectionRows(s, f).rows;
  out.kinds = Object.fromEntries(all.map((r) => [r.node + "/" + r.sockCookie, [r.localKind, r.remoteKind, r.remoteLabel]]));
  out.dedup = rows.connectionRows(s, { ...f, dedup: true }).rows.map((r) => r.node + "/" + r.sockCookie).sort();
  out.noExternal = rows.connectionRows(s, { ...f, ext: false }).rows.length;
  out.byNamespace = rows.connectionRows(s, { ...f, ns: "shop" }).rows.length;
  out.ipTypes = Object.fromEntries(rows.ipRows(s, fromQuery("").filters.ips).rows.map((r) => [r.ip, [r.type, r.hostname]]));
  s.apply([{ type: "dns.expired", nodeName: "n1", ip: "93.184.216.34", hostname: "example.com" }]);
  out.afterExpiry = rows.connectionRows(s, { ...f, port: "443", side: "remote" }).rows.map((r) => r.remoteLabel).sort();
  // a reset (it may name the multiplexer): the rows stay until each node's are sent again; a node sent
  // nothing is empty at snapshot.complete
  s.apply([{ type: "stream.reset", nodeName: "n2", reason: "overflow", missedEvents: 5 }]);
  out.duringReset = [...s.nodes.values()].map((n) => [n.name, n.conns.size, n.ips.size]);
  s.apply([conn("n1", 1), conn("n1", 2), conn("n1", 3), { type: "snapshot.complete", nodeName: "n2" }]);
  out.afterReset = [...s.nodes.values()].map((n) => [n.name, n.conns.size, n.ips.size]);
  // a close lingers, then leaves; a silent UDP flow expires
  s.apply([conn("n1", 1, { state: "CLOSE", states: ["FIN_WAIT1", "FIN_WAIT2", "CLOSE"] })]);
  s.apply([conn("n1", 7, { protocol: "UDP", state: "ACTIVE", states: ["ACTIVE"] })], Date.now() - 80000);
  out.lingering = s.sweep(Date.now(), 5000);
  out.afterLinger = (s.sweep(Date.now() + 10000, 5000), [...s.node("n1").conns.keys()].sort());
  // a new session (reconnect): n1 is sent again without host.info (as through the multiplexer), n2 is not
  s.beginSession();
  s.apply([conn("n1", 4), { type: "snapshot.complete", nodeName: "n1" }]);
  out.afterSession = [...s.nodes.values()].map((n) => [n.name, [...n.conns.keys()]]);
  // the multiplexer's own events: its host.info and peer.status do not start or clear a node's state
  s.apply([
    { type: "host.info", nodeName: "n1", mux: true, fanoutService: "netstatd-headless" },
    { type: "peer.status", peer: "10.0.0.2", nodeName: "n2", status: "connected", hostInfo: { hostIPs: ["10.0.0.2"] } },
    conn("n2", 5),
  ]);
  out.muxNodes = [...s.nodes.values()].map((n) => [n.name, n.conns.size, n.hostInfo?.hostIPs || null]);
  s.apply([{ type: "peer.status", peer: "10.0.0.2", nodeName: "n2", status: "gone" }, { type: "node.removed", nodeName: "n2" }]);
  out.afterRemoved = [[...s.nodes.keys()], [...s.peers.keys()]];
  return out;
}
