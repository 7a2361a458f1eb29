"""The node's connection and listener tables: a flush period's pending changes applied to them.

Each change that clients must hear of comes out as a `Change`: the connection (with the states it
passed through this period) or the listener (with its event type), and a close reason when the
close was not the kernel's. Enrichment (enrich/events.py) turns changes into events.

Bounded: at most max_connections TCP connections, max_udp_flows UDP flows and max_listeners
listeners; over a cap the oldest entry goes, counted in `evicted`. A UDP flow idle for udp_idle_s
is closed (closeReason "idle").
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import Any

from ..protocol import (
    CLOSED,
    PORT_CLOSED,
    PORT_LISTENING,
    TCP_CLOSE,
    TCP_CLOSE_WAIT,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    TCP_SYN_SENT,
    UDP_ACTIVE,
    AddressText,
    is_v4_mapped,
    unmap_v4,
)
from ..sources.bpf import events as ev
from .fold import Period
from .model import INBOUND, OUTBOUND, Conn, Listener, TcpStats, UdpCounts
from .native import ShortRep

log = logging.getLogger("netstatd.state")

# (connection, the states it passed through, close reason) or (listener, its event type, close reason)
Change = tuple[Any, Any, str | None]
UdpKey = tuple[int, bytes, int]  # cookie, peer address, peer port: one UDP socket, many peers
# A UDP flow's kernel entry taken out of the map (loader.py take_udp_flow): its counters, or None
TakeUdpFlow = Callable[[UdpKey], tuple[int, int, int, int] | None]
NO_PEER = bytes(16)


MAX_UNBOUND_LISTENERS = 1024


def reset_of(oldstate: int, error: int) -> str | None:
    """Whether a TCP socket that went from `oldstate` to CLOSE with `error` was ended by a reset, and
    which way (docs/protocol.md): the kernel's tcp_reset() leaves ECONNRESET (EPIPE in CLOSE_WAIT) on
    a socket that received one; an abortive close (unread data, SO_LINGER 0, a disconnect) goes from
    ESTABLISHED or CLOSE_WAIT straight to CLOSE with no error, and sends one, as tcp_abort() does
    (ECONNABORTED: ss -K)."""
    if error in (errno.ECONNRESET, errno.EPIPE):
        return "received"
    if error == errno.ECONNABORTED or (error == 0 and oldstate in (TCP_ESTABLISHED, TCP_CLOSE_WAIT)):
        return "sent"
    return None


class Tables:
    def __init__(
        self,
        *,
        max_connections: int = 1_000_000,
        max_udp_flows: int = 200_000,
        max_listeners: int = 65_536,
        udp_idle_s: float = 60.0,
    ) -> None:
        self.tcp: dict[int, Conn] = {}
        self.udp: dict[UdpKey, Conn] = {}
        self._udp_by_cookie: dict[int, set[UdpKey]] = {}
        self.listeners: dict[int, Listener] = {}
        self._listener_ports: dict[tuple[int, str, int], Listener] = {}
        # listen() without bind(): the kernel reports the listener before it picks the port. Held here,
        # unannounced, until a sock_diag look-up (diag.py) gives the port; the oldest dropped past the cap.
        self.unbound_listeners: dict[int, Listener] = {}
        self.max_connections = max_connections
        self.max_udp_flows = max_udp_flows
        self.max_listeners = max_listeners
        self.udp_idle_s = udp_idle_s
        self.ip_text = AddressText()
        self._comm_text: dict[bytes, str] = {}  # raw comm -> text, cleared when full
        # (local, remote, family) as the kernel has them -> (family, local text, remote text); cleared when full
        self._pair_text: dict[tuple[bytes, bytes, int], tuple[int, str, str]] = {}
        # cookies closed by reconcile(): a late kernel CLOSE for them is not a new connection
        self.reconciled_cookies: dict[int, None] = {}
        # sockets closed while a seed scan runs (state/seed.py): the scan may still list them
        self.closed_while_seeding: set[int] | None = None
        self._next_idle_check = 0.0
        # metrics, read at scrape time
        self.opened = {"TCP": 0, "UDP": 0}
        self.closed = {"TCP": 0, "UDP": 0}
        self.unattributed = 0
        self.evicted = 0
        self.reconciled = 0
        self.connect_failures: dict[str, int] = {}  # by error name (a handful: errno's)
        self.stats_refreshed = 0  # connection events with new counters from the stats iterator
        self.resets = {"sent": 0, "received": 0}
        self.udp_restarts = 0  # UDP flows whose kernel entry started over under them (evicted)
        # the states of this period's UDP ACTIVE changes, by flow: a close in the same period joins its change
        self._udp_active: dict[UdpKey, list[str]] = {}
        # the kernel's udp_flows map, for the UDP closes decided here (the agent sets it once the probes load)
        self.take_udp_flow: TakeUdpFlow | None = None

    # -- a flush period ------------------------------------------------------
    def apply_opens(self, period: Period) -> list[Change]:
        """The period's listen() and bind() records: first, so its connections can use them."""
        out: list[Change] = []
        for rec in period.opens:
            self._apply_control(rec, out)
        return out

    def apply(self, period: Period) -> list[Change]:
        """The period's connections and flows, then its closes of listeners and UDP sockets, then UDP
        flows gone idle (apply_opens() first)."""
        out: list[Change] = []
        full = ev.RECORD.unpack_from
        for key, (first, chunk, off, states, accept) in period.entries.items():
            if type(key) is int:
                self._apply_tcp(key, first, full(chunk, off), states, accept, out)
            else:
                self._apply_udp(key, first, full(chunk, off), out)
        for rec in period.closes:
            self._apply_control(rec, out)
        self._udp_active.clear()
        now = time.monotonic()
        if now >= self._next_idle_check:
            self._next_idle_check = now + 1.0
            self._expire_idle_udp(now, out)
        return out

    def short(self, rep: ShortRep, uses: int) -> Conn:
        """A connection the native helper took out (it opened and closed within the period), standing for
        `uses` of them: decided and counted as _apply_tcp does a new connection; nothing is kept."""
        conn = self._new_tcp(rep.first_old, rep.last, rep.states, rep.owner if rep.accepted else None, uses)
        conn.state, conn.ts = CLOSED, rep.last[ev.TS]
        self._ended(conn, rep.last, uses)
        self.opened["TCP"] += uses
        self.closed["TCP"] += uses
        return conn

    def _apply_tcp(self, cookie: int, first_old: int, last: tuple, states: list[str], accept, out: list) -> None:
        conn = self.tcp.get(cookie)
        if conn is None:
            if cookie in self.reconciled_cookies:
                return  # its close was already delivered by reconcile()
            conn = self._new_tcp(first_old, last, states, accept, 1)
            self.opened["TCP"] += 1
        else:
            if accept is not None:
                conn.direction = INBOUND
            self._addresses(conn, last)  # at SYN_SENT the local port is still 0: the latest record has it
            self._set_owner(conn, accept if accept is not None else last, 1)
        if last[ev.TS] < conn.ts and states[-1:] != [CLOSED]:
            pass  # drained after a sweep that saw a newer state: keep that one
        elif states:
            conn.state = states[-1]
            conn.ts = last[ev.TS]
        else:  # only accept() was seen
            conn.state = conn.state or "ESTABLISHED"
            conn.ts = last[ev.TS]
        if conn.state == CLOSED:
            if last[ev.KIND] == ev.EV_TCP_STATE and last[ev.NEWSTATE] == TCP_CLOSE:
                self._ended(conn, last, 1)
            self.tcp.pop(cookie, None)
            self.closed["TCP"] += 1
            if self.closed_while_seeding is not None:
                self.closed_while_seeding.add(cookie)
        else:
            self.tcp[cookie] = conn
            if len(self.tcp) > self.max_connections:
                del self.tcp[next(iter(self.tcp))]  # the oldest (dicts keep insertion order)
                self._count_eviction()
        out.append((conn, states, None))

    def refresh_stats(self, records: bytes, read_ns: int) -> list[Change]:
        """The stats iterator's records (read at CLOCK_MONOTONIC read_ns): each connection we hold whose
        counters changed, as a change with no state."""
        out: list[Change] = []
        tcp = self.tcp
        for cookie, *counters in ev.STATS_RECORD.iter_unpack(records):
            conn = tcp.get(cookie)
            if conn is None:
                continue  # not applied yet (its open is still in the ring), or not ours (loopback)
            stats = TcpStats._make(counters)
            if stats != conn.stats:
                conn.stats, conn.stats_ts = stats, read_ns
                out.append((conn, [], None))
        self.stats_refreshed += len(out)
        return out

    def _ended(self, conn: Conn, rec: tuple, n: int) -> None:
        """A CLOSE record's counters, error and reset onto its connection, counted n times."""
        conn.stats = TcpStats._make(rec[ev.BYTES_ACKED : ev.TOTAL_RETRANS + 1])
        error = rec[ev.ERROR]
        conn.error = errno.errorcode.get(error, f"E{error}") if error else None
        conn.reset = reset_of(rec[ev.OLDSTATE], error)
        if conn.reset is not None:
            self.resets[conn.reset] += n
        if rec[ev.OLDSTATE] == TCP_SYN_SENT:  # it never connected
            reason = conn.error or "closed"  # closed by its application while connecting
            self.connect_failures[reason] = self.connect_failures.get(reason, 0) + n

    def _new_tcp(self, first_old: int, last: tuple, states: list[str], accept: tuple | None, n: int) -> Conn:
        """A TCP connection the tables do not hold yet: the one place its direction and owner are decided.
        Connecting sockets are outbound; accepted ones (or ones that came from LISTEN or passed SYN_RECV)
        inbound; otherwise inbound when a listener holds its local port."""
        conn = Conn("TCP")
        conn.cookie = last[ev.COOKIE]
        self._addresses(conn, last)
        if states and states[0] == "SYN_SENT":
            conn.direction = OUTBOUND
        elif accept is not None or first_old == TCP_LISTEN or "SYN_RECV" in states:
            conn.direction = INBOUND
        else:
            conn.direction = INBOUND if self.listener_for(conn) else OUTBOUND
        self._set_owner(conn, accept if accept is not None else last, n)
        return conn

    def _set_owner(self, conn: Conn, rec: tuple, n: int) -> None:
        """The record's process, else (a passive socket of a listener older than us) the listener's."""
        if rec[ev.TGID]:
            conn.pid, conn.comm, conn.cgroup_id = rec[ev.TGID], self._comm(rec[ev.COMM]), rec[ev.CGROUP]
        elif not conn.pid:
            self.owner_from_listener(conn, n)

    def _comm(self, raw: bytes) -> str:
        text = self._comm_text.get(raw)
        if text is None:
            if len(self._comm_text) >= 4096:
                self._comm_text.clear()
            text = self._comm_text[raw] = ev.comm_str(raw)
        return text

    def owner_from_listener(self, conn: Conn, n: int) -> None:
        lst = self.listener_for(conn)
        if lst is not None and lst.pid:
            conn.pid, conn.comm = lst.pid, lst.comm
            conn.direction = INBOUND
        else:
            self.unattributed += n

    def _apply_udp(self, key: UdpKey, first_kind: int, last: tuple, out: list[Change]) -> None:
        conn = self.udp.get(key)
        if conn is None:
            conn = Conn("UDP")
            conn.direction = OUTBOUND if first_kind == ev.EV_UDP_SEND else INBOUND
            conn.state = UDP_ACTIVE
            conn.cookie = key[0]
            self._addresses(conn, last)
            self.udp[key] = conn
            self._udp_by_cookie.setdefault(key[0], set()).add(key)
            self.opened["UDP"] += 1
            if len(self.udp) > self.max_udp_flows:
                self._drop_udp_flow(next(iter(self.udp)))  # oldest first, with its cookie index
                self._count_eviction()
        # the latest sender or receiver (a UDP socket may be shared); no listener fallback: not a connection
        conn.pid, conn.comm, conn.cgroup_id = last[ev.TGID], self._comm(last[ev.COMM]), last[ev.CGROUP]
        conn.ts = last[ev.TS]
        conn.last_seen = time.monotonic()
        if last[ev.FLAGS] & ev.EVF_UDP_COUNTS:
            self._udp_counts(conn, last[ev.BYTES_ACKED : ev.SEGS_IN + 1], last[ev.FLAGS] & ev.EVF_UDP_NEW)
        states = self._udp_active[key] = [UDP_ACTIVE]
        out.append((conn, states, None))

    def _udp_counts(self, conn: Conn, kernel: tuple[int, int, int, int], new_entry: int) -> None:
        counts = conn.udp_counts
        if counts is None:
            counts = conn.udp_counts = UdpCounts()
        if counts.update(kernel, bool(new_entry)):
            self.udp_restarts += 1

    def _close_udp_flow(self, key: UdpKey, conn: Conn, ts: int, reason: str | None, out: list[Change]) -> None:
        """A UDP flow closed by a decision of ours (its socket's close without its own record, idle, gone):
        its counts from its kernel entry, which goes (a later datagram starts a new flow)."""
        take = self.take_udp_flow
        kernel = take(key) if take is not None else None
        if kernel is not None:
            self._udp_counts(conn, kernel, False)
        self._udp_closed(key, conn, ts, reason, out)

    def _udp_closed(self, key: UdpKey, conn: Conn, ts: int, reason: str | None, out: list[Change]) -> None:
        conn.state, conn.ts = CLOSED, ts
        self.closed["UDP"] += 1
        active = self._udp_active.pop(key, None)
        if active is not None and reason is None:
            active.append(CLOSED)  # active and closed within the period: one event (the coalescing rule)
        else:
            out.append((conn, [CLOSED], reason))

    def _apply_control(self, rec: tuple, out: list[Change]) -> None:
        """listen() and bind() records; the close of a listener or of a UDP socket."""
        kind, cookie = rec[ev.KIND], rec[ev.COOKIE]
        if kind == ev.EV_TCP_LISTEN or kind == ev.EV_UDP_BIND:
            lst = self._listener(rec, "TCP" if kind == ev.EV_TCP_LISTEN else "UDP")
            if lst.port == 0:
                self.unbound_listeners[cookie] = lst
                if len(self.unbound_listeners) > MAX_UNBOUND_LISTENERS:
                    del self.unbound_listeners[next(iter(self.unbound_listeners))]
                    self._count_eviction()
                return
            self.add_listener(lst)
            out.append((lst, PORT_LISTENING, None))
            return
        if self.closed_while_seeding is not None:
            self.closed_while_seeding.add(cookie)
        if kind == ev.EV_TCP_STATE:  # LISTEN -> CLOSE
            self.unbound_listeners.pop(cookie, None)
            lst = self.remove_listener(cookie) or self._listener(rec, "TCP")  # one we never saw open: still told
            lst.ts = rec[ev.TS]
            out.append((lst, PORT_CLOSED, None))
        elif kind == ev.EV_UDP_CLOSE:
            if rec[ev.DADDR] != NO_PEER:  # a flow of the socket, with its final counts
                key = (cookie, rec[ev.DADDR], rec[ev.DPORT])
                conn = self.udp.get(key)
                if conn is not None:
                    self._drop_udp_flow(key)
                    if rec[ev.FLAGS] & ev.EVF_UDP_COUNTS:
                        self._udp_counts(conn, rec[ev.BYTES_ACKED : ev.SEGS_IN + 1], 0)
                    self._udp_closed(key, conn, rec[ev.TS], None, out)
                if rec[ev.FLAGS] & ev.EVF_UDP_MORE:
                    return  # the socket's last record closes the rest
            for key in self._udp_by_cookie.pop(cookie, ()):
                conn = self.udp.pop(key, None)
                if conn is not None:
                    self._close_udp_flow(key, conn, rec[ev.TS], None, out)
            lst = self.remove_listener(cookie)
            if lst is not None:
                lst.ts = rec[ev.TS]
                out.append((lst, PORT_CLOSED, None))

    def _listener(self, rec: tuple, protocol: str) -> Listener:
        lst = Listener(protocol)
        lst.family, lst.cookie, lst.cgroup_id = rec[ev.FAMILY], rec[ev.COOKIE], rec[ev.CGROUP]
        lst.ip, lst.port, lst.netns = self.ip_text(rec[ev.SADDR], lst.family), rec[ev.SPORT], rec[ev.NETNS]
        lst.pid, lst.comm, lst.ts = rec[ev.TGID], self._comm(rec[ev.COMM]), rec[ev.TS]
        return lst

    # -- addresses -------------------------------------------------------------
    def _addresses(self, conn: Conn, rec: tuple) -> None:
        conn.family, conn.local_ip, conn.remote_ip = self._pair(rec)
        conn.local_port = rec[ev.SPORT]
        conn.remote_port = rec[ev.DPORT]
        conn.netns = rec[ev.NETNS]

    def _pair(self, rec: tuple) -> tuple[int, str, str]:
        """(family, local IP text, remote IP text) of a record; v4-mapped addresses as IPv4."""
        key = (rec[ev.SADDR], rec[ev.DADDR], rec[ev.FAMILY])
        texts = self._pair_text.get(key)
        if texts is None:
            saddr, daddr, family = key
            if family == 6 and is_v4_mapped(daddr):
                family, saddr, daddr = 4, unmap_v4(saddr), unmap_v4(daddr)
            if len(self._pair_text) >= 65536:
                self._pair_text.clear()
            texts = self._pair_text[key] = (family, self.ip_text(saddr, family), self.ip_text(daddr, family))
        return texts

    # -- closes the kernel did not report --------------------------------------
    def reconcile(self, tcp: set[int], udp: set[int], before_ns: int) -> list[Change]:
        """Close what the kernel no longer has: state left behind by a kernel gap, or by a socket
        the kernel closed without a traced transition.

        tcp, udp: the cookies sock_diag lists in every netns (sockdiag.live_cookies: TCP
        connections and listeners, every UDP socket), from a dump that started after before_ns
        (CLOCK_MONOTONIC). An entry whose last record is older than that and whose socket is not
        in the dump closed without us seeing it; its close is delivered now with closeReason "gone".
        """
        now = time.monotonic_ns()
        out: list[Change] = []
        for cookie, conn in list(self.tcp.items()):
            if cookie not in tcp and conn.ts < before_ns:
                del self.tcp[cookie]
                self.reconciled_cookies[cookie] = None
                if len(self.reconciled_cookies) > 65536:
                    del self.reconciled_cookies[next(iter(self.reconciled_cookies))]
                conn.state, conn.ts = CLOSED, now
                self.closed["TCP"] += 1
                out.append((conn, [CLOSED], "gone"))
        for key, conn in list(self.udp.items()):
            if key[0] not in udp and conn.ts < before_ns:
                self._drop_udp_flow(key)
                self._close_udp_flow(key, conn, now, "gone", out)
        for cookie, lst in list(self.listeners.items()):
            if cookie not in (tcp if lst.protocol == "TCP" else udp) and lst.ts < before_ns:
                self.remove_listener(cookie)
                lst.ts = now
                out.append((lst, PORT_CLOSED, "gone"))
        self.reconciled += len(out)
        return out

    def _expire_idle_udp(self, now: float, out: list[Change]) -> None:
        cutoff = now - self.udp_idle_s
        for key in [k for k, c in self.udp.items() if c.last_seen < cutoff]:
            conn = self._drop_udp_flow(key)
            self._close_udp_flow(key, conn, conn.ts, "idle", out)

    def _drop_udp_flow(self, key: UdpKey) -> Conn:
        conn = self.udp.pop(key)
        keys = self._udp_by_cookie.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._udp_by_cookie[key[0]]
        return conn

    def add_udp_flow(self, key: UdpKey, conn: Conn) -> None:
        self.udp[key] = conn
        self._udp_by_cookie.setdefault(key[0], set()).add(key)

    def _count_eviction(self) -> None:
        self.evicted += 1
        if self.evicted in (1, 1000) or self.evicted % 100_000 == 0:
            log.warning(
                "connection table full: evicted %d entries so far (raise the cap if this host is that busy)",
                self.evicted,
            )

    # -- listeners -------------------------------------------------------------
    def add_listener(self, lst: Listener) -> None:
        old = self.listeners.pop(lst.cookie, None)
        if old is not None:
            self._listener_ports.pop((old.netns, old.protocol, old.port), None)
        self.listeners[lst.cookie] = lst
        self._listener_ports[(lst.netns, lst.protocol, lst.port)] = lst
        if len(self.listeners) > self.max_listeners:
            self.remove_listener(next(iter(self.listeners)))
            self._count_eviction()

    def bind_listener(self, cookie: int, port: int) -> Listener | None:
        """An unbound listener's port, found by sock_diag: it becomes a listener like any other."""
        lst = self.unbound_listeners.pop(cookie, None)
        if lst is not None:
            lst.port = port
            self.add_listener(lst)
        return lst

    def remove_listener(self, cookie: int) -> Listener | None:
        lst = self.listeners.pop(cookie, None)
        if lst is not None:
            k = (lst.netns, lst.protocol, lst.port)
            if self._listener_ports.get(k) is lst:
                del self._listener_ports[k]
        return lst

    def listener_for(self, conn: Conn) -> Listener | None:
        return self._listener_ports.get((conn.netns, conn.protocol, conn.local_port))

    # -- snapshot ----------------------------------------------------------------
    def snapshot(self):
        """Every listener, then every connection, as changes, one at a time. The hub encodes a
        snapshot a frame at a time while the tables keep changing, so this walks a copy of the keys
        and skips what has gone meanwhile."""
        for key in list(self.listeners):
            lst = self.listeners.get(key)
            if lst is not None:
                yield lst, PORT_LISTENING, None
        for table in (self.tcp, self.udp):
            for key in list(table):
                conn = table.get(key)
                if conn is not None:
                    yield conn, [conn.state], None
