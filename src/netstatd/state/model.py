"""What the node's tables hold: a connection (TCP) or flow (UDP), and a listening port.

The tables fill in what the kernel says (addresses, owner pid and comm, state); enrichment
(enrich/events.py) fills in, once, what it looks up about the owner and the addresses (exe,
container, names) and keeps it here, so that later events of the same socket carry it even after
the process is gone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ..enrich.cgroups import CgroupOwner

OUTBOUND, INBOUND = "outbound", "inbound"


class Conn:
    """A live TCP connection (keyed by socket cookie) or UDP flow (cookie, peer)."""

    __slots__ = (
        "cgroup_id",
        "comm",
        "container",
        "cookie",
        "counted",
        "direction",
        "error",
        "exe",
        "family",
        "last_seen",
        "local_hostname",
        "local_ip",
        "local_port",
        "netns",
        "owner_pid",
        "pid",
        "protocol",
        "remote_hostname",
        "remote_ip",
        "remote_port",
        "reset",
        "state",
        "stats",
        "stats_ts",
        "ts",
        "udp_counts",
    )

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.pid = 0
        self.comm = ""
        self.cgroup_id = 0
        self.direction = OUTBOUND
        self.state = ""
        self.last_seen = 0.0
        self.ts = 0  # CLOCK_MONOTONIC ns of the latest record (or sweep) applied
        # enrichment's, for `owner_pid`: looked up once (the process may be gone by the close)
        self.exe: str | None = None
        self.owner_pid = -1
        self.container: CgroupOwner | None = None
        # names from DNSTap, kept once known: the answer may expire while the connection lives
        self.remote_hostname: str | None = None
        self.local_hostname: str | None = None
        # a TCP connection's end, from its CLOSE record (tcp_stats()); None before, or when the
        # close came from a sock_diag check
        self.stats: TcpStats | None = None
        self.stats_ts = 0  # CLOCK_MONOTONIC ns the stats iterator read them (0: from the close record)
        self.error: str | None = None  # the socket's error, e.g. "ECONNREFUSED"
        self.reset: str | None = None  # "sent" or "received"
        self.counted = (0, 0)  # bytes sent and received already in the per-namespace metrics
        # a UDP flow's totals, from its records (UdpCounts.update()); None before its first
        self.udp_counts: UdpCounts | None = None


class TcpStats(NamedTuple):
    """A TCP socket's counters at its close (struct tcp_sock, docs/kernel.md)."""

    bytes_sent: int  # acknowledged by the peer
    bytes_received: int
    segments_sent: int
    segments_received: int
    rtt_us: int  # smoothed
    retransmits: int


_U32 = 0xFFFFFFFF


class UdpCounts:
    """A UDP flow's totals (docs/protocol.md, UDP), from the kernel's counters of its map entry as its
    records carry them: the 64-bit totals go on across the entry starting over (evicted from the LRU,
    or taken at an idle close and made again) and across the wrap of the records' 32-bit datagram
    counts, by adding what each record adds to the one before."""

    __slots__ = ("bytes_received", "bytes_sent", "last", "packets_received", "packets_sent")

    def __init__(self) -> None:
        self.bytes_sent = self.bytes_received = self.packets_sent = self.packets_received = 0
        self.last: tuple[int, int, int, int] | None = None  # the entry's counters as last seen

    def update(self, kernel: tuple[int, int, int, int], new_entry: bool) -> bool:
        """kernel: the entry's bytes sent, bytes received, datagrams sent and received (mod 2**32);
        new_entry: the entry started at this record's datagram. Returns whether the entry started over
        under a flow that had counts (a restart; less bytes than before says so too, should the record
        that made the entry have been lost)."""
        last = self.last
        restart = last is not None and (new_entry or kernel[0] < last[0] or kernel[1] < last[1])
        if last is None or restart:
            last = (0, 0, 0, 0)
        self.bytes_sent += kernel[0] - last[0]
        self.bytes_received += kernel[1] - last[1]
        self.packets_sent += (kernel[2] - last[2]) & _U32
        self.packets_received += (kernel[3] - last[3]) & _U32
        self.last = kernel
        return restart

    def totals(self) -> tuple[int, int, int, int]:
        return self.bytes_sent, self.bytes_received, self.packets_sent, self.packets_received


class Listener:
    """A listening TCP socket or a bound UDP socket."""

    __slots__ = ("cgroup_id", "comm", "cookie", "exe", "family", "ip", "netns", "pid", "port", "protocol", "ts")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.pid = 0
        self.comm = ""
        self.exe: str | None = None  # enrichment's, as for Conn
        self.cgroup_id = 0  # from the listen()/bind() record: names the container after its process exits
