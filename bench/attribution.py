"""Share of events attributed to the right pod and container, with real CRI pods (issue 3).

A private containerd runs PODS pods of two containers each. Every container connects in a loop
(busybox nc) to its own TCP server on the host side of the pod bridge, from its first moment (no
start-up delay, so the race with containerd's TaskStart event is included). The agent runs with
CONTAINERD_SOCKET pointing at that daemon; one WebSocket client records every event. Each server
port belongs to exactly one container, so the expected pod and container of every event is known.

    sudo .venv/bin/python bench/attribution.py [--seconds 5] [--pods 3]
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import subprocess
import threading
import time

from netstatd.testing.agent import AgentProcess, free_port
from netstatd.testing.containerd import PrivateContainerd
from netstatd.testing.stream import StreamClient


def serve(sock: socket.socket) -> None:
    """Accept and close at once, until the socket is closed."""
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--pods", type=int, default=3)
    args = ap.parse_args()

    with PrivateContainerd() as ctd:
        ctd.run_pod("bridge", {"main": ["sleep", "3600"]}, namespace="setup")  # creates the bridge
        host_ip = str(ipaddress.ip_network(ctd.subnet).network_address + 1)
        subprocess.run(["ip", "addr", "add", f"{host_ip}/24", "dev", ctd.bridge], check=True)
        servers: dict[int, tuple[str, str]] = {}  # server port -> (pod, container)
        sockets = []
        with AgentProcess(env={"CONTAINERD_SOCKET": ctd.socket}) as agent, StreamClient(agent.ws_url) as stream:
            stream.wait_snapshot()
            pods = []
            for i in range(args.pods):
                cmds = {}
                for cname in ("app", "sidecar"):
                    port = free_port()
                    s = socket.create_server((host_ip, port), backlog=512)
                    threading.Thread(target=serve, args=(s,), daemon=True).start()
                    sockets.append(s)
                    servers[port] = (f"pod{i}", cname)
                    cmds[cname] = ["sh", "-c", f"while true; do echo hi | nc {host_ip} {port}; done"]
                pods.append(ctd.run_pod(f"pod{i}", cmds, namespace="bench"))
            time.sleep(args.seconds)
            for pod in pods:
                ctd.remove_pod(pod)
            time.sleep(1.0)  # the last flush
            events = [e for e in list(stream.events) if e["type"] == "connection.event"]
        for s in sockets:
            s.close()

    pod_side = [e for e in events if e["remoteIP"] == host_ip and e["remotePort"] in servers]
    host_side = [e for e in events if e["localIP"] == host_ip and e["localPort"] in servers]
    right_pod = sum(e.get("podName") == servers[e["remotePort"]][0] for e in pod_side)
    right_container = sum(e.get("containerName") == servers[e["remotePort"]][1] for e in pod_side)
    host_right = sum(e.get("host") is True and e.get("remotePodName") == servers[e["localPort"]][0] for e in host_side)
    print(
        f"pod-side events:  {len(pod_side):,}; right pod {right_pod / len(pod_side):.4%} ({right_pod:,}), "
        f"right container {right_container / len(pod_side):.4%} ({right_container:,})"
    )
    print(
        f"host-side events: {len(host_side):,}; host with the right remote pod "
        f"{host_right / len(host_side):.4%} ({host_right:,})"
    )


if __name__ == "__main__":
    main()
