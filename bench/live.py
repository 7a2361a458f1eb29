#!/usr/bin/env python3
"""Pre-existing state and memory (issue 7): the agent started beside N live TCP connections.

A client process in one test namespace opens N connections to a server process in another (over
veth, spread over several server ports) and both hold them open. Then the real agent starts; the
bench measures how long until it serves /metrics with the existing sockets seeded, how long until a
WebSocket client's initial snapshot is complete and how many of the N connections (both ends, with
their owning pid) it holds, and the agent's RSS once that snapshot has been sent.

    sudo .venv/bin/python bench/live.py [--connections 100000] [--json bench/out/live.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness import OUT, git, interrupted, prepare

from netstatd.testing.agent import AgentProcess
from netstatd.testing.hosts import Host, HostPair
from netstatd.testing.stream import StreamClient

HERE = Path(__file__).resolve().parent
PORT = 7200
# Connections per worker pair (one client process, one server process on its own port): the hard
# RLIMIT_NOFILE here is 20000 and cannot be raised (no CAP_SYS_RESOURCE), so N is spread over pairs.
PER_WORKER = 18_000
BACKLOG = 65535
TARGET_RSS_MIB = 200  # issue 7, with 100k live connections


def _say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _raise_nofile(n: int) -> None:
    want = n + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard))


# -- workers: `live.py _worker client|server ...` inside the test namespaces --


def run_server(addr: str, port: int, expect: int) -> None:
    _raise_nofile(expect)
    sel = selectors.DefaultSelector()
    listeners = []
    for lport in (port,):
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.bind((addr, lport))
        lsock.listen(BACKLOG)
        lsock.setblocking(False)
        sel.register(lsock, selectors.EVENT_READ)
        listeners.append(lsock)
    held: list[socket.socket] = []
    stop = threading.Event()
    lock = threading.Lock()

    def commands() -> None:
        for line in sys.stdin:
            if line.strip() == "count":
                with lock:
                    _say({"accepted": len(held)})
            else:
                break
        stop.set()

    threading.Thread(target=commands, daemon=True).start()
    _say({"pid": os.getpid()})
    while not stop.is_set():
        for key, _ in sel.select(0.2):
            while True:
                try:
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                except BlockingIOError:
                    break
                with lock:
                    held.append(conn)
    for s in held + listeners:
        s.close()


def run_client(addr: str, port: int, n: int) -> None:
    _raise_nofile(n)
    held: list[socket.socket] = []
    failed = 0
    _say({"pid": os.getpid()})
    t0 = time.monotonic()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.connect((addr, port))
        except OSError:
            s.close()
            failed += 1
            continue
        held.append(s)
    _say({"connected": len(held), "failed": failed, "elapsed": time.monotonic() - t0})
    sys.stdin.readline()  # until told to stop
    for s in held:
        s.close()


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="live.py _worker")
    p.add_argument("role", choices=("client", "server"))
    p.add_argument("--addr", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, required=True)
    a = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if a.role == "server":
        run_server(a.addr, a.port, a.connections)
    else:
        run_client(a.addr, a.port, a.connections)
    return 0


# -- the bench -------------------------------------------------------------------------


def _read(proc: subprocess.Popen, timeout: float = 600) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {proc.pid} exited with {proc.wait()}")
    return json.loads(line)


def _spawn(host: Host, role: str, addr: str, port: int, n: int) -> subprocess.Popen:
    return host.popen(
        sys.executable,
        str(Path(__file__).resolve()),
        "_worker",
        role,
        f"--addr={addr}",
        f"--port={port}",
        f"--connections={n}",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@dataclasses.dataclass
class LiveConnections:
    """n TCP connections from pair.a to pair.b, held open by worker pairs (see open_live)."""

    pair: HostPair
    workers: int
    clients: list[subprocess.Popen]
    servers: list[subprocess.Popen]
    client_pids: list[int]
    server_pids: list[int]
    opened: dict[str, Any]
    accepted: int

    def stop(self) -> None:
        """Ask the workers to close their connections."""
        for w in self.clients + self.servers:
            with contextlib.suppress(OSError):
                w.stdin.write("stop\n")  # type: ignore[union-attr]
                w.stdin.flush()  # type: ignore[union-attr]


def open_live(stack: contextlib.ExitStack, n: int) -> LiveConnections:
    """Opens n connections between two new namespaces; stack removes them (and the workers)."""
    workers = max(1, -(-n // PER_WORKER))
    procs: list[subprocess.Popen] = []
    pair = HostPair()
    stack.callback(pair.close)
    pair.open()
    for h in (pair.a, pair.b):
        h.run("sysctl", "-q", "-w", f"net.core.somaxconn={BACKLOG}", f"net.ipv4.tcp_max_syn_backlog={BACKLOG}")

    def kill_workers() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    stack.callback(kill_workers)
    servers, clients, server_pids, client_pids = [], [], [], []
    for i in range(workers):
        share = n // workers + (1 if i < n % workers else 0)
        server = _spawn(pair.b, "server", pair.b.ipv4, PORT + i, share)
        procs.append(server)
        servers.append(server)
        server_pids.append(_read(server)["pid"])
        client = _spawn(pair.a, "client", pair.b.ipv4, PORT + i, share)
        procs.append(client)
        clients.append(client)
        client_pids.append(_read(client)["pid"])
    print(f"  opening {n:,} connections ({workers} client and server processes)...", flush=True)
    results = [_read(c) for c in clients]
    opened = {
        "connected": sum(r["connected"] for r in results),
        "failed": sum(r["failed"] for r in results),
        "elapsed": max(r["elapsed"] for r in results),
    }
    deadline = time.monotonic() + 120
    accepted = 0
    while time.monotonic() < deadline:
        for srv in servers:
            assert srv.stdin is not None
            srv.stdin.write("count\n")
            srv.stdin.flush()
        accepted = sum(_read(srv)["accepted"] for srv in servers)
        if accepted >= opened["connected"]:
            break
        time.sleep(0.2)
    print(f"  {opened['connected']:,} connected ({opened['elapsed']:.1f} s), {accepted:,} accepted", flush=True)
    return LiveConnections(pair, workers, clients, servers, client_pids, server_pids, opened, accepted)


def run(n: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        live = open_live(stack, n)
        pair, workers, opened, accepted = live.pair, live.workers, live.opened, live.accepted
        client_pids, server_pids = live.client_pids, live.server_pids

        log = OUT / "agent-live.log"
        agent = AgentProcess(log_path=log)
        stack.callback(agent.stop)
        t0 = time.monotonic()
        agent.start(timeout=600)
        ready_s = time.monotonic() - t0
        assert agent.proc is not None
        m = re.search(r"seeded (\d+) existing sockets from (\d+) network namespaces in ([\d.]+)s", agent.log_text())
        client_ws = StreamClient(agent.ws_url).start(timeout=60)
        stack.callback(client_ws.stop)
        client_ws.wait_snapshot(timeout=600)
        snapshot_s = time.monotonic() - t0
        rss = status_kib(agent.proc.pid, "VmRSS")
        hwm = status_kib(agent.proc.pid, "VmHWM")
        cpu = agent.cpu_seconds()

        ns_a, ns_b = pair.a.netns_inode, pair.b.netns_inode
        # Owner by port: worker pair i uses server port PORT + i.
        owner_of = {ns_a: ("remotePort", client_pids), ns_b: ("localPort", server_pids)}
        seen = {ns_a: 0, ns_b: 0}
        owned = {ns_a: 0, ns_b: 0}
        for e in client_ws.events:
            if e["type"] == "snapshot.complete":
                break
            if e["type"] != "connection.event" or e.get("protocol") != "TCP" or e.get("state") != "ESTABLISHED":
                continue
            side = owner_of.get(e["netns"])
            if side is None or not PORT <= e[side[0]] < PORT + workers:
                continue
            seen[e["netns"]] += 1
            owned[e["netns"]] += e["pid"] == side[1][e[side[0]] - PORT]
        time.sleep(2)
        rss_idle = status_kib(agent.proc.pid, "VmRSS")
        live.stop()
        expected = opened["connected"] + accepted
        return {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git("rev-parse", "HEAD"),
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "live_connections": opened["connected"],
            "worker_pairs": workers,
            "connect_failed": opened["failed"],
            "server_accepted": accepted,
            "agent_ready_s": round(ready_s, 2),
            "agent_seed_s": float(m.group(3)) if m else None,
            "agent_seeded_sockets": int(m.group(1)) if m else None,
            "snapshot_s": round(snapshot_s, 2),
            "snapshot_connections": seen[ns_a] + seen[ns_b],
            "snapshot_connections_expected": expected,
            "snapshot_complete_ratio": round((seen[ns_a] + seen[ns_b]) / expected, 4) if expected else None,
            "snapshot_owner_ratio": round((owned[ns_a] + owned[ns_b]) / expected, 4) if expected else None,
            "snapshot_events": len(client_ws.events),
            "agent_rss_mib": round(rss / 1024, 1),
            "agent_rss_idle_mib": round(rss_idle / 1024, 1),
            "agent_rss_peak_mib": round(hwm / 1024, 1),
            "agent_cpu_s_to_snapshot": round(cpu, 2),
            "targets": {
                f"rss_le_{TARGET_RSS_MIB}_mib": rss / 1024 <= TARGET_RSS_MIB,
                "snapshot_has_every_connection": seen[ns_a] + seen[ns_b] == expected,
            },
        }


def main() -> int:
    if sys.argv[1:2] == ["_worker"]:
        return worker_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=100_000, help="live connections (default 100000)")
    p.add_argument("--json", type=Path, default=OUT / "live.json")
    args = p.parse_args()
    prepare(p)
    try:
        report = run(args.connections)
    except KeyboardInterrupt:
        return interrupted()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
