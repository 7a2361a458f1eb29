"""Node state: the hostnames learned from DNSTap, and their events.

The collector learns many answers per second, most of them repeats. Only a
new name, or a changed one, becomes a `dns.resolved` event; pending events
are keyed by IP, so the backlog between flushes is bounded by the cache.
"""

from __future__ import annotations

import time
from typing import Any

from ..metrics import Metric, single
from ..protocol import DNS_EXPIRED, DNS_RESOLVED, WallClock
from ..sources.dnstap.decode import Resolution
from .names import NameCache, NameEntry

Event = dict[str, Any]
EXPIRY_CHECK_S = 1.0


class Hostnames:
    def __init__(self, node_name: str, clock: WallClock, max_entries: int = 100_000) -> None:
        self.node_name = node_name
        self.clock = clock
        self.cache = NameCache(max_entries)
        self._pending: dict[str, NameEntry] = {}  # ip -> entry to announce at the next flush
        self._next_expiry = 0.0
        self.expired = 0

    def metrics(self) -> list[Metric]:
        return [
            single("netstatd_dns_names", "gauge", "IP -> hostname entries in the cache.", len(self.cache)),
            single(
                "netstatd_dns_names_evicted_total",
                "counter",
                "Entries dropped because the cache was full (raise --dns-max-names).",
                self.cache.evicted,
            ),
            single("netstatd_dns_names_expired_total", "counter", "Entries whose TTL ran out.", self.expired),
        ]

    def learn(self, resolutions: list[Resolution]) -> None:
        now = time.monotonic()
        learn, pending = self.cache.learn, self._pending
        for r in resolutions:
            entry = learn(r, now)
            if entry is not None:
                pending[entry.ip] = entry

    def lookup(self, ip: str) -> str | None:
        entry = self.cache.lookup(ip)
        return entry.hostname if entry is not None else None

    def flush(self) -> list[Event]:
        """dns.resolved for what was learned since the last flush; dns.expired once a second."""
        out = [self.resolved_event(e) for e in self._pending.values()]
        self._pending.clear()
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRY_CHECK_S
            for entry in self.cache.expire(now):
                self.expired += 1
                self._pending.pop(entry.ip, None)
                out.append(
                    {
                        "type": DNS_EXPIRED,
                        "timestamp": self.clock.now(),
                        "nodeName": self.node_name,
                        "ip": entry.ip,
                        "hostname": entry.hostname,
                    }
                )
        return out

    def snapshot(self) -> list[Event]:
        return [self.resolved_event(e) for e in self.cache.entries()]

    def resolved_event(self, e: NameEntry) -> Event:
        event = {
            "type": DNS_RESOLVED,
            "timestamp": self.clock.now(),
            "nodeName": self.node_name,
            "ip": e.ip,
            "hostname": e.hostname,
            "aliases": list(e.aliases),
            "ttl": e.ttl,
            "clientIP": e.client_ip,
        }
        if e.latency_ms is not None:
            event["latencyMs"] = e.latency_ms
        return event
