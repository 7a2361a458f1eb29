"""The node's IP inventory: host IPs, pod IPs, and host-network pods shown with the host's IPs.

Built from plain inputs (interface addresses, pods) so it is testable without netlink; the agent
refreshes it when containers change and periodically, and streams the differences as
`ip.added` / `ip.removed` (docs/protocol.md).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from ..metrics import Metric, single
from ..protocol import FAMILY_NAMES, IP_ADDED, IP_REMOVED
from ..sources.addresses import InterfaceAddress
from .containers import Pod

Event = dict[str, Any]
# One entry per (ip, sandbox id): "" for the host itself, so a host IP also appears once per host-network pod.
Key = tuple[str, str]


def _kind(a: InterfaceAddress) -> str:
    return "loopback" if a.scope == "host" or ipaddress.ip_address(a.ip).is_loopback else "host"


def _entry(ip: str, family: int, kind: str, interface: str | None, pod: Pod | None, source: str) -> Event:
    return {
        "ip": ip,
        "family": FAMILY_NAMES[family],
        "kind": kind,
        "interface": interface,
        "source": source,
        "podName": pod.name if pod else None,
        "namespace": pod.namespace if pod else None,
        "podUID": pod.uid if pod else None,
        "usesHostNetwork": bool(pod and pod.host_network),
    }


def build_inventory(
    host: Iterable[InterfaceAddress],
    pods: Iterable[Pod],
    netns_addresses: Callable[[Pod], list[InterfaceAddress]],
) -> dict[Key, Event]:
    """Every IP of the node: the host's (loopback marked), each pod's, and each host-network pod's view.

    Pod IPs come from CRI; a pod CRI reports none for (not host network) falls back to the global
    addresses of its own netns (netns_addresses, which returns [] when it cannot be read).
    """
    host = list(host)
    out: dict[Key, Event] = {}
    for a in host:
        out[(a.ip, "")] = _entry(a.ip, a.family, _kind(a), a.ifname, None, "interface")
    for pod in pods:
        if pod.host_network:
            # kubelet shows a host-network pod with the node's IPs: the same addresses, flagged as the pod's
            for a in host:
                if _kind(a) == "host":
                    out[(a.ip, pod.sandbox_id)] = _entry(a.ip, a.family, "host", a.ifname, pod, "interface")
        elif pod.ips:
            for ip in pod.ips:
                out[(ip, pod.sandbox_id)] = _entry(ip, ipaddress.ip_address(ip).version, "pod", None, pod, "cri")
        else:
            for a in netns_addresses(pod):
                if a.scope == "global":
                    out[(a.ip, pod.sandbox_id)] = _entry(a.ip, a.family, "pod", a.ifname, pod, "netns")
    return out


class IpInventory:
    """The current inventory; update() returns the events that turn the old one into the new one."""

    def __init__(self, node_name: str, now: Callable[[], str]) -> None:
        self.node_name = node_name
        self.now = now
        self.entries: dict[Key, Event] = {}

    def metrics(self) -> list[Metric]:
        return [
            single(
                "netstatd_ips", "gauge", "Entries in the IP inventory (ip.added minus ip.removed).", len(self.entries)
            )
        ]

    def update(self, fresh: dict[Key, Event]) -> list[Event]:
        out = [self._event(IP_REMOVED, e) for k, e in self.entries.items() if k not in fresh]
        # a changed entry (e.g. its interface) is announced again; the newer replaces the older
        out += [self._event(IP_ADDED, e) for k, e in fresh.items() if self.entries.get(k) != e]
        self.entries = fresh
        return out

    def snapshot(self) -> list[Event]:
        return [self._event(IP_ADDED, e) for e in self.entries.values()]

    def _event(self, kind: str, body: Event) -> Event:
        return {"type": kind, "timestamp": self.now(), "nodeName": self.node_name, **body}
