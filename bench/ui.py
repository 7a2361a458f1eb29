#!/usr/bin/env python3
"""Web UI under load (issues 5, 16 and 17): 50k connection rows, then 5k updates/s, in Chromium.

The agent's own hub and HTTP app (hub.py, api/app.py: the UI files, /netstat with its snapshot and
subscriptions) serve generated state, built before the page loads as an agent's is: 5 nodes' pods,
host IPs and DNS names (`host.info` per node, as a multiplexer sends several), --rows
`connection.event`s, then --rate live events/s in 50 ms batches (state changes, counter refreshes,
new connections, closes; opens and closes balance, so the table stays at about --rows live
connections plus those lingering). Traffic as docs/protocol.md has it: most live TCP connections and
every UDP flow carry their counters (heavy-tailed totals), refreshed (`states: []`) by a fifth of the
live events, which gives their rows a Rate; closes carry final counters; a few connects are refused
or time out, a few connections end with a reset (the red "failed" rows). With --mux, the generated
state is one node's, and the page talks to a `netstatd mux` process in front of it (its first client
opens the upstream).

Headless Chromium (Debian's, the tests' launch arguments) opens the Connections view and the page
records, from an init script:

- first screen: from navigation to the first row in the grid, with where the time went (the socket
  opened, the first frame of rows received);
- frame times: gaps between requestAnimationFrame callbacks over --seconds of live updates
  (p50/p95/p99/max), and long tasks (PerformanceObserver);
- filter response: text typed into a filter until the grid's rows on screen all match (checked at
  each change of the grid's DOM, timed at the end of that frame's main-thread work), and cleared
  until rows the filter had hidden are back, --reps times each. Search is the page's own filter; Port
  and Namespace are also the subscription, so a change is a round trip to the server (at once for
  Port, after a pause in the typing for Namespace, and at once whenever the filter is widened): each
  change waits until the subscription is in force, so clearing measures the widening's round trip.

    .venv/bin/python bench/ui.py [--rows 50000] [--rate 5000] [--seconds 20] [--reps 10] [--json PATH]
                                 [--sort FIELD:DIR] [--web-dir DIR] [--mux]

--sort opens the view sorted (e.g. pid:asc); --web-dir serves the UI files
from another copy of src/netstatd/web (e.g. an older commit's, for a
before/after comparison: git archive COMMIT src/netstatd/web | tar -x -C /tmp/old).

No root needed; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from netstatd.api.app import UI_HEADERS, WEB_TYPES, build_app
from netstatd.hub import Hub
from netstatd.protocol import (
    TCP_CLOSE_WAIT,
    TCP_ESTABLISHED,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    TCP_LAST_ACK,
    TCP_STATES,
    TCP_SYN_SENT,
)
from netstatd.testing.agent import MuxProcess, free_port

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
CHROMIUM = "/usr/bin/chromium"
# The tests' arguments (tests/integration/test_web_ui.py): the browser reaches nothing but 127.0.0.1.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
BATCH_MS = 50  # the agent's coalescing window: one WebSocket frame per 50 ms
MAX_ARRAY = 2000  # events per frame at most (docs/protocol.md)
TARGET_P95_FRAME_MS = 50
TARGET_FILTER_MS = 100  # a filter applied in the page
TARGET_RESUBSCRIBE_MS = 300  # one that needs the server's rows (Port and Namespace widened: cleared)
FILTER_PORT = 5432  # one of the service ports below: about 1 row in 12 has it
FILTER_SEARCH = "payments"  # a namespace and pod name: 1 pod in 16
FILTER_NAMESPACE = "payments"  # the same namespace in the Namespace filter, which the server applies too

NODES = [f"node-{i}" for i in range(1, 6)]
NAMESPACES = ["default", "kube-system", "shop", "payments", "monitoring", "ingress", "batch", "auth"]
APPS = ["web", "api", "cart", "db", "cache", "worker", "proxy", "metrics"]
EXES = [
    ("/usr/bin/python3.11", "python3"),
    ("/usr/local/bin/envoy", "envoy"),
    ("/usr/bin/curl", "curl"),
    ("/usr/sbin/nginx", "nginx"),
    ("/usr/local/bin/node", "node"),
    ("/app/server", "server"),
    ("/usr/bin/java", "java"),
    ("/usr/lib/postgresql/15/bin/postgres", "postgres"),
    ("/usr/bin/kubelet", "kubelet"),
    ("/usr/bin/containerd", "containerd"),
]
SERVICE_PORTS = [80, 443, 8080, 5432, 6379, 9090, 53, 3306, 8443, 9200, 2379, 10250]
HOSTNAMES = ["api.github.com", "s3.amazonaws.com", "registry.k8s.io", "example.com", "pypi.org", "auth0.com"]
TCP_OPEN = [TCP_STATES[s] for s in (TCP_SYN_SENT, TCP_ESTABLISHED)]
TCP_CHANGES = [TCP_STATES[s] for s in (TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_LAST_ACK)]
WITH_COUNTERS = 0.7  # live TCP connections of the snapshot that have had their counters refreshed
FAILED_CONNECTS = 0.03  # of the live opens: a connect refused or timed out (one event, SYN_SENT -> CLOSE)
RESETS = 0.03  # of the closes of TCP connections: a reset, sent or received
CONNECT_ERRORS = ["ECONNREFUSED", "ECONNREFUSED", "ETIMEDOUT", "EHOSTUNREACH"]


def now_ts() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def p(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))], 2)

    mean = round(sum(v) / len(v), 2)
    return {"n": len(v), "p50": p(0.50), "p95": p(0.95), "p99": p(0.99), "max": round(v[-1], 2), "mean": mean}


class Cluster:
    """Five nodes with pods, host IPs, DNS names, and their connections (deterministic: seeded)."""

    def __init__(self, rows: int, nodes: list[str] = NODES, seed: int = 5) -> None:
        self.node_names = nodes
        self.rnd = random.Random(seed)
        self.cookie = 1 << 40
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        for n, node in enumerate(nodes):
            host_ips = [f"10.0.0.{n + 10}", f"fd00::{n + 10:x}"]
            self.nodes[node] = {"hostIPs": host_ips, "pods": []}
            for i in range(24):
                ns = NAMESPACES[(n + i) % len(NAMESPACES)]
                app = APPS[i % len(APPS)]
                name = f"{ns}-{app}-{i:02d}" if ns != "payments" else f"payments-{app}-{i:02d}"
                pod = {
                    "node": node,
                    "namespace": ns,
                    "podName": name,
                    "podUID": f"uid-{node}-{i}",
                    "containerId": f"{n:02d}{i:02d}".ljust(64, "a"),
                    "containerName": app,
                    "ips": [f"10.244.{n}.{i + 2}", f"fd00:244:{n}::{i + 2:x}"],
                    "netns": 4026532000 + n * 100 + i,
                }
                self.nodes[node]["pods"].append(pod)
                self.pods.append(pod)
        self.externals = [f"93.184.{i}.{j}" for i in range(4) for j in range(1, 60)]
        self.externals6 = [f"2606:4700::{i:x}" for i in range(1, 120)]
        self.dns = {ip: HOSTNAMES[i % len(HOSTNAMES)] for i, ip in enumerate(self.externals[:100])}
        # live connections per node: key -> event (the last one sent)
        self.conns: dict[str, dict[str, dict[str, Any]]] = {node: {} for node in nodes}
        self.keys: list[tuple[str, str]] = []  # (node, key) of open connections, for picking at random
        for _ in range(rows):
            ev = self.open()
            if ev["protocol"] == "UDP" or self.rnd.random() < WITH_COUNTERS:
                self.count(ev)

    def inventory(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        ts = now_ts()
        for node, info in self.nodes.items():
            out.append(
                {
                    "type": "host.info",
                    "timestamp": ts,
                    "nodeName": node,
                    "hostIPs": info["hostIPs"],
                    "version": "bench",
                    "kernelRelease": "6.1.0",
                    "captureTCP": True,
                    "captureUDP": True,
                    "loopback": False,
                }
            )
        for node, info in self.nodes.items():
            for ip in info["hostIPs"]:
                fam = "IPv6" if ":" in ip else "IPv4"
                out.append(
                    {"type": "ip.added", "timestamp": ts, "nodeName": node, "ip": ip, "family": fam, "kind": "host"}
                    | {"interface": "eth0", "source": "interface", "podName": None, "namespace": None, "podUID": None}
                    | {"usesHostNetwork": False}
                )
            for p in info["pods"]:
                out.append(
                    {"type": "container.added", "timestamp": ts, "nodeName": node, "containerId": p["containerId"]}
                    | {"name": f"{p['namespace']}/{p['podName']}/{p['containerName']}", "podName": p["podName"]}
                    | {"namespace": p["namespace"], "podUID": p["podUID"], "containerName": p["containerName"]}
                    | {"image": "registry.example/app:1", "labels": {"app": p["containerName"]}}
                    | {"usesHostNetwork": False, "podIPs": p["ips"], "netns": p["netns"]}
                )
                for ip in p["ips"]:
                    fam = "IPv6" if ":" in ip else "IPv4"
                    out.append(
                        {"type": "ip.added", "timestamp": ts, "nodeName": node, "ip": ip, "family": fam, "kind": "pod"}
                        | {"interface": None, "source": "cri", "podName": p["podName"], "namespace": p["namespace"]}
                        | {"podUID": p["podUID"], "usesHostNetwork": False}
                    )
        for ip, name in self.dns.items():
            out.append(
                {"type": "dns.resolved", "timestamp": ts, "nodeName": self.node_names[0], "ip": ip, "hostname": name}
                | {"aliases": [], "ttl": 300, "clientIP": "10.244.0.2"}
            )
        return out

    def _remote(self, v6: bool) -> tuple[str, dict[str, Any] | None]:
        r = self.rnd.random()
        if r < 0.45:  # another pod, anywhere in the cluster
            pod = self.rnd.choice(self.pods)
            return pod["ips"][1 if v6 else 0], pod
        if r < 0.65:  # a node
            info = self.nodes[self.rnd.choice(self.node_names)]
            return info["hostIPs"][1 if v6 else 0], None
        return (self.rnd.choice(self.externals6) if v6 else self.rnd.choice(self.externals)), None

    def open(self, states: list[str] | None = None) -> dict[str, Any]:
        rnd = self.rnd
        node = rnd.choice(self.node_names)
        info = self.nodes[node]
        v6 = rnd.random() < 0.2
        udp = rnd.random() < 0.15
        on_host = rnd.random() < 0.25
        pod = None if on_host else rnd.choice(info["pods"])
        local_ip = info["hostIPs"][1 if v6 else 0] if on_host else pod["ips"][1 if v6 else 0]
        remote_ip, rpod = self._remote(v6)
        outbound = rnd.random() < 0.6
        service = rnd.choice(SERVICE_PORTS)
        ephemeral = rnd.randrange(32768, 61000)
        exe, comm = rnd.choice(EXES)
        self.cookie += rnd.randrange(1, 50)
        state = "ACTIVE" if udp else ("ESTABLISHED" if states is None else states[-1])
        ev: dict[str, Any] = {
            "type": "connection.event",
            "timestamp": now_ts(),
            "nodeName": node,
            "protocol": "UDP" if udp else "TCP",
            "family": "IPv6" if v6 else "IPv4",
            "state": state,
            "states": [state] if (udp or states is None) else states,
            "localIP": local_ip,
            "localPort": ephemeral if outbound else service,
            "remoteIP": remote_ip,
            "remotePort": service if outbound else ephemeral,
            "pid": rnd.randrange(300, 400000),
            "exe": exe,
            "comm": comm,
            "netns": 4026531840 if on_host else pod["netns"],
            "sockCookie": self.cookie,
            "direction": "outbound" if outbound else "inbound",
            "host": on_host,
        }
        if pod:
            ev |= {"containerId": pod["containerId"], "containerName": pod["containerName"]}
            ev |= {"podName": pod["podName"], "namespace": pod["namespace"], "podUID": pod["podUID"]}
            ev["usesHostNetwork"] = False
        if rpod and rpod["node"] == node:
            ev |= {"remotePodName": rpod["podName"], "remoteNamespace": rpod["namespace"]}
            ev["remotePodUID"] = rpod["podUID"]
        if remote_ip in self.dns and rnd.random() < 0.7:
            ev["remoteHostname"] = self.dns[remote_ip]
        key = f"{ev['sockCookie']}|{remote_ip}|{ev['remotePort']}" if udp else str(ev["sockCookie"])
        self.conns[node][key] = ev
        self.keys.append((node, key))
        return ev

    def count(self, ev: dict[str, Any]) -> None:
        """Sets (or grows) ev's counters, as the agent's refreshes and closes carry them: totals."""
        rnd = self.rnd
        if "bytesSent" in ev:  # grown since: a few kB on most, a lot on a few
            sent = ev["bytesSent"] + int(rnd.paretovariate(1.3) * 800)
            received = ev["bytesReceived"] + int(rnd.paretovariate(1.3) * 2500)
        else:  # heavy-tailed totals: most connections small, a few top talkers (up to GBs)
            sent = int(rnd.paretovariate(1.1) * 300)
            received = int(rnd.paretovariate(1.1) * 1200)
        ev["bytesSent"], ev["bytesReceived"] = sent, received
        if ev["protocol"] == "UDP":
            ev["packetsSent"] = max(1, sent // 200)
            ev["packetsReceived"] = max(1, received // 400)
            return
        ev["segmentsSent"] = 3 + sent // 1400 + received // 2800
        ev["segmentsReceived"] = 2 + received // 1400 + sent // 2800
        ev["rttUs"] = int(rnd.lognormvariate(6.5, 1.3))  # ~0.7 ms median, tens of ms for external peers
        ev["retransmits"] = ev.get("retransmits", 0) + (rnd.random() < 0.05)

    def fail_connect(self, ev: dict[str, Any]) -> None:
        """A new connection's connect refused or timed out: its open and close in one event."""
        ev["state"] = "CLOSE"
        ev["states"] = ["SYN_SENT", "CLOSE"]
        ev["error"] = self.rnd.choice(CONNECT_ERRORS)
        retries = 2 if ev["error"] == "ETIMEDOUT" else 0
        ev |= {"bytesSent": 0, "bytesReceived": 0, "segmentsSent": 1 + retries, "segmentsReceived": int(retries == 0)}
        ev |= {"rttUs": 0, "retransmits": retries}

    def _pick(self) -> tuple[str, str, dict[str, Any]] | None:
        # swap-remove picking keeps this O(1); keys of connections already closed are skipped
        while self.keys:
            i = self.rnd.randrange(len(self.keys))
            node, key = self.keys[i]
            ev = self.conns[node].get(key)
            if ev is not None:
                return node, key, ev
            self.keys[i] = self.keys[-1]
            self.keys.pop()
        return None

    def update(self, count: int) -> list[dict[str, Any]]:
        """count live events: 20% state changes (or UDP refreshes), 20% counter refreshes, 30% opens (a
        few of them failed connects), 30% closes (with their counters; a few with a reset)."""
        out = []
        ts = now_ts()
        rnd = self.rnd
        for _ in range(count):
            r = rnd.random()
            if r < 0.3:
                states = None if rnd.random() < 0.5 else TCP_OPEN
                ev = self.open(states)
                if ev["protocol"] == "TCP" and rnd.random() < FAILED_CONNECTS:
                    self.fail_connect(ev)
                    del self.conns[ev["nodeName"]][str(ev["sockCookie"])]
                out.append(ev)
                continue
            picked = self._pick()
            if picked is None:
                continue
            node, key, old = picked
            ev = dict(old, timestamp=ts)
            if r < 0.5:
                if ev["protocol"] == "TCP":
                    ev["state"] = rnd.choice(TCP_CHANGES)
                    ev["states"] = [ev["state"]]
                else:
                    ev["states"] = ["ACTIVE"]
                    self.count(ev)
                self.conns[node][key] = ev
            elif r < 0.7:
                self.count(ev)
                self.conns[node][key] = dict(ev, states=[ev["state"]])  # as a snapshot would send it
                ev["states"] = []  # a refresh of the counters only
            else:
                tcp = ev["protocol"] == "TCP"
                ev["states"] = ["FIN_WAIT1", "FIN_WAIT2", "CLOSE"] if tcp else ["CLOSE"]
                ev["state"] = "CLOSE"
                if tcp:
                    self.count(ev)
                    if rnd.random() < RESETS:
                        ev["states"] = ["CLOSE"]
                        ev["reset"] = rnd.choice(["sent", "received"])
                        if ev["reset"] == "received":
                            ev["error"] = "ECONNRESET"
                del self.conns[node][key]
            out.append(ev)
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        return [ev for conns in self.conns.values() for ev in conns.values()]


class Server:
    """The agent's own hub and HTTP app (hub.py, api/app.py) over the generated cluster, on an event loop
    in a thread: the snapshot and the subscriptions are served by the real code. With mux=True the
    cluster is one node, and the page talks to a `netstatd mux` process in front of it."""

    def __init__(self, rows: int, rate: int, web_dir: Path | None = None, mux: bool = False) -> None:
        self.web_dir = web_dir
        self.rate = rate
        self.cluster = Cluster(rows, NODES[:1] if mux else NODES)  # before serving: an agent has its state
        self.port = free_port()
        self.mux = MuxProcess(agents_port=self.port) if mux else None
        self.sent_live = 0
        self.late_batches = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="ui-bench-server", daemon=True)

    @property
    def url(self) -> str:
        return self.mux.url if self.mux else f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the bench's node did not start")
        if self.mux:
            self.mux.start()
        return self

    def stop(self) -> None:
        if self.mux:
            self.mux.stop()
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    def _host_info(self) -> dict[str, Any]:
        node = self.cluster.node_names[0]
        info = self.cluster.nodes[node]
        return {"type": "host.info", "timestamp": now_ts(), "nodeName": node, "hostIPs": info["hostIPs"]} | {
            "version": "bench", "captureTCP": True, "captureUDP": True, "loopback": False
        }  # fmt: skip

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # the served node's host.info comes first (build_app sends it), not in its snapshot
        first = self.cluster.node_names[0]
        inventory = [e for e in self.cluster.inventory() if (e["type"], e["nodeName"]) != ("host.info", first)]
        hub = Hub(self.cluster.node_names[0], lambda: [*inventory, *self.cluster.snapshot()], now_ts)
        app = build_app(hub, self._host_info, lambda: [], lambda pid: None)
        if self.web_dir:
            app.middlewares.append(self._web_dir_files)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        per_batch = max(1, round(self.rate * BATCH_MS / 1000))
        tick = time.monotonic()
        while not self._stop.is_set():
            tick += BATCH_MS / 1000
            delay = tick - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.late_batches += 1
            batch = self.cluster.update(per_batch)
            hub.publish(batch)
            self.sent_live += len(batch)
        await runner.cleanup()

    @web.middleware
    async def _web_dir_files(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """--web-dir: the page and its files from that directory, everything else from the app."""
        assert self.web_dir
        if request.path == "/":
            path = self.web_dir / "index.html"
        elif request.path.startswith("/web/"):
            path = (self.web_dir / request.path.removeprefix("/web/")).resolve()
            if not path.is_relative_to(self.web_dir.resolve()) or not path.is_file():
                raise web.HTTPNotFound()
        else:
            return await handler(request)
        content_type = WEB_TYPES.get(path.suffix, "text/plain")
        return web.Response(body=path.read_bytes(), content_type=content_type, headers=UI_HEADERS)


# Installed before the page's own scripts: frame timestamps (rAF), long tasks, and the time of the
# latest input event on a filter (event.timeStamp: when the browser received the input, so a busy
# main thread that delays the handler counts against the UI).
INIT_SCRIPT = """
(() => {
  const B = (window.__bench = { frames: [], longtasks: [], recording: false, lastInput: 0, inFrame: false });
  // inFrame: true from the first rAF callback of a frame until the end of that frame's task
  const endOfFrame = new MessageChannel();
  endOfFrame.port1.onmessage = () => { B.inFrame = false; };
  const tick = (t) => {
    B.inFrame = true;
    endOfFrame.port2.postMessage(0);
    if (B.recording) B.frames.push(t);
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
  try {
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) if (B.recording) B.longtasks.push(e.duration);
    }).observe({ type: "longtask", buffered: false });
  } catch (e) { B.noLongtask = String(e); }
  document.addEventListener("input", (e) => { B.lastInput = e.timeStamp; }, true);
  // Where the first screen's time goes (ms since navigation): the socket created and open, the first
  // frame with connections received, the first row in the grid.
  B.load = {};
  document.addEventListener("DOMContentLoaded", () => { B.load.domContentLoaded = performance.now(); });
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      B.load.socketCreated ??= performance.now();
      this.addEventListener("open", () => { B.load.socketOpen ??= performance.now(); });
      this.addEventListener("message", (m) => {
        if (B.load.firstRowsReceived == null && m.data.includes('"connection.event"')) {
          B.load.firstRowsReceived = performance.now();
        }
      });
    }
  };
  new MutationObserver((_, observer) => {
    if (document.querySelector("#grid-conn .tabulator-row")) {
      B.load.firstRowShown = performance.now();
      observer.disconnect();
    }
  }).observe(document, { subtree: true, childList: true });
})();
"""

# Arms a watch for the grid showing what a filter change should show: at every change of the grid's
# DOM (MutationObserver) after the next input event, the rows on screen are checked. Once they all
# pass (mode "match"), or once the view has a row that does not (mode "clear": after a
# re-subscription, one the server sent), the time is taken at the end of the frame that paints them:
# a MessageChannel message marks the end of the current task if the change was made during a frame
# (a requestAnimationFrame callback: style, layout and paint follow in the same task), else of the
# next frame's task.
# Result in __bench.filterMs: ms from the input event's timeStamp, or -1 after 10 s.
ARM_WATCH = """
([field, value, mode]) => {
  const B = window.__bench;
  const armedAt = performance.now();
  B.filterMs = null;
  const grid = document.getElementById("grid-conn");
  const cells = (row, f) =>
    [...row.querySelectorAll(`.tabulator-cell[tabulator-field="${f}"]`)].map((c) => c.textContent);
  const has = (row) =>
    field === "port"
      ? cells(row, "localPort").includes(value) || cells(row, "remotePort").includes(value)
      : row.textContent.toLowerCase().includes(value);
  // a row of the view (on screen or below the fold) that the filter hides: what clearing it brings back
  const hidden = (r) =>
    field === "port" ? r.localPort !== +value && r.remotePort !== +value : !r._text?.includes(value);
  const channel = new MessageChannel();
  let done = false;
  const finish = (ms) => {
    if (done) return;
    done = true;
    observer.disconnect();
    B.filterMs = ms;
  };
  channel.port1.onmessage = () => finish(performance.now() - B.lastInput);
  const observer = new MutationObserver(() => {
    if (done || B.lastInput <= armedAt) return;
    const rows = [...grid.querySelectorAll(".tabulator-row")];
    const ok = mode === "match" ? rows.length > 0 && rows.every(has) : window.netstatd.grids.conn.all.some(hidden);
    if (!ok) return;
    if (B.inFrame) channel.port2.postMessage(0);
    else requestAnimationFrame(() => channel.port2.postMessage(0));
  });
  observer.observe(grid, { subtree: true, childList: true, characterData: true });
  setTimeout(() => finish(-1), 10000);
}
"""


def frame_stats(frames: list[float], longtasks: list[float], seconds: float) -> dict[str, Any]:
    gaps = [b - a for a, b in itertools.pairwise(frames)]
    return {
        "frames": len(frames),
        "fps": round(len(frames) / seconds, 1),
        "gap_ms": percentiles(gaps),
        "gaps_over_50ms": sum(g > 50 for g in gaps),
        "gaps_over_100ms": sum(g > 100 for g in gaps),
        "longtasks": {"count": len(longtasks), "total_ms": round(sum(longtasks)), **percentiles(longtasks)},
    }


def measure_filter(page, name: str, field: str, value: str, reps: int) -> dict[str, Any]:
    selector = f'input[name="conn.{name}"]'
    applied, cleared = [], []
    for _ in range(reps):
        for text, mode, out in ((value, "match", applied), ("", "clear", cleared)):
            page.evaluate(ARM_WATCH, [field, value.lower(), mode])
            page.fill(selector, text)
            page.wait_for_function("window.__bench.filterMs !== null", polling=50, timeout=15_000)
            out.append(page.evaluate("window.__bench.filterMs"))
            # the subscription in force before the next change (the page sends a typed one once the
            # typing pauses for 0.4 s): clearing then measures a widening, not a race with a snapshot
            page.wait_for_timeout(500)
            page.wait_for_function("!window.netstatd.store.loading", polling=50, timeout=15_000)
    failed = sum(t < 0 for t in applied + cleared)
    return {
        "filter": f"conn.{name}={value}",
        "apply_ms": percentiles([t for t in applied if t >= 0]),
        "clear_ms": percentiles([t for t in cleared if t >= 0]),
        "timeouts": failed,
        "applied": [round(t, 1) for t in applied],
        "cleared": [round(t, 1) for t in cleared],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    server = Server(args.rows, args.rate, args.web_dir, args.mux).start()
    result: dict[str, Any] = {
        "rows": args.rows,
        "rate_per_s": args.rate,
        "batch_ms": BATCH_MS,
        "seconds": args.seconds,
        "sort": args.sort,
        "web_dir": str(args.web_dir) if args.web_dir else "package",
        "served_by": "netstatd mux, one node behind it" if args.mux else "the node's hub",
        "when": now_ts(),
        "targets": {
            "p95_frame_ms": TARGET_P95_FRAME_MS,
            "filter_ms": TARGET_FILTER_MS,
            "resubscribe_ms": TARGET_RESUBSCRIBE_MS,
        },
    }
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            result["browser"] = browser.version
            # bypass_csp: Playwright's wait_for_function polls with eval(), which the page's CSP forbids
            context = browser.new_context(viewport={"width": 1600, "height": 900}, bypass_csp=True)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.add_init_script(INIT_SCRIPT)
            t0 = time.monotonic()
            page.goto(server.url + "/?view=conn" + (f"&conn.sort={args.sort}" if args.sort else ""))
            page.wait_for_selector("#grid-conn .tabulator-row", timeout=120_000)
            # first screen: from the page's navigation to the first row in the grid (the page's own clock:
            # Playwright's polling lags behind a page busy taking the snapshot); how long the wait took here
            load = page.evaluate("window.__bench.load")
            result["first_screen_ms"] = {k: round(v) for k, v in load.items()}
            result["first_screen_s"] = round(load["firstRowShown"] / 1000, 2)
            result["first_screen_seen_by_playwright_s"] = round(time.monotonic() - t0, 2)
            page.wait_for_function(
                "n => window.netstatd?.store.snapshotDone && "
                "+document.getElementById('status-rows').textContent.split(' of ')[0].replace(/,/g, '') >= n",
                arg=args.rows,
                timeout=120_000,
                polling=100,
            )
            result["snapshot_shown_s"] = round(time.monotonic() - t0, 2)
            page.wait_for_timeout(2000)  # let the first live batches settle in

            events0 = page.evaluate("window.netstatd.store.eventCount")
            page.evaluate("window.__bench.frames = []; window.__bench.longtasks = []; window.__bench.recording = true")
            t1 = time.monotonic()
            page.wait_for_timeout(args.seconds * 1000)
            bench = page.evaluate("(() => { window.__bench.recording = false; return window.__bench; })()")
            elapsed = time.monotonic() - t1
            events1 = page.evaluate("window.netstatd.store.eventCount")
            result["updates"] = frame_stats(bench["frames"], bench["longtasks"], elapsed)
            result["updates"]["events_per_s_received"] = round((events1 - events0) / elapsed)
            result["updates"]["rows_status"] = page.inner_text("#status-rows")
            if bench.get("noLongtask"):
                result["updates"]["longtask_error"] = bench["noLongtask"]

            # filter response, with the updates still flowing; frames recorded meanwhile too
            page.evaluate("window.__bench.frames = []; window.__bench.longtasks = []; window.__bench.recording = true")
            t2 = time.monotonic()
            result["filters"] = [
                measure_filter(page, "port", "port", str(FILTER_PORT), args.reps),
                measure_filter(page, "q", "q", FILTER_SEARCH, args.reps),
                measure_filter(page, "ns", "q", FILTER_NAMESPACE, args.reps),
            ]
            bench = page.evaluate("(() => { window.__bench.recording = false; return window.__bench; })()")
            result["while_filtering"] = frame_stats(bench["frames"], bench["longtasks"], time.monotonic() - t2)
            result["page_errors"] = errors
            browser.close()
    finally:
        server.stop()
    result["server"] = {
        "live_events_sent": server.sent_live,
        "late_batches": server.late_batches,
    }
    p95 = result["updates"]["gap_ms"].get("p95", 1e9)
    # Search is the page's own both ways; Port and Namespace cleared widen the subscription
    search = next(f for f in result["filters"] if f["filter"].startswith("conn.q="))
    in_page = [f["apply_ms"] for f in result["filters"]] + [search["clear_ms"]]
    resubscribed = [f["clear_ms"] for f in result["filters"] if f is not search]
    filt = max(t.get("p95", 1e9) for t in in_page)
    resub = max(t.get("p95", 1e9) for t in resubscribed)
    result["verdict"] = {
        "p95_frame_ms": p95,
        "p95_filter_ms": filt,
        "p95_resubscribe_ms": resub,
        "frames_ok": p95 < TARGET_P95_FRAME_MS,
        "filter_ok": filt < TARGET_FILTER_MS and resub < TARGET_RESUBSCRIBE_MS,
    }
    return result


def summary(r: dict[str, Any]) -> str:
    u = r["updates"]
    g = u["gap_ms"]
    lines = [
        f"{r['rows']:,} rows, {r['rate_per_s']:,} updates/s ({u['events_per_s_received']:,}/s received), "
        f"{r['seconds']} s, sort {r['sort'] or 'none'}, UI from {r['web_dir']}; "
        f"first screen after {r['first_screen_s']} s, snapshot shown after {r['snapshot_shown_s']} s",
        f"frame gaps ms: p50 {g['p50']} p95 {g['p95']} p99 {g['p99']} max {g['max']} "
        f"({u['fps']} fps, {u['gaps_over_50ms']} gaps > 50 ms)",
        f"long tasks: {u['longtasks']['count']}, {u['longtasks']['total_ms']} ms in total"
        + (f", p95 {u['longtasks']['p95']} ms" if u["longtasks"]["count"] else ""),
    ]
    for f in r["filters"]:
        a, c = f["apply_ms"], f["clear_ms"]
        lines.append(
            f"filter {f['filter']}: apply p50 {a.get('p50')} p95 {a.get('p95')} max {a.get('max')} ms; "
            f"clear p50 {c.get('p50')} p95 {c.get('p95')} ms; timeouts {f['timeouts']}"
        )
    w = r["while_filtering"]["gap_ms"]
    lines.append(f"frame gaps while filtering: p50 {w.get('p50')} p95 {w.get('p95')} max {w.get('max')} ms")
    v = r["verdict"]
    lines.append(
        f"targets: p95 frame < {TARGET_P95_FRAME_MS} ms: {'MET' if v['frames_ok'] else 'MISSED'}; "
        f"filter p95 {v['p95_filter_ms']} ms in the page (< {TARGET_FILTER_MS}), {v['p95_resubscribe_ms']} ms "
        f"re-subscribed (< {TARGET_RESUBSCRIBE_MS}): {'MET' if v['filter_ok'] else 'MISSED'}"
    )
    if r["page_errors"]:
        lines.append(f"page errors: {r['page_errors'][:3]}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--rate", type=int, default=5_000, help="live events per second")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--reps", type=int, default=10, help="filter changes per filter")
    ap.add_argument("--json", type=Path, default=OUT / "ui.json")
    ap.add_argument("--sort", help="open the view sorted by a column, e.g. pid:asc")
    ap.add_argument("--web-dir", type=Path, help="serve the UI from this directory instead of the package")
    ap.add_argument("--mux", action="store_true", help="the page talks to `netstatd mux`, with one node behind it")
    args = ap.parse_args()
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"wrote {args.json}")
    return 0 if result["verdict"]["frames_ok"] and result["verdict"]["filter_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
