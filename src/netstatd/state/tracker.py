"""Node state: live connections and listening ports, built from kernel records.

Records are folded into per-socket pending entries as they arrive (cheap:
a tuple and a dict lookup each). Every flush period (50 ms) each pending
socket becomes one `connection.event` carrying its latest state and every
state it passed through (`states`), so a connection's open and close are
never skipped, yet a sub-millisecond connection costs one event per side.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from ..protocol import (
    CONNECTION_EVENT,
    FAMILY_NAMES,
    PORT_CLOSED,
    PORT_LISTENING,
    UDP_ACTIVE,
    UDP_CLOSE,
    AddressText,
    WallClock,
    is_v4_mapped,
    unmap_v4,
)
from ..sources.bpf import events as ev
from ..sources.procfs import ProcessCache

try:
    from . import _shortconn  # built by `make setup` (setup.py); without it short connections take the Python path
except ImportError:
    _shortconn = None

if TYPE_CHECKING:
    from ..enrich.attribution import Attribution
    from ..enrich.cgroups import CgroupOwner
    from .hostnames import Hostnames

log = logging.getLogger("netstatd.state")

Event = dict[str, Any]
PROTO_NAMES = {6: "TCP", 17: "UDP"}
OUTBOUND, INBOUND = "outbound", "inbound"


class Conn:
    """A live TCP connection (keyed by socket cookie) or UDP flow (cookie, peer)."""

    __slots__ = (
        "cgroup_id",
        "comm",
        "container",
        "cookie",
        "direction",
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
        "state",
        "ts",
    )

    def __init__(self) -> None:
        self.pid = 0
        self.comm = ""
        self.exe = ""
        self.cgroup_id = 0
        self.direction: str | None = None
        self.state = ""
        self.last_seen = 0.0
        self.ts = 0  # CLOCK_MONOTONIC ns of the latest record (or sweep) applied
        # the container of `owner_pid`, resolved once: the process may be gone by the close
        self.owner_pid = -1
        self.container: CgroupOwner | None = None
        # names from DNSTap, kept once known: the answer may expire while the connection lives
        self.remote_hostname: str | None = None
        self.local_hostname: str | None = None


class Listener:
    """A listening TCP socket or a bound UDP socket."""

    __slots__ = ("cgroup_id", "comm", "cookie", "exe", "family", "ip", "netns", "pid", "port", "protocol", "ts")

    def __init__(self) -> None:
        self.cgroup_id = 0  # from the listen()/bind() record: names the container after its process exits


class Tracker:
    """Applies kernel records and seeded sockets; emits protocol events."""

    def __init__(
        self,
        node_name: str,
        processes: ProcessCache,
        *,
        max_connections: int = 1_000_000,
        max_udp_flows: int = 200_000,
        max_listeners: int = 65_536,
        udp_idle_s: float = 60.0,
        native: bool = True,
    ) -> None:
        self.node_name = node_name
        # short TCP connections through the native helper (shortconn.c), when it is built
        self.native = native and _shortconn is not None
        self.processes = processes
        # container/pod fields for events; None leaves events without them
        self.attribution: Attribution | None = None
        # IP -> hostname from DNSTap; None leaves events without names
        self.hostnames: Hostnames | None = None
        self.clock = WallClock()
        self.ip_text = AddressText()
        self.tcp: dict[int, Conn] = {}
        self.udp: dict[tuple[int, bytes, int], Conn] = {}
        self._udp_by_cookie: dict[int, set[tuple[int, bytes, int]]] = {}
        self.listeners: dict[int, Listener] = {}
        self._listener_ports: dict[tuple[int, str, int], Listener] = {}
        self.max_connections = max_connections
        self.max_udp_flows = max_udp_flows
        self.max_listeners = max_listeners
        self.udp_idle_s = udp_idle_s
        # cookie (TCP) or (cookie, peer, port) (UDP) -> [first, last, states, accept record]
        self._pending: dict[Any, list] = {}
        # listen/bind records apply before the flush's connections, closes after
        self._opens: list[tuple] = []
        self._closes: list[tuple] = []
        self._next_idle_check = 0.0
        self._owner_memo: dict[tuple[int, bytes], tuple[str, str]] = {}  # (pid, raw comm) -> (comm, exe), per flush
        self._folded_names: dict[int, tuple[str, ...]] = {}
        # (local, remote, family) as the kernel has them -> (family, local text, remote text); cleared when full
        self._pair_text: dict[tuple[bytes, bytes, int], tuple[int, str, str]] = {}
        # per flush: (pid, netns, cgroup id) -> (owner fields, container, attributed?); remote IP -> fields, name
        self._fields_memo: dict[tuple[int, int, int], tuple[Event, CgroupOwner | None, bool]] = {}
        self._remote_memo: dict[str, Event | None] = {}
        self._names_memo: dict[str, str | None] = {}
        # per flush, for _short_tcp_event: (pid, comm, cgroup id, netns) -> (owner fields, attributed?);
        # (local IP, remote IP) -> remote pod fields and names
        self._short_owner_memo: dict[tuple, tuple[str, bool | None]] = {}
        self._short_remote_memo: dict[tuple[str, str], str] = {}
        self._short_memo: dict[tuple, tuple[str, tuple[bool, bool | None]]] = {}  # _short_tcp_event's templates
        self._shorts: list[bytes] = []  # short connections _shortconn.split() took out, until the flush
        self._carry = b""  # records of new connections still open, for split() again with the next chunk
        self._native_memo: dict[bytes, list] = {}  # _shortconn.render()'s templates (_native_template), per flush
        self._states_json: dict[tuple[str, ...], str] = {}  # state names -> their JSON list, cleared when full
        self._node_json = orjson.dumps(node_name).decode()
        # Sockets closed while a seed scan runs: the scan may still list them.
        self._closed_while_seeding: set[int] | None = None
        self._scans = 0  # scans between begin_seed() and their seed()/add_listeners()
        # metrics, read at scrape time
        self.records_ingested = 0  # kernel records taken in, to compare with the kernel's CNT_EMITTED
        self.record_counts: Counter[int] = Counter()  # kind | family << 8 | oldstate << 16 | newstate << 24 -> records
        self.opened = {"TCP": 0, "UDP": 0}
        self.closed = {"TCP": 0, "UDP": 0}
        self.unattributed = 0
        self.evicted = 0
        self.reconciled = 0
        # cookies closed by reconcile(): a late kernel CLOSE for them is not a new connection
        self._reconciled_cookies: dict[int, None] = {}

    # -- ingest (per kernel record: keep it lean) --------------------------
    def ingest(self, chunk: bytes) -> int:
        """Fold a chunk of ring records into pending entries. Returns the record count.

        Pending entry: [first (TCP: old state, UDP: kind), chunk, offset of the
        latest record, state names, accept record]. Only the latest record of
        each connection is decoded in full, at the flush.

        With the native helper, connections that open and close within a flush period are taken out
        first (_shortconn.split) and rendered at the flush; the records of new connections still
        open are carried into the next chunk (and folded at the flush); the rest is folded here.
        While a seed scan runs everything is folded here: the scan needs every closed cookie.
        """
        count = len(chunk) // ev.RECORD_SIZE
        self.records_ingested += count
        # metrics by kind/family/states, counted for the whole chunk at once
        if self.native:
            _shortconn.count_kinds(chunk, self.record_counts)
        else:
            self.record_counts.update(memoryview(chunk).cast("I")[ev.KIND_WORD :: ev.RECORD_WORDS])
        if self.native and self._closed_while_seeding is None:
            chunk, shorts, owners, self._carry = _shortconn.split(
                self._carry + chunk, self._pending, self.tcp, self._reconciled_cookies
            )
            if shorts:
                self._shorts.append(shorts)
            for pid, comm in owners:  # of packed and carried connections
                self._see_process(pid, comm)
        elif self._carry:
            chunk, self._carry = self._carry + chunk, b""
        self._fold(chunk)
        return count

    def _see_process(self, pid: int, raw_comm: bytes) -> None:
        """Read /proc/PID/exe now, milliseconds after the event, not at the flush: short-lived
        processes may be gone by then. Its cgroup too, while it is alive."""
        if pid and pid not in self.processes:
            self.processes.lookup(pid, ev.comm_str(raw_comm))
            if self.attribution is not None:
                self.attribution.container_of(pid)

    def _fold(self, chunk: bytes) -> None:
        pending = self._pending
        names = ev.TCP_STATE_NAMES
        full = ev.RECORD.unpack_from
        size = ev.RECORD_SIZE
        last_pid = 0
        off = -size
        folded_names = self._folded_names
        for cookie, pid, kind, _family, old, new, folded in ev.RECORD_BRIEF.iter_unpack(chunk):
            off += size
            if pid != last_pid:
                last_pid = pid
                self._see_process(pid, full(chunk, off)[ev.COMM])
            if kind == ev.EV_TCP_STATE:
                if old == ev.TCP_LISTEN and new == ev.TCP_CLOSE:
                    self._closes.append(full(chunk, off))  # a listener closed
                    continue
                key: Any = cookie
                first = old
            elif kind == ev.EV_UDP_SEND or kind == ev.EV_UDP_RECV:
                rec = full(chunk, off)
                key = (cookie, rec[ev.DADDR], rec[ev.DPORT])
                first = kind
            elif kind == ev.EV_TCP_ACCEPT:
                p = pending.get(cookie)
                if p is None:
                    pending[cookie] = [0, chunk, off, [], full(chunk, off)]
                else:
                    p[4] = full(chunk, off)
                continue
            elif kind == ev.EV_UDP_CLOSE:
                self._closes.append(full(chunk, off))
                continue
            else:
                self._opens.append(full(chunk, off))
                continue
            p = pending.get(key)
            if folded:
                # states the kernel folded into this record come before its own
                passed = folded_names.get(folded)
                if passed is None:
                    passed = self._folded(folded)
                if p is None:
                    pending[key] = [first, chunk, off, [*passed, names[new]], None]
                    continue
                p[3].extend(passed)
            elif p is None:
                pending[key] = [first, chunk, off, [names[new]], None]
                continue
            p[1] = chunk
            p[2] = off
            p[3].append(names[new])

    def _folded(self, folded: int) -> tuple[str, ...]:
        """event.folded as state names, cached (a few sequences recur: FIN_WAIT1+FIN_WAIT2, ...)."""
        if len(self._folded_names) >= 1024:
            self._folded_names.clear()
        passed = self._folded_names[folded] = tuple(ev.TCP_STATE_NAMES[s] for s in ev.folded_states(folded))
        return passed

    # -- flush --------------------------------------------------------------
    def flush(self) -> list[Event]:
        """Turn everything pending into events (called every flush period)."""
        self.clock.refresh()
        self._new_period()
        out: list[Event] = []
        if self._carry:
            self._fold(self._carry)
            self._carry = b""
        pending, self._pending = self._pending, {}
        opens, self._opens = self._opens, []
        closes, self._closes = self._closes, []
        for rec in opens:
            self._apply_control(rec, out)
        if self._shorts:
            out += self._render_shorts()
        full = ev.RECORD.unpack_from
        tcp = self.tcp
        for key, (first, chunk, off, states, accept) in pending.items():
            if type(key) is int:
                if states and states[-1] == "CLOSE" and key not in tcp and key not in self._reconciled_cookies:
                    out.append(self._short_tcp_event(key, first, full(chunk, off), states, accept))
                else:
                    self._apply_tcp(key, first, full(chunk, off), states, accept, out)
            else:
                self._apply_udp(key, first, full(chunk, off), out)
        for rec in closes:
            self._apply_control(rec, out)
        now = time.monotonic()
        if now >= self._next_idle_check:
            self._next_idle_check = now + 1.0
            self._expire_idle_udp(now, out)
        return out

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

    def _addresses(self, conn: Conn, rec: tuple) -> None:
        conn.family, conn.local_ip, conn.remote_ip = self._pair(rec)
        conn.local_port = rec[ev.SPORT]
        conn.remote_port = rec[ev.DPORT]
        conn.netns = rec[ev.NETNS]
        conn.cookie = rec[ev.COOKIE]

    def _set_owner(self, conn: Conn, rec: tuple) -> None:
        pid = rec[ev.TGID]
        key = (pid, rec[ev.COMM])
        owner = self._owner_memo.get(key)
        if owner is None:
            comm = ev.comm_str(rec[ev.COMM])
            owner = self._owner_memo[key] = (comm, self.processes.lookup(pid, comm).exe)
        conn.pid = pid
        conn.comm, conn.exe = owner
        conn.cgroup_id = rec[ev.CGROUP]

    def _apply_tcp(self, cookie: int, first_old: int, last: tuple, states: list[str], accept, out: list[Event]) -> None:
        conn = self.tcp.get(cookie)
        if conn is None:
            if cookie in self._reconciled_cookies:
                return  # its close was already delivered by reconcile()
            conn = Conn()
            conn.protocol = "TCP"
            if states and states[0] == "SYN_SENT":
                conn.direction = OUTBOUND
            elif accept is not None or first_old == ev.TCP_LISTEN or "SYN_RECV" in states:
                conn.direction = INBOUND
            self.opened["TCP"] += 1
        elif accept is not None:
            conn.direction = INBOUND
        # At SYN_SENT the local port is still 0: the latest record has it.
        self._addresses(conn, last)
        if accept is not None:
            self._set_owner(conn, accept)
        elif last[ev.TGID]:
            self._set_owner(conn, last)
        elif not conn.pid:
            self._owner_from_listener(conn)
        if conn.direction is None:
            conn.direction = INBOUND if self._listener_for(conn) else OUTBOUND
        if last[ev.TS] < conn.ts and states[-1:] != ["CLOSE"]:
            pass  # drained after a sweep that saw a newer state: keep that one
        elif states:
            conn.state = states[-1]
            conn.ts = last[ev.TS]
        else:  # only accept() was seen
            conn.state = conn.state or "ESTABLISHED"
            conn.ts = last[ev.TS]
        if conn.state == "CLOSE":
            self.tcp.pop(cookie, None)
            self.closed["TCP"] += 1
            if self._closed_while_seeding is not None:
                self._closed_while_seeding.add(cookie)
        else:
            self.tcp[cookie] = conn
            if len(self.tcp) > self.max_connections:
                self._evict(self.tcp)
        out.append(self.connection_event(conn, states))

    def _short_tcp_event(self, cookie: int, first_old: int, last: tuple, states: list[str], accept) -> Any:
        """The event _apply_tcp() and connection_event() make for a connection that opened and closed
        within one flush (most of them under churn), without a Conn and already encoded.
        tests/unit/test_tracker.py checks that both ways give the same event.

        Events of one flush that share addresses, owner and states differ only in timestamp, ports and
        cookie: their text is memoised per flush with those four left open. A connecting socket's
        local port is not in the key (its event does not depend on it); any other's is, since its
        direction or owner may come from the listener on that port."""
        self.opened["TCP"] += 1
        self.closed["TCP"] += 1
        if self._closed_while_seeding is not None:
            self._closed_while_seeding.add(cookie)
        owner = accept if accept is not None else last
        outbound = states[0] == "SYN_SENT"
        key = (
            last[ev.SADDR],
            last[ev.DADDR],
            last[ev.FAMILY],
            last[ev.NETNS],
            0 if outbound and owner[ev.TGID] else last[ev.SPORT],
            owner[ev.TGID],
            owner[ev.COMM],
            owner[ev.CGROUP],
            first_old,
            accept is not None,
            *states,
        )
        memo = self._short_memo.get(key)
        if memo is None:
            pieces, counts = self._short_template(first_old, last, owner, states, accept is not None)
            memo = self._short_memo[key] = ("%s".join(map(_escape_percent, pieces)), counts)
        else:
            self._count_short_owner(memo[1])
        return orjson.Fragment(memo[0] % (self.clock.from_kernel(last[ev.TS]), last[ev.SPORT], last[ev.DPORT], cookie))

    def _render_shorts(self) -> list[Any]:
        """The events of the connections _shortconn.split() took out since the last flush."""
        shorts, self._shorts = self._shorts, []
        memo = self._native_memo
        events = _shortconn.render(shorts, memo, self._native_template, orjson.Fragment, self.clock.offset_ns)
        for template in memo.values():
            if template[5]:  # events after the first that reused it: they count as it did
                self._count_short_owner(template[6], template[5])
                template[5] = 0
        self.opened["TCP"] += len(events)
        self.closed["TCP"] += len(events)
        return events

    def _native_template(self, last: bytes, owner: bytes, first_old: int, accepted: int, states: bytes) -> list:
        """_shortconn.render()'s template for a connection: the five pieces of its event text around
        timestamp, ports and cookie (bytes), the count of events that reused it, and how it counts."""
        names = ev.TCP_STATE_NAMES
        pieces, counts = self._short_template(
            first_old, ev.RECORD.unpack(last), ev.RECORD.unpack(owner), [names[s] for s in states], bool(accepted)
        )
        return [*(p.encode() for p in pieces), 0, counts]

    def _short_template(
        self, first_old: int, last: tuple, owner: tuple, states: list[str], accepted: bool
    ) -> tuple[tuple[str, ...], tuple[bool, bool | None]]:
        """The event's text around its timestamp, local port, remote port and cookie (the five
        pieces of _SHORT_TCP_EVENT, filled in), and how the owner counts in the attribution metrics
        (_count_short_owner)."""
        family, local_ip, remote_ip = self._pair(last)
        netns, local_port = last[ev.NETNS], last[ev.SPORT]
        listener = None
        if states[0] == "SYN_SENT":
            direction = OUTBOUND
        elif accepted or first_old == ev.TCP_LISTEN or "SYN_RECV" in states:
            direction = INBOUND
        else:
            listener = self._listener_ports.get((netns, "TCP", local_port))
            direction = INBOUND if listener is not None else OUTBOUND
        if owner[ev.TGID]:
            key: tuple = (owner[ev.TGID], owner[ev.COMM], owner[ev.CGROUP], netns)
        else:  # a passive socket of a listener older than us
            if listener is None:
                listener = self._listener_ports.get((netns, "TCP", local_port))
            if listener is not None and listener.pid:
                direction = INBOUND
                key = (listener.pid, listener.comm, 0, netns)
            else:
                self.unattributed += 1
                key = (0, b"", 0, netns)
        fields = self._short_owner(*key)
        counts = (not key[0], self._short_owner_memo[key][1])
        names = tuple(states)
        states_json = self._states_json.get(names)
        if states_json is None:
            if len(self._states_json) >= 1024:
                self._states_json.clear()
            states_json = self._states_json[names] = orjson.dumps(states).decode()
        # Addresses are inet_ntop text and the rest numbers or our constants: nothing to escape for
        # JSON here; exe, comm and the pod fields come JSON-encoded in `fields`.
        start, middle, remote_port, cookie, end = _SHORT_TCP_EVENT
        pieces = (
            start,
            middle % (self._node_json, FAMILY_NAMES[family], states_json, local_ip),
            remote_port % remote_ip,
            cookie,
            end % (direction, fields, self._short_remote(local_ip, remote_ip)),
        )
        return pieces, counts

    def _count_short_owner(self, counts: tuple[bool, bool | None], events: int = 1) -> None:
        """The metrics more events with a memoised owner count in (as _short_template did)."""
        unattributed, resolved = counts
        if unattributed:
            self.unattributed += events
        a = self.attribution
        if resolved is not None and a is not None:
            if resolved:
                a.resolved += events
            else:
                a.host += events

    def _short_owner(self, pid: int, comm: bytes | str, cgroup_id: int, netns: int) -> str:
        """The JSON members pid, exe, comm, netns and the container/pod fields, memoised per flush."""
        key = (pid, comm, cgroup_id, netns)
        memo = self._short_owner_memo.get(key)
        a = self.attribution
        if memo is None:
            c = Conn()
            c.pid, c.netns, c.cgroup_id = pid, netns, cgroup_id
            if pid:
                c.comm = comm if type(comm) is str else ev.comm_str(comm)
                c.exe = self.processes.lookup(pid, c.comm).exe
            fields = {"pid": pid, "exe": c.exe, "comm": c.comm, "netns": netns}
            resolved = None
            if a is not None:
                before = a.resolved
                fields.update(self._owner_fields(a, c))
                resolved = a.resolved != before
            memo = self._short_owner_memo[key] = (orjson.dumps(fields).decode()[1:-1], resolved)
            return memo[0]
        members, resolved = memo
        self._count_short_owner((False, resolved))  # the counts stay per event
        return members

    def _short_remote(self, local_ip: str, remote_ip: str) -> str:
        """Remote pod fields and DNSTap names of an address pair as JSON members (with a leading
        comma), memoised per flush."""
        key = (local_ip, remote_ip)
        members = self._short_remote_memo.get(key)
        if members is None:
            extra: Event = {}
            a = self.attribution
            if a is not None:
                remote = self._remote_memo.get(remote_ip, _MISSING)
                if remote is _MISSING:
                    remote = self._remote_memo[remote_ip] = a.remote(remote_ip)
                if remote is not None:
                    extra.update(remote)
            names = self.hostnames
            if names is not None:
                for field, ip in (("remoteHostname", remote_ip), ("localHostname", local_ip)):
                    name = self._hostname(names, ip)
                    if name is not None:
                        extra[field] = name
            members = self._short_remote_memo[key] = "," + orjson.dumps(extra).decode()[1:-1] if extra else ""
        return members

    def _apply_udp(self, key: tuple[int, bytes, int], first_kind: int, last: tuple, out: list[Event]) -> None:
        conn = self.udp.get(key)
        if conn is None:
            conn = Conn()
            conn.protocol = "UDP"
            conn.direction = OUTBOUND if first_kind == ev.EV_UDP_SEND else INBOUND
            conn.state = UDP_ACTIVE
            self._addresses(conn, last)
            self.udp[key] = conn
            self._udp_by_cookie.setdefault(key[0], set()).add(key)
            self.opened["UDP"] += 1
            if len(self.udp) > self.max_udp_flows:
                self._drop_udp_flow(next(iter(self.udp)))  # oldest first, with its cookie index
                self._count_eviction()
        self._set_owner(conn, last)
        conn.ts = last[ev.TS]
        conn.last_seen = time.monotonic()
        out.append(self.connection_event(conn, [UDP_ACTIVE]))

    def _apply_control(self, rec: tuple, out: list[Event]) -> None:
        kind = rec[ev.KIND]
        cookie = rec[ev.COOKIE]
        if kind == ev.EV_TCP_LISTEN or kind == ev.EV_UDP_BIND:
            lst = Listener()
            lst.protocol = "TCP" if kind == ev.EV_TCP_LISTEN else "UDP"
            lst.family = rec[ev.FAMILY]
            lst.cgroup_id = rec[ev.CGROUP]
            lst.ip = self.ip_text(rec[ev.SADDR], lst.family)
            lst.port = rec[ev.SPORT]
            lst.netns = rec[ev.NETNS]
            lst.cookie = cookie
            lst.pid = rec[ev.TGID]
            lst.comm = ev.comm_str(rec[ev.COMM])
            lst.exe = self.processes.lookup(lst.pid, lst.comm).exe
            lst.ts = rec[ev.TS]
            self._add_listener(lst)
            out.append(self.port_event(lst, PORT_LISTENING))
        elif kind == ev.EV_TCP_STATE:  # LISTEN -> CLOSE
            if self._closed_while_seeding is not None:
                self._closed_while_seeding.add(cookie)
            lst = self._remove_listener(cookie)
            if lst is None:  # a listener we never saw open: still announce the close
                lst = Listener()
                lst.protocol, lst.family, lst.cookie = "TCP", rec[ev.FAMILY], cookie
                lst.ip, lst.port, lst.netns = self.ip_text(rec[ev.SADDR], lst.family), rec[ev.SPORT], rec[ev.NETNS]
                lst.pid, lst.comm = rec[ev.TGID], ev.comm_str(rec[ev.COMM])
                lst.exe = self.processes.lookup(lst.pid, lst.comm).exe
            lst.ts = rec[ev.TS]
            out.append(self.port_event(lst, PORT_CLOSED))
        elif kind == ev.EV_UDP_CLOSE:
            if self._closed_while_seeding is not None:
                self._closed_while_seeding.add(cookie)
            for key in self._udp_by_cookie.pop(cookie, ()):
                conn = self.udp.pop(key, None)
                if conn is not None:
                    conn.state = UDP_CLOSE
                    conn.ts = rec[ev.TS]
                    self.closed["UDP"] += 1
                    out.append(self.connection_event(conn, [UDP_CLOSE]))
            lst = self._remove_listener(cookie)
            if lst is not None:
                lst.ts = rec[ev.TS]
                out.append(self.port_event(lst, PORT_CLOSED))

    def reconcile(self, tcp: set[int], udp: set[int], before_ns: int) -> list[Event]:
        """Close what the kernel no longer has: state left behind by a kernel gap, or by a socket
        the kernel closed without a traced transition.

        tcp, udp: the cookies sock_diag lists in every netns (sockdiag.live_cookies: TCP
        connections and listeners, every UDP socket), from a dump that started after before_ns
        (CLOCK_MONOTONIC). An entry whose last record is older than that and whose socket is not
        in the dump closed without us seeing it; its close is delivered now with closeReason "gone".
        """
        now = time.monotonic_ns()
        out: list[Event] = []
        for cookie, conn in list(self.tcp.items()):
            if cookie not in tcp and conn.ts < before_ns:
                del self.tcp[cookie]
                self._reconciled_cookies[cookie] = None
                if len(self._reconciled_cookies) > 65536:
                    del self._reconciled_cookies[next(iter(self._reconciled_cookies))]
                conn.state, conn.ts = "CLOSE", now
                out.append(self._gone(self.connection_event(conn, ["CLOSE"])))
                self.closed["TCP"] += 1
        for key, conn in list(self.udp.items()):
            if key[0] not in udp and conn.ts < before_ns:
                self._drop_udp_flow(key)
                conn.state, conn.ts = UDP_CLOSE, now
                out.append(self._gone(self.connection_event(conn, [UDP_CLOSE])))
                self.closed["UDP"] += 1
        for cookie, lst in list(self.listeners.items()):
            if cookie not in (tcp if lst.protocol == "TCP" else udp) and lst.ts < before_ns:
                self._remove_listener(cookie)
                lst.ts = now
                out.append(self._gone(self.port_event(lst, PORT_CLOSED)))
        return out

    def _gone(self, event: Event) -> Event:
        self.reconciled += 1
        event["closeReason"] = "gone"
        return event

    def _drop_udp_flow(self, key: tuple[int, bytes, int]) -> Conn:
        conn = self.udp.pop(key)
        keys = self._udp_by_cookie.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._udp_by_cookie[key[0]]
        return conn

    def _expire_idle_udp(self, now: float, out: list[Event]) -> None:
        cutoff = now - self.udp_idle_s
        idle = [k for k, c in self.udp.items() if c.last_seen < cutoff]
        for key in idle:
            conn = self._drop_udp_flow(key)
            conn.state = UDP_CLOSE
            self.closed["UDP"] += 1
            ev_ = self.connection_event(conn, [UDP_CLOSE])
            ev_["closeReason"] = "idle"
            out.append(ev_)

    def _evict(self, table: dict) -> None:
        """Over the cap: drop the oldest entry (dicts keep insertion order)."""
        del table[next(iter(table))]
        self._count_eviction()

    def _count_eviction(self) -> None:
        self.evicted += 1
        if self.evicted in (1, 1000) or self.evicted % 100_000 == 0:
            log.warning(
                "connection table full: evicted %d entries so far (raise the cap if this host is that busy)",
                self.evicted,
            )

    # -- listeners ---------------------------------------------------------
    def _add_listener(self, lst: Listener) -> None:
        old = self.listeners.pop(lst.cookie, None)
        if old is not None:
            self._listener_ports.pop((old.netns, old.protocol, old.port), None)
        self.listeners[lst.cookie] = lst
        self._listener_ports[(lst.netns, lst.protocol, lst.port)] = lst
        if len(self.listeners) > self.max_listeners:
            oldest = next(iter(self.listeners))
            self._remove_listener(oldest)
            self._count_eviction()

    def _remove_listener(self, cookie: int) -> Listener | None:
        lst = self.listeners.pop(cookie, None)
        if lst is not None:
            k = (lst.netns, lst.protocol, lst.port)
            if self._listener_ports.get(k) is lst:
                del self._listener_ports[k]
        return lst

    def _listener_for(self, conn: Conn) -> Listener | None:
        return self._listener_ports.get((conn.netns, conn.protocol, conn.local_port))

    def _owner_from_listener(self, conn: Conn) -> None:
        """A passive socket whose owner the kernel did not know (its listener predates us)."""
        lst = self._listener_for(conn)
        if lst is not None and lst.pid:
            conn.pid, conn.comm, conn.exe = lst.pid, lst.comm, lst.exe
            conn.direction = INBOUND
        else:
            self.unattributed += 1

    # -- seeding -------------------------------------------------------------
    def begin_seed(self) -> None:
        """Call before scanning existing sockets (and after the probes are live)."""
        if self._closed_while_seeding is None:  # another scan running keeps its set
            self._closed_while_seeding = set()
        self._scans += 1

    def _end_scan(self) -> set[int]:
        """The cookies closed since the scan began. Scans may overlap (seed + netns scans): the set
        lives until the last one ends; a cookie closed before a later scan began is gone anyway."""
        gone = self._closed_while_seeding or set()
        self._scans = max(0, self._scans - 1)
        if not self._scans:
            self._closed_while_seeding = None
        return gone

    def add_listeners(self, sockets: Iterable, include_loopback: bool) -> list[Event]:
        """Listening sockets from a scan of one netns (a container started). Call begin_seed() before the dump.

        Only unknown cookies are added (pid 0: attribution goes by the netns); known listeners and
        connections are left alone, so a socket the kernel already reported is not announced twice.
        """
        # plus listen()/bind() records not flushed yet: their own event is coming
        gone = self._end_scan() | {r[ev.COOKIE] for r in self._opens}
        out: list[Event] = []
        for s in sockets:
            if s.cookie in gone or s.cookie in self.listeners or not _is_listening(s):
                continue
            if not include_loopback and _loopback(s.saddr, s.family):
                continue
            lst = self._seeded_listener(s, 0, None)
            self._add_listener(lst)
            out.append(self.port_event(lst, PORT_LISTENING))
        return out

    def seed(self, sockets: Iterable, owners: dict[int, int], include_loopback: bool) -> list[Conn | Listener]:
        """Sockets that existed before the kernel probes: sources.sockdiag.DiagSocket records.

        owners maps socket inode -> pid. Sockets already known from live
        records, or closed since begin_seed(), are left alone. Returns the
        added state (events_for() makes its events for clients that connected meanwhile: a
        host with 100k sockets need not hold 100k events at once).
        """
        out: list[Conn | Listener] = []
        gone = self._end_scan()
        deferred = []
        for s in sockets:
            if s.cookie in gone:
                continue
            if not include_loopback and (_loopback(s.saddr, s.family) or _loopback(s.daddr, s.family)):
                continue
            pid = owners.get(s.inode, 0)
            info = self.processes.lookup(pid) if pid else None
            if _is_listening(s):
                if s.cookie in self.listeners:
                    continue
                lst = self._seeded_listener(s, pid, info)
                self._add_listener(lst)
                out.append(lst)
            elif (s.protocol == 6 and s.state not in _TCP_NOT_CONNECTIONS) or (s.protocol == 17 and s.state == 1):
                deferred.append((s, pid, info))  # a TCP connection, or a connected UDP socket
        # Connections after listeners, so direction and owner can use them.
        now = time.monotonic_ns()
        shared = {}.setdefault
        for s, pid, info in deferred:
            if s.protocol == 6 and s.cookie in self.tcp:
                continue
            conn = Conn()
            conn.protocol = PROTO_NAMES[s.protocol]
            family, saddr, daddr = s.family, s.saddr, s.daddr
            if family == 6 and is_v4_mapped(daddr):
                family, saddr, daddr = 4, unmap_v4(saddr), unmap_v4(daddr)
            conn.family = family
            conn.local_ip, conn.remote_ip = self.ip_text(saddr, family), self.ip_text(daddr, family)
            # one int object per distinct value: 100k seeded connections share a few ports and netns
            conn.local_port, conn.remote_port = shared(s.sport, s.sport), shared(s.dport, s.dport)
            conn.netns, conn.cookie = shared(s.netns, s.netns), s.cookie
            conn.ts = now
            if info is not None:
                conn.pid, conn.comm, conn.exe = pid, info.comm, info.exe
            conn.direction = INBOUND if self._listener_for(conn) else OUTBOUND
            if not conn.pid and conn.direction == INBOUND:
                self._owner_from_listener(conn)
            if conn.protocol == "TCP":
                conn.state = ev.TCP_STATES.get(s.state, str(s.state))
                self.tcp[s.cookie] = conn
            else:
                conn.state = UDP_ACTIVE
                conn.last_seen = time.monotonic()
                key = (s.cookie, s.daddr, s.dport)  # as live records key it
                self.udp[key] = conn
                self._udp_by_cookie.setdefault(s.cookie, set()).add(key)
            out.append(conn)
        return out

    def events_for(self, added: Iterable[Conn | Listener]) -> Iterator[Event]:
        """Events for state that seed() added, made one at a time."""
        self._new_period()
        for item in added:
            yield self._listening_event(item) if type(item) is Listener else self._state_event(item)

    def _seeded_listener(self, s: Any, pid: int, info: Any) -> Listener:
        lst = Listener()
        lst.protocol = PROTO_NAMES[s.protocol]
        lst.family, lst.cookie = s.family, s.cookie
        lst.ip, lst.port, lst.netns = self.ip_text(s.saddr, s.family), s.sport, s.netns
        lst.pid = pid
        lst.comm, lst.exe = (info.comm, info.exe) if info else ("", "")
        lst.ts = time.monotonic_ns()
        return lst

    # -- events ----------------------------------------------------------------
    def connection_event(self, c: Conn, states: list[str]) -> Event:
        event = {
            "type": CONNECTION_EVENT,
            "timestamp": self.clock.from_kernel(c.ts),
            "nodeName": self.node_name,
            "protocol": c.protocol,
            "family": FAMILY_NAMES[c.family],
            "state": c.state,
            "states": states,
            "localIP": c.local_ip,
            "localPort": c.local_port,
            "remoteIP": c.remote_ip,
            "remotePort": c.remote_port,
            "pid": c.pid,
            "exe": c.exe,
            "comm": c.comm,
            "netns": c.netns,
            "sockCookie": c.cookie,
            "direction": c.direction,
        }
        a = self.attribution
        if a is not None:
            event.update(self._owner_fields(a, c))
            remote = self._remote_memo.get(c.remote_ip, _MISSING)
            if remote is _MISSING:
                remote = self._remote_memo[c.remote_ip] = a.remote(c.remote_ip)
            if remote is not None:
                event.update(remote)
        names = self.hostnames
        if names is not None:
            if c.remote_hostname is None:
                c.remote_hostname = self._hostname(names, c.remote_ip)
            if c.local_hostname is None:
                c.local_hostname = self._hostname(names, c.local_ip)
        if c.remote_hostname is not None:
            event["remoteHostname"] = c.remote_hostname
        if c.local_hostname is not None:
            event["localHostname"] = c.local_hostname
        return event

    def _owner_fields(self, a: Attribution, c: Conn) -> Event:
        """Container/pod fields of c's owner; memoised per flush: most events of a burst share an owner."""
        key = (c.pid, c.netns, c.cgroup_id)
        memo = self._fields_memo.get(key)
        if memo is None:
            if c.owner_pid != c.pid:
                c.owner_pid, c.container = c.pid, a.container_of(c.pid)
            before = a.resolved
            fields = a.fields(c.container, c.netns, c.cgroup_id)
            memo = self._fields_memo[key] = (fields, c.container, a.resolved != before)
            return fields
        fields, container, resolved = memo
        if c.owner_pid != c.pid:
            c.owner_pid, c.container = c.pid, container
        # the counts stay per event, as without the memo
        if resolved:
            a.resolved += 1
        else:
            a.host += 1
        return fields

    def _hostname(self, names: Hostnames, ip: str) -> str | None:
        name = self._names_memo.get(ip, _MISSING)
        if name is _MISSING:
            name = self._names_memo[ip] = names.lookup(ip)
        return name

    def _new_period(self) -> None:
        """Memos live for one flush (or snapshot): containers, pods and names change between them."""
        self._owner_memo.clear()
        self._fields_memo.clear()
        self._remote_memo.clear()
        self._names_memo.clear()
        self._short_owner_memo.clear()
        self._short_remote_memo.clear()
        self._short_memo.clear()
        self._native_memo.clear()

    def port_event(self, lst: Listener, kind: str) -> Event:
        event = {
            "type": kind,
            "timestamp": self.clock.from_kernel(lst.ts),
            "nodeName": self.node_name,
            "protocol": lst.protocol,
            "family": FAMILY_NAMES[lst.family],
            "ip": lst.ip,
            "port": lst.port,
            "netns": lst.netns,
            "pid": lst.pid,
            "exe": lst.exe,
            "comm": lst.comm,
            "sockCookie": lst.cookie,
        }
        a = self.attribution
        if a is not None:
            event.update(a.fields(a.container_of(lst.pid), lst.netns, lst.cgroup_id))
        return event

    def snapshot(self) -> list[Event]:
        """Current state as events: every listening port, then every live connection."""
        return list(self.iter_snapshot())

    def iter_snapshot(self) -> Iterator[Event]:
        """snapshot() one event at a time. The hub encodes it a frame at a time while the state keeps
        changing, so it walks a copy of the keys and skips what has gone meanwhile."""
        self._new_period()
        for table, make in (
            (self.listeners, self._listening_event),
            (self.tcp, self._state_event),
            (self.udp, self._state_event),
        ):
            for key in list(table):
                item = table.get(key)
                if item is not None:
                    yield make(item)

    def _listening_event(self, lst: Listener) -> Event:
        return self.port_event(lst, PORT_LISTENING)

    def _state_event(self, c: Conn) -> Event:
        return self.connection_event(c, [c.state])


_MISSING = object()
# connection.event of _short_tcp_event() and shortconn.c, with the fields of connection_event() (in another
# order), in five pieces: its timestamp, local port, remote port and cookie go between them
_SHORT_TCP_EVENT = (
    '{"type":"' + CONNECTION_EVENT + '","timestamp":"',
    '","nodeName":%s,"protocol":"TCP","family":"%s","state":"CLOSE","states":%s,"localIP":"%s","localPort":',
    ',"remoteIP":"%s","remotePort":',
    ',"sockCookie":',
    ',"direction":"%s",%s%s}',
)

_TCP_NOT_CONNECTIONS = (ev.TCP_CLOSE, 6, 12)  # CLOSE, TIME_WAIT, NEW_SYN_RECV


def _escape_percent(text: str) -> str:
    return text.replace("%", "%%")


def _loopback(addr: bytes, family: int) -> bool:
    if family == 4:
        return addr[0] == 127
    return addr == b"\0" * 15 + b"\x01" or (is_v4_mapped(addr) and addr[12] == 127)


def _is_listening(s: Any) -> bool:
    """A TCP listener, or a bound unconnected UDP socket (what `ss -tuln` lists)."""
    return (s.protocol == 6 and s.state == ev.TCP_LISTEN) or (
        s.protocol == 17 and s.state == ev.TCP_CLOSE and s.sport != 0
    )
