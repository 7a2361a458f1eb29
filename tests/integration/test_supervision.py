"""A fault injected into every supervised loop of the real agent (NETSTATD_FAILPOINTS): each is logged
with its traceback, counted in netstatd_internal_errors_total{task}, restarted, and works again."""

from __future__ import annotations

import re
import socket
import time

import pytest

from netstatd.sources.dnstap.framestream import CONTENT_TYPE, START, control_frame, data_frame
from netstatd.testing.agent import AgentProcess
from netstatd.testing.dns import client_response
from netstatd.testing.stream import StreamClient
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(120)

TASKS = (
    "ring", "flush", "containerd", "files", "ips", "reconcile", "sweep",
    "discovery", "mux-idle", "peer", "dnstap", "netns-scan",
)  # fmt: skip


def errors_by_task(agent: AgentProcess) -> dict[str, float]:
    out = {}
    for line in agent.metrics().splitlines():
        m = re.match(r'netstatd_internal_errors_total\{task="([^"]+)"\} (\S+)', line)
        if m:
            out[m[1]] = float(m[2])
    return out


def send_dnstap(port: int, name: str, address: str) -> None:
    """One unidirectional Frame Streams sender with one client response, then it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(control_frame(START, (CONTENT_TYPE,)) + data_frame(client_response(name, address)))
        time.sleep(0.2)


def test_every_loop_restarts_after_a_fault_and_works_again(ctd, tmp_path):
    agent = AgentProcess(
        "--loopback",
        "--log-level", "debug",
        env={"CONTAINERD_SOCKET": ctd.socket, "NETSTATD_FAILPOINTS": ",".join(TASKS)},
        log_path=tmp_path / "agent.log",
    )  # fmt: skip
    with agent, StreamClient(agent.ws_url) as node, StreamClient(agent.mux_ws_url) as mux:
        node.wait_snapshot()
        mux.wait_snapshot()
        # work that reaches the remaining failpoints: containerd events, a DNSTap sender
        pod = ctd.run_pod("faults", {"app": ["sleep", "3600"]}, namespace="faults")
        send_dnstap(agent.dnstap_port, "first.faults.test.", "192.0.2.1")
        wait_faults(agent, [t for t in TASKS if t != "netns-scan"])
        # the follower works again: a container started now is reported, and its netns scanned (the
        # netns-scan fault: the scan runs again). Only once it follows containerd again: a task started
        # while it waits to restart is found by the relisting, which scans no netns.
        wait_until(lambda: agent.metric("netstatd_containerd_syncs_total") >= 2, 30)
        wait_until(lambda: agent.metric("netstatd_containerd_connected") == 1, 30)
        later = ctd.run_pod("after-faults", {"app": ["sleep", "3600"]}, namespace="faults")
        node.wait_for(lambda e: e["type"] == "container.added" and e.get("podName") == "after-faults")
        wait_faults(agent, TASKS)
        counts = errors_by_task(agent)
        assert {task: counts[task] for task in TASKS} == dict.fromkeys(TASKS, 1.0)  # once each: restarted, fine
        log = agent.log_text()
        for task in TASKS:
            assert re.search(rf"ERROR netstatd: internal error in {task} \(.*\n(.*\n)*?Traceback", log), task

        # each path works after its restart: kernel records (ring, flush), netns scans, peers, DNSTap
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            socket.create_connection(("127.0.0.1", port)).close()
            node.wait_for(lambda e: e["type"] == "connection.event" and e.get("localPort") == port)
        wait_until(lambda: re.search(r'netstatd_netns_scans_total\{result="done"\} [1-9]', agent.metrics()), 30)
        mux.wait_for(lambda e: e["type"] == "peer.status" and e["status"] == "connected", timeout=20)
        send_dnstap(agent.dnstap_port, "second.faults.test.", "192.0.2.2")
        node.wait_for(lambda e: e["type"] == "dns.resolved" and e.get("ip") == "192.0.2.2")
        ctd.remove_pod(later)
        ctd.remove_pod(pod)


def wait_faults(agent: AgentProcess, tasks) -> None:
    deadline = time.monotonic() + 60
    while not all(errors_by_task(agent).get(task, 0) >= 1 for task in tasks):
        assert time.monotonic() < deadline, f"internal errors by task: {errors_by_task(agent)}"
        time.sleep(0.5)
