"""Pods from containers' own labels: containers made with `ctr run` (CRI has no sandbox for them), with
the io.kubernetes.pod.* labels CRI puts on every container; and a containerd without the CRI plugin."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import uuid

import pytest

from netstatd.testing.agent import AgentProcess, free_port
from netstatd.testing.containerd import PrivateContainerd, kubelet_cgroupfs_parent, systemd_scope_path
from netstatd.testing.stream import StreamClient
from tests.conftest import require_root
from tests.integration.container_traffic import Server, api, connection_events

pytestmark = pytest.mark.timeout(90)

NAMESPACE = "lbl"


@pytest.fixture(scope="module")
def agent(ctd_agent):
    return ctd_agent


def pod_labels(pod: str, uid: str, container: str) -> dict[str, str]:
    return {
        "io.kubernetes.pod.name": pod,
        "io.kubernetes.pod.namespace": NAMESPACE,
        "io.kubernetes.pod.uid": uid,
        "io.kubernetes.container.name": container,
    }


def started(stream: StreamClient, container_id: str) -> dict:
    """The container.added of a container once its task runs (the create's has no netns yet)."""
    return stream.wait_for(
        lambda e: e["type"] == "container.added" and e["containerId"] == container_id and e["netns"], timeout=5
    )


def test_ctr_containers_with_pod_labels_and_a_sidecar_are_one_pod(ctd, stream, agent):
    """kubelet's cgroupfs shape in a netns of its own, a systemd-shaped sidecar joining that netns."""
    netns = ctd.make_netns()
    uid = str(uuid.uuid4())
    main_id, side_id = secrets.token_hex(32), secrets.token_hex(32)
    main_server, side_server = Server(netns.host_ip), Server(netns.host_ip)
    try:
        main_pid = ctd.run_plain_container(
            main_id,
            main_server.client_loop(),
            f"{kubelet_cgroupfs_parent(uid)}/{main_id}",
            labels=pod_labels("labelweb", uid, "main"),
            netns_path=netns.path,
        )
        ctd.run_plain_container(
            side_id,
            side_server.client_loop(),
            systemd_scope_path(uid, side_id),
            labels=pod_labels("labelweb", uid, "sidecar"),
            netns_path=f"/proc/{main_pid}/ns/net",
        )
        inode = os.stat(netns.path).st_ino
        for cid, name in ((main_id, "main"), (side_id, "sidecar")):
            added = started(stream, cid)
            assert (added["podName"], added["namespace"], added["podUID"]) == ("labelweb", NAMESPACE, uid), added
            assert (added["containerName"], added["name"]) == (name, f"{NAMESPACE}/labelweb/{name}")
            assert added["usesHostNetwork"] is False and added["podIPs"] == [] and added["netns"] == inode
        both = api(agent, f"?namespace={NAMESPACE}&podName=labelweb")
        assert {c["containerId"] for c in both} == {main_id, side_id}
        assert {c["podUID"] for c in both} == {uid}
        # Traffic from inside each container carries the pod, and its own container.
        for server, cid, name in ((main_server, main_id, "main"), (side_server, side_id, "sidecar")):
            for e in connection_events(stream, server):
                assert (e["podName"], e["namespace"], e["podUID"]) == ("labelweb", NAMESPACE, uid), str(e)
                assert (e.get("containerId"), e.get("containerName")) == (cid, name), str(e)
                assert e["host"] is False and e["usesHostNetwork"] is False and e["comm"] == "nc", str(e)
        # A pod like any other: its netns's address is its IP in the inventory.
        ip = stream.wait_for(lambda e: e["type"] == "ip.added" and e["ip"] == netns.ns_ip, timeout=5)
        assert (ip["kind"], ip["podName"], ip["podUID"], ip["usesHostNetwork"]) == ("pod", "labelweb", uid, False)
        # The pod goes with its last container.
        ctd.remove_plain_container(main_id)
        stream.wait_for(lambda e: e["type"] == "container.deleted" and e["containerId"] == main_id, timeout=5)
        assert [c["containerId"] for c in api(agent, f"?namespace={NAMESPACE}&podName=labelweb")] == [side_id]
        ctd.remove_plain_container(side_id)
        stream.wait_for(lambda e: e["type"] == "ip.removed" and e["ip"] == netns.ns_ip, timeout=5)
        assert api(agent, f"?namespace={NAMESPACE}&podName=labelweb") == []
    finally:
        main_server.close()
        side_server.close()


def test_net_host_ctr_container_with_pod_labels(ctd, stream, agent):
    """--net-host: no network namespace in its spec, so host network; the host's netns stays the host's."""
    netns = ctd.make_netns()  # only for a non-loopback host address to connect to
    server, port = Server(netns.host_ip), free_port()
    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    listen = f"while true; do nc -l -p {port} >/dev/null; done"
    command = ["sh", "-c", f"{listen} & {server.client_script()}"]
    try:
        ctd.run_plain_container(
            cid,
            command,
            f"{kubelet_cgroupfs_parent(uid)}/{cid}",
            labels=pod_labels("labelhost", uid, "agent"),
            host_network=True,
        )
        added = started(stream, cid)
        assert (added["podName"], added["namespace"], added["podUID"]) == ("labelhost", NAMESPACE, uid), added
        assert added["usesHostNetwork"] is True and added["podIPs"] == []
        assert added["netns"] == os.stat("/proc/self/ns/net").st_ino  # the host's (PID 1's may be unreadable)
        assert [c["containerId"] for c in api(agent, f"?namespace={NAMESPACE}&podName=labelhost")] == [cid]
        listening = stream.wait_for(
            lambda e: e["type"] == "port.listening" and e["port"] == port and e["protocol"] == "TCP", timeout=5
        )
        assert (listening.get("containerId"), listening["podName"], listening["podUID"]) == (cid, "labelhost", uid)
        assert listening["usesHostNetwork"] is True and listening["host"] is False
        for e in connection_events(stream, server):
            assert (e["podName"], e["namespace"], e["podUID"]) == ("labelhost", NAMESPACE, uid), str(e)
            assert e.get("containerId") == cid and e["usesHostNetwork"] is True and e["host"] is False, str(e)
        # Shown with the host's IPs, as a hostNetwork CRI pod is; the host's own entries stay the host's.
        shown = stream.wait_for(lambda e: e["type"] == "ip.added" and e["podName"] == "labelhost", timeout=5)
        assert shown["kind"] == "host" and shown["usesHostNetwork"] is True
        host_side = stream.wait_for(
            lambda e: e["type"] == "connection.event" and e["localPort"] == server.port, timeout=5
        )
        assert host_side["host"] is True and "podName" not in host_side  # the test's own server process
        ctd.remove_plain_container(cid)
    finally:
        server.close()


def test_containerd_without_cri(tmp_path):
    """The CRI plugin disabled: containers and tasks are listed anyway, pods come from labels, said once.

    The listener is up before the agent starts: the agent's first listing and its start-up socket scan
    (the seed) attribute it."""
    require_root()
    with PrivateContainerd(cri=False) as bare:
        netns = bare.make_netns()
        server, port = Server(netns.host_ip), free_port()
        uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
        command = ["sh", "-c", f"nc -l -p {port} & {server.client_script()}"]
        pid = bare.run_plain_container(
            cid,
            command,
            f"{kubelet_cgroupfs_parent(uid)}/{cid}",
            labels=pod_labels("nocri", uid, "app"),
            netns_path=netns.path,
        )
        try:
            wait_listening(pid, port)
            env = {"CONTAINERD_SOCKET": bare.socket}
            with (
                AgentProcess("--log-level", "debug", env=env, log_path=tmp_path / "agent.log") as lone,
                StreamClient(lone.ws_url) as client,
            ):
                done = client.wait_snapshot()
                snapshot = client.events[: client.events.index(done)]
                [added] = [e for e in snapshot if e["type"] == "container.added" and e["containerId"] == cid]
                assert (added["podName"], added["namespace"], added["podUID"]) == ("nocri", NAMESPACE, uid)
                [listening] = [
                    e
                    for e in snapshot
                    if e["type"] == "port.listening" and e["port"] == port and e["protocol"] == "TCP"
                ]
                assert (listening.get("containerId"), listening["podName"], listening["podUID"]) == (cid, "nocri", uid)
                for e in connection_events(client, server):
                    assert (e["podName"], e["podUID"], e.get("containerId")) == ("nocri", uid, cid), str(e)
                assert [c["containerId"] for c in api(lone, f"?namespace={NAMESPACE}&podName=nocri")] == [cid]
                log = lone.log_text()
                assert log.count("CRI API at") == 1 and "pods come from containers' labels" in log, log[-2000:]
                assert "serving host data only" not in log
                assert lone.metric("netstatd_containerd_connected") == 1
        finally:
            server.close()


def wait_listening(pid: int, port: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ss = subprocess.run(
            ["nsenter", f"--net=/proc/{pid}/ns/net", "ss", "-Htln"], capture_output=True, text=True
        ).stdout
        if f":{port} " in ss:
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} in the container")
