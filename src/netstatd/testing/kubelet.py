"""The kubelet's part, for tests and benches: run a workload of the rendered deploy/ through CRI.

`Kubelet.run()` takes a pod template as `kubectl kustomize deploy/` renders it and does what the
kubelet does with it on a node, with nothing taken from elsewhere:
- RunPodSandbox with the template's host namespaces (hostNetwork, hostPID: NamespaceMode NODE),
  labels, DNS policy and the QoS cgroup parent;
- the volumes: hostPath (with its type checked), emptyDir (a tmpfs of its sizeLimit for medium
  Memory), Secret (files in a tmpfs in the kubelet's atomic-writer layout, with defaultMode);
- CreateContainer with image, command, args, env (the downward API's fieldRefs filled in), mounts,
  security context (capabilities, user, read-only root, seccomp, AppArmor, the default masked and
  read-only /proc paths) and resources; then StartContainer.
It refuses what it does not implement (a volume kind, subPath, an env source), so a manifest that
grows one fails here loudly instead of running differently. `probe()` runs an httpGet or tcpSocket
probe as the kubelet does: to the pod's IP (the node's, under hostNetwork), HTTPS unverified.

What a node would have and this machine has not is mapped by the caller: `host_paths` replaces a
hostPath (the tests' private containerd socket for /run/containerd/containerd.sock), `Node.cluster_dns`
is the cluster DNS server's address.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from netstatd.sources.containerd.protos import cri_pb2
from netstatd.testing.containerd import Pod, PrivateContainerd

# The kubelet's default /proc paths for procMount Default (runtime-spec masked and read-only paths).
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
CRITICAL_PRIORITY_CLASSES = ("system-node-critical", "system-cluster-critical")
HOST_PATH_TYPES = {
    "": lambda p: True,
    "Directory": os.path.isdir,
    "File": os.path.isfile,
    "Socket": lambda p: os.path.exists(p) and stat.S_ISSOCK(os.stat(p).st_mode),
    "CharDevice": lambda p: os.path.exists(p) and stat.S_ISCHR(os.stat(p).st_mode),
}
PROFILES = {
    "RuntimeDefault": (cri_pb2.SecurityProfile.RuntimeDefault, "runtime/default"),
    "Unconfined": (cri_pb2.SecurityProfile.Unconfined, "unconfined"),
}


def render(kustomization: str | Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders from a folder (what `kubectl apply -k` would send)."""
    out = subprocess.run(["kubectl", "kustomize", str(kustomization)], check=True, capture_output=True, text=True)
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} objects {kind}/{name} in the rendered manifests")
    return matches[0]


def quantity(text: str | int) -> float:
    """A Kubernetes quantity ("50m", "128Mi", "1Gi", "2") as a number (cores, bytes)."""
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    if not match or match[2] not in ("", *suffixes):
        raise ValueError(f"not a quantity: {text!r}")
    return float(match[1]) * suffixes.get(match[2], 1)


def qos_class(containers: list[dict[str, Any]]) -> str:
    """Guaranteed, Burstable or BestEffort, by the pod's requests and limits."""
    resources = [c.get("resources", {}) for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    for r in resources:
        limits, requests = r.get("limits", {}), {**r.get("limits", {}), **r.get("requests", {})}
        for name in ("cpu", "memory"):
            if name not in limits or quantity(requests[name]) != quantity(limits[name]):
                return "Burstable"
    return "Guaranteed"


@dataclass(frozen=True)
class Node:
    name: str  # spec.nodeName
    ip: str  # status.hostIP, and the pod IP under hostNetwork
    cluster_dns: tuple[str, ...]  # the kubelet's --cluster-dns
    cluster_domain: str = "cluster.local"
    memory_bytes: int = field(default_factory=lambda: os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass
class RunningPod:
    name: str
    namespace: str
    spec: dict[str, Any]
    pod: Pod
    created: dict[str, float] = field(default_factory=dict)  # container name -> time.monotonic() at Create
    log_dir: str = ""

    def container(self, name: str) -> dict[str, Any]:
        return next(c for c in self.spec["containers"] if c["name"] == name)

    def log(self, name: str) -> str:
        path = Path(self.log_dir, name, "0.log")
        return path.read_text(errors="replace") if path.exists() else ""


class Kubelet:
    """Runs pod templates on a PrivateContainerd. close() unmounts and removes the volumes it made."""

    def __init__(
        self,
        ctd: PrivateContainerd,
        node: Node,
        secrets: dict[str, dict[str, bytes]],
        host_paths: dict[str, str] | None = None,
    ) -> None:
        self.ctd = ctd
        self.node = node
        self.secrets = secrets  # Secret name -> key -> data (the cluster's Secrets)
        self.host_paths = host_paths or {}
        self.dir = Path(tempfile.mkdtemp(prefix="nsd-kubelet-"))
        self._mounts: list[Path] = []

    # ---- pods

    def run(self, template: dict[str, Any], namespace: str, name: str) -> RunningPod:
        spec = template["spec"]
        if spec.get("initContainers"):
            raise NotImplementedError("initContainers")
        uid = str(uuid.uuid4())
        pod_dir = self.dir / uid
        fs_group = spec.get("securityContext", {}).get("fsGroup")
        volumes = {v["name"]: self._volume(v, pod_dir / "volumes", fs_group) for v in spec.get("volumes", [])}
        self._check_host_ports(spec)
        running = RunningPod(name, namespace, spec, self.ctd.run_sandbox(self._sandbox(template, namespace, name, uid)))
        running.log_dir = running.pod.sandbox_config.log_directory
        assert self.ctd.cri is not None
        for container in spec["containers"]:
            config = self._container(running, container, volumes, pod_dir)
            running.created[container["name"]] = time.monotonic()
            cid = self.ctd.create_container(running.pod, config)
            self.ctd.cri.StartContainer(cri_pb2.StartContainerRequest(container_id=cid), timeout=30)
        return running

    def _namespaces(self, spec: dict[str, Any]) -> cri_pb2.NamespaceOption:
        return cri_pb2.NamespaceOption(
            network=cri_pb2.NODE if spec.get("hostNetwork") else cri_pb2.POD,
            pid=cri_pb2.NODE
            if spec.get("hostPID")
            else cri_pb2.POD
            if spec.get("shareProcessNamespace")
            else cri_pb2.CONTAINER,
            ipc=cri_pb2.NODE if spec.get("hostIPC") else cri_pb2.POD,
        )

    def _sandbox(self, template: dict[str, Any], namespace: str, name: str, uid: str) -> cri_pb2.PodSandboxConfig:
        spec = template["spec"]
        qos = qos_class(spec["containers"])
        parent = f"/kubepods/pod{uid}" if qos == "Guaranteed" else f"/kubepods/{qos.lower()}/pod{uid}"
        log_dir = self.dir / "logs" / f"{namespace}_{name}_{uid}"
        log_dir.mkdir(parents=True)
        pod_security = spec.get("securityContext", {})
        sandbox_security = cri_pb2.LinuxSandboxSecurityContext(
            namespace_options=self._namespaces(spec),
            privileged=any(c.get("securityContext", {}).get("privileged") for c in spec["containers"]),
            seccomp=self._profile(pod_security.get("seccompProfile"))[0],
        )
        if "runAsUser" in pod_security:
            sandbox_security.run_as_user.value = pod_security["runAsUser"]
        return cri_pb2.PodSandboxConfig(
            metadata=cri_pb2.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            hostname="" if spec.get("hostNetwork") else name,  # hostNetwork keeps the node's UTS namespace
            log_directory=str(log_dir),
            dns_config=self._dns(spec, namespace),
            labels={
                **template["metadata"].get("labels", {}),
                "io.kubernetes.pod.name": name,
                "io.kubernetes.pod.namespace": namespace,
                "io.kubernetes.pod.uid": uid,
            },
            annotations=template["metadata"].get("annotations", {}),
            linux=cri_pb2.LinuxPodSandboxConfig(
                cgroup_parent=parent,
                security_context=sandbox_security,
                sysctls={s["name"]: s["value"] for s in pod_security.get("sysctls", [])},
            ),
        )

    def _dns(self, spec: dict[str, Any], namespace: str) -> cri_pb2.DNSConfig | None:
        policy = spec.get("dnsPolicy", "ClusterFirst")
        # ClusterFirst under hostNetwork falls back to the node's resolv.conf; so does any cluster policy
        # on a kubelet without --cluster-dns. Here that would send queries off the machine: refuse.
        cluster = policy == "ClusterFirstWithHostNet" or (policy == "ClusterFirst" and not spec.get("hostNetwork"))
        if policy == "None":
            dns = spec.get("dnsConfig", {})
            return cri_pb2.DNSConfig(
                servers=dns.get("nameservers", []),
                searches=dns.get("searches", []),
                options=[f"{o['name']}:{o['value']}" if "value" in o else o["name"] for o in dns.get("options", [])],
            )
        if not cluster or not self.node.cluster_dns:
            raise NotImplementedError(f"dnsPolicy {policy}: only the cluster DNS is served here")
        domain = self.node.cluster_domain
        return cri_pb2.DNSConfig(
            servers=list(self.node.cluster_dns),
            searches=[f"{namespace}.svc.{domain}", f"svc.{domain}", domain],
            options=["ndots:5"],
        )

    def _check_host_ports(self, spec: dict[str, Any]) -> None:
        """A hostNetwork pod binds its ports on the node: say which one is taken, before starting it."""
        if not spec.get("hostNetwork"):
            return
        for c in spec["containers"]:
            for p in c.get("ports", []):
                kind = socket.SOCK_DGRAM if p.get("protocol") == "UDP" else socket.SOCK_STREAM
                with socket.socket(socket.AF_INET, kind) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
                    try:
                        s.bind(("0.0.0.0", p["containerPort"]))
                    except OSError as e:
                        raise RuntimeError(
                            f"port {p['containerPort']} ({p.get('name')}) of container {c['name']} is in use on "
                            f"this machine ({e.strerror}): the hostNetwork pod cannot bind it; stop what holds it"
                        ) from None

    # ---- volumes

    def _volume(self, volume: dict[str, Any], base: Path, fs_group: int | None) -> str:
        name = volume["name"]
        if "hostPath" in volume:
            source = volume["hostPath"]
            path = self.host_paths.get(source["path"], source["path"])
            kind = source.get("type", "")
            if kind in ("DirectoryOrCreate", "FileOrCreate"):
                if kind == "DirectoryOrCreate":
                    os.makedirs(path, exist_ok=True)
                else:
                    Path(path).touch()
            elif kind not in HOST_PATH_TYPES:
                raise NotImplementedError(f"hostPath type {kind}")
            elif not HOST_PATH_TYPES[kind](path):
                raise RuntimeError(f"volume {name}: hostPath {path} is not a {kind or 'path'}")
            return path
        if "emptyDir" in volume:
            path = base / "empty-dir" / name
            path.mkdir(parents=True)
            source = volume["emptyDir"] or {}
            if source.get("medium") == "Memory":
                size = int(quantity(source.get("sizeLimit", self.node.memory_bytes)))
                self._tmpfs(path, size)
            path.chmod(0o777)  # an emptyDir is writable by any user of the pod
            return str(path)
        if "secret" in volume:
            source = volume["secret"]
            data = self.secrets.get(source["secretName"])
            if data is None:
                if source.get("optional"):
                    data = {}
                else:
                    raise RuntimeError(f'volume {name}: secret "{source["secretName"]}" not found')
            path = base / "secret" / name
            path.mkdir(parents=True)
            self._tmpfs(path, 16 * 2**20)
            self._write_atomic(path, data, source.get("items"), source.get("defaultMode", 0o644), fs_group)
            return str(path)
        raise NotImplementedError(f"volume {name}: {sorted(set(volume) - {'name'})}")

    def _tmpfs(self, path: Path, size: int) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        self._mounts.append(path)

    @staticmethod
    def _write_atomic(
        path: Path, data: dict[str, bytes], items: list[dict] | None, mode: int, fs_group: int | None = None
    ) -> None:
        """The kubelet's layout: files in a timestamped folder, `..data` linking to it, and each key a
        link through `..data`; an update swaps `..data` at once. With the pod's fsGroup, files belong to
        that group."""
        version = path / time.strftime("..%Y_%m_%d_%H_%M_%S.0", time.gmtime())
        version.mkdir()
        files = (
            {i["path"]: (data[i["key"]], i.get("mode", mode)) for i in items}
            if items
            else {key: (value, mode) for key, value in data.items()}
        )
        for rel, (value, file_mode) in files.items():
            target = version / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(value)
            target.chmod(file_mode)
            if fs_group is not None:
                os.chown(target, 0, fs_group)
        (path / "..data").symlink_to(version.name)
        for top in {rel.split("/", 1)[0] for rel in files}:
            (path / top).symlink_to(f"..data/{top}")

    # ---- containers

    def _env(self, running: RunningPod, container: dict[str, Any]) -> list[cri_pb2.KeyValue]:
        fields = {
            "metadata.name": running.name,
            "metadata.namespace": running.namespace,
            "metadata.uid": running.pod.uid,
            "spec.nodeName": self.node.name,
            "spec.serviceAccountName": running.spec.get("serviceAccountName", "default"),
            "status.hostIP": self.node.ip,
        }
        fields["status.podIP"] = self.node.ip if running.spec.get("hostNetwork") else self.ctd.pod_ip(running.pod)
        env: dict[str, str] = {}
        for e in container.get("env", []):
            if "value" in e or "valueFrom" not in e:
                env[e["name"]] = expand(e.get("value", ""), env)
            elif "fieldRef" in e["valueFrom"]:
                env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in e["valueFrom"]:
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = self.secrets[ref["name"]][ref["key"]].decode()
            else:
                raise NotImplementedError(f"env {e['name']}: {sorted(e['valueFrom'])}")
        return [cri_pb2.KeyValue(key=k, value=v) for k, v in env.items()]

    def _container(
        self, running: RunningPod, container: dict[str, Any], volumes: dict[str, str], pod_dir: Path
    ) -> cri_pb2.ContainerConfig:
        name = container["name"]
        envs = self._env(running, container)
        env = {kv.key: kv.value for kv in envs}
        mounts = []
        for m in container.get("volumeMounts", []):
            if m.get("subPath") or m.get("subPathExpr"):
                raise NotImplementedError(f"volumeMount {m['name']}: subPath")
            mounts.append(
                cri_pb2.Mount(
                    container_path=m["mountPath"], host_path=volumes[m["name"]], readonly=m.get("readOnly", False)
                )
            )
        # The termination message file: writable even under a read-only root filesystem.
        termination = pod_dir / "containers" / name / "termination-log"
        termination.parent.mkdir(parents=True)
        termination.touch()
        mounts.append(
            cri_pb2.Mount(
                container_path=container.get("terminationMessagePath", "/dev/termination-log"),
                host_path=str(termination),
            )
        )
        return cri_pb2.ContainerConfig(
            metadata=cri_pb2.ContainerMetadata(name=name, attempt=0),
            image=cri_pb2.ImageSpec(image=container["image"]),
            command=[expand(a, env) for a in container.get("command", [])],
            args=[expand(a, env) for a in container.get("args", [])],
            working_dir=container.get("workingDir", ""),
            envs=envs,
            mounts=mounts,
            labels={
                "io.kubernetes.pod.name": running.name,
                "io.kubernetes.pod.namespace": running.namespace,
                "io.kubernetes.pod.uid": running.pod.uid,
                "io.kubernetes.container.name": name,
            },
            log_path=f"{name}/0.log",
            linux=cri_pb2.LinuxContainerConfig(
                resources=self._resources(running, container), security_context=self._security(running, container)
            ),
        )

    def _resources(self, running: RunningPod, container: dict[str, Any]) -> cri_pb2.LinuxContainerResources:
        requests = {
            **container.get("resources", {}).get("limits", {}),
            **container.get("resources", {}).get("requests", {}),
        }
        limits = container.get("resources", {}).get("limits", {})
        out = cri_pb2.LinuxContainerResources(cpu_shares=max(2, int(quantity(requests.get("cpu", 0)) * 1024)))
        if "cpu" in limits:
            out.cpu_period = 100_000
            out.cpu_quota = int(quantity(limits["cpu"]) * 100_000)
        if "memory" in limits:
            out.memory_limit_in_bytes = int(quantity(limits["memory"]))
        qos = qos_class(running.spec["containers"])
        if running.spec.get("priorityClassName") in CRITICAL_PRIORITY_CLASSES or qos == "Guaranteed":
            out.oom_score_adj = -997
        elif qos == "BestEffort":
            out.oom_score_adj = 1000
        else:
            memory = quantity(requests.get("memory", 0))
            out.oom_score_adj = min(999, max(2, int(1000 - 1000 * memory / self.node.memory_bytes)))
        return out

    @staticmethod
    def _profile(spec: dict[str, Any] | None) -> tuple[cri_pb2.SecurityProfile, str]:
        """A seccomp or AppArmor profile: the CRI message and the older string form (both sent)."""
        if spec is None:
            return cri_pb2.SecurityProfile(profile_type=cri_pb2.SecurityProfile.Unconfined), "unconfined"
        if spec["type"] == "Localhost":
            ref = spec.get("localhostProfile", "")
            return cri_pb2.SecurityProfile(
                profile_type=cri_pb2.SecurityProfile.Localhost, localhost_ref=ref
            ), f"localhost/{ref}"
        kind, path = PROFILES[spec["type"]]
        return cri_pb2.SecurityProfile(profile_type=kind), path

    def _security(self, running: RunningPod, container: dict[str, Any]) -> cri_pb2.LinuxContainerSecurityContext:
        pod_sc = running.spec.get("securityContext", {})
        sc = {**pod_sc, **container.get("securityContext", {})}
        seccomp, seccomp_path = self._profile(sc.get("seccompProfile"))
        out = cri_pb2.LinuxContainerSecurityContext(
            capabilities=cri_pb2.Capability(
                add_capabilities=sc.get("capabilities", {}).get("add", []),
                drop_capabilities=sc.get("capabilities", {}).get("drop", []),
            ),
            privileged=sc.get("privileged", False),
            namespace_options=self._namespaces(running.spec),
            readonly_rootfs=sc.get("readOnlyRootFilesystem", False),
            supplemental_groups=pod_sc.get("supplementalGroups", []),
            no_new_privs=sc.get("allowPrivilegeEscalation") is False,
            seccomp=seccomp,
            seccomp_profile_path=seccomp_path,
        )
        # AppArmor: the runtime's default profile unless the spec says otherwise; on a node without
        # AppArmor the kubelet sets none (containerd refuses a profile there).
        if apparmor_enabled():
            apparmor, apparmor_name = self._profile(sc.get("appArmorProfile", {"type": "RuntimeDefault"}))
            out.apparmor.CopyFrom(apparmor)
            out.apparmor_profile = apparmor_name
        if not out.privileged:
            out.masked_paths.extend(MASKED_PATHS)
            out.readonly_paths.extend(READONLY_PATHS)
        if "runAsUser" in sc:
            out.run_as_user.value = sc["runAsUser"]
        if "runAsGroup" in sc:
            out.run_as_group.value = sc["runAsGroup"]
        return out

    # ---- probes

    def probe(self, running: RunningPod, container: str, kind: str = "readinessProbe", timeout: float = 0) -> bool:
        """One probe of `kind` as the kubelet runs it: True when it succeeds."""
        spec = running.container(container)[kind]
        host = self.node.ip if running.spec.get("hostNetwork") else self.ctd.pod_ip(running.pod)
        timeout = timeout or spec.get("timeoutSeconds", 1)
        if "tcpSocket" in spec:
            port = self._port(running, container, spec["tcpSocket"]["port"])
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
                return True
            return False
        get = spec["httpGet"]
        port = self._port(running, container, get["port"])
        scheme = get.get("scheme", "HTTP").lower()
        url = f"{scheme}://{get.get('host', host)}:{port}{get.get('path', '/')}"
        request = urllib.request.Request(url, headers={h["name"]: h["value"] for h in get.get("httpHeaders", [])})
        context = ssl._create_unverified_context()  # the kubelet does not verify a probe's certificate
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                return 200 <= response.status < 400
        except (urllib.error.URLError, OSError):
            return False

    @staticmethod
    def _port(running: RunningPod, container: str, port: int | str) -> int:
        if isinstance(port, int):
            return port
        return next(p["containerPort"] for p in running.container(container).get("ports", []) if p.get("name") == port)

    # ---- teardown

    def close(self) -> None:
        for path in reversed(self._mounts):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        self._mounts.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Kubelet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def apparmor_enabled() -> bool:
    path = Path("/sys/module/apparmor/parameters/enabled")
    return path.exists() and path.read_text().strip() == "Y"


def expand(text: str, env: dict[str, str]) -> str:
    """$(VAR) references in command, args and env values, as the kubelet expands them ($$ escapes)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)
