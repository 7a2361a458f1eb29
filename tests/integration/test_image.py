"""The image and the DaemonSet's pod, run as a kubelet would run them (`make test-image`).

The image is the one `make image` built. The pod comes from the rendered deploy/ through CRI
(testing.kubelet): host network and host PID, the manifest's capabilities, seccomp, read-only root,
user, env, volumes, args and probes, and the Secrets made by the manifest's own setup commands. The
agent inside follows the tests' private containerd (mounted where the manifest mounts the node's
socket) and finds its multiplexer's peers through a cluster DNS server on a loopback address.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

import pytest

from netstatd.testing import image
from netstatd.testing.agent import process_status
from netstatd.testing.agent_pod import SERVICE, AgentPod
from netstatd.testing.kubelet import quantity
from netstatd.testing.stream import StreamClient
from tests.conftest import require
from tests.integration.container_traffic import Server, connection_events

pytestmark = pytest.mark.timeout(240)

PYTHON_EXE = os.path.realpath(sys.executable)
CONNECT_AND_WAIT = "import socket, time; s = socket.create_connection(('{ip}', {port})); time.sleep(1)"
# Linux capability numbers (linux/capability.h) of the names the manifest may add.
CAPABILITY_BITS = {"DAC_READ_SEARCH": 2, "NET_ADMIN": 12, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "PERFMON": 38, "BPF": 39}


@pytest.fixture(scope="module")
def agent_pod(ctd):
    require(shutil.which("kubectl"), "needs kubectl (make test-packages installs kubernetes-client)")
    require(image.built(), f"needs the image {image.TAG}: make test and make test-image build it (make image)")
    with AgentPod(ctd) as pod:
        pod.import_image()
        pod.start()
        print(f"CreateContainer to the first /metrics answer: {pod.ready_after:.2f} s")
        yield pod
        print(pod.log()[-3000:])


@pytest.fixture
def stream(agent_pod):
    with StreamClient(agent_pod.ws_url(), headers=agent_pod.headers, ssl_context=agent_pod.ssl_context()) as client:
        client.wait_snapshot()
        yield client


def test_probes_answer_as_the_kubelet_asks(agent_pod):
    name = agent_pod.container["name"]
    for kind in ("readinessProbe", "livenessProbe"):
        assert kind in agent_pod.container, f"the manifest has no {kind}"
        assert agent_pod.kubelet.probe(agent_pod.pod, name, kind, timeout=5), kind


def test_the_pod_demands_its_token(agent_pod):
    with pytest.raises(urllib.error.HTTPError) as refused:
        agent_pod.get("/metrics", token=False)
    assert refused.value.code == 401
    token_name = agent_pod.secrets["netstatd-tokens"]["tokens"].decode().split(":", 1)[0]
    assert json.loads(agent_pod.get("/api/whoami")) == {"name": token_name, "authRequired": True}


def test_metrics_pass_promtool(agent_pod):
    body = agent_pod.get("/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert b"netstatd_events_total" in body


def test_the_container_holds_only_the_manifest_capabilities(agent_pod):
    security = agent_pod.container["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    wanted = sum(1 << CAPABILITY_BITS[name] for name in security["capabilities"]["add"])
    pid = agent_pod.pid()
    fields = process_status(pid)
    assert int(fields["CapEff"], 16) == wanted, fields["CapEff"]
    assert int(fields["CapBnd"], 16) == wanted, fields["CapBnd"]
    assert fields["Uid"].split()[0] == str(security["runAsUser"])
    assert fields["Seccomp"] == "2"  # a filter: RuntimeDefault
    # The root filesystem is read-only, as readOnlyRootFilesystem says.
    root = next(line for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines() if line.split()[4] == "/")
    assert security["readOnlyRootFilesystem"] and "ro" in root.split()[5].split(","), root


def test_host_process_connection_carries_pid_and_exe(agent_pod, host_ip, stream):
    """A process outside any container, to a host address (loopback is left out by default)."""
    server = socket.create_server((host_ip, 0))
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept()[0].close(), daemon=True).start()
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CONNECT_AND_WAIT.format(ip=host_ip, port=port),
        ]
    )
    try:

        def outbound(e: dict) -> bool:
            return e["type"] == "connection.event" and e.get("remotePort") == port and e.get("pid") == client.pid

        event = stream.wait_for(outbound, timeout=10)
        assert event["exe"] == PYTHON_EXE
    finally:
        client.wait(timeout=10)
        server.close()


def test_cri_pod_connection_carries_pod_and_container(agent_pod, ctd, host_ip, stream):
    server = Server(host_ip)
    try:
        pod = ctd.run_pod("client", {"app": server.client_loop()}, namespace="image-test")
        events = connection_events(stream, server)
        assert {(e["podName"], e["namespace"], e["containerName"]) for e in events} == {("client", "image-test", "app")}
        assert {e["containerId"] for e in events} == {pod.containers["app"]}
    finally:
        server.close()


def test_the_multiplexer_reaches_the_agent_with_the_manifest_certificate(agent_pod):
    """The pod's own multiplexer finds the node through the cluster DNS (FANOUT_SERVICE) and gets in with
    the client certificate the manifest gives it: the cluster view streams this node."""
    url, ssl_context = agent_pod.ws_url(agent_pod.settings.http_mux_port), agent_pod.ssl_context()
    with StreamClient(url, headers=agent_pod.headers, ssl_context=ssl_context) as client:
        status = client.wait_for(lambda e: e["type"] == "peer.status" and e["status"] != "reconnecting", timeout=30)
        assert (status["status"], status["nodeName"]) == ("connected", agent_pod.node.name), status
        assert agent_pod.node.ip in status["hostInfo"]["hostIPs"]
        client.wait_for(lambda e: e["type"] == "port.listening" and e["nodeName"] == agent_pod.node.name)


def memory_limit(pid: int) -> int:
    """The memory limit of the cgroup a process is in (cgroup v1 memory controller, or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
        if controllers == "" and Path(f"/sys/fs/cgroup{path}/memory.max").exists():
            return int(Path(f"/sys/fs/cgroup{path}/memory.max").read_text())
    raise LookupError(f"no memory cgroup for pid {pid}")


def test_the_multiplexer_deployment_runs_unprivileged_and_streams_the_node(agent_pod, ctd):
    """The Deployment's replicas, each in its own pod network namespace as nobody with no capability,
    find the agent through the cluster DNS and stream it to a client that reaches them by the Service's
    name (the certificate's)."""
    pods = agent_pod.run_mux()
    deployment = agent_pod.mux_workload
    assert len(pods) == deployment["spec"]["replicas"]
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for pod in pods:
        pid = ctd.container_pid(pod.pod.containers[container["name"]])
        fields = process_status(pid)
        assert fields["Uid"].split()[0] == str(pod_security["runAsUser"])
        assert int(fields["CapEff"], 16) == int(fields["CapBnd"], 16) == 0
        assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
        assert memory_limit(pid) == quantity(container["resources"]["limits"]["memory"])
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")  # no host network
        headers, ssl_context = agent_pod.headers, agent_pod.ssl_context()
        url = agent_pod.mux_ws_url(pod)
        with StreamClient(url, headers=headers, ssl_context=ssl_context, server_hostname=SERVICE) as client:
            status = client.wait_for(lambda e: e["type"] == "peer.status" and e["status"] != "reconnecting", timeout=30)
            assert (status["status"], status["nodeName"]) == ("connected", agent_pod.node.name), status
            client.wait_for(lambda e: e["type"] == "port.listening" and e["nodeName"] == agent_pod.node.name)
