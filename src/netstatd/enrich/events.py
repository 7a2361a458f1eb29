"""The one builder of connection.event and port events: table changes in, enriched events out.

Enrichment happens here and nowhere else: the owner's executable (procfs), its container or pod
(attribution), the remote address's pod, and names from DNSTap. What is looked up about a socket's
owner is kept on the socket (the process may be gone by its close); the rest is memoised for one
period (a flush or a snapshot), since most events of a burst share owners and addresses.

The native helper's events come from here too: template() builds a connection's event with
placeholders where its timestamp, ports and cookie go, and cuts its JSON there, so the text the C
code completes is exactly this builder's output. Every event is counted once in the attribution
metrics, here: `count` says how many connections a template stands for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

from ..metrics import Metric
from ..protocol import CONNECTION_EVENT, FAMILY_NAMES, WallClock
from ..sources.bpf import events as ev
from ..sources.procfs import ProcessCache
from ..state.containers import HOST_FIELDS
from ..state.model import Conn, Listener
from ..state.native import ShortConnections

if TYPE_CHECKING:
    from ..state.hostnames import Hostnames
    from ..state.tables import Change
    from ..state.tracker import Flush
    from .attribution import Attribution
    from .cgroups import CgroupOwner
    from .traffic import NamespaceTraffic

Event = dict[str, Any]
_MISSING = object()
# Placeholders of template(): strings, so they encode as "\u0000.." tokens no other text of the event
# can hold before the counters, the last of them (addresses are IP text, exe and comm cannot contain NUL).
_TS, _LOCAL_PORT, _REMOTE_PORT, _COOKIE = "\0ts", "\0lp", "\0rp", "\0ck"
# a closed connection's counters, in TcpStats' order (the native helper writes each one's in)
STATS_FIELDS = ("bytesSent", "bytesReceived", "segmentsSent", "segmentsReceived", "rttUs", "retransmits")
_STATS = tuple(f"\0s{i}" for i in range(len(STATS_FIELDS)))
# a UDP flow's totals, in UdpCounts.totals()' order
UDP_COUNT_FIELDS = ("bytesSent", "bytesReceived", "packetsSent", "packetsReceived")
_CUTS = (
    b"\\u0000ts",  # the timestamp keeps its quotes
    b'"\\u0000lp"',
    b'"\\u0000rp"',
    b'"\\u0000ck"',
    *(f'"\\u0000s{i}"'.encode() for i in range(len(STATS_FIELDS))),
)


class EventBuilder:
    def __init__(
        self,
        node_name: str,
        clock: WallClock,
        processes: ProcessCache,
        attribution: Attribution | None = None,
        hostnames: Hostnames | None = None,
        traffic: NamespaceTraffic | None = None,
    ) -> None:
        self.node_name = node_name
        self.clock = clock
        self.processes = processes
        self.attribution = attribution  # None: events without container/pod fields
        self.hostnames = hostnames  # None: events without names
        self.traffic = traffic  # None: no per-namespace byte metrics
        self._owner_memo: dict[tuple[int, int, int], Event] = {}  # (pid, netns, cgroup) -> container/pod fields
        self._process_memo: dict[tuple[int, str], tuple[str, str, CgroupOwner | None]] = {}  # -> exe, comm, container
        self._remote_memo: dict[str, Event | None] = {}
        self._names_memo: dict[str, str | None] = {}
        self.attributed = {"container": 0, "host": 0}  # events by owner: a container or pod, or the host

    def begin_period(self) -> None:
        """Memos live for one flush or snapshot: containers, pods and names change between them."""
        self.clock.refresh()
        self._owner_memo.clear()
        self._process_memo.clear()
        self._remote_memo.clear()
        self._names_memo.clear()

    def render(self, changes: Iterable[Change]) -> list[Event]:
        return [self.event(*change) for change in changes]

    def render_flush(self, flush: Flush) -> list[Any]:
        """A flush period's events: dicts, and for the short connections encoded text (orjson.Fragment)."""
        self.begin_period()
        events = self.render(flush.changes)
        shorts = flush.shorts
        if shorts is not None:
            templates = [self.template(c, states, n) for c, states, n in shorts.templates]
            texts = ShortConnections.render(shorts.packed, shorts.index, templates, self.clock.offset_ns)
            events[flush.shorts_at : flush.shorts_at] = map(orjson.Fragment, texts)
            if self.traffic is not None:
                sums = ShortConnections.byte_sums(shorts.packed, shorts.index, len(templates))
                for (c, _, _), (sent, received) in zip(shorts.templates, sums, strict=True):
                    self.traffic.add(self._namespace(c), sent, received)
        return events

    def event(self, item: Conn | Listener, states: Any, close_reason: str | None) -> Event:
        """The event of one table change (state/tables.py Change)."""
        if type(item) is Listener:
            return self.port_event(item, states, close_reason)
        return self.connection_event(item, states, close_reason)

    # -- connection.event ----------------------------------------------------
    def connection_event(
        self, c: Conn, states: list[str], close_reason: str | None = None, *, count: int = 1, account: bool = True
    ) -> Event:
        """account: count the connection's new bytes under its namespace (not for a template: its bytes
        are the sums of the connections it stands for)."""
        self._see_owner(c)
        event = {
            "type": CONNECTION_EVENT,
            "timestamp": self.clock.from_kernel(max(c.ts, c.stats_ts)),
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
        if c.stats is not None:
            event.update(zip(STATS_FIELDS, c.stats, strict=True))
            if c.error is not None:
                event["error"] = c.error
            if c.reset is not None:
                event["reset"] = c.reset
        if c.udp_counts is not None:
            event.update(zip(UDP_COUNT_FIELDS, c.udp_counts.totals(), strict=True))
        a = self.attribution
        if a is not None:
            event.update(self._owner_fields(a, c, count))
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
        if close_reason is not None:
            event["closeReason"] = close_reason
        if account and self.traffic is not None:
            totals = c.stats or c.udp_counts
            if totals is not None:
                sent, received = totals.bytes_sent, totals.bytes_received
                self.traffic.add(event.get("namespace"), sent - c.counted[0], received - c.counted[1])
                c.counted = (sent, received)
        return event

    def _namespace(self, c: Conn) -> str | None:
        a = self.attribution
        return self._owner_fields(a, c, 0).get("namespace") if a is not None else None

    def template(self, c: Conn, states: list[str], count: int) -> tuple[bytes, ...]:
        """c's event text in eleven pieces, around its timestamp, local port, remote port, cookie and
        counters (the native helper writes those in), for `count` closed connections that share
        everything else."""
        event = self.connection_event(c, states, count=count, account=False)
        event["timestamp"], event["localPort"], event["remotePort"], event["sockCookie"] = (
            _TS,
            _LOCAL_PORT,
            _REMOTE_PORT,
            _COOKIE,
        )
        event.update(zip(STATS_FIELDS, _STATS, strict=True))
        rest = orjson.dumps(event)
        pieces = []
        for cut in _CUTS:
            piece, rest = rest.split(cut, 1)
            pieces.append(piece)
        pieces.append(rest)
        return tuple(pieces)

    # -- port.listening / port.closed ------------------------------------------
    def port_event(self, lst: Listener, kind: str, close_reason: str | None = None) -> Event:
        self._see_owner(lst)
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
            fields = a.fields(a.container_of(lst.pid), lst.netns, lst.cgroup_id)
            self._count(fields, 1)
            event.update(fields)
        if close_reason is not None:
            event["closeReason"] = close_reason
        return event

    def metrics(self) -> list[Metric]:
        return [
            Metric(
                "netstatd_events_attributed_total",
                "counter",
                "Connection and port events built (live and in snapshots) by owner: a container or pod, or the host.",
                [({"owner": owner}, n) for owner, n in self.attributed.items()],
            )
        ]

    # -- enrichment ------------------------------------------------------------
    def see_processes(self, processes: Iterable[tuple[int, bytes]]) -> None:
        """Processes just seen in kernel records: read /proc/PID/exe and the cgroup now, milliseconds
        after the event, not at the flush: short-lived processes may be gone by then."""
        cache, a = self.processes, self.attribution
        for pid, raw_comm in processes:
            if pid and pid not in cache:
                cache.lookup(pid, ev.comm_str(raw_comm))
                if a is not None:
                    a.container_of(pid)

    def _see_owner(self, item: Conn | Listener) -> None:
        """The owner's executable (and comm, when the kernel gave none), and for a connection its
        container: looked up once per owner, and kept."""
        if type(item) is Listener:
            if item.exe is None:
                item.exe = self._exe(item)
            return
        if item.owner_pid != item.pid:
            item.owner_pid = item.pid
            key = (item.pid, item.comm)
            seen = self._process_memo.get(key)
            if seen is None:
                exe = self._exe(item)
                a = self.attribution
                seen = self._process_memo[key] = (exe, item.comm, a.container_of(item.pid) if a is not None else None)
            item.exe, item.comm, item.container = seen

    def _exe(self, item: Conn | Listener) -> str:
        if not item.pid:
            return ""
        info = self.processes.lookup(item.pid, item.comm or None)
        if not item.comm:
            item.comm = info.comm
        return info.exe

    def _owner_fields(self, a: Attribution, c: Conn, count: int) -> Event:
        """Container/pod fields of c's owner, counted `count` times in the attribution metrics."""
        key = (c.pid, c.netns, c.cgroup_id)
        fields = self._owner_memo.get(key)
        if fields is None:
            fields = self._owner_memo[key] = a.fields(c.container, c.netns, c.cgroup_id)
        self._count(fields, count)
        return fields

    def _count(self, fields: Event, events: int) -> None:
        """The one place events are counted by owner (netstatd_events_attributed_total)."""
        self.attributed["host" if fields is HOST_FIELDS else "container"] += events

    def _hostname(self, names: Hostnames, ip: str) -> str | None:
        name = self._names_memo.get(ip, _MISSING)
        if name is _MISSING:
            name = self._names_memo[ip] = names.lookup(ip)
        return name
