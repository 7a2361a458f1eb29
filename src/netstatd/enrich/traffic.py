"""Bytes per Kubernetes namespace, for /metrics (--metrics-per-namespace): each TCP connection's and UDP
flow's bytes counted once, as its counters grow, under the namespace of its pod.

Bounded: at most MAX_NAMESPACES label values. The bytes of namespaces past them are counted under
`namespace="_other"`, and each connection event that went there in
netstatd_namespace_bytes_overflow_total.
"""

from __future__ import annotations

from ..metrics import Metric, single

MAX_NAMESPACES = 200
HOST = "_host"  # connections of host processes (no pod)
OTHER = "_other"  # namespaces past the cap


class NamespaceTraffic:
    def __init__(self, max_namespaces: int = MAX_NAMESPACES) -> None:
        self.max_namespaces = max_namespaces
        self.bytes: dict[str, list[int]] = {}  # namespace -> [sent, received]
        self.overflow = 0

    def add(self, namespace: str | None, sent: int, received: int) -> None:
        if not sent and not received:
            return
        key = namespace or HOST
        totals = self.bytes.get(key)
        if totals is None:
            if len(self.bytes) >= self.max_namespaces:
                self.overflow += 1
                key = OTHER
                totals = self.bytes.get(key)
            if totals is None:
                totals = self.bytes[key] = [0, 0]
        totals[0] += sent
        totals[1] += received

    def metrics(self) -> list[Metric]:
        samples = [
            ({"namespace": ns, "direction": d}, totals[i])
            for ns, totals in sorted(self.bytes.items())
            for i, d in enumerate(("sent", "received"))
        ]
        return [
            Metric(
                "netstatd_namespace_bytes_total",
                "counter",
                "Payload bytes of the TCP connections and UDP flows of each Kubernetes namespace's pods "
                "(_host: host processes), sent and received, as their counters grow (--metrics-per-namespace).",
                samples,
            ),
            single(
                "netstatd_namespace_bytes_overflow_total",
                "counter",
                f"Connection events whose bytes were counted under _other: {MAX_NAMESPACES} namespaces were "
                "labelled already.",
                self.overflow,
            ),
        ]
