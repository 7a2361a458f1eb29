"""Wire schema shared by the API, the multiplexer and the browser (docs/protocol.md).

Conversions here run once per event on the hot path, so they cache.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from typing import Any

# Event types (the browser's copy: web/store.js, which names this module).
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
DNS_FAILED = "dns.failed"
# the multiplexer's own
MUX_STATUS = "mux.status"
PEER_STATUS = "peer.status"
NODE_REMOVED = "node.removed"
SUBSCRIBE = "subscribe"  # client -> server: a new filter (subscription.py)
SUBSCRIBE_ERROR = "subscribe.error"  # server -> client: that subscribe (or a frame) could not be taken
# every type a node's stream carries
NODE_EVENT_TYPES = frozenset(
    (
        HOST_INFO,
        CONNECTION_EVENT,
        PORT_LISTENING,
        PORT_CLOSED,
        CONTAINER_ADDED,
        CONTAINER_DELETED,
        IP_ADDED,
        IP_REMOVED,
        DNS_RESOLVED,
        DNS_EXPIRED,
        DNS_FAILED,
        SNAPSHOT_COMPLETE,
        STREAM_RESET,
    )
)

# A dns.failed stands for this long after its timestamp (there is no event for its end), and a node holds
# at most this many, one per (clientIP, name): state/dnsfailures.py, mux/state.py and web/store.js keep
# them so (docs/protocol.md, "dns.failed").
DNS_FAILED_KEEP_S = 600
DNS_FAILED_MAX = 1000

FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}

# TCP states: the kernel's numbers (include/net/tcp_states.h; netstatd.bpf.c and sock_diag use them)
# and their names on the wire.
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_SYN_RECV, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_TIME_WAIT = 1, 2, 3, 4, 5, 6
TCP_CLOSE, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_LISTEN, TCP_CLOSING, TCP_NEW_SYN_RECV = 7, 8, 9, 10, 11, 12
TCP_STATES = {
    TCP_ESTABLISHED: "ESTABLISHED",
    TCP_SYN_SENT: "SYN_SENT",
    TCP_SYN_RECV: "SYN_RECV",
    TCP_FIN_WAIT1: "FIN_WAIT1",
    TCP_FIN_WAIT2: "FIN_WAIT2",
    TCP_TIME_WAIT: "TIME_WAIT",
    TCP_CLOSE: "CLOSE",
    TCP_CLOSE_WAIT: "CLOSE_WAIT",
    TCP_LAST_ACK: "LAST_ACK",
    TCP_LISTEN: "LISTEN",
    TCP_CLOSING: "CLOSING",
    TCP_NEW_SYN_RECV: "NEW_SYN_RECV",
}
# state number -> name, as a list: indexing it is the cheapest lookup per record
TCP_STATE_NAMES = [TCP_STATES.get(i, str(i)) for i in range(256)]
UDP_ACTIVE = "ACTIVE"  # a UDP flow has no kernel state: ACTIVE until it closes
CLOSED = "CLOSE"  # the last state of every connection and flow, TCP and UDP


def connection_key(event: Mapping[str, Any]) -> tuple[Any, ...]:
    """What identifies a connection.event's connection on its node: a TCP socket's cookie; a UDP flow's
    socket cookie and peer (one socket, many peers). web/store.js connKey() is the same."""
    if event.get("protocol") == "UDP":
        return (event.get("sockCookie"), event.get("remoteIP"), event.get("remotePort"))
    return (event.get("sockCookie"),)


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
