"""The node's containers and pods, and the lookups that attribute sockets to them.

Pure state: the containerd source fills it (put_pod/put/remove, or replace after a resync) and
reads back the container.added / container.deleted events to publish. Lookups by container id,
network namespace inode and pod IP are dict gets, cheap enough for every event of a flush.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..protocol import CONTAINER_ADDED, CONTAINER_DELETED

Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Pod:
    sandbox_id: str
    name: str
    namespace: str  # Kubernetes namespace
    uid: str
    labels: dict[str, str] = field(hash=False, compare=True)
    host_network: bool = False
    ips: tuple[str, ...] = ()
    netns: int = 0  # network namespace inode; 0 when unknown (the host's for host-network pods)
    netns_path: str = field(default="", compare=False)  # a path that opens it (for its addresses); "" unknown


@dataclass(frozen=True, slots=True)
class Container:
    id: str
    runtime_namespace: str  # containerd namespace (k8s.io for CRI)
    image: str
    pod: Pod | None  # None for containers outside CRI (ctr, nerdctl, ...)
    container_name: str  # Kubernetes container name; the id outside CRI
    labels: dict[str, str] = field(hash=False, compare=True)  # pod labels, or the container's own outside CRI
    host_network: bool = False
    netns: int = 0
    cgroup_id: int = 0  # inode of its cgroup v2 directory, as the kernel reports it on every record; 0 unknown

    @property
    def name(self) -> str:
        """Human-readable: <namespace>/<pod>/<container> for pods, <containerd namespace>/<id> otherwise."""
        if self.pod is not None:
            return f"{self.pod.namespace}/{self.pod.name}/{self.container_name}"
        return f"{self.runtime_namespace}/{self.id}"

    def fields(self) -> Event:
        pod = self.pod
        return {
            "containerId": self.id,
            "name": self.name,
            "podName": pod.name if pod else None,
            "namespace": pod.namespace if pod else None,
            "podUID": pod.uid if pod else None,
            "containerName": self.container_name,
            "image": self.image,
            "labels": self.labels,
            "usesHostNetwork": self.host_network,
            "podIPs": list(pod.ips) if pod and not self.host_network else [],
            "netns": self.netns,
        }


def _pod_fields(pod: Pod) -> Event:
    return {
        "host": False,
        "podName": pod.name,
        "namespace": pod.namespace,
        "podUID": pod.uid,
        "usesHostNetwork": pod.host_network,
    }


HOST_FIELDS: Event = {"host": True}


class ContainerIndex:
    """containers by id; pods by sandbox id, netns inode and pod IP."""

    def __init__(self, node_name: str, now: Callable[[], str]) -> None:
        self.node_name = node_name
        self.now = now
        self.containers: dict[str, Container] = {}
        self.pods: dict[str, Pod] = {}
        self._by_netns: dict[int, Pod] = {}
        self._by_ip: dict[str, Pod] = {}
        self._by_cgroup: dict[int, str] = {}  # cgroup id -> container id
        # per container / pod: the fields merged into connection and port events (built once)
        self._owner: dict[str, Event] = {}
        self._remote: dict[str, Event] = {}

    # -- changes (each returns the events to publish) -----------------------
    def put_pod(self, pod: Pod) -> None:
        old = self.pods.get(pod.sandbox_id)
        if old is not None:
            self._unindex_pod(old)
        self.pods[pod.sandbox_id] = pod
        # Host-network pods share the host's netns and IPs: those must stay the host's.
        if not pod.host_network:
            if pod.netns:
                self._by_netns[pod.netns] = pod
            for ip in pod.ips:
                self._by_ip[ip] = pod
                self._remote[ip] = {
                    "remotePodName": pod.name,
                    "remoteNamespace": pod.namespace,
                    "remotePodUID": pod.uid,
                }

    def remove_pod(self, sandbox_id: str) -> None:
        pod = self.pods.pop(sandbox_id, None)
        if pod is not None:
            self._unindex_pod(pod)

    def _unindex_pod(self, pod: Pod) -> None:
        if self._by_netns.get(pod.netns) is pod:
            del self._by_netns[pod.netns]
        for ip in pod.ips:
            if self._by_ip.get(ip) is pod:
                del self._by_ip[ip]
                del self._remote[ip]

    def put(self, c: Container) -> list[Event]:
        """Add or replace a container: container.added when it is new or anything about it changed."""
        if self.containers.get(c.id) == c:
            return []
        old = self.containers.get(c.id)
        if old is not None and old.cgroup_id:
            self._by_cgroup.pop(old.cgroup_id, None)
        self.containers[c.id] = c
        if c.cgroup_id:
            self._by_cgroup[c.cgroup_id] = c.id
        owner = {"host": False, **{k: v for k, v in c.fields().items() if k in _OWNER_KEYS}}
        self._owner[c.id] = owner
        return [self._event(CONTAINER_ADDED, c.fields())]

    def remove(self, container_id: str) -> list[Event]:
        c = self.containers.pop(container_id, None)
        if c is None:
            return []
        if self._by_cgroup.get(c.cgroup_id) == container_id:
            del self._by_cgroup[c.cgroup_id]
        del self._owner[container_id]
        return [self._event(CONTAINER_DELETED, {"containerId": container_id})]

    def replace(self, pods: Iterable[Pod], containers: Iterable[Container]) -> list[Event]:
        """The whole state from a fresh listing: deletes what is gone, adds what is new or changed."""
        fresh = {c.id: c for c in containers}
        out: list[Event] = []
        for cid in [cid for cid in self.containers if cid not in fresh]:
            out += self.remove(cid)
        for sid in list(self.pods):
            self.remove_pod(sid)
        for pod in pods:
            self.put_pod(pod)
        for c in fresh.values():
            out += self.put(c)
        return out

    def _event(self, kind: str, body: Event) -> Event:
        return {"type": kind, "timestamp": self.now(), "nodeName": self.node_name, **body}

    # -- reads ---------------------------------------------------------------
    def snapshot(self) -> list[Event]:
        return [self._event(CONTAINER_ADDED, c.fields()) for c in self.containers.values()]

    def query(self, namespace: str | None = None, pod_name: str | None = None) -> list[Event]:
        """Containers as container.added bodies; the filters are exact matches (None = any)."""
        out = []
        for c in self.containers.values():
            f = c.fields()
            if namespace is not None and f["namespace"] != namespace:
                continue
            if pod_name is not None and f["podName"] != pod_name:
                continue
            out.append(f)
        return out

    def container_fields(self, container_id: str) -> Event | None:
        """Owner fields for events of a process in this container (shared dict: copy before changing)."""
        return self._owner.get(container_id)

    def cgroup_fields(self, cgroup_id: int) -> Event | None:
        """Owner fields by the cgroup id of a kernel record: works after the process has exited."""
        cid = self._by_cgroup.get(cgroup_id)
        return self._owner.get(cid) if cid is not None else None

    def netns_fields(self, netns: int) -> Event | None:
        """Owner fields for a socket in a pod's own network namespace (the container is not known)."""
        pod = self._by_netns.get(netns)
        return _pod_fields(pod) if pod is not None else None

    def remote_fields(self, ip: str) -> Event | None:
        """remotePodName/remoteNamespace/remotePodUID when ip is a pod IP on this node."""
        return self._remote.get(ip)


# The fields a connection.event or port.listening gains from its container.
_OWNER_KEYS = ("containerId", "containerName", "podName", "namespace", "podUID", "usesHostNetwork")
