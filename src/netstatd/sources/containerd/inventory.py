"""containerd/CRI listings -> the node state's Pod and Container records."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from ...state.containers import Container, Pod
from .client import ContainerInfo, PodSandboxInfo, TaskInfo

KIND_LABEL = "io.cri-containerd.kind"  # "sandbox" or "container" on CRI-made containers
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"
CONTAINER_NAME_ANNOTATION = "io.kubernetes.cri.container-name"


def netns_inode(path: str) -> int:
    """Inode of a network namespace (a bind mount or /proc/PID/ns/net); 0 when it cannot be read."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


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


def build_container(
    c: ContainerInfo, pods: Mapping[str, Pod], task_pid: int, proc_root: str = "/proc", cgroup_root: str = ""
) -> Container:
    """A container record; its pod from `pods` (by sandbox id) when CRI made it."""
    pod = pods.get(c.pod_sandbox_id) if c.pod_sandbox_id else None
    cgid = cgroup_id(cgroup_root, c.cgroups_path)
    name = c.labels.get(CONTAINER_NAME_LABEL) or c.annotations.get(CONTAINER_NAME_ANNOTATION) or c.id
    if pod is not None:
        return Container(c.id, c.namespace, c.image, pod, name, pod.labels, pod.host_network, pod.netns, cgid)
    # Outside CRI: no network namespace entry in the spec means the host's.
    host_network = "network" not in c.linux_namespaces
    netns = netns_inode(f"{proc_root}/{task_pid}/ns/net") if task_pid else 0
    return Container(c.id, c.namespace, c.image, None, name, dict(c.labels), host_network, netns, cgid)


def build_all(
    containers: Iterable[ContainerInfo],
    tasks: Iterable[TaskInfo],
    sandboxes: Iterable[PodSandboxInfo],
    proc_root: str = "/proc",
    cgroup_root: str = "",
) -> tuple[list[Pod], list[Container]]:
    """Pods from CRI sandboxes; containers without the sandboxes' own (pause) containers."""
    pods = {s.id: build_pod(s, proc_root) for s in sandboxes}
    pids = {(t.namespace, t.container_id): t.pid for t in tasks if t.status == "RUNNING"}
    out = [
        build_container(c, pods, pids.get((c.namespace, c.id), 0), proc_root, cgroup_root)
        for c in containers
        if not is_sandbox(c)
    ]
    return list(pods.values()), out
