#!/usr/bin/env python3
"""The multiplexer with large nodes (issue 6): memory and time to fan in nodes of many connections each.

N live TCP connections are held open between two test namespaces (bench/live.py's workers), then a
test cluster of --nodes agents starts (testing/cluster.py: one network namespace per node, a real
unbound answering the headless name). The agents share this machine's kernel, so every node reports
all of those connections, both ends: --nodes x 2N rows in all. One WebSocket client then connects to
node 0's mux port; the mux opens its upstreams and merges every node. Reported: the time until the
client holds every node's rows, and the RSS of node 0's agent (agent + mux with a client) against
the other agents (agent only), at rest and at peak.

    sudo .venv/bin/python bench/mux.py [--nodes 3] [--connections 30000] [--json bench/out/mux.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harness import OUT, git, interrupted, prepare
from live import LiveConnections, open_live, status_kib

from netstatd.testing.cluster import Cluster, in_netns
from netstatd.testing.stream import StreamClient

MERGE_TIMEOUT_S = 600.0


def status_mib(pid: int, field: str) -> float:
    return round(status_kib(pid, field) / 1024, 1)


def rows_per_node(client: StreamClient, live: LiveConnections) -> Counter[str]:
    """Open TCP rows of the live connections (either end) the client holds, by node."""
    netns = {live.pair.a.netns_inode, live.pair.b.netns_inode}
    latest: dict[tuple[str, int], str] = {}
    for e in list(client.events):
        if e.get("type") == "connection.event" and e.get("protocol") == "TCP" and e.get("netns") in netns:
            latest[(e["nodeName"], e["sockCookie"])] = e["state"]
    return Counter(node for (node, _), state in latest.items() if state != "CLOSE")


def run(nodes: int, n: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        live = open_live(stack, n)
        expected = live.opened["connected"] + live.accepted
        cluster = stack.enter_context(Cluster(nodes))
        cluster.set_records([h.ipv4 for h in cluster.nodes])
        agents = [cluster.agent(i) for i in range(nodes)]
        for a in agents:
            stack.callback(a.stop)
        t0 = time.monotonic()
        cluster.start_agents(agents, timeout=600)
        ready_s = time.monotonic() - t0
        pids = [a.proc.pid for a in agents if a.proc]
        rss_before = [status_mib(p, "VmRSS") for p in pids]

        print(f"  {nodes} agents up after {ready_s:.1f} s; a client joins node 0's mux...", flush=True)
        with in_netns(cluster.switch.netns_path):  # the client's thread stays in the switch netns
            client = StreamClient(agents[0].mux_ws_url).start(timeout=60)
        stack.callback(client.stop)
        t1 = time.monotonic()
        client.wait_snapshot(timeout=MERGE_TIMEOUT_S)
        rows: Counter[str] = Counter()
        while time.monotonic() - t1 < MERGE_TIMEOUT_S:
            rows = rows_per_node(client, live)
            if len(rows) == nodes and min(rows.values()) >= expected:
                break
            time.sleep(1.0)
        merged_s = time.monotonic() - t1
        time.sleep(5)  # settled: the mux's queues drained
        rss_after = [status_mib(p, "VmRSS") for p in pids]
        peak = [status_mib(p, "VmHWM") for p in pids]
        live.stop()
        others = rss_after[1:] or [0.0]
        return {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git("rev-parse", "HEAD"),
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "nodes": nodes,
            "live_connections": live.opened["connected"],
            "rows_per_node_expected": expected,
            "rows_per_node": dict(sorted(rows.items())),
            "rows_merged": sum(rows.values()),
            "all_merged": len(rows) == nodes and min(rows.values()) >= expected,
            "agents_ready_s": round(ready_s, 2),
            "merge_s": round(merged_s, 2),
            "client_events": len(client.events),
            "rss_before_mib": rss_before,
            "rss_after_mib": rss_after,
            "rss_peak_mib": peak,
            "mux_node_rss_mib": rss_after[0],
            "mux_node_rss_peak_mib": peak[0],
            "mux_extra_rss_mib": round(rss_after[0] - max(others), 1),
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--connections", type=int, default=30_000, help="live connections (each node sees both ends)")
    p.add_argument("--json", type=Path, default=OUT / "mux.json")
    args = p.parse_args()
    prepare(p)
    try:
        report = run(args.nodes, args.connections)
    except KeyboardInterrupt:
        return interrupted()
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "commit"}, indent=2))
    return 0 if report["all_merged"] else 1


if __name__ == "__main__":
    sys.exit(main())
