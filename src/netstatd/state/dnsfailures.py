"""Node state: the failed DNS answers learned from DNSTap, and their `dns.failed` events.

A client that cannot resolve a name asks again and again, so failures are rate-limited per (client IP,
name): the first is announced at the next flush, and those that follow within `interval_s` are folded
into one more event when the interval ends (its `count` says how many it stands for). The latest event of
each pair is kept for a new client's snapshot until DNS_FAILED_KEEP_S after that pair's last failure.

Bounded: at most `max_entries` pairs (the least recently failed is forgotten first; its failures not
announced yet are counted as dropped), and at most `max_per_s` events a second from the node (the rest
wait, still counted, for the next second).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..metrics import Metric, single
from ..protocol import DNS_FAILED, DNS_FAILED_KEEP_S, DNS_FAILED_MAX, WallClock
from ..sources.dnstap.decode import Failure

Event = dict[str, Any]
Key = tuple[str, str]  # (client IP, name)
EXPIRY_CHECK_S = 1.0
MAX_EVENTS_PER_S = 200


@dataclass(slots=True)
class _Pair:
    latest: Failure  # the latest failed answer
    at_ns: int  # wall-clock ns it was received: the timestamp of the event it goes into
    seen: float  # monotonic s it was received: the pair is forgotten DNS_FAILED_KEEP_S after
    total: int = 0  # failed answers since the pair was first seen
    held: int = 0  # failed answers in no event yet
    next_at: float = 0.0  # monotonic s: no event for the pair before then
    event: Event | None = None  # the latest event sent: the snapshot's


class DnsFailures:
    def __init__(
        self,
        node_name: str,
        clock: WallClock,
        pod_fields: Callable[[str], Event | None],
        interval_s: float = 10.0,
        max_entries: int = DNS_FAILED_MAX,
        keep_s: float = DNS_FAILED_KEEP_S,
        max_per_s: int = MAX_EVENTS_PER_S,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        """pod_fields: podName/namespace/podUID of a client IP that is a pod of this node, else None."""
        self.node_name = node_name
        self.clock = clock
        self._pod_fields = pod_fields
        self.interval_s = interval_s
        self.max_entries = max_entries
        self.keep_s = keep_s
        self.max_per_s = max_per_s
        self._now = now
        # least recently failed first: recording a failure moves its pair to the end
        self._pairs: OrderedDict[Key, _Pair] = OrderedDict()
        self._held: dict[Key, None] = {}  # pairs with failures in no event yet, in the order they came
        self._second = -1  # the whole monotonic second the budget is for
        self._budget = 0  # events still allowed in it
        self._next_expiry = 0.0
        self.sent = 0  # dns.failed events
        self.suppressed = 0  # failed answers folded into another's event
        self.dropped = 0  # failed answers in no event: their pair was forgotten first
        self.evicted = 0  # pairs forgotten because the table was full

    def metrics(self) -> list[Metric]:
        return [
            single("netstatd_dns_failed_events_total", "counter", "dns.failed events sent.", self.sent),
            single(
                "netstatd_dns_failed_suppressed_total",
                "counter",
                "Failed DNS answers folded into the dns.failed of an earlier one (one event per client and name "
                "per --dns-failed-interval).",
                self.suppressed,
            ),
            single(
                "netstatd_dns_failed_dropped_total",
                "counter",
                "Failed DNS answers in no dns.failed: their client and name were forgotten first (table full).",
                self.dropped,
            ),
            single(
                "netstatd_dns_failed_entries",
                "gauge",
                "Client and name pairs with a recent failed answer (the dns.failed of a snapshot).",
                len(self._pairs),
            ),
            single(
                "netstatd_dns_failed_entries_evicted_total",
                "counter",
                f"Client and name pairs forgotten because {self.max_entries} were kept (least recently failed first).",
                self.evicted,
            ),
        ]

    def record(self, failures: list[Failure]) -> None:
        """Failed answers, as the collector decoded them; they become events at the next flush()es."""
        now = self._now()
        wall = time.time_ns()
        pairs, held = self._pairs, self._held
        for f in failures:
            key = (f.client_ip, f.name)
            p = pairs.get(key)
            if p is None:
                if len(pairs) >= self.max_entries:
                    self._evict()
                p = pairs[key] = _Pair(f, wall, now)
            else:
                pairs.move_to_end(key)
                p.latest, p.at_ns, p.seen = f, wall, now
            p.total += 1
            p.held += 1
            held[key] = None

    def _evict(self) -> None:
        key, p = self._pairs.popitem(last=False)
        self.evicted += 1
        self._forget(key, p)

    def _forget(self, key: Key, p: _Pair) -> None:
        if p.held:
            self.dropped += p.held
            del self._held[key]

    def flush(self) -> list[Event]:
        """dns.failed for the pairs whose interval has ended; every second, forget those gone quiet."""
        now = self._now()
        out: list[Event] = []
        if self._held:
            second = int(now)
            if second != self._second:
                self._second, self._budget = second, self.max_per_s
            pairs, held = self._pairs, self._held
            for key in list(held):  # at most max_entries
                if self._budget <= 0:
                    break
                p = pairs[key]
                if now >= p.next_at:
                    del held[key]
                    out.append(self._event(p, now))
                    self._budget -= 1
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRY_CHECK_S
            self._expire(now)
        return out

    def _event(self, p: _Pair, now: float) -> Event:
        f = p.latest
        e: Event = {
            "type": DNS_FAILED,
            "timestamp": self.clock.text(p.at_ns),
            "nodeName": self.node_name,
            "name": f.name,
            "qtype": f.qtype,
            "rcode": f.rcode,
            "clientIP": f.client_ip,
            "count": p.held,
            "total": p.total,
        }
        if f.latency_ms is not None:
            e["latencyMs"] = f.latency_ms
        pod = self._pod_fields(f.client_ip) if f.client_ip else None
        if pod:
            e.update(pod)
        self.sent += 1
        self.suppressed += p.held - 1
        p.held = 0
        p.next_at = now + self.interval_s
        p.event = e
        return e

    def _expire(self, now: float) -> None:
        pairs = self._pairs
        quiet_since = now - self.keep_s
        while pairs:
            key, p = next(iter(pairs.items()))  # the least recently failed
            if p.seen > quiet_since:
                break
            del pairs[key]
            self._forget(key, p)

    def snapshot(self) -> list[Event]:
        """The latest dns.failed of every pair, as it was sent."""
        return [p.event for p in self._pairs.values() if p.event is not None]
