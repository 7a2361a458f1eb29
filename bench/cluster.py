#!/usr/bin/env python3
"""Cluster scale (issue 16): the standalone multiplexer over many simulated nodes and a few real agents.

The real agents run on test hosts (network namespaces on one bridge: testing/cluster.py). The
simulated nodes are worker processes on the same bridge, one address each, that serve the agent's
wire protocol with the agent's own code: a Hub and build_app (api/app.py) over generated state, so
they honour subscriptions exactly as an agent does. Each node holds --connections connections of
pods in 41 namespaces, with listening ports, containers, pod IPs and DNS names; the namespace
`payments` holds about 2% of the rows. Each sends --rate events/s (a close and an open, keeping its
size). The headless Service's DNS name lists every node. `netstatd mux` runs as nobody in a host of
its own (its own netns, the cluster DNS in its resolv.conf).

In one run, from the switch namespace:
1. a client of one namespace (`?namespace=payments`): time to snapshot.complete, rows held, bytes
   received in the first --seconds, and the bytes the nodes sent the mux meanwhile (push-down);
2. the same client in Chromium (unless --no-browser): time from page load to the first screen of
   rows, and the frame time p95 over --seconds;
3. an unfiltered client, the same measures, and in Chromium what the page holds, its frame times and
   what it tells the user (the subscription is too wide for it: docs/ui.md);
and the mux's RSS and CPU in each phase.

    sudo .venv/bin/python bench/cluster.py [--nodes 200] [--connections 5000] [--rate 50] [--seconds 30]
                                           [--agents 3] [--no-browser] [--json bench/out/cluster.json]
    make bench-cluster NODES=200 CONNECTIONS=5000
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from harness import OUT, git, interrupted, prepare
from live import status_kib
from ui import percentiles

from netstatd.api.access import AccessPolicy, HostNames
from netstatd.api.app import build_app
from netstatd.hub import Hub
from netstatd.protocol import WallClock
from netstatd.testing.agent import MuxProcess
from netstatd.testing.cluster import HEADLESS, NODE_PORT, Cluster, in_netns
from netstatd.testing.stream import StreamClient

MUX_PORT = 6280
NAMESPACE = "payments"  # the one-namespace client's
SHARE = 0.02  # of every node's rows in NAMESPACE
OTHER_NAMESPACES = [f"team-{i:02d}" for i in range(40)]
APPS = ["api", "web", "worker", "cache", "db", "queue"]
PODS_PER_NAMESPACE = 4
WORKERS = 8
PROBE_EVERY_S = 1.0
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--bounding-set=-all"]


# -- a simulated node: generated state behind the agent's own hub and HTTP app --------------------------


class SimNode:
    def __init__(self, name: str, ip: str, connections: int, seed: int) -> None:
        self.name, self.ip = name, ip
        self.rnd = random.Random(seed)
        self.clock = WallClock()
        self.cookie = 1
        self.pods: list[dict[str, Any]] = []
        for n, ns in enumerate([NAMESPACE, *OTHER_NAMESPACES]):
            for k in range(PODS_PER_NAMESPACE):
                app = APPS[(n + k) % len(APPS)]
                self.pods.append(
                    {
                        "podName": f"{ns}-{app}-{k}",
                        "namespace": ns,
                        "podUID": f"{name}-{ns}-{k}",
                        "ip": f"10.{100 + seed % 100}.{n}.{k + 2}",
                        "containerId": f"{seed:08x}{n:04x}{k:04x}" + "0" * 48,
                    }
                )
        self.inventory = [e for pod in self.pods for e in self._pod_events(pod)]
        self.connections: dict[int, dict[str, Any]] = {}
        for _ in range(connections):
            self._open()
        self.hub = Hub(name, self.snapshot, self.clock.now)

    def _pod_of_row(self) -> dict[str, Any]:
        if self.rnd.random() < SHARE:
            return self.pods[self.rnd.randrange(PODS_PER_NAMESPACE)]  # NAMESPACE's pods come first
        return self.pods[self.rnd.randrange(PODS_PER_NAMESPACE, len(self.pods))]

    def _pod_events(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        base = {
            "nodeName": self.name,
            "timestamp": self.clock.now(),
            **{k: pod[k] for k in ("podName", "namespace", "podUID")},
        }
        return [
            {"type": "container.added", **base, "containerId": pod["containerId"], "containerName": "app",
             "name": f"{pod['namespace']}/{pod['podName']}/app", "podIPs": [pod["ip"]], "usesHostNetwork": False},
            {"type": "ip.added", **base, "ip": pod["ip"], "family": "IPv4", "kind": "pod", "source": "cri",
             "interface": "eth0", "usesHostNetwork": False},
            {"type": "port.listening", **base, "protocol": "TCP", "family": "IPv4", "ip": "0.0.0.0", "port": 8080,
             "netns": 4026532000, "pid": 1000, "exe": "/app/server", "comm": "server",
             "sockCookie": int(pod["containerId"][:12], 16), "host": False, "containerId": pod["containerId"]},
        ]  # fmt: skip

    def _event(self, cookie: int, pod: dict[str, Any], state: str, remote: int) -> dict[str, Any]:
        return {
            "type": "connection.event", "timestamp": self.clock.now(), "nodeName": self.name, "protocol": "TCP",
            "family": "IPv4", "state": state, "states": [state], "localIP": pod["ip"],
            "localPort": 30000 + cookie % 30000,
            "remoteIP": f"10.96.{remote % 200}.{remote % 250 + 1}", "remotePort": (443, 5432, 6379, 8080)[remote % 4],
            "pid": 1000 + remote % 50, "exe": "/app/server", "comm": "server", "netns": 4026532000,
            "sockCookie": cookie, "direction": "outbound", "host": False, "containerId": pod["containerId"],
            "containerName": "app", "podName": pod["podName"], "namespace": pod["namespace"], "podUID": pod["podUID"],
            "usesHostNetwork": False, "remoteHostname": f"svc-{remote % 300}.cluster.local",
        }  # fmt: skip

    def _open(self) -> dict[str, Any]:
        self.cookie += 1
        e = self._event(self.cookie, self._pod_of_row(), "ESTABLISHED", self.rnd.randrange(1 << 20))
        self.connections[self.cookie] = e
        return e

    def churn(self, events: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(events // 2):
            cookie = next(iter(self.connections))  # the oldest
            closed = {
                **self.connections.pop(cookie),
                "state": "CLOSE",
                "states": ["CLOSE"],
                "timestamp": self.clock.now(),
            }
            out += [closed, self._open()]
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        # a list: the hub encodes it a frame at a time while churn() changes the connections
        return [*self.inventory, *self.connections.values()]

    def host_info(self) -> dict[str, Any]:
        return {"type": "host.info", "timestamp": self.clock.now(), "nodeName": self.name, "hostIPs": [self.ip],
                "version": "sim", "captureTCP": True, "captureUDP": True, "loopback": False}  # fmt: skip


async def worker(ips: list[str], connections: int, rate: int, first: int) -> None:
    # the nodes' own log (a client refused, too slow, a send that failed) on the bench's stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    nodes = [SimNode(f"sim-{first + i:03d}", ip, connections, first + i) for i, ip in enumerate(ips)]
    for node in nodes:
        names = HostNames((), ())
        names.set_addresses([node.ip])
        app = build_app(node.hub, node.host_info, lambda: [], lambda pid: None, policy=AccessPolicy(names, frozenset()))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, node.ip, NODE_PORT, reuse_address=True).start()
    print("ready", flush=True)
    per_tick = max(2, rate // 10)
    while True:
        await asyncio.sleep(0.1)
        for node in nodes:
            node.hub.publish(node.churn(per_tick))


# -- the run ---------------------------------------------------------------------------------------------


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    return round(status_kib(pid, field) / 1024, 1)


class Prober(threading.Thread):
    """GET /healthz every PROBE_EVERY_S, as the kubelet's probes do: how long the mux takes to answer.
    With curl, a process of its own: this one is busy reading the clients' streams."""

    def __init__(self, mux: MuxProcess) -> None:
        super().__init__(daemon=True)
        self.mux = mux
        self.times: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(PROBE_EVERY_S):
            argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total}", "--max-time", "60"]
            took = subprocess.run([*argv, self.mux.url + "/healthz"], capture_output=True, text=True, check=True)
            self.times.append(float(took.stdout))

    def result(self) -> dict[str, float]:
        """Answer times in ms."""
        self.done.set()
        self.join()
        return percentiles([t * 1000 for t in self.times])


def client_phase(mux: MuxProcess, query: str, seconds: float, expected_rows: int | None) -> dict[str, Any]:
    """One client: time to snapshot.complete and its rows; the bytes it received and the nodes sent the
    mux in its first `seconds`; the mux's RSS then, its CPU over the phase and how fast it answered
    /healthz meanwhile."""
    peer_bytes0, cpu0 = mux.metric("netstatd_mux_peer_bytes_total"), mux.cpu_seconds()
    t0 = time.monotonic()
    prober = Prober(mux)
    prober.start()
    with StreamClient(mux.ws_url + query, defer_live=True) as client:
        complete_at, rows, scanned = None, 0, 0
        window: dict[str, Any] = {}
        while complete_at is None or not window:
            if not window and time.monotonic() - t0 >= seconds:
                window = {
                    "bytes_received_first_s": client.bytes,
                    "node_to_mux_bytes_first_s": int(mux.metric("netstatd_mux_peer_bytes_total") - peer_bytes0),
                    "mux_rss_mib": rss_mib(mux.proc.pid),
                    "mux_peak_rss_mib": rss_mib(mux.proc.pid, "VmHWM"),  # since it started
                }
            events = client.events
            for e in events[scanned:]:
                if complete_at is None and e["type"] == "connection.event":
                    rows += 1
                elif complete_at is None and e["type"] == "snapshot.complete":
                    complete_at = time.monotonic() - t0
            scanned = len(events)
            if time.monotonic() - t0 > 600:
                raise RuntimeError(f"no snapshot.complete within 600 s for {query or 'everything'}")
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        result = {
            "query": query or "(none)",
            "snapshot_complete_s": round(complete_at, 2),
            "rows_before_snapshot_complete": rows,
            "window_s": seconds,
            **window,
            "stream_resets": sum(e["type"] == "stream.reset" for e in client.events),
            # released before every node had sent its rows (WAIT_S): the rest came live
            "mux_waits_expired_total": mux.metric("netstatd_mux_client_waits_expired_total"),
            "mux_cores": round((mux.cpu_seconds() - cpu0) / elapsed, 3),
            "healthz_ms": prober.result(),
        }
        if expected_rows is not None:
            result["rows_expected_about"] = expected_rows
    return result


def warnings(log: str) -> dict[str, int]:
    """The mux's warnings, counted by message (peer addresses and numbers left out)."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if " WARNING " in line:
            message = re.sub(r"[\d.]+", "N", line.split(" WARNING ", 1)[1])[:160]
            counts[message] = counts.get(message, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10])


def settled(mux: MuxProcess, rows: int, timeout: float = 300) -> dict[str, Any]:
    """Once the merged state holds every node's rows (or after timeout): the mux's RSS and rows then."""
    t0 = time.monotonic()
    while mux.metric("netstatd_mux_rows") < rows and time.monotonic() - t0 < timeout:
        time.sleep(1)
    return {
        "waited_s": round(time.monotonic() - t0, 1),
        "mux_rows": int(mux.metric("netstatd_mux_rows")),
        "mux_row_json_mib": round(mux.metric("netstatd_mux_row_bytes") / 2**20),
        "mux_rss_mib": rss_mib(mux.proc.pid),
        "mux_peak_rss_mib": rss_mib(mux.proc.pid, "VmHWM"),
    }


def browser_phase(url: str, seconds: float) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright
    from ui import CHROMIUM, CHROMIUM_ARGS, INIT_SCRIPT, frame_stats

    # the tests' arguments resolve nothing but 127.0.0.1: the mux's address too
    host = url.split("//", 1)[1].split(":", 1)[0]
    args = [a + f", EXCLUDE {host}" if a.startswith("--host-resolver-rules=") else a for a in CHROMIUM_ARGS]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        context = browser.new_context(viewport={"width": 1600, "height": 900}, bypass_csp=True)
        page = context.new_page()
        page.add_init_script(INIT_SCRIPT)
        page.goto(url)
        page.wait_for_selector("#grid-conn .tabulator-row", timeout=120_000)
        # from navigation to the first row in the grid, on the page's clock (as bench/ui.py)
        first_screen = page.evaluate("window.__bench.load.firstRowShown") / 1000
        page.evaluate("window.__bench.frames = []; window.__bench.longtasks = []; window.__bench.recording = true")
        t1 = time.monotonic()
        page.wait_for_timeout(seconds * 1000)
        bench = page.evaluate("(() => { window.__bench.recording = false; return window.__bench; })()")
        stats = frame_stats(bench["frames"], bench["longtasks"], time.monotonic() - t1)
        result = {
            "first_screen_s": round(first_screen, 2),
            "frames": stats,
            "rows_status": page.inner_text("#status-rows"),
            "snapshot_done": page.evaluate("window.netstatd.store.snapshotDone"),
            "js_heap_mib": round(page.evaluate("performance.memory.usedJSHeapSize") / 2**20),
            # what the page tells a user whose subscription is too wide for it (docs/ui.md)
            "too_wide_banner": page.inner_text("#too-wide") if page.is_visible("#too-wide") else None,
        }
        browser.close()
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "nodes_simulated": args.nodes,
        "agents": args.agents,
        "connections_per_node": args.connections,
        "rate_per_node": args.rate,
    }
    with Cluster(nodes=args.agents) as cluster:
        agents = [cluster.agent(i) for i in range(args.agents)]
        cluster.start_agents(agents)
        base = cluster.dns_ip.rsplit(".", 1)[0]
        sim_ips = [f"{base}.{10 + i}" for i in range(args.nodes)]
        for ip in sim_ips:
            cluster.switch.run("ip", "addr", "add", f"{ip}/24", "dev", "br0")
        t0 = time.monotonic()
        workers = []
        for w in range(min(WORKERS, args.nodes)):
            share = sim_ips[w::WORKERS]
            argv = [
                sys.executable,
                __file__,
                "_worker",
                ",".join(share),
                str(args.connections),
                str(args.rate),
                str(w * 1000),
            ]
            workers.append(cluster.popen(cluster.switch, *argv, stdout=-1))
        for p in workers:
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready", "a simulated node worker failed"
        report["simulated_nodes_ready_s"] = round(time.monotonic() - t0, 1)
        cluster.set_records([h.ipv4 for h in cluster.nodes] + sim_ips)
        host = cluster.add_host()
        mux = MuxProcess(
            "--http-mux-port", str(MUX_PORT), "--listen-address", host.ipv4, "--mux-max-bytes", str(args.mux_max_bytes),
            agents_port=NODE_PORT, host=host.ipv4, prefix=[*cluster.agent_cmd_prefix(host), *NOBODY],
            env={"NODE_NAME": "mux", "FANOUT_SERVICE": HEADLESS}, log_path=cluster.dir / "mux.log",
        )  # fmt: skip
        total_nodes = args.nodes + args.agents
        with in_netns(cluster.switch.netns_path):
            mux.start(60)
            deadline = time.monotonic() + 60
            while mux.metric("netstatd_mux_discovery_lookups_total") < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            report["mux_rss_idle_mib"] = rss_mib(mux.proc.pid)
            expected = round(args.nodes * args.connections * SHARE)
            report["one_namespace"] = client_phase(mux, f"?namespace={NAMESPACE}", args.seconds, expected)
            if not args.no_browser:
                url = f"{mux.url}/?view=conn&conn.ns={NAMESPACE}"
                report["one_namespace"]["browser"] = browser_phase(url, args.seconds)
            report["unfiltered"] = client_phase(mux, "", args.seconds, args.nodes * args.connections)
            report["unfiltered"]["settled"] = settled(mux, args.nodes * args.connections)
            if not args.no_browser:
                report["unfiltered"]["browser"] = browser_phase(f"{mux.url}/?view=conn", args.seconds)
                report["unfiltered"]["browser"]["mux_rss_mib"] = rss_mib(mux.proc.pid)
            report["mux_peers_connected"] = mux.metric('netstatd_mux_peers{status="connected"}')
            report["mux_nodes"] = mux.metric("netstatd_mux_nodes")
            report["mux_garbage"] = mux.metric("netstatd_mux_peer_garbage_total")
            report["mux_upstream_connections"] = mux.metric("netstatd_mux_upstream_connections_total")
        report["mux_warnings"] = warnings(mux.log_text())
        report["nodes_total"] = total_nodes
        one, all_ = report["one_namespace"], report["unfiltered"]
        report["ratios"] = {
            "client_bytes": round(one["bytes_received_first_s"] / max(1, all_["bytes_received_first_s"]), 4),
            "node_to_mux_bytes": round(one["node_to_mux_bytes_first_s"] / max(1, all_["node_to_mux_bytes_first_s"]), 4),
        }
        mux.stop()
    return report


def main() -> int:
    if sys.argv[1:2] == ["_worker"]:
        ips, connections, rate, first = sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        asyncio.run(worker(ips, connections, rate, first))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=200, help="simulated nodes (default 200)")
    p.add_argument("--agents", type=int, default=3, help="real agents on test hosts (default 3)")
    p.add_argument("--connections", type=int, default=5000, help="connections per simulated node (default 5000)")
    p.add_argument("--rate", type=int, default=50, help="events/s per simulated node (default 50)")
    p.add_argument("--seconds", type=float, default=30, help="each client's measuring window (default 30)")
    p.add_argument("--mux-max-bytes", type=int, default=2 << 30, help="the mux's --mux-max-bytes (default 2 GiB)")
    p.add_argument("--no-browser", action="store_true", help="skip the Chromium measure")
    p.add_argument("--json", type=Path, default=OUT / "cluster.json")
    args = p.parse_args()
    prepare(p)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        report = run(args)
    except KeyboardInterrupt:
        return interrupted()
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
