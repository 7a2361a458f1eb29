"""The DaemonSet's pod as a cluster would run it: the image `make image` built, the rendered deploy/,
the Secrets made by the manifest's own commands, run by testing.kubelet on a private containerd.

Used by tests/integration/test_image.py (`make test-image`) and bench/agent_pod.py. Run from the
repository (it reads deploy/ and runs scripts/make-certs.sh). Needs root, podman or buildah, kubectl,
unbound, and the ports the manifest names free on this machine (hostNetwork).
"""

from __future__ import annotations

import base64
import os
import random
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

from netstatd.api.deployment import deployment_info
from netstatd.testing import image
from netstatd.testing.containerd import PrivateContainerd
from netstatd.testing.dns import Zone
from netstatd.testing.kubelet import Kubelet, Node, RunningPod, find, render

REPO = Path(__file__).resolve().parents[3]
WORKLOAD = ("DaemonSet", "netstatd")
HOST_PATHS_REPLACED = ("/run/containerd/containerd.sock",)  # by the tests' private containerd's socket


def node_ip() -> str:
    """The node's address: the first global IPv4 address of this machine (loopback if it has none).
    Traffic to it stays on the machine."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        return line.split()[3].split("/")[0]
    return "127.0.0.1"


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
        workload = find(objects, *WORKLOAD)
        self.namespace: str = workload["metadata"]["namespace"]
        self.template: dict[str, Any] = workload["spec"]["template"]
        self.container: dict[str, Any] = self.template["spec"]["containers"][0]
        self.objects = objects
        self.secrets = secrets_from_commands(self.dir)
        self.token = self.secrets["netstatd-tokens"]["tokens"].decode().strip().split(":", 1)[1]
        self.ca_file = self.dir / "ca.crt"
        self.ca_file.write_bytes(self.secrets["netstatd-tls"]["ca.crt"])
        self.node = Node(name=socket.gethostname(), ip=node_ip(), cluster_dns=(_free_loopback_address(),))
        self.dns: Zone | None = None
        self.kubelet: Kubelet | None = None
        self.pod: RunningPod | None = None
        self.ready_after = 0.0  # seconds from CreateContainer to the first /metrics answer
        self.serving_after = 0.0  # ... to the log's "serving node" (programs attached, sockets seeded)

    def port(self, name: str) -> int:
        return next(p["containerPort"] for p in self.container["ports"] if p["name"] == name)

    def env(self, name: str) -> str:
        return next(e["value"] for e in self.container["env"] if e["name"] == name)

    # ---- lifecycle

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
        created = self.pod.created[self.container["name"]]
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/metrics", timeout=1)
                break
            except (urllib.error.URLError, OSError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no /metrics within {timeout}s ({e}); agent log:\n{self.log()[-4000:]}"
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

    def stop_pod(self) -> None:
        """Remove the pod (StopPodSandbox kills the agent), keep the rest: start() runs it again."""
        if self.pod is not None:
            self.ctd.remove_pod(self.pod.pod)
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
            subprocess.run(["rm", "-rf", str(self.dir)])

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

    def url(self, port_name: str = "http", path: str = "") -> str:
        return f"https://localhost:{self.port(port_name)}{path}"

    def ws_url(self, port_name: str = "http") -> str:
        return f"wss://localhost:{self.port(port_name)}/netstat"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, port_name: str = "http", timeout: float = 5, token: bool = True) -> bytes:
        headers = self.headers if token else {}
        request = urllib.request.Request(self.url(port_name, path), headers=headers)
        return urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context()).read()

    def pid(self) -> int:
        """The agent's pid on the host (its container's init process)."""
        assert self.pod is not None
        return self.ctd.container_pid(self.pod.pod.containers[self.container["name"]])

    def log(self) -> str:
        return self.pod.log(self.container["name"]) if self.pod else ""


def _free_loopback_address() -> str:
    """A loopback address whose port 53 is free, for the cluster DNS server (resolv.conf takes no port)."""
    for _ in range(50):
        address = f"127.53.{random.randrange(256)}.{random.randrange(1, 255)}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((address, 53))
                return address
            except OSError:
                continue
    raise RuntimeError("no loopback address with a free port 53 (is a DNS server bound to 0.0.0.0:53?)")
