"""The agent with a real private containerd: container events, attribution of pod traffic, /api/containers."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import subprocess
import time

import pytest

from netstatd.testing.agent import AgentProcess, free_port
from netstatd.testing.containerd import systemd_scope_path
from netstatd.testing.stream import StreamClient
from tests.integration.container_traffic import Server, api, connection_events

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def agent(ctd_agent):
    return ctd_agent


def test_container_added_and_deleted_within_one_second(ctd, stream):
    pod = ctd.run_pod("events", {"app": ["sleep", "3600"]}, namespace="ev")
    cid = pod.containers["app"]
    added = stream.wait_for(lambda e: e["type"] == "container.added" and e["containerId"] == cid, timeout=1.0)
    assert (added["podName"], added["namespace"], added["podUID"]) == ("events", "ev", pod.uid)
    assert added["containerName"] == "app" and added["name"] == "ev/events/app"
    assert added["image"] == "netstatd.test/busybox:1" and added["usesHostNetwork"] is False
    assert len(added["podIPs"]) == 1 and ipaddress.ip_address(added["podIPs"][0]) in ipaddress.ip_network(ctd.subnet)
    assert added["labels"]["io.kubernetes.pod.name"] == "events" and added["netns"] > 0
    ctd.remove_container(cid)
    stream.wait_for(lambda e: e["type"] == "container.deleted" and e["containerId"] == cid, timeout=1.0)
    ctd.remove_pod(pod)


def test_late_client_gets_containers_in_its_snapshot(ctd, agent):
    pod = ctd.run_pod("late", {"app": ["sleep", "3600"]}, namespace="late")
    deadline = time.monotonic() + 2
    while not api(agent, "?podName=late") and time.monotonic() < deadline:
        time.sleep(0.05)
    with StreamClient(agent.ws_url) as client:
        done = client.wait_snapshot()
        before = client.events[: client.events.index(done)]
        assert any(e["type"] == "container.added" and e["containerId"] == pod.containers["app"] for e in before)
    ctd.remove_pod(pod)


def test_api_filters(ctd, agent):
    pod = ctd.run_pod("shopweb", {"app": ["sleep", "3600"], "sidecar": ["sleep", "3600"]}, namespace="shop")
    deadline = time.monotonic() + 2
    while len(api(agent, "?namespace=shop&podName=shopweb")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    both = api(agent, "?namespace=shop&podName=shopweb")
    assert {c["containerName"] for c in both} == {"app", "sidecar"}
    assert {c["containerId"] for c in both} == set(pod.containers.values())
    assert {c["containerName"] for c in api(agent, "?namespace=shop")} >= {"app", "sidecar"}
    assert api(agent, "?namespace=nosuch") == []
    assert api(agent, "?podName=nosuch") == []
    assert api(agent, "?namespace=shop&podName=nosuch") == []
    assert len(api(agent)) >= 2
    ctd.remove_pod(pod)


def test_pod_outbound_connections_carry_pod_and_container(ctd, host_ip, stream):
    """Two containers of one pod share its netns and IP; each connection keeps its own container."""
    app_server, side_server = Server(host_ip), Server(host_ip)
    try:
        pod = ctd.run_pod(
            "client", {"app": app_server.client_loop(), "sidecar": side_server.client_loop()}, namespace="shop"
        )
        for server, name in ((app_server, "app"), (side_server, "sidecar")):
            events = connection_events(stream, server)
            for e in events:
                assert (e["podName"], e["namespace"], e["podUID"]) == ("client", "shop", pod.uid), str(e)
                assert (e.get("containerId"), e.get("containerName")) == (pod.containers[name], name), str(e)
                assert e["host"] is False and e["usesHostNetwork"] is False
                assert e["pid"] > 0 and e["comm"] == "nc" and e["direction"] == "outbound", str(e)
        # The host's side of the same connections: a host process, talking to a pod on this node.
        host_side = stream.wait_for(
            lambda e: e["type"] == "connection.event" and e["localPort"] == app_server.port, timeout=5
        )
        assert host_side["host"] is True and "podName" not in host_side
        assert host_side["remotePodName"] == "client" and host_side["remoteNamespace"] == "shop"
        assert host_side["remotePodUID"] == pod.uid
        ctd.remove_pod(pod)
    finally:
        app_server.close()
        side_server.close()


def test_host_client_into_a_pod_server_is_attributed_on_the_pod_side(ctd, host_ip, agent, stream):
    """The reverse direction: a host process connects to a server in a pod."""
    port = 8080
    serve = f"sleep 1; while true; do echo hi | nc -l -p {port}; done"
    pod = ctd.run_pod("server", {"web": ["sh", "-c", serve]}, namespace="shop")
    try:
        pod_ip = stream.wait_for(
            lambda e: e["type"] == "container.added" and e["containerId"] == pod.containers["web"], timeout=2
        )["podIPs"][0]
        deadline = time.monotonic() + 10
        while True:  # until the pod's nc listens
            try:
                with socket.create_connection((pod_ip, port), timeout=1) as c:
                    c.recv(10)
                    local_port = c.getsockname()[1]
                break
            except OSError:
                assert time.monotonic() < deadline, "the pod's server never listened"
                time.sleep(0.2)

        def pod_side(e: dict) -> bool:
            return e["type"] == "connection.event" and e["localPort"] == port and e["remotePort"] == local_port

        cookie = stream.wait_for(pod_side, timeout=5)["sockCookie"]
        stream.wait_for(lambda e: pod_side(e) and e["sockCookie"] == cookie and e["state"] == "CLOSE", timeout=5)
        for e in stream.matching(lambda e: pod_side(e) and e["sockCookie"] == cookie):
            assert (e["podName"], e["namespace"], e["podUID"]) == ("server", "shop", pod.uid), str(e)
            assert (e.get("containerId"), e.get("containerName")) == (pod.containers["web"], "web"), str(e)
            assert e["host"] is False and e["direction"] == "inbound", str(e)
            assert e["pid"] > 0 and e["comm"] == "nc", str(e)
        host_side = stream.wait_for(
            lambda e: e["type"] == "connection.event" and e["localPort"] == local_port and e["remotePort"] == port,
            timeout=5,
        )
        assert host_side["host"] is True and host_side["direction"] == "outbound"
        assert (host_side["remotePodName"], host_side["remoteNamespace"]) == ("server", "shop")
    finally:
        ctd.remove_pod(pod)


def test_systemd_and_plain_cgroup_shapes_resolve(ctd, host_ip, stream):
    """kubelet's systemd-driver path and containerd's /<namespace>/<id>, both in a pod's netns."""
    pod = ctd.run_pod("shapes", {"app": ["sleep", "3600"]}, namespace="shapes")
    netns = f"/proc/{ctd.container_pid(pod.sandbox_id)}/ns/net"
    scoped_id, plain_id = secrets.token_hex(32), f"plain-{secrets.token_hex(3)}"
    scoped_server, plain_server = Server(host_ip), Server(host_ip)
    try:
        labels = {"io.kubernetes.pod.uid": pod.uid, "io.kubernetes.container.name": "scoped"}
        scope = systemd_scope_path(pod.uid, scoped_id)
        ctd.run_plain_container(scoped_id, scoped_server.client_loop(), scope, labels=labels, netns_path=netns)
        ctd.run_plain_container(plain_id, plain_server.client_loop(), netns_path=netns)
        for server, cid, name in ((scoped_server, scoped_id, "scoped"), (plain_server, plain_id, plain_id)):
            for e in connection_events(stream, server):
                assert (e.get("containerId"), e.get("containerName"), e["host"]) == (cid, name, False), str(e)
    finally:
        scoped_server.close()
        plain_server.close()
        ctd.remove_pod(pod)


def test_host_network_pod(ctd, stream):
    port = free_port()
    command = ["sh", "-c", f"while true; do nc -l -p {port} >/dev/null; done"]
    pod = ctd.run_pod("hostpod", {"main": command}, namespace="kube-system", host_network=True)
    cid = pod.containers["main"]
    added = stream.wait_for(lambda e: e["type"] == "container.added" and e["containerId"] == cid, timeout=2)
    assert added["usesHostNetwork"] is True and added["podIPs"] == []
    listening = stream.wait_for(
        lambda e: e["type"] == "port.listening" and e["port"] == port and e["protocol"] == "TCP", timeout=5
    )
    assert (listening["containerId"], listening["podName"], listening["namespace"]) == (cid, "hostpod", "kube-system")
    assert listening["usesHostNetwork"] is True and listening["host"] is False
    ctd.remove_pod(pod)


def scans_done(agent: AgentProcess) -> float:
    for line in agent.metrics().splitlines():
        if line.startswith('netstatd_netns_scans_total{result="done"} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_container_start_scans_its_pod_netns_once_per_listener(ctd, agent, stream):
    """A container start scans its pod's netns; a listener the kernel reported is not announced twice."""
    port = free_port()
    pod = ctd.run_pod("listener", {"srv": ["sh", "-c", f"while true; do nc -l -p {port} >/dev/null; done"]})
    cid = pod.containers["srv"]
    added = stream.wait_for(lambda e: e["type"] == "container.added" and e["containerId"] == cid, timeout=2)
    listening = stream.wait_for(
        lambda e: e["type"] == "port.listening" and e["port"] == port and e["protocol"] == "TCP", timeout=5
    )
    assert (listening["podName"], listening["namespace"], listening["netns"]) == ("listener", "default", added["netns"])
    before = scans_done(agent)
    # A sidecar starting in the same pod scans the same netns, which holds the known listener.
    ctd.start_container(pod, "side", ["sleep", "3600"])
    deadline = time.monotonic() + 3
    while scans_done(agent) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scans_done(agent) > before
    time.sleep(0.2)
    same = stream.matching(lambda e: e["type"] == "port.listening" and e["sockCookie"] == listening["sockCookie"])
    assert len(same) == 1
    assert f"scanned netns {added['netns']}:" in agent.log_text()
    ctd.remove_pod(pod)


def test_ip_inventory_pod_host_and_host_network(ctd, host_ip, stream):
    pod = ctd.run_pod("ippod", {"app": ["sleep", "3600"]}, namespace="ips")
    # host_ip is on the pod bridge: in the snapshot, or at the latest in the refresh this pod triggers
    host = stream.wait_for(lambda e: e["type"] == "ip.added" and e["ip"] == host_ip, timeout=2)
    assert (host["kind"], host["podName"], host["usesHostNetwork"], host["interface"]) == (
        "host",
        None,
        False,
        ctd.bridge,
    )
    assert stream.matching(lambda e: e["type"] == "ip.added" and e["ip"] == "127.0.0.1")[0]["kind"] == "loopback"
    mine = stream.wait_for(lambda e: e["type"] == "ip.added" and e["podName"] == "ippod", timeout=2)
    assert (mine["kind"], mine["namespace"], mine["podUID"], mine["usesHostNetwork"]) == ("pod", "ips", pod.uid, False)
    assert ipaddress.ip_address(mine["ip"]) in ipaddress.ip_network(ctd.subnet) and mine["source"] == "cri"
    hostpod = ctd.run_pod("iphost", {"app": ["sleep", "3600"]}, namespace="ips", host_network=True)
    shown = stream.wait_for(lambda e: e["type"] == "ip.added" and e["podName"] == "iphost", timeout=2)
    assert shown["kind"] == "host" and shown["usesHostNetwork"] is True and shown["podUID"] == hostpod.uid
    ctd.remove_pod(pod)
    gone = stream.wait_for(lambda e: e["type"] == "ip.removed" and e["podName"] == "ippod", timeout=2)
    assert gone["ip"] == mine["ip"]
    ctd.remove_pod(hostpod)


def test_containerd_restart_loses_nothing(ctd, agent, stream):
    """SIGKILL containerd, start it again and create a pod at once: the agent resyncs, says so once."""
    before = ctd.run_pod("steady", {"app": ["sleep", "3600"]}, namespace="restart")
    stream.wait_for(lambda e: e["type"] == "container.added" and e["containerId"] == before.containers["app"], 2)
    ctd.restart_daemon(kill=True)
    # Created while the agent is still disconnected (it reconnects after its backoff).
    after = ctd.run_pod("fresh", {"app": ["sleep", "3600"]}, namespace="restart")
    stream.wait_for(lambda e: e["type"] == "container.added" and e["containerId"] == after.containers["app"], 10)
    ids = {c["containerId"] for c in api(agent, "?namespace=restart")}
    assert ids == {before.containers["app"], after.containers["app"]}
    # Nothing that still exists was deleted by the resync.
    assert not stream.matching(lambda e: e["type"] == "container.deleted" and e["containerId"] in ids)
    log = agent.log_text()
    assert log.count("serving host data only") == 1, log[-2000:]
    ctd.remove_pod(before)
    ctd.remove_pod(after)


def test_agent_started_later_attributes_existing_pod_sockets(ctd, tmp_path):
    """Sockets found by the start-up namespace scan (no kernel event yet) carry their pod."""
    port = free_port()
    pod = ctd.run_pod("early", {"server": ["sh", "-c", f"nc -l -p {port}"]}, namespace="early")
    deadline = time.monotonic() + 5
    netns = f"/proc/{ctd.container_pid(pod.sandbox_id)}/ns/net"
    while time.monotonic() < deadline:  # wait until nc listens
        ss = subprocess.run(["nsenter", f"--net={netns}", "ss", "-Htln"], capture_output=True, text=True).stdout
        if f":{port} " in ss:
            break
        time.sleep(0.05)
    env = {"CONTAINERD_SOCKET": ctd.socket}
    with (
        AgentProcess(env=env, log_path=tmp_path / "late.log") as late,
        StreamClient(late.ws_url) as client,
    ):
        done = client.wait_snapshot()
        snapshot = client.events[: client.events.index(done)]
        [listening] = [
            e for e in snapshot if e["type"] == "port.listening" and e["port"] == port and e["protocol"] == "TCP"
        ]
        assert (listening.get("containerId"), listening["podName"], listening["namespace"]) == (
            pod.containers["server"],
            "early",
            "early",
        ), str(listening)
        assert any(e["type"] == "container.added" and e["containerId"] == pod.containers["server"] for e in snapshot)
    ctd.remove_pod(pod)


def test_no_containerd_one_log_line_and_host_data(tmp_path):
    missing = str(tmp_path / "no-containerd.sock")
    with AgentProcess(env={"CONTAINERD_SOCKET": missing}, log_path=tmp_path / "agent.log") as lone:
        assert api(lone) == [] and api(lone, "?namespace=x") == []
        time.sleep(2)  # several reconnect attempts (0.5 s, then 1 s)
        log = lone.log_text()
        assert log.count(missing) == 1 and "serving host data only" in log, log
        assert lone.metric("netstatd_containerd_connected") == 0
