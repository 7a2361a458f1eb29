"""IP → name cache learnt from DNS answers (dnstap CLIENT_RESPONSE messages)."""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..sources.dnstap.decode import Resolution


@dataclass(slots=True)
class NameEntry:
    ip: str
    hostname: str
    aliases: tuple[str, ...]
    ttl: int
    client_ip: str
    expires: float  # time.monotonic() seconds
    latency_ms: float | None = None  # of the latest answer, like ttl and client_ip


class NameCache:
    """The latest name seen for each IP, until its TTL runs out.

    - The latest answer for an IP wins (its hostname may change).
    - An entry lives max(ttl, min_ttl_s) seconds after it was last learnt.
    - Over `max_entries`, the least recently learnt entry is dropped and counted in `evicted`
      (OrderedDict order: learning an IP moves it to the end; a plain dict's pop-front degrades
      to a scan over deleted slots, ~50 µs per eviction at 100k entries).
    - Expiry uses a heap of (expires, ip) with lazy invalidation: a popped item whose entry was
      refreshed or replaced is skipped. The heap is rebuilt from the live entries when it holds more
      than twice as many items as the cache (plus slack), so refreshing the same IPs forever keeps
      memory bounded.
    """

    def __init__(self, max_entries: int = 100_000, min_ttl_s: float = 0.0) -> None:
        self.max_entries = max_entries
        self.min_ttl_s = min_ttl_s
        self.evicted = 0
        self._entries: OrderedDict[str, NameEntry] = OrderedDict()
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, r: Resolution, now: float) -> NameEntry | None:
        """Record r; return the entry when it is new or its names changed (announce it), else None."""
        expires = now + max(r.ttl, self.min_ttl_s)
        entries = self._entries
        e = entries.get(r.ip)
        if e is not None and e.hostname == r.hostname and e.aliases == r.aliases:
            e.ttl, e.client_ip, e.expires, e.latency_ms = r.ttl, r.client_ip, expires, r.latency_ms
            entries.move_to_end(r.ip)
            changed = None
        else:
            changed = NameEntry(r.ip, r.hostname, r.aliases, r.ttl, r.client_ip, expires, r.latency_ms)
            entries[r.ip] = changed
            if e is not None:
                entries.move_to_end(r.ip)
            elif len(entries) > self.max_entries:
                entries.popitem(last=False)
                self.evicted += 1
        heap = self._heap
        heapq.heappush(heap, (expires, r.ip))
        if len(heap) > 2 * len(entries) + 1024:
            self._heap = [(x.expires, ip) for ip, x in entries.items()]
            heapq.heapify(self._heap)
        return changed

    def lookup(self, ip: str, now: float | None = None) -> NameEntry | None:
        e = self._entries.get(ip)
        if e is None:
            return None
        if e.expires <= (time.monotonic() if now is None else now):
            return None
        return e

    def expire(self, now: float) -> list[NameEntry]:
        """Remove and return the entries whose TTL ran out by `now`."""
        heap, entries = self._heap, self._entries
        out: list[NameEntry] = []
        while heap and heap[0][0] <= now:
            expires, ip = heapq.heappop(heap)
            e = entries.get(ip)
            # Skip stale heap items: the IP was refreshed, replaced or evicted since.
            if e is not None and e.expires == expires:
                del entries[ip]
                out.append(e)
        return out

    def entries(self, now: float | None = None) -> list[NameEntry]:
        """Live entries (for a new client's snapshot)."""
        t = time.monotonic() if now is None else now
        return [e for e in self._entries.values() if e.expires > t]
