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


class TcpStats(NamedTuple):
    """A TCP socket's counters at its close (struct tcp_sock, docs/kernel.md)."""

    bytes_sent: int  # acknowledged by the peer
    bytes_received: int
    segments_sent: int
    segments_received: int
    rtt_us: int  # smoothed
    retransmits: int


class Listener:
    """A listening TCP socket or a bound UDP socket."""

    __slots__ = ("cgroup_id", "comm", "cookie", "exe", "family", "ip", "netns", "pid", "port", "protocol", "ts")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.pid = 0
        self.comm = ""
        self.exe: str | None = None  # enrichment's, as for Conn
        self.cgroup_id = 0  # from the listen()/bind() record: names the container after its process exits
