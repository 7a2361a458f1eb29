"""The node's containers and pods, and the lookups that attribute sockets to them.

Pure state: the agent applies the containerd follower's changes to it (apply(), or put_pod/put/remove
and replace after a resync) and publishes the container.added / container.deleted events they return.
Lookups by container id, network namespace inode and pod IP are dict gets, cheap enough for every
event of a flush.

Pods come two ways. A pod whose sandbox is known (CRI, or its sandbox container's labels) is given
explicitly (put_pod) and lives until its sandbox goes (remove_pod). A pod known only from its
containers' io.kubernetes.pod.* labels (containers made outside CRI, or CRI not answering) is implied:
it exists while a container names it, and its containers (a sidecar in the same netns) share it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..metrics import Metric, single
from ..protocol import CONTAINER_ADDED, CONTAINER_DELETED
from ..sources.containerd.changes import (
    ContainerGone,
    ContainerSeen,
    IndexChange,
    Listed,
    PodGone,
    PodSeen,
)
from ..sources.containerd.records import Container, Pod

__all__ = ["HOST_FIELDS", "Container", "ContainerIndex", "Pod", "container_name"]

Event = dict[str, Any]


def container_name(c: Container) -> str:
    """Human-readable: <namespace>/<pod>/<container> for pods, <containerd namespace>/<id> otherwise."""
    if c.pod is not None:
        return f"{c.pod.namespace}/{c.pod.name}/{c.container_name}"
    return f"{c.runtime_namespace}/{c.id}"


def _container_body(c: Container) -> Event:
    """The container.added fields (docs/protocol.md)."""
    pod = c.pod
    return {
        "containerId": c.id,
        "name": container_name(c),
        "podName": pod.name if pod else None,
        "namespace": pod.namespace if pod else None,
        "podUID": pod.uid if pod else None,
        "containerName": c.container_name,
        "image": c.image,
        "labels": c.labels,
        "usesHostNetwork": c.host_network,
        "podIPs": list(pod.ips) if pod and not c.host_network else [],
        "netns": c.netns,
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
        self.pods: dict[str, Pod] = {}  # every pod, given or implied
        self._given: set[str] = set()  # sandbox ids of the pods given with put_pod
        # sandbox id -> container id -> the pod as that container has it, latest last (implied pods)
        self._members: dict[str, dict[str, Pod]] = {}
        self._by_netns: dict[int, Pod] = {}
        self._by_ip: dict[str, Pod] = {}
        self._by_cgroup: dict[int, str] = {}  # cgroup id -> container id
        # per container / pod: the fields merged into connection and port events (built once)
        self._owner: dict[str, Event] = {}
        self._remote: dict[str, Event] = {}

    def metrics(self) -> list[Metric]:
        return [
            single("netstatd_containers", "gauge", "Containers known from containerd.", len(self.containers)),
            single(
                "netstatd_pods",
                "gauge",
                "Pods known from containerd: CRI sandboxes, and pods named by containers' labels.",
                len(self.pods),
            ),
        ]

    # -- changes (each returns the events to publish) -----------------------
    def apply(self, change: IndexChange) -> list[Event]:
        """One change from the containerd follower; returns the container events to publish."""
        match change:
            case Listed(pods, containers):
                return self.replace(pods, containers)
            case PodSeen(pod):
                self.put_pod(pod)
            case PodGone(sandbox_id):
                self.remove_pod(sandbox_id)
            case ContainerSeen(container):
                return self.put(container)
            case ContainerGone(container_id):
                return self.remove(container_id)
        return []

    def put_pod(self, pod: Pod) -> None:
        """A pod from its sandbox: it wins over what containers' labels imply for the same sandbox id."""
        self._given.add(pod.sandbox_id)
        self._set_pod(pod)

    def remove_pod(self, sandbox_id: str) -> None:
        """The sandbox is gone: so is its pod, whatever its containers still say."""
        self._given.discard(sandbox_id)
        self._members.pop(sandbox_id, None)
        self._drop_pod(sandbox_id)

    def _set_pod(self, pod: Pod) -> None:
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

    def _drop_pod(self, sandbox_id: str) -> None:
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

    def _link(self, container_id: str, old: Pod | None, new: Pod | None) -> None:
        """Container container_id now names pod `new` (None: no pod) instead of `old`."""
        if old is not None and (new is None or new.sandbox_id != old.sandbox_id):
            members = self._members.get(old.sandbox_id)
            if members is not None:
                members.pop(container_id, None)
                if not members:
                    del self._members[old.sandbox_id]
                self._settle(old.sandbox_id)
        if new is not None:
            members = self._members.setdefault(new.sandbox_id, {})
            members.pop(container_id, None)  # to the end: the latest wins
            members[container_id] = new
            self._settle(new.sandbox_id)

    def _settle(self, sandbox_id: str) -> None:
        """An implied pod from its containers: gone with the last one."""
        if sandbox_id in self._given:
            return
        members = self._members.get(sandbox_id)
        if not members:
            self._drop_pod(sandbox_id)
            return
        # The latest container that knows the netns speaks for the pod (a sidecar not started yet does not).
        pods = list(members.values())
        pod = next((p for p in reversed(pods) if p.netns), pods[-1])
        if self.pods.get(sandbox_id) is not pod:  # identity: the netns path may be another container's
            self._set_pod(pod)

    def put(self, c: Container) -> list[Event]:
        """Add or replace a container: container.added when it is new or anything about it changed."""
        old = self.containers.get(c.id)
        self._link(c.id, old.pod if old is not None else None, c.pod)
        if old == c:
            return []
        if old is not None and old.cgroup_id:
            self._by_cgroup.pop(old.cgroup_id, None)
        self.containers[c.id] = c
        if c.cgroup_id:
            self._by_cgroup[c.cgroup_id] = c.id
        body = _container_body(c)
        self._owner[c.id] = {"host": False, **{k: v for k, v in body.items() if k in _OWNER_KEYS}}
        return [self._event(CONTAINER_ADDED, body)]

    def remove(self, container_id: str) -> list[Event]:
        c = self.containers.pop(container_id, None)
        if c is None:
            return []
        self._link(container_id, c.pod, None)
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
            self._drop_pod(sid)
        self._given.clear()
        self._members.clear()
        for pod in pods:
            self.put_pod(pod)
        for c in fresh.values():
            out += self.put(c)
        return out

    def _event(self, kind: str, body: Event) -> Event:
        return {"type": kind, "timestamp": self.now(), "nodeName": self.node_name, **body}

    # -- reads ---------------------------------------------------------------
    def snapshot(self) -> list[Event]:
        return [self._event(CONTAINER_ADDED, _container_body(c)) for c in self.containers.values()]

    def query(self, namespace: str | None = None, pod_name: str | None = None) -> list[Event]:
        """Containers as container.added bodies; the filters are exact matches (None = any)."""
        out = []
        for c in self.containers.values():
            f = _container_body(c)
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

    def pod_fields(self, ip: str) -> Event | None:
        """podName/namespace/podUID when ip is a pod IP on this node (a DNS client's, for dns.failed)."""
        pod = self._by_ip.get(ip)
        return {"podName": pod.name, "namespace": pod.namespace, "podUID": pod.uid} if pod is not None else None


# The fields a connection.event or port.listening gains from its container.
_OWNER_KEYS = ("containerId", "containerName", "podName", "namespace", "podUID", "usesHostNetwork")
