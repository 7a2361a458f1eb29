"""Sockets that existed before the kernel probes, or that a scan of a new pod's netns finds.

A scan (sock_diag) runs while the probes are live, so a socket may close between the dump and its
being applied: from begin_seed() to the end of the scan the tables remember every cookie that
closes (Tables.closed_while_seeding), and the scan leaves those alone. Scans may overlap (the start-up
seed and netns scans of starting pods): the set lives until the last one ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ..protocol import (
    PORT_LISTENING,
    TCP_CLOSE,
    TCP_LISTEN,
    TCP_NEW_SYN_RECV,
    TCP_STATE_NAMES,
    TCP_TIME_WAIT,
    UDP_ACTIVE,
    is_v4_mapped,
    unmap_v4,
)
from .model import INBOUND, OUTBOUND, Conn, Listener
from .tables import Change, Tables

PROTOCOLS = {6: "TCP", 17: "UDP"}
_TCP_NOT_CONNECTIONS = (TCP_CLOSE, TCP_TIME_WAIT, TCP_NEW_SYN_RECV)


class Seeding:
    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self._scans = 0  # scans between begin() and their end

    def begin(self) -> None:
        """Call before dumping sockets (and after the probes are live)."""
        if self.tables.closed_while_seeding is None:  # another scan running keeps its set
            self.tables.closed_while_seeding = set()
        self._scans += 1

    @property
    def running(self) -> bool:
        return self._scans > 0

    def _end(self) -> set[int]:
        """The cookies closed since the scan began; a cookie closed before a later scan began is gone anyway."""
        gone = self.tables.closed_while_seeding or set()
        self._scans = max(0, self._scans - 1)
        if not self._scans:
            self.tables.closed_while_seeding = None
        return gone

    def add_listeners(self, sockets: Iterable, include_loopback: bool, unapplied: set[int]) -> list[Change]:
        """Listening sockets from a scan of one netns (a container started). Ends the scan.

        Only unknown cookies are added (pid 0: attribution goes by the netns); known listeners and
        connections are left alone, so a socket the kernel already reported is not announced twice.
        unapplied: cookies of listen()/bind() records not applied yet: their own event is coming.
        """
        t = self.tables
        gone = self._end() | unapplied
        out: list[Change] = []
        for s in sockets:
            if s.cookie in gone or s.cookie in t.listeners or not is_listening(s):
                continue
            if not include_loopback and _loopback(s.saddr, s.family):
                continue
            lst = self._listener(s, 0)
            t.add_listener(lst)
            out.append((lst, PORT_LISTENING, None))
        return out

    def seed(self, sockets: Iterable, owners: dict[int, int], include_loopback: bool) -> list[Conn | Listener]:
        """Sockets of a start-up dump (sources.sockdiag.DiagSocket records). Ends the scan.

        owners maps socket inode -> pid. Sockets already known from live records, or closed since
        begin(), are left alone. Returns what was added, for the events of clients connected meanwhile
        (a host with 100k sockets need not hold 100k events at once).
        """
        t = self.tables
        out: list[Conn | Listener] = []
        gone = self._end()
        connections = []
        for s in sockets:
            if s.cookie in gone:
                continue
            if not include_loopback and (_loopback(s.saddr, s.family) or _loopback(s.daddr, s.family)):
                continue
            if is_listening(s):
                if s.cookie not in t.listeners:
                    lst = self._listener(s, owners.get(s.inode, 0))
                    t.add_listener(lst)
                    out.append(lst)
            elif (s.protocol == 6 and s.state not in _TCP_NOT_CONNECTIONS) or (s.protocol == 17 and s.state == 1):
                connections.append(s)  # a TCP connection, or a connected UDP socket
        # Connections after listeners, so direction and owner can use them.
        now = time.monotonic_ns()
        shared = {}.setdefault
        for s in connections:
            if s.protocol == 6 and s.cookie in t.tcp:
                continue
            conn = Conn(PROTOCOLS[s.protocol])
            family, saddr, daddr = s.family, s.saddr, s.daddr
            if family == 6 and is_v4_mapped(daddr):
                family, saddr, daddr = 4, unmap_v4(saddr), unmap_v4(daddr)
            conn.family = family
            conn.local_ip, conn.remote_ip = t.ip_text(saddr, family), t.ip_text(daddr, family)
            # one int object per distinct value: 100k seeded connections share a few ports and netns
            conn.local_port, conn.remote_port = shared(s.sport, s.sport), shared(s.dport, s.dport)
            conn.netns, conn.cookie = shared(s.netns, s.netns), s.cookie
            conn.ts = now
            conn.pid = owners.get(s.inode, 0)  # comm and exe: enrichment reads them while the process lives
            conn.direction = INBOUND if t.listener_for(conn) else OUTBOUND
            if not conn.pid and conn.direction == INBOUND:
                t.owner_from_listener(conn, 1)
            if conn.protocol == "TCP":
                conn.state = TCP_STATE_NAMES[s.state]
                t.tcp[s.cookie] = conn
            else:
                conn.state = UDP_ACTIVE
                conn.last_seen = time.monotonic()
                t.add_udp_flow((s.cookie, s.daddr, s.dport), conn)  # keyed as live records key it
            out.append(conn)
        return out

    def _listener(self, s: Any, pid: int) -> Listener:
        lst = Listener(PROTOCOLS[s.protocol])
        lst.family, lst.cookie = s.family, s.cookie
        lst.ip, lst.port, lst.netns = self.tables.ip_text(s.saddr, s.family), s.sport, s.netns
        lst.pid = pid
        lst.ts = time.monotonic_ns()
        return lst


def _loopback(addr: bytes, family: int) -> bool:
    if family == 4:
        return addr[0] == 127
    return addr == b"\0" * 15 + b"\x01" or (is_v4_mapped(addr) and addr[12] == 127)


def is_listening(s: Any) -> bool:
    """A TCP listener, or a bound unconnected UDP socket (what `ss -tuln` lists)."""
    return (s.protocol == 6 and s.state == TCP_LISTEN) or (s.protocol == 17 and s.state == TCP_CLOSE and s.sport != 0)
