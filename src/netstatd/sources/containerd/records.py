"""What the containerd source knows about a pod or a container, as plain immutable values.

Built from containerd/CRI listings (inventory.py) and handed to the agent inside change records
(changes.py); the node state (state/containers.py) indexes them. Nothing here knows about events.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Pod:
    """A Kubernetes pod: from its CRI sandbox, else from the io.kubernetes.pod.* labels of its containers."""

    sandbox_id: str  # the CRI sandbox id; for a pod known only from labels, see labels.label_sandbox_id
    name: str
    namespace: str  # Kubernetes namespace
    uid: str
    labels: dict[str, str] = field(hash=False, compare=True)
    host_network: bool = False
    ips: tuple[str, ...] = ()  # from CRI only: () for a pod known from labels
    netns: int = 0  # network namespace inode; 0 when unknown (the host's for host-network pods)
    netns_path: str = field(default="", compare=False)  # a path that opens it (for its addresses); "" unknown


@dataclass(frozen=True, slots=True)
class Container:
    """A containerd container (not a pod's pause container) with the pod it belongs to, if any."""

    id: str
    runtime_namespace: str  # containerd namespace (k8s.io for CRI)
    image: str
    pod: Pod | None  # None for a container neither CRI nor its labels place in a pod (ctr, nerdctl, ...)
    container_name: str  # Kubernetes container name; the id when no label names it
    labels: dict[str, str] = field(hash=False, compare=True)  # the CRI pod's labels, else the container's own
    host_network: bool = False
    netns: int = 0
    cgroup_id: int = 0  # inode of its cgroup v2 directory, as the kernel reports it on every record; 0 unknown
