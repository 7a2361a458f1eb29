"""Wire schema shared by the API, the multiplexer and the browser (docs/protocol.md).

Conversions here run once per event on the hot path, so they cache.
"""

from __future__ import annotations

import socket
import time

HOST_INFO = "host.info"
CONNECTION_EVENT = "connection.event"
PORT_LISTENING = "port.listening"
PORT_CLOSED = "port.closed"
SNAPSHOT_COMPLETE = "snapshot.complete"
STREAM_RESET = "stream.reset"
CONTAINER_ADDED = "container.added"
CONTAINER_DELETED = "container.deleted"
IP_ADDED = "ip.added"
IP_REMOVED = "ip.removed"
DNS_RESOLVED = "dns.resolved"
DNS_EXPIRED = "dns.expired"

FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
UDP_ACTIVE = "ACTIVE"
UDP_CLOSE = "CLOSE"

_V4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"
_ZERO16 = b"\0" * 16


def is_v4_mapped(addr: bytes) -> bool:
    return addr[:12] == _V4_MAPPED_PREFIX


def unmap_v4(addr: bytes) -> bytes:
    """::ffff:a.b.c.d (or ::) in the 16-byte convention, as an IPv4 address."""
    return addr[12:16] + b"\0" * 12


class AddressText:
    """16-byte kernel addresses to text, cached. Cleared when full (cap entries)."""

    def __init__(self, cap: int = 65536) -> None:
        self._v4: dict[bytes, str] = {}
        self._v6: dict[bytes, str] = {}
        self._cap = cap

    def __call__(self, addr: bytes, family: int) -> str:
        cache = self._v4 if family == 4 else self._v6
        text = cache.get(addr)
        if text is None:
            if len(cache) >= self._cap:
                cache.clear()
            if family == 4:
                text = socket.inet_ntop(socket.AF_INET, addr[:4])
            else:
                text = socket.inet_ntop(socket.AF_INET6, addr)
            cache[addr] = text
        return text


# ".123" and "456Z": a timestamp's fraction from two table lookups instead of a format per event
_MILLIS = [f".{i:03d}" for i in range(1000)]
_MICROS = [f"{i:03d}Z" for i in range(1000)]


class WallClock:
    """Kernel CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) to RFC 3339 UTC text.

    The offset to wall-clock time is measured once and refreshed every minute,
    so an event's timestamp is when the kernel saw it, not when we read it.
    """

    def __init__(self) -> None:
        self._offset_ns = 0
        self._offset_at = -1e18
        self._sec = -1
        self._prefix = ""
        self.refresh()

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._offset_at > 60:
            self._offset_ns = time.time_ns() - time.monotonic_ns()
            self._offset_at = now

    @property
    def offset_ns(self) -> int:
        """Wall-clock minus CLOCK_MONOTONIC nanoseconds, as from_kernel() adds it."""
        return self._offset_ns

    def text(self, wall_ns: int) -> str:
        sec, frac = divmod(wall_ns, 1_000_000_000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        ms, us = divmod(frac // 1000, 1000)
        return self._prefix + _MILLIS[ms] + _MICROS[us]

    def from_kernel(self, mono_ns: int) -> str:
        """Call refresh() now and then (the tracker does, once per flush)."""
        return self.text(mono_ns + self._offset_ns)

    def now(self) -> str:
        return self.text(time.time_ns())
