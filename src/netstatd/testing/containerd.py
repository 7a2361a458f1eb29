"""A private containerd with the CRI plugin, a CNI bridge and local images: real pods for tests/benches.

Everything lives under a temp dir (root, state, sockets, runc root, CNI config, host-local IPAM data)
except what containerd 1.6 always puts elsewhere: shim sockets in /run/containerd/s, CNI results in
/var/lib/cni/results, the bridge and veths in the host netns, and pod cgroups. close() removes all of it
(also after a failure): pods and tasks, mounts (netns, rootfs), veths and the bridge, cgroups deepest
first, the daemon and any shim left, then the temp dir. No registry: the busybox image (also the pause
image) is assembled here as an OCI archive from busybox-static and imported with ctr.

Pods: run_pod() goes through CRI (RunPodSandbox, CreateContainer, StartContainer) with kubelet's
cgroupfs layout /kubepods/<qos>/pod<uid>/<id>. Other cgroup shapes (kubelet's systemd-driver scope,
containerd's default /<namespace>/<id>) need a literal cgroups path, which CRI cannot take:
run_plain_container() makes those with `ctr run` in the netstatd-test namespace, optionally joined to
a pod's netns.

Pod addresses come from a private 10.232.N.0/24 that exists only inside the pods (isGateway false:
the bridge gets no address and ip_forward is not touched). make_netns() gives ctr-made containers a
network namespace of their own with a veth to the host (10.234.N.0/24, a /30 per netns; 10.233 is the
test cluster's).

PrivateContainerd(cri=False) disables the CRI plugin: containerd's own API only, as on a node whose
CRI plugin is off or broken (run_pod() is then unavailable; run_plain_container() works).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import grpc

from netstatd.sources.containerd.protos import cri_pb2, cri_pb2_grpc
from netstatd.testing.agent import stop_process

BUSYBOX = "/bin/busybox"
CNI_BIN_DIR = "/usr/lib/cni"
IMAGE = "netstatd.test/busybox:1"
PAUSE_IMAGE = "netstatd.test/pause:1"
CRI_NS = "k8s.io"
CNI_RESULTS = "/var/lib/cni/results"
PLAIN_NS = "netstatd-test"  # containerd namespace for containers made with ctr (not CRI)
# Created by containerd 1.6 outside its configured dirs; removed at close() when empty and new.
SHARED_DIRS = (
    "/run/containerd/s",  # shim sockets
    "/run/containerd/fifo",
    f"/run/containerd/runc/{PLAIN_NS}",  # runc root of ctr-made tasks (CRI tasks use our runc root)
    "/run/containerd/runc",
    "/run/containerd",
    CNI_RESULTS,
    "/var/lib/cni",
)


def _sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


# ---- images


def _layer_tar() -> bytes:
    """A rootfs with /bin/busybox and a symlink per applet, plus the dirs runc expects."""
    applets = _sh(BUSYBOX, "--list").split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "sbin", "etc", "tmp", "proc", "sys", "dev", "root"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, "bin/busybox")
        for a in applets:
            if a == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{a}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_oci_archive(path: str, images: dict[str, list[str]]) -> None:
    """Write an OCI image-layout tar holding one image per name (same layer, own Cmd)."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest, len(data)

    layer = _layer_tar()
    layer_digest, layer_size = blob(layer)
    manifests = []
    for name, cmd in images.items():
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin:/sbin"], "Cmd": cmd, "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
        cfg_digest, cfg_size = blob(json.dumps(config).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}
            ],
        }
        m_digest, m_size = blob(json.dumps(manifest).encode())
        manifests.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": m_digest,
                "size": m_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
            }
        )
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": json.dumps(index).encode()}
    files.update({f"blobs/sha256/{d.split(':', 1)[1]}": data for d, data in blobs.items()})
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---- cgroups and mounts


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            out.append((left.split()[4].replace("\\040", " "), right.split()[0]))
    return out


def cgroup_mounts() -> list[str]:
    """Every cgroup v1 hierarchy and the v2 mount (hybrid hosts have both)."""
    return [mp for mp, fstype in _mountinfo() if fstype in ("cgroup", "cgroup2")]


def remove_cgroup_tree(rel: str) -> None:
    """Kill what is left in the cgroup `rel` (e.g. /kubepods/besteffort/pod<uid>) and rmdir it deepest first."""
    for mount in cgroup_mounts():
        top = os.path.join(mount, rel.lstrip("/"))
        if not os.path.isdir(top):
            continue
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            for _ in range(50):  # killed processes leave the cgroup asynchronously
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
                    break
                with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.02)


# ---- pods


def kubelet_cgroupfs_parent(uid: str, qos: str = "besteffort") -> str:
    return f"/kubepods/{qos}/pod{uid}"


def kubelet_systemd_parent(uid: str, qos: str = "besteffort") -> str:
    """The systemd driver's pod slice. containerd turns a *.slice parent into runc's "slice:prefix:id"
    form, which only the systemd driver understands, so this is for paths built by hand (ctr --cgroup)."""
    u = uid.replace("-", "_")
    return f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice"


def systemd_scope_path(uid: str, container_id: str, qos: str = "besteffort") -> str:
    """The cgroup kubelet's systemd driver gives a CRI container (a literal path for the cgroupfs driver)."""
    return f"{kubelet_systemd_parent(uid, qos)}/cri-containerd-{container_id}.scope"


@dataclass
class Pod:
    name: str
    namespace: str
    uid: str
    sandbox_id: str
    host_network: bool
    cgroup_parent: str
    sandbox_config: cri_pb2.PodSandboxConfig
    containers: dict[str, str] = field(default_factory=dict)  # container name -> container id


@dataclass(frozen=True)
class Netns:
    name: str  # under /run/netns
    host_veth: str
    host_ip: str  # the host's end of the veth
    ns_ip: str  # the namespace's end

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"


class PrivateContainerd:
    """containerd + CRI + CNI bridge under a temp dir. Use as a context manager; close() always cleans up."""

    def __init__(self, tag: str | None = None, subnet: int = 0, cri: bool = True) -> None:
        self.tag = tag or secrets.token_hex(3)
        self.with_cri = cri
        n = subnet or (int(self.tag, 16) % 200 + 20)
        self.subnet = f"10.232.{n}.0/24"
        self.veth_subnet = n  # 10.234.<n>.0/24 for make_netns()
        self.netns: list[Netns] = []
        self.bridge = f"nsdbr{self.tag}"[:15]
        self.network = f"netstatd-test-{self.tag}"
        self.dir = ""
        self.proc: subprocess.Popen | None = None
        self.pods: list[Pod] = []
        self._cgroups: list[str] = []  # pod-level cgroups to remove
        self._new_shared_dirs = [d for d in SHARED_DIRS if not os.path.exists(d)]
        self._channel: grpc.Channel | None = None
        self.cri: cri_pb2_grpc.RuntimeServiceStub | None = None

    # paths
    @property
    def socket(self) -> str:
        return os.path.join(self.dir, "containerd.sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "containerd.log")

    def log_text(self) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return f.read()
        return ""

    def ctr(self, *argv: str, namespace: str = CRI_NS, check: bool = True) -> str:
        cmd = ["ctr", "--address", self.socket, "--namespace", namespace, *argv]
        return _sh(*cmd, check=check)

    # ---- lifecycle

    def open(self) -> PrivateContainerd:
        try:
            self._start()
        except Exception:
            log = self.log_text()[-3000:]
            self.close()
            if log:
                print(f"containerd log (tail):\n{log}")
            raise
        return self

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("root", "state", "opt", "runc", "cni/net.d", "cni/ipam", "logs"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        disabled = "" if self.with_cri else 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
        config = f"""version = 2
{disabled}
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # CAP_SYS_RESOURCE is missing here: without this RunPodSandbox fails ("can't get final child's PID")
  restrict_oom_score_adj = true
  # netns bind mounts under our state dir instead of /var/run/netns
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
[{cri}.containerd]
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{d}/runc"
[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{d}/cni/net.d"
  max_conf_num = 1
"""
        with open(os.path.join(d, "config.toml"), "w") as f:
            f.write(config)
        conflist = {
            "cniVersion": "1.0.0",
            "name": self.network,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": False,
                    "ipMasq": False,
                    "hairpinMode": False,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": f"{d}/cni/ipam",
                        "ranges": [[{"subnet": self.subnet, "rangeStart": self.subnet.replace(".0/24", ".10")}]],
                    },
                },
                {"type": "loopback"},
            ],
        }
        with open(os.path.join(d, "cni/net.d/10-netstatd.conflist"), "w") as f:
            json.dump(conflist, f)

    def _start(self) -> None:
        # short: unix socket paths are limited to 108 bytes
        self.dir = tempfile.mkdtemp(prefix=f"nsd-ctd-{self.tag}-", dir="/tmp")
        self._write_config()
        self.start_daemon()
        archive = os.path.join(self.dir, "images.tar")
        build_oci_archive(archive, {IMAGE: ["/bin/sh"], PAUSE_IMAGE: ["/bin/sleep", "2147483647"]})
        self.ctr("images", "import", archive)
        self.ctr("images", "import", archive, namespace=PLAIN_NS)

    def start_daemon(self, timeout: float = 10) -> None:
        """Start containerd on the existing dirs (also after stop_daemon) and wait until CRI is ready."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the daemon, closed with it
        try:
            self.proc = subprocess.Popen(
                ["containerd", "--config", os.path.join(self.dir, "config.toml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):  # a stale socket passes here; _wait_ready catches that
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start (exit {self.proc.poll()})")
            time.sleep(0.02)
        self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.cri = cri_pb2_grpc.RuntimeServiceStub(self._channel)
        self._wait_ready(deadline)

    def stop_daemon(self, kill: bool = False) -> None:
        """Stop only the daemon (SIGTERM, or SIGKILL to simulate a crash): tasks and shims keep running."""
        if kill and self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._stop_daemon()

    def restart_daemon(self, kill: bool = False) -> None:
        self.stop_daemon(kill=kill)
        self.start_daemon()

    def _wait_ready(self, deadline: float) -> None:
        """RuntimeReady and NetworkReady (the CNI conflist is picked up shortly after start); without
        CRI, containerd's own API answering."""
        assert self.cri is not None
        while not self.with_cri:
            cmd = ["ctr", "--address", self.socket, "version"]
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("containerd does not answer")
            time.sleep(0.05)
        while True:
            with contextlib.suppress(grpc.RpcError):
                conds = self.cri.Status(cri_pb2.StatusRequest(), timeout=2).status.conditions
                if conds and all(c.status for c in conds):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("CRI runtime/network not ready")
            time.sleep(0.05)

    # ---- pods through CRI, as kubelet does

    def run_pod(
        self,
        name: str,
        containers: dict[str, list[str]],
        namespace: str = "default",
        host_network: bool = False,
        labels: dict[str, str] | None = None,
        uid: str | None = None,
        qos: str = "besteffort",
    ) -> Pod:
        """RunPodSandbox, then CreateContainer + StartContainer per entry (container name -> command)."""
        assert self.cri is not None
        uid = uid or str(uuid.uuid4())
        parent = kubelet_cgroupfs_parent(uid, qos)
        mode = cri_pb2.NODE if host_network else cri_pb2.POD
        ns_opts = cri_pb2.NamespaceOption(network=mode, pid=cri_pb2.CONTAINER, ipc=cri_pb2.POD)
        pod_labels = {
            "io.kubernetes.pod.name": name,
            "io.kubernetes.pod.namespace": namespace,
            "io.kubernetes.pod.uid": uid,
            **(labels or {}),
        }
        config = cri_pb2.PodSandboxConfig(
            metadata=cri_pb2.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            hostname="" if host_network else name,  # kubelet leaves it empty: hostNetwork shares the UTS ns
            labels=pod_labels,
            linux=cri_pb2.LinuxPodSandboxConfig(
                cgroup_parent=parent,
                security_context=cri_pb2.LinuxSandboxSecurityContext(namespace_options=ns_opts),
            ),
        )
        pod = self.run_sandbox(config)
        for cname, command in containers.items():
            self.start_container(pod, cname, command)
        return pod

    def run_sandbox(self, config: cri_pb2.PodSandboxConfig) -> Pod:
        """RunPodSandbox from a whole config (its cgroup parent is removed at close())."""
        assert self.cri is not None
        parent = config.linux.cgroup_parent
        self._cgroups.append(parent)
        sandbox_id = self.cri.RunPodSandbox(cri_pb2.RunPodSandboxRequest(config=config), timeout=30).pod_sandbox_id
        host_network = config.linux.security_context.namespace_options.network == cri_pb2.NODE
        meta = config.metadata
        pod = Pod(meta.name, meta.namespace, meta.uid, sandbox_id, host_network, parent, config)
        self.pods.append(pod)
        return pod

    def start_container(self, pod: Pod, name: str, command: list[str]) -> str:
        mode = cri_pb2.NODE if pod.host_network else cri_pb2.POD
        cconfig = cri_pb2.ContainerConfig(
            metadata=cri_pb2.ContainerMetadata(name=name, attempt=0),
            image=cri_pb2.ImageSpec(image=IMAGE),
            command=command,
            labels={
                "io.kubernetes.pod.name": pod.name,
                "io.kubernetes.pod.namespace": pod.namespace,
                "io.kubernetes.pod.uid": pod.uid,
                "io.kubernetes.container.name": name,
            },
            linux=cri_pb2.LinuxContainerConfig(
                security_context=cri_pb2.LinuxContainerSecurityContext(
                    namespace_options=cri_pb2.NamespaceOption(network=mode, pid=cri_pb2.CONTAINER, ipc=cri_pb2.POD)
                )
            ),
        )
        cid = self.create_container(pod, cconfig)
        self.cri.StartContainer(cri_pb2.StartContainerRequest(container_id=cid), timeout=30)
        return cid

    def create_container(self, pod: Pod, config: cri_pb2.ContainerConfig) -> str:
        """CreateContainer from a whole config in the pod's sandbox (StartContainer is the caller's)."""
        assert self.cri is not None
        req = cri_pb2.CreateContainerRequest(
            pod_sandbox_id=pod.sandbox_id, config=config, sandbox_config=pod.sandbox_config
        )
        cid = self.cri.CreateContainer(req, timeout=30).container_id
        pod.containers[config.metadata.name] = cid
        return cid

    def import_image(self, archive: str, name: str) -> None:
        """Import an OCI archive into the CRI namespace and name its (only) image `name`, which must be
        fully qualified (docker.io/library/x:tag for a manifest's `x:tag`)."""
        before = set(self.ctr("images", "list", "-q").split())
        self.ctr("images", "import", archive)
        # The CRI plugin lists each image by its id (sha256:...) as well: names only.
        imported = [
            r for r in self.ctr("images", "list", "-q").split() if r not in before and not r.startswith("sha256:")
        ]
        if name not in imported:
            if len(imported) != 1:
                raise RuntimeError(f"{archive}: expected one image, imported {imported}")
            self.ctr("images", "tag", imported[0], name)

    def remove_container(self, container_id: str) -> None:
        assert self.cri is not None
        # Right after its task exits, the CRI plugin still handles the exit asynchronously: Stop can fail
        # ("ttrpc: closed") and Remove can say "still running". kubelet retries too.
        deadline = time.monotonic() + 10
        while True:
            try:
                self.cri.StopContainer(cri_pb2.StopContainerRequest(container_id=container_id, timeout=0), timeout=30)
                self.cri.RemoveContainer(cri_pb2.RemoveContainerRequest(container_id=container_id), timeout=30)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for pod in self.pods:
            pod.containers = {n: c for n, c in pod.containers.items() if c != container_id}

    def remove_pod(self, pod: Pod) -> None:
        """StopPodSandbox (kills its containers, CNI DEL) and RemovePodSandbox, then the pod cgroup."""
        assert self.cri is not None
        self.cri.StopPodSandbox(cri_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=30)
        self.cri.RemovePodSandbox(cri_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=30)
        if pod in self.pods:
            self.pods.remove(pod)
        remove_cgroup_tree(pod.cgroup_parent)

    # ---- containers with ctr: any literal cgroups path (runc's cgroupfs driver takes it verbatim)

    def run_plain_container(
        self,
        container_id: str,
        command: list[str],
        cgroups_path: str = "",
        labels: dict[str, str] | None = None,
        netns_path: str = "",
        namespace: str = PLAIN_NS,
        host_network: bool = False,
    ) -> int:
        """`ctr run -d`: returns the task pid. cgroups_path "" gives containerd's default /<namespace>/<id>.

        For kubelet's systemd-driver shape pass systemd_scope_path(uid, id) (the systemd driver itself
        fails here: PID 1 is not systemd). netns_path joins that netns (e.g. a CRI pod's, or one from
        make_netns()), host_network the host's (`--net-host`: no network namespace in the spec), else a
        new one with only loopback.
        """
        argv = ["run", "-d", "--null-io"]
        if cgroups_path:
            argv += ["--cgroup", cgroups_path]
        for k, v in (labels or {}).items():
            argv += ["--label", f"{k}={v}"]
        if netns_path:
            argv += ["--with-ns", f"network:{netns_path}"]
        if host_network:
            argv += ["--net-host"]
        # Its own cgroup only for the default path: /<namespace> may hold other instances' containers.
        self._cgroups.append(os.path.dirname(cgroups_path) if cgroups_path else f"/{namespace}/{container_id}")
        self.ctr(*argv, IMAGE, container_id, *command, namespace=namespace)
        return self.container_pid(container_id, namespace)

    def remove_plain_container(self, container_id: str, namespace: str = PLAIN_NS) -> None:
        """Kill a ctr-made container's task and delete it (its cgroups go at close())."""
        self.ctr("tasks", "kill", "-s", "KILL", container_id, namespace=namespace, check=False)
        deadline = time.monotonic() + 10
        # The task can be deleted only once it has exited (the kill is asynchronous).
        while container_id in self.ctr("tasks", "list", "-q", namespace=namespace).split():
            self.ctr("tasks", "delete", container_id, namespace=namespace, check=False)
            if time.monotonic() > deadline:
                raise RuntimeError(f"task {container_id} did not exit")
            time.sleep(0.05)
        self.ctr("containers", "delete", container_id, namespace=namespace)

    def bridge_address(self) -> str:
        """The host's address on the pod bridge (.1 of the pod subnet), made on first use: CNI here has no
        gateway (isGateway false), so pods reach the host only at this address."""
        ip = str(ipaddress.ip_network(self.subnet).network_address + 1)
        if f" {self.bridge}:" not in _sh("ip", "-o", "link", "show"):
            self.run_pod("bridge", {"main": ["sleep", "3600"]}, namespace="setup")  # CNI creates the bridge
        if f" {ip}/" not in _sh("ip", "-o", "-4", "addr", "show", "dev", self.bridge):
            _sh("ip", "addr", "add", f"{ip}/24", "dev", self.bridge)
        return ip

    def container_exited(self, container_id: str) -> bool:
        """Its process has exited (CRI's CONTAINER_EXITED)."""
        assert self.cri is not None
        request = cri_pb2.ContainerStatusRequest(container_id=container_id)
        return self.cri.ContainerStatus(request, timeout=10).status.state == cri_pb2.CONTAINER_EXITED

    def pod_ip(self, pod: Pod) -> str:
        """The pod's address from CRI (empty for a hostNetwork pod)."""
        assert self.cri is not None
        request = cri_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id)
        return self.cri.PodSandboxStatus(request, timeout=10).status.network.ip

    def make_netns(self) -> Netns:
        """A named network namespace with a veth to the host (a /30: host .1, namespace .2), for ctr
        containers that must reach the host without a CRI pod; removed at close()."""
        i = len(self.netns)
        base = f"10.234.{self.veth_subnet}"
        # The first /30 after ours that no interface has: another instance may share our subnet.
        taken = _sh("ip", "-o", "-4", "addr", "show")
        first = int(self.netns[-1].host_ip.rsplit(".", 1)[1]) // 4 + 1 if self.netns else 0
        slot = next((k for k in range(first, 64) if f" {base}.{4 * k + 1}/" not in taken), None)
        if slot is None:
            raise RuntimeError(f"make_netns: no free /30 left in {base}.0/24")
        ns = Netns(
            name=f"nsd-{self.tag}-{i}",
            host_veth=f"nsdv{self.tag}{i}"[:15],
            host_ip=f"{base}.{4 * slot + 1}",
            ns_ip=f"{base}.{4 * slot + 2}",
        )
        self.netns.append(ns)
        peer = f"nsdp{self.tag}{i}"[:15]
        _sh("ip", "netns", "add", ns.name)
        _sh("ip", "link", "add", ns.host_veth, "type", "veth", "peer", "name", peer)
        _sh("ip", "link", "set", peer, "netns", ns.name)
        _sh("ip", "addr", "add", f"{ns.host_ip}/30", "dev", ns.host_veth)
        _sh("ip", "link", "set", ns.host_veth, "up")
        for cmd in (
            ("addr", "add", f"{ns.ns_ip}/30", "dev", peer),
            ("link", "set", peer, "up"),
            ("link", "set", "lo", "up"),
        ):
            _sh("ip", "-n", ns.name, *cmd)
        return ns

    def container_pid(self, container_id: str, namespace: str = CRI_NS) -> int:
        """The init pid of a container's task (from ctr, independent of the client under test)."""
        for line in self.ctr("tasks", "list", namespace=namespace).splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == container_id:
                return int(parts[1])
        raise LookupError(container_id)

    # ---- teardown

    def close(self) -> None:
        """Remove everything this instance made; every step runs even when an earlier one fails."""
        steps = [
            self._remove_cri_pods,
            self._remove_tasks,
            self._stop_daemon,
            self._kill_shims,
            self._unmount,
            self._remove_network,
            self._remove_cgroups,
            self._remove_dir,
        ]
        errors = []
        for step in steps:
            try:
                step()
            except Exception as e:  # keep tearing down; report at the end
                errors.append(f"{step.__name__}: {e!r}")
        if errors:
            print("containerd teardown problems:\n  " + "\n  ".join(errors))

    def __enter__(self) -> PrivateContainerd:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and os.path.exists(self.socket)

    def _remove_cri_pods(self) -> None:
        if not self._alive() or self.cri is None or not self.with_cri:
            return
        for item in self.cri.ListPodSandbox(cri_pb2.ListPodSandboxRequest(), timeout=10).items:
            with contextlib.suppress(grpc.RpcError):
                self.cri.StopPodSandbox(cri_pb2.StopPodSandboxRequest(pod_sandbox_id=item.id), timeout=30)
            with contextlib.suppress(grpc.RpcError):
                self.cri.RemovePodSandbox(cri_pb2.RemovePodSandboxRequest(pod_sandbox_id=item.id), timeout=30)
        self.pods.clear()

    def _remove_tasks(self) -> None:
        """Containers made outside CRI (ctr), in any namespace."""
        if not self._alive():
            return
        for ns in self.ctr("namespaces", "list", "-q").split():
            for cid in self.ctr("tasks", "list", "-q", namespace=ns, check=False).split():
                self.ctr("tasks", "kill", "-s", "KILL", cid, namespace=ns, check=False)
                self.ctr("tasks", "delete", "-f", cid, namespace=ns, check=False)
            for cid in self.ctr("containers", "list", "-q", namespace=ns, check=False).split():
                self.ctr("containers", "delete", cid, namespace=ns, check=False)

    def _stop_daemon(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        stop_process(self.proc, 5)

    def _kill_shims(self) -> None:
        """Shims outlive the daemon when their task was not deleted; theirs carry our socket path."""
        if not self.dir:
            return
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if len(argv) > 1 and b"containerd-shim" in argv[0] and self.socket.encode() in argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def _unmount(self) -> None:
        """netns bind mounts and rootfs overlays left under our dir, deepest first."""
        if not self.dir:
            return
        mounts = [mp for mp, _ in _mountinfo() if mp.startswith(self.dir + "/")]
        for mp in sorted(set(mounts), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)

    def _remove_network(self) -> None:
        out = subprocess.run(["ip", "-o", "link", "show", "master", self.bridge], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            dev = line.split(":")[1].strip().split("@")[0]
            subprocess.run(["ip", "link", "del", dev], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for ns in self.netns:  # the peer veth goes with its namespace
            subprocess.run(["ip", "link", "del", ns.host_veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        self.netns.clear()
        if os.path.isdir(CNI_RESULTS):
            for f in os.listdir(CNI_RESULTS):
                if f.startswith(self.network + "-"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(CNI_RESULTS, f))

    def _remove_cgroups(self) -> None:
        for parent in reversed(self._cgroups):
            remove_cgroup_tree(parent)
        # the qos/kubepods levels too, but only when empty (rmdir fails otherwise): another user may own them
        for parent in self._cgroups:
            parts = parent.strip("/").split("/")
            for depth in range(len(parts) - 1, 0, -1):
                for mount in cgroup_mounts():
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(mount, *parts[:depth]))
        self._cgroups.clear()

    def _remove_dir(self) -> None:
        if self.dir and os.path.isdir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)
        for d in self._new_shared_dirs:  # deepest first by construction of SHARED_DIRS
            with contextlib.suppress(OSError):
                os.rmdir(d)
