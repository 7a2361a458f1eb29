// The client's copy of the stream's state (docs/protocol.md), keyed by node so the same code serves one
// agent and the cluster-wide multiplexer. Applying an event is O(1); views read the maps when they
// redraw. No DOM here. The event type names and the connection key (connKey) mirror the agent's
// src/netstatd/protocol.py: change them together.

import { isLoopback } from "./net.js";

// The agent closes idle UDP flows after 60 s (closeReason "idle"); a flow silent for longer than this
// lost its close somewhere (e.g. while we were reconnecting), so the UI expires it itself.
export const UDP_EXPIRE_MS = 75_000;
// The most connection rows the page holds by default (`conn.max` in the URL). A browser stays fluid
// with 50k (bench/ui.py), not with a cluster's million: past the cap, a subscription is too wide, and
// the page counts what it leaves out (by namespace and node) so the user can narrow it.
export const MAX_CONNS = 100_000;
// A dns.failed stands for 10 minutes after its timestamp, and a node holds at most 1000, the latest per
// client IP and name (protocol.py DNS_FAILED_KEEP_S, DNS_FAILED_MAX: change them together).
export const DNS_FAILED_KEEP_MS = 600_000;
export const DNS_FAILED_MAX = 1000;
// A connection's counters (docs/protocol.md, "How much and how well"): totals, never deltas. An event
// without them (a state change, an older agent, a row not refreshed yet, a close the agent did not
// see) keeps the row's last known ones.
const COUNTERS = [
  "bytesSent",
  "bytesReceived",
  "segmentsSent",
  "segmentsReceived",
  "packetsSent",
  "packetsReceived",
  "rttUs",
  "retransmits",
];
// The states a TCP connection is in only once its handshake completed.
const ESTABLISHED_STATES = new Set(["ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK", "CLOSING"]);
// A live row whose byte totals stopped coming: its Rate drops to 0 once the next sample is this late
// (the agent sends counters only when a value changed): twice the row's last interval, plus this.
const RATE_STALE_SLACK_MS = 1000;

class NodeState {
  constructor(name) {
    this.name = name;
    this.hostInfo = null;
    this.containers = new Map(); // containerId -> container.added
    this.ips = new Map(); // ip|podUID -> ip.added (one host IP appears once per host-network pod too)
    this.ports = new Map(); // sockCookie -> port row
    this.conns = new Map(); // sockCookie (TCP) or sockCookie|remoteIP|remotePort (UDP) -> connection row
    // The rows a stream.reset or a new session replaced, until snapshot.complete: the same connection's
    // row sent again takes its counter samples from there, so its Rate goes on (not empty again).
    this.former = null;
    this.dns = new Map(); // ip -> Map(hostname -> dns.resolved)
    this.dnsFailed = new Map(); // clientIP|name -> dns.failed row, least recently received first
    // Its rows are about to be sent again: "session" (a new WebSocket session) or "reset" (a
    // stream.reset). They stay on screen until its first event, which clears them; its connections
    // stay until its first connection event (staleConns), since a snapshot sends the inventory first.
    this.stale = false;
    this.staleConns = false;
  }

  clear() {
    this.clearInventory();
    this.clearConns();
  }

  clearInventory() {
    this.containers.clear();
    this.ips.clear();
    this.ports.clear();
    this.dns.clear();
    this.dnsFailed.clear();
  }

  clearConns() {
    if (this.conns.size) this.former = this.conns;
    this.conns = new Map();
    this.staleConns = false;
  }
}

export class Store {
  constructor() {
    this.nodes = new Map();
    this.eventCount = 0;
    this.snapshotDone = false;
    this.adding = false; // a widened subscription's rows are coming (until its partial snapshot.complete)
    // Sessions, stream.resets and widenings: each starts rows the user waits for (drawn at once).
    this.loads = 0;
    this.loadRows = 0; // connection events since the last of them
    this.maxConns = MAX_CONNS;
    this._connCount = null; // connection rows held (null: count again, rows were removed)
    this.left = newLeft(); // connections past maxConns, since the last restart
    // What changed since the views last read it: views redraw only when their data is dirty.
    this.dirty = { conn: true, ports: true, ips: true, dns: true };
    this.indexDirty = true; // ip and dns indexes need rebuilding (inventory or DNS changed)
    this.indexVersion = 0; // counts rebuilds: rows derived from an older index are out of date
    this._ipIndex = new Map();
    this._dnsIndex = new Map();
    // Multiplexer only (docs/multiplexer.md): its own host.info, discovery state and upstreams.
    this.mux = null; // the mux's host.info
    this.muxStatus = null; // latest mux.status
    this.peers = new Map(); // peer IP -> latest peer.status
  }

  node(name) {
    let n = this.nodes.get(name);
    if (!n) {
      n = new NodeState(name);
      this.nodes.set(name, n);
    }
    return n;
  }

  // A new WebSocket session: the old rows stay on screen (marked stale) until each node's snapshot
  // replaces them, so a restart of the agent does not blank the page.
  beginSession() {
    this.restart("session");
  }

  restart(why) {
    for (const n of this.nodes.values()) n.stale = why;
    this.snapshotDone = false;
    this.adding = false;
    this.loads++;
    this.loadRows = 0;
    this.left = newLeft();
  }

  // A partial re-subscription: what the page holds stays, the rows the wider filter adds follow.
  beginAdding() {
    this.adding = true;
    this.loads++;
    this.loadRows = 0;
  }

  // A snapshot or a widening's rows are still coming.
  get loading() {
    return !this.snapshotDone || this.adding;
  }

  connCount() {
    this._connCount ??= [...this.nodes.values()].reduce((n, node) => n + node.conns.size, 0);
    return this._connCount;
  }

  // A connection the page does not hold: counted where it belongs while the snapshot comes (each
  // connection once), as an event afterwards (a connection's events cannot be told apart unheld).
  leaveOut(ev) {
    const left = this.left;
    if (this.snapshotDone) {
      left.laterEvents++;
    } else {
      left.rows++;
      tally(left.byNamespace, ev.namespace || "");
      tally(left.byNode, ev.nodeName || "");
    }
    left.version++;
  }

  apply(events, now = Date.now()) {
    for (const ev of events) {
      this.eventCount++;
      const session = SESSION_HANDLERS[ev.type];
      if (session) {
        // about the multiplexer and its upstreams, not a node's state: must not start a node's session
        if (session(this, ev) !== false) continue;
      }
      const handler = HANDLERS[ev.type];
      if (!handler) continue;
      const node = this.node(ev.nodeName || "");
      if (node.stale) {
        // The first event of a node in a new session: its whole state is being sent again. Its
        // connections (what the page's own filter may still show) go at its first connection event.
        node.clearInventory();
        node.staleConns = true;
        node.stale = false;
        this.markAll();
      }
      if (node.staleConns && ev.type === "connection.event") {
        node.clearConns();
        this._connCount = null;
      }
      handler(this, node, ev, now);
    }
  }

  clearNode(node) {
    node.clear();
    this._connCount = null;
  }

  markAll() {
    this.dirty.conn = this.dirty.ports = this.dirty.ips = this.dirty.dns = true;
    this.indexDirty = true;
  }

  // Drops connections closed longer than lingerMs ago, and closes UDP flows silent for too long; drops
  // DNS failures whose time is over. Returns how many closed connections are still lingering (they fade
  // out meanwhile).
  sweep(now, lingerMs) {
    let lingering = 0;
    for (const n of this.nodes.values()) {
      for (const [key, row] of n.dnsFailed) {
        if (now - row.at >= DNS_FAILED_KEEP_MS) {
          n.dnsFailed.delete(key);
          this.dirty.dns = true;
        }
      }
      for (const [key, row] of n.conns) {
        if (!row.closedAt && row.protocol === "UDP" && now - row.lastSeen > UDP_EXPIRE_MS) {
          // a new object, like every change: the grid tells changed rows by identity
          // (_iv: 0: its derived fields, e.g. the search text with the state, are computed again)
          n.conns.set(key, { ...row, state: "CLOSE", closeReason: "expired", closedAt: now, _iv: 0 });
          this.dirty.conn = true;
          lingering++;
          continue;
        }
        if (!row.closedAt) {
          const sample = row._sample;
          if (row.rate > 0 && sample.dt > 0 && now - sample.seen > 2 * sample.dt + RATE_STALE_SLACK_MS) {
            // no new totals for two of its intervals: nothing moved in at least one (a new object, as
            // for every change; the sample stays, so the next totals give the rate since then)
            n.conns.set(key, { ...row, rate: 0 });
            this.dirty.conn = true;
          }
          continue;
        }
        if (now - row.closedAt >= lingerMs) {
          n.conns.delete(key);
          this._connCount = null;
          this.dirty.conn = true;
        } else {
          lingering++;
        }
      }
    }
    return lingering;
  }

  // ip -> {kind, podName, namespace, usesHostNetwork, node}: every node's inventory and host IPs.
  // A pod's own IP wins over a host entry, which wins over loopback.
  ipIndex() {
    this._rebuildIndexes();
    return this._ipIndex;
  }

  // ip -> hostname, from every node's DNS cache (dns.resolved / dns.expired).
  dnsIndex() {
    this._rebuildIndexes();
    return this._dnsIndex;
  }

  _rebuildIndexes() {
    if (!this.indexDirty) return;
    this.indexDirty = false;
    this.indexVersion++;
    const rank = { pod: 3, host: 2, loopback: 1 };
    const ips = new Map();
    const put = (ip, entry) => {
      const old = ips.get(ip);
      if (!old || (rank[entry.kind] || 0) > (rank[old.kind] || 0) || (!old.podName && entry.podName && entry.kind === old.kind)) {
        ips.set(ip, entry);
      }
    };
    const dns = new Map();
    for (const n of this.nodes.values()) {
      for (const ip of n.hostInfo?.hostIPs || []) put(ip, { kind: "host", node: n.name });
      for (const e of n.ips.values()) {
        put(e.ip, { kind: e.kind, podName: e.podName, namespace: e.namespace, usesHostNetwork: e.usesHostNetwork, node: n.name });
      }
      for (const c of n.containers.values()) {
        for (const ip of c.podIPs || []) put(ip, { kind: "pod", podName: c.podName, namespace: c.namespace, node: n.name });
      }
      for (const [ip, names] of n.dns) {
        if (!dns.has(ip) && names.size) dns.set(ip, names.keys().next().value);
      }
    }
    this._ipIndex = ips;
    this._dnsIndex = dns;
  }
}

// protocol.connection_key()
function connKey(ev) {
  return ev.protocol === "UDP" ? `${ev.sockCookie}|${ev.remoteIP}|${ev.remotePort}` : String(ev.sockCookie);
}

// Events about the stream itself and the multiplexer's session (docs/multiplexer.md), not a node's
// state. Returning false passes the event on to HANDLERS (a node's own host.info).
const SESSION_HANDLERS = {
  "host.info"(store, ev) {
    if (!ev.mux) return false;
    store.mux = ev;
    store.peers.clear(); // their peer.status follow
    return true;
  },
  "mux.status"(store, ev) {
    store.muxStatus = ev;
  },
  "peer.status"(store, ev) {
    if (ev.status === "gone") store.peers.delete(ev.peer);
    else store.peers.set(ev.peer, ev);
    // A node's host.info reaches a mux client inside its peer.status: host IPs colour endpoints blue.
    if (ev.nodeName && ev.hostInfo) {
      store.node(ev.nodeName).hostInfo = ev.hostInfo;
      store.markAll();
    }
  },
  "node.removed"(store, ev) {
    // drop everything of that node; a rebuilt snapshot may follow
    if (store.nodes.delete(ev.nodeName)) {
      store._connCount = null;
      store.markAll();
    }
  },
  "stream.reset"(store, ev) {
    // Partial (the filter only widened): the rows it adds follow, nothing is dropped.
    if (ev.partial) {
      store.beginAdding();
      return;
    }
    // The whole stream starts again (we fell behind, or the subscription changed) and every node's
    // state follows; on the multiplexer port the reset names the multiplexer, not a node. The rows
    // stay on screen (the page's own filters narrow them at once) until each node's are sent again.
    store.restart("reset");
  },
  // (it names the node or the multiplexer that sent the stream: it starts no node's state)
  "snapshot.complete"(store, ev) {
    if (ev.partial) {
      store.adding = false;
      return;
    }
    store.snapshotDone = true;
    for (const [name, n] of store.nodes) {
      // nothing sent again: gone from the new session; after a reset, nothing matches there now
      if (n.stale === "session") store.nodes.delete(name);
      else if (n.stale) n.clear();
      else if (n.staleConns) n.clearConns();
      n.stale = false;
      n.former = null;
    }
    store._connCount = null;
    store.markAll();
  },
};

// One handler per event type. Each keeps its node's maps in step and marks what changed.
const HANDLERS = {
  "host.info"(store, node, ev) {
    // A node's session starts with host.info and its full state follows: forget what we had.
    store.clearNode(node);
    node.stale = false;
    node.hostInfo = ev;
    store.markAll();
  },
  "container.added"(store, node, ev) {
    node.containers.set(ev.containerId, ev);
    store.markAll(); // names and pod IPs shown in every view
  },
  "container.deleted"(store, node, ev) {
    node.containers.delete(ev.containerId);
    store.markAll();
  },
  "ip.added"(store, node, ev) {
    node.ips.set(`${ev.ip}|${ev.podUID || ""}`, ev);
    store.markAll(); // endpoint kinds (colours) may change
  },
  "ip.removed"(store, node, ev) {
    node.ips.delete(`${ev.ip}|${ev.podUID || ""}`);
    store.markAll();
  },
  "port.listening"(store, node, ev) {
    node.ports.set(String(ev.sockCookie), { ...ev, id: `${node.name}|${ev.sockCookie}`, node: node.name });
    store.dirty.ports = true;
  },
  "port.closed"(store, node, ev) {
    node.ports.delete(String(ev.sockCookie));
    store.dirty.ports = true;
  },
  "connection.event"(store, node, ev, now) {
    const key = connKey(ev);
    const old = node.conns.get(key);
    if (!old) {
      if (store.connCount() >= store.maxConns) {
        store.leaveOut(ev);
        return;
      }
      store._connCount++;
    }
    const row = { ...ev, id: `${node.name}|${key}`, node: node.name, firstSeen: old ? old.firstSeen : now, lastSeen: now };
    row.closedAt = ev.state === "CLOSE" ? old?.closedAt || now : 0;
    // An event with only SYN_SENT has localPort 0 (the kernel picks it just after); keep a known one.
    if (!row.localPort && old?.localPort) row.localPort = old.localPort;
    traffic(row, ev, old || node.former?.get(key), store.snapshotDone, now);
    node.conns.set(key, row);
    store.dirty.conn = true;
    store.loadRows++;
    if (!isLoopback(ev.remoteIP)) store.dirty.ips = true; // "every IP seen" includes remote peers
  },
  "dns.resolved"(store, node, ev) {
    let names = node.dns.get(ev.ip);
    if (!names) node.dns.set(ev.ip, (names = new Map()));
    names.set(ev.hostname, ev);
    store.markAll();
  },
  "dns.expired"(store, node, ev) {
    const names = node.dns.get(ev.ip);
    if (!names) return;
    names.delete(ev.hostname);
    if (!names.size) node.dns.delete(ev.ip);
    store.markAll();
  },
  "dns.failed"(store, node, ev, now) {
    const key = `${ev.clientIP}|${ev.name}`;
    node.dnsFailed.delete(key); // to the end: the least recently received goes first
    if (node.dnsFailed.size >= DNS_FAILED_MAX) node.dnsFailed.delete(node.dnsFailed.keys().next().value);
    const at = Date.parse(ev.timestamp);
    node.dnsFailed.set(key, { ...ev, id: `${node.name}|${key}`, node: node.name, at: Number.isNaN(at) ? now : at });
    store.dirty.dns = true;
  },
};

// A connection row's traffic fields, from its event and its previous row (prior, if any):
// - the counters, the latest totals (an event without them keeps the prior ones), and `rtt` (µs; null
//   when never measured: rttUs 0);
// - `rate`: bytes/s, sent and received, between the last two samples (events whose byte totals
//   changed: rate = change / time between their timestamps); null until there are two. A live event
//   with the same totals and a later timestamp is a sample too (nothing moved: 0 B/s), but not a
//   snapshot's (live: false), which only sends the latest state again;
// - `failed`: isFailed(), and `failure`, what the Error column says.
export function traffic(row, ev, prior, live, now) {
  if (prior) {
    for (const f of COUNTERS) if (row[f] === undefined && prior[f] !== undefined) row[f] = prior[f];
    if (!row.error && prior.error) row.error = prior.error;
    if (!row.reset && prior.reset) row.reset = prior.reset;
  }
  row.rtt = row.rttUs > 0 ? row.rttUs : null;
  row.rate = prior?.rate ?? null;
  row._sample = prior?._sample ?? null; // {at: timestamp ms, bytes, seen: when received, dt: ms since the one before}
  if (typeof ev.bytesSent === "number" || typeof ev.bytesReceived === "number") {
    const bytes = (row.bytesSent || 0) + (row.bytesReceived || 0);
    const parsed = Date.parse(ev.timestamp);
    const at = Number.isNaN(parsed) ? now : parsed;
    const last = row._sample;
    if (!last || bytes < last.bytes) {
      row._sample = { at, bytes, seen: now, dt: 0 };
      row.rate = null;
    } else if (at > last.at && (bytes !== last.bytes || live)) {
      row.rate = ((bytes - last.bytes) * 1000) / (at - last.at);
      row._sample = { at, bytes, seen: now, dt: at - last.at };
    }
  }
  // TCP: whether the handshake ever completed (its states, or counters only a connection has)
  if (row.protocol === "TCP") {
    row._up =
      !!prior?._up ||
      ESTABLISHED_STATES.has(row.state) ||
      (ev.states || []).some((s) => ESTABLISHED_STATES.has(s)) ||
      row.bytesSent > 0 ||
      row.bytesReceived > 0 ||
      row.rttUs > 0;
  }
  row.failed = isFailed(row);
  row.failure = failureText(row);
}

// A failed connection (the "failed only" filter, the red rows): it ended with an error or a reset, or a
// TCP connection closed without ever reaching ESTABLISHED.
export function isFailed(r) {
  return !!(r.error || r.reset || neverEstablished(r));
}

// A TCP close before the handshake completed. Not a close the agent did not see (closeReason "gone":
// the transitions it missed may be the ones that established it).
function neverEstablished(r) {
  return r.protocol === "TCP" && !!r.closedAt && !r._up && r.closeReason !== "gone";
}

// The Error column: the error's name, "reset sent" / "reset received", or "not established" for a TCP
// connection that closed before its handshake completed with no error (its application gave up first).
function failureText(r) {
  const parts = [];
  if (r.error) parts.push(r.error);
  if (r.reset) parts.push(`reset ${r.reset}`);
  if (!parts.length && neverEstablished(r)) parts.push("not established");
  return parts.join(", ");
}

// counts.get(key) += n, from 0
export function tally(counts, key, n = 1) {
  counts.set(key, (counts.get(key) || 0) + n);
}

function newLeft() {
  return { rows: 0, laterEvents: 0, byNamespace: new Map(), byNode: new Map(), version: 0 };
}
