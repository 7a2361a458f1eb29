"""deploy/'s pods as a cluster would run them: the image `make image` built, the rendered manifests,
the Secrets made by the manifest's own commands, run by testing.kubelet on a private containerd. The
DaemonSet's agent pod (this machine is the node), and the multiplexer Deployment's replicas in pod
network namespaces.

The node's address is the host's address on the pod bridge: pods reach the host only there (CNI has no
gateway here). The cluster DNS, an unbound on that address's port 53, answers for the headless
Services with it.

Used by tests/integration/test_image.py (`make test-image`) and bench/image.py. Run from the
repository (it reads deploy/ and runs scripts/make-certs.sh). Needs root, podman or buildah, kubectl,
unbound, and the ports the agent's manifest names free on this machine (hostNetwork).
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from netstatd import settings
from netstatd.api.deployment import deployment_info
from netstatd.testing import image
from netstatd.testing.containerd import PrivateContainerd
from netstatd.testing.dns import Zone
from netstatd.testing.kubelet import Kubelet, Node, RunningPod, find, render

REPO = Path(__file__).resolve().parents[3]
AGENT = ("DaemonSet", "netstatd")
MUX = ("Deployment", "netstatd-mux")
SERVICE = "netstatd"  # the name a user reaches the multiplexers by: their certificate carries it
HOST_PATHS_REPLACED = ("/run/containerd/containerd.sock",)  # by the tests' private containerd's socket


def secrets_from_commands(home: Path) -> dict[str, dict[str, bytes]]:
    """Run the manifest's setup commands (the `# $ ` lines before `kubectl apply`) with HOME=home, each
    `kubectl create secret` as a client-side dry run: the Secrets a user following them would make."""
    made: dict[str, dict[str, bytes]] = {}
    env = {**os.environ, "HOME": str(home)}
    for command in deployment_info()["commands"]:
        if command.startswith("kubectl apply"):
            break
        dry_run = " create secret " in command
        argv = f"{command} --dry-run=client -o yaml" if dry_run else command
        out = subprocess.run(["bash", "-c", argv], cwd=REPO, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"setup command failed: {command}\n{out.stderr}")
        if dry_run:
            secret = yaml.safe_load(out.stdout)
            made[secret["metadata"]["name"]] = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    return made


class AgentPod:
    """start(): the image imported, cluster DNS up, the pod created; it waits for the first /metrics.
    close() removes everything, also after a failure."""

    def __init__(self, ctd: PrivateContainerd) -> None:
        self.ctd = ctd
        self.dir = Path(tempfile.mkdtemp(prefix="nsd-agent-pod-"))
        objects = render(REPO / "deploy")
        workload = find(objects, *AGENT)
        self.namespace: str = workload["metadata"]["namespace"]
        self.template: dict[str, Any] = workload["spec"]["template"]
        self.container: dict[str, Any] = self.template["spec"]["containers"][0]
        self.settings = settings.parse(self.container["args"], environ={})  # the agent's, from its args
        self.mux_workload = find(objects, *MUX)
        self.objects = objects
        self.secrets = secrets_from_commands(self.dir)
        self.token = self.secrets["netstatd-tokens"]["tokens"].decode().strip().split(":", 1)[1]
        self.ca_file = self.dir / "ca.crt"
        self.ca_file.write_bytes(self.secrets["netstatd-tls"]["ca.crt"])
        address = ctd.bridge_address()
        self.node = Node(name=socket.gethostname(), ip=address, cluster_dns=(address,))
        self.dns: Zone | None = None
        self.kubelet: Kubelet | None = None
        self.pod: RunningPod | None = None
        self.mux_pods: list[RunningPod] = []
        self.ready_after = 0.0  # seconds from CreateContainer to the first /metrics answer
        self.serving_after = 0.0  # ... to the log's "serving node" (programs attached, sockets seeded)

    def import_image(self) -> None:
        if not image.built():
            raise RuntimeError(f"no image {image.TAG}: run make image")
        archive = self.dir / "image.tar"
        image.save(str(archive))
        self.ctd.import_image(str(archive), image.normalized(self.container["image"]))
        archive.unlink()

    def start(self, timeout: float = 60) -> AgentPod:
        self.dns = Zone(self._service_records(), zones=("cluster.local.",), address=self.node.cluster_dns[0], port=53)
        self.dns.start()
        host_paths = dict.fromkeys(HOST_PATHS_REPLACED, self.ctd.socket)
        self.kubelet = Kubelet(self.ctd, self.node, self.secrets, host_paths)
        self.pod = self.kubelet.run(self.template, self.namespace, f"netstatd-{random.randrange(16**5):05x}")
        name = self.container["name"]
        created = self.pod.created[name]
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/metrics", timeout=1)
                break
            except (urllib.error.URLError, OSError) as e:
                if time.monotonic() > deadline or self.ctd.container_exited(self.pod.pod.containers[name]):
                    raise RuntimeError(
                        f"no /metrics within {timeout}s or the agent exited ({e}); its log:\n{self.log()[-4000:]}"
                    ) from None
                time.sleep(0.05)
        self.ready_after = time.monotonic() - created
        # The agent logs "serving node" once its programs are attached and existing sockets seeded.
        while "serving node" not in self.log():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not start serving within {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        self.serving_after = time.monotonic() - created
        return self

    def run_mux(self, timeout: float = 60) -> list[RunningPod]:
        """The multiplexer Deployment's replicas (after start()), each once it answers /healthz."""
        assert self.kubelet is not None
        template = self.mux_workload["spec"]["template"]
        name = self.mux_workload["metadata"]["name"]
        for _ in range(self.mux_workload["spec"].get("replicas", 1)):
            pod = self.kubelet.run(template, self.namespace, f"{name}-{random.randrange(16**5):05x}")
            self.mux_pods.append(pod)
            container = pod.spec["containers"][0]["name"]
            deadline = time.monotonic() + timeout
            while not self.kubelet.probe(pod, container, "readinessProbe"):
                if time.monotonic() > deadline or self.ctd.container_exited(pod.pod.containers[container]):
                    raise RuntimeError(
                        f"{pod.name} not ready within {timeout}s, or exited:\n{pod.log(container)[-4000:]}"
                    )
                time.sleep(0.1)
        return self.mux_pods

    def mux_ws_url(self, pod: RunningPod) -> str:
        port = next(p["containerPort"] for p in pod.spec["containers"][0]["ports"] if p["name"] == "http-mux")
        return f"wss://{self.ctd.pod_ip(pod.pod)}:{port}/netstat"

    def stop_pod(self) -> None:
        """Remove the pods (StopPodSandbox kills their processes), keep the rest: start() runs it again."""
        for pod in [*self.mux_pods, *([self.pod] if self.pod else [])]:
            self.ctd.remove_pod(pod.pod)
        self.mux_pods.clear()
        self.pod = None
        if self.kubelet is not None:
            self.kubelet.close()
            self.kubelet = None
        if self.dns is not None:
            self.dns.close()
            self.dns = None

    def close(self) -> None:
        try:
            self.stop_pod()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> AgentPod:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _service_records(self) -> list[str]:
        """What the cluster DNS answers: each headless Service of the manifests names the node (the
        only pod, hostNetwork)."""
        domain = self.node.cluster_domain
        return [
            f"{s['metadata']['name']}.{s['metadata']['namespace']}.svc.{domain}. 30 IN A {self.node.ip}"
            for s in self.objects
            if s["kind"] == "Service" and s["spec"].get("clusterIP") == "None"
        ]

    # ---- clients

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def url(self, path: str = "", port: int = 0) -> str:
        """The agent's node port (its --http-port), or another of its ports."""
        return f"https://localhost:{port or self.settings.http_port}{path}"

    def ws_url(self, port: int = 0) -> str:
        return f"wss://localhost:{port or self.settings.http_port}/netstat"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, timeout: float = 5, token: bool = True) -> bytes:
        headers = self.headers if token else {}
        request = urllib.request.Request(self.url(path), headers=headers)
        return urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context()).read()

    def pid(self) -> int:
        """The agent's pid on the host (its container's init process)."""
        assert self.pod is not None
        return self.ctd.container_pid(self.pod.pod.containers[self.container["name"]])

    def log(self) -> str:
        return self.pod.log(self.container["name"]) if self.pod else ""
