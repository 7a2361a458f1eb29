"""containerd/CRI listings -> Pod and Container records (records.py).

A container's pod comes from its CRI sandbox; when CRI has none for it (a container made outside CRI,
or CRI off or not answering), from its own io.kubernetes.pod.* labels (labels.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from .client import ContainerInfo, PodSandboxInfo, TaskInfo
from .labels import KIND_LABEL, pod_from_labels
from .records import Container, Pod

CONTAINER_NAME_LABEL = "io.kubernetes.container.name"
CONTAINER_NAME_ANNOTATION = "io.kubernetes.cri.container-name"


def netns_inode(path: str) -> int:
    """Inode of a network namespace (a bind mount or /proc/PID/ns/net); 0 when it cannot be read."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def host_netns(proc_root: str = "/proc") -> frozenset[int]:
    """The host's network namespace: PID 1's, and the agent's own (a hostNetwork DaemonSet shares it)."""
    return frozenset(i for i in (netns_inode(f"{proc_root}/1/ns/net"), netns_inode("/proc/self/ns/net")) if i)


def cgroup_id(cgroup_root: str, cgroups_path: str) -> int:
    """The cgroup v2 id (directory inode) of a container's cgroupfs-style path; 0 when not found.

    Only literal paths resolve: the systemd driver's `slice:prefix:id` form is left to /proc/PID/cgroup.
    """
    if not cgroup_root or not cgroups_path.startswith("/"):
        return 0
    try:
        return os.stat(cgroup_root + cgroups_path).st_ino
    except OSError:
        return 0


def is_sandbox(c: ContainerInfo) -> bool:
    return c.labels.get(KIND_LABEL) == "sandbox"


def build_pod(s: PodSandboxInfo, proc_root: str = "/proc") -> Pod:
    netns = netns_inode(s.netns_path) if s.netns_path else 0
    if not netns and s.pid:
        netns = netns_inode(f"{proc_root}/{s.pid}/ns/net")  # host-network pods: the host's
    path = s.netns_path or (f"{proc_root}/{s.pid}/ns/net" if s.pid else "")
    return Pod(s.id, s.name, s.namespace, s.uid, dict(s.labels), s.host_network, s.ips, netns, path)


def _own_network(c: ContainerInfo, task_pid: int, proc_root: str, host: frozenset[int]) -> tuple[bool, int, str]:
    """(host network, netns inode, a path to it) of a container outside CRI, from its running task.

    Host network: no network namespace in its spec (ctr --net-host), or its task's is the host's.
    """
    path = f"{proc_root}/{task_pid}/ns/net" if task_pid else ""
    netns = netns_inode(path) if path else 0
    return "network" not in c.linux_namespaces or netns in host, netns, path


def sandbox_pod_from_labels(
    c: ContainerInfo, task_pid: int, proc_root: str = "/proc", host: frozenset[int] = frozenset()
) -> Pod | None:
    """The pod of a sandbox (pause) container CRI did not report, from the sandbox's labels."""
    return pod_from_labels(c, *_own_network(c, task_pid, proc_root, host))


def build_container(
    c: ContainerInfo,
    pods: Mapping[str, Pod],
    task_pid: int,
    proc_root: str = "/proc",
    cgroup_root: str = "",
    host: frozenset[int] = frozenset(),
) -> Container:
    """A container record: its pod from `pods` (by sandbox id), else from its labels, else none.

    host: the host's netns inodes (host_netns()), which make a container outside CRI host-network.
    """
    pod = pods.get(c.pod_sandbox_id) if c.pod_sandbox_id else None
    cgid = cgroup_id(cgroup_root, c.cgroups_path)
    name = c.labels.get(CONTAINER_NAME_LABEL) or c.annotations.get(CONTAINER_NAME_ANNOTATION) or c.id
    if pod is not None:
        return Container(c.id, c.namespace, c.image, pod, name, pod.labels, pod.host_network, pod.netns, cgid)
    host_network, netns, path = _own_network(c, task_pid, proc_root, host)
    pod = pod_from_labels(c, host_network, netns, path)
    return Container(c.id, c.namespace, c.image, pod, name, dict(c.labels), host_network, netns, cgid)


def build_all(
    containers: Iterable[ContainerInfo],
    tasks: Iterable[TaskInfo],
    sandboxes: Iterable[PodSandboxInfo],
    proc_root: str = "/proc",
    cgroup_root: str = "",
    host: frozenset[int] = frozenset(),
) -> tuple[list[Pod], list[Container]]:
    """Pods from CRI sandboxes (else from sandbox containers' labels); containers without the
    sandboxes' own (pause) containers. Pods known only from app containers' labels are in those."""
    containers = list(containers)
    pods = {s.id: build_pod(s, proc_root) for s in sandboxes}
    pids = {(t.namespace, t.container_id): t.pid for t in tasks if t.status == "RUNNING"}
    for c in containers:
        if is_sandbox(c) and c.id not in pods:
            pod = sandbox_pod_from_labels(c, pids.get((c.namespace, c.id), 0), proc_root, host)
            if pod is not None:
                pods[pod.sandbox_id] = pod
    out = [
        build_container(c, pods, pids.get((c.namespace, c.id), 0), proc_root, cgroup_root, host)
        for c in containers
        if not is_sandbox(c)
    ]
    return list(pods.values()), out
