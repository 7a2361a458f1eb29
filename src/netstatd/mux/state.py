"""The multiplexer's merged state: per node, the tables a client keeps, built from the node's stream.

No I/O: a peer feeds events in, the server asks for a snapshot. Keys follow docs/protocol.md (keep in
step with the node's own tables: state/containers.py, state/ips.py, state/names.py, state/dnsfailures.py,
state/tracker.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson

from ..protocol import (
    CLOSED,
    CONNECTION_EVENT,
    CONTAINER_ADDED,
    CONTAINER_DELETED,
    DNS_EXPIRED,
    DNS_FAILED,
    DNS_FAILED_KEEP_S,
    DNS_FAILED_MAX,
    DNS_RESOLVED,
    IP_ADDED,
    IP_REMOVED,
    PORT_CLOSED,
    PORT_LISTENING,
    connection_key,
)

Event = dict[str, Any]


# A connection row is kept as its snapshot event's JSON in two parts: the fields it shares with the other
# rows of its container (one bytes object for them all), and its own. At 1M rows that takes the mux's
# memory from ~1.2 to ~0.7 KiB a row, and a snapshot joins the two (~0.1 µs a row, where a compressed
# row took ~10 µs).
SHARED_FIELDS = (
    "type", "nodeName", "protocol", "family", "host", "containerId", "containerName", "podName", "namespace",
    "podUID", "usesHostNetwork", "localIP", "netns", "exe", "comm",
)  # fmt: skip
SHARED_SET = frozenset(SHARED_FIELDS)
MAX_SHARED = 50_000  # distinct shared parts kept per node; past that the cache starts again (rows keep theirs)
ABSENT = object()  # a shared field the event does not have (not the same row as one whose value is null)
Row = tuple[bytes, bytes]  # (shared part: '{...,' , own part: '...}'); the row's JSON is their concatenation


# the tables before connections, in the stream's order
INVENTORY = ("containers", "ips", "names", "failures", "ports")


def row_json(row: Row) -> bytes:
    return row[0] + row[1]


class NodeTables:
    """One node's current state, keyed as a client would keep it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.containers: dict[str, Event] = {}
        self.ips: dict[tuple[str, str], Event] = {}
        self.names: dict[str, Event] = {}
        # (clientIP, name) -> the latest dns.failed, least recently sent first; each until its timestamp
        # is DNS_FAILED_KEEP_S old (kept in step with the node's: state/dnsfailures.py)
        self.failures: dict[tuple[str, str], Event] = {}
        self._failure_ends: dict[tuple[str, str], float] = {}  # key -> when it ends, time.time() seconds
        self.ports: dict[int, Event] = {}
        self.connections: dict[tuple[Any, ...], Row] = {}
        self._shared: dict[tuple[Any, ...], bytes] = {}  # SHARED_FIELDS' values -> their JSON part
        self.bytes = 0  # the JSON of every row held: what --mux-max-bytes bounds
        self._sizes: dict[tuple[int, Any], int] = {}  # (id of its table, key) -> bytes, for the dict tables

    def apply(self, e: Event) -> None:
        t = e["type"]
        if t == CONNECTION_EVENT:
            key = connection_key(e)
            old = self.connections.get(key)
            if old:
                self.bytes -= len(old[0]) + len(old[1])
            if e.get("state") == CLOSED:
                self.connections.pop(key, None)
            else:
                if old and ("remoteHostname" not in e or "localHostname" not in e):
                    # a name, once given, stays for the connection's lifetime (docs/protocol.md)
                    kept = orjson.loads(row_json(old))
                    for name in ("remoteHostname", "localHostname"):
                        if name in kept and name not in e:
                            e[name] = kept[name]
                row = self._row(e)
                self.connections[key] = row
                self.bytes += len(row[0]) + len(row[1])
        elif t == PORT_LISTENING:
            self._set(self.ports, e.get("sockCookie"), e)
        elif t == PORT_CLOSED:
            self._drop(self.ports, e.get("sockCookie"))
        elif t == CONTAINER_ADDED:
            self._set(self.containers, e.get("containerId"), e)
        elif t == CONTAINER_DELETED:
            self._drop(self.containers, e.get("containerId"))
        elif t == IP_ADDED:
            self._set(self.ips, (e.get("ip"), e.get("podUID") or ""), e)
        elif t == IP_REMOVED:
            self._drop(self.ips, (e.get("ip"), e.get("podUID") or ""))
        elif t == DNS_RESOLVED:
            self._set(self.names, e.get("ip"), e)
        elif t == DNS_EXPIRED:
            self._drop(self.names, e.get("ip"))
        elif t == DNS_FAILED:
            self._failed(e)

    def _failed(self, e: Event) -> None:
        key = (str(e.get("clientIP")), str(e.get("name")))
        self._drop(self.failures, key)  # to the end: the table is in the order they came
        if len(self.failures) >= DNS_FAILED_MAX:
            self._drop(self.failures, next(iter(self.failures)))
        self._set(self.failures, key, e)
        self._failure_ends[key] = _seconds(e.get("timestamp")) + DNS_FAILED_KEEP_S

    def expire_failures(self, now: float) -> None:
        """Drop the dns.failed whose time is over (now: time.time()); what a client does with them too."""
        ends = self._failure_ends
        for key in [k for k, end in ends.items() if end <= now]:
            self._drop(self.failures, key)

    def _row(self, e: Event) -> Row:
        """The row for connection.event `e`, its shared part taken from the cache when it is there."""
        values: tuple[Any, ...] | None = tuple(e.get(f, ABSENT) for f in SHARED_FIELDS)
        try:
            part = self._shared.get(values)  # type: ignore[arg-type]
        except TypeError:  # a list or an object where a scalar belongs: the row keeps its own copy
            values, part = None, None
        own = {k: v for k, v in e.items() if k not in SHARED_SET}
        own["states"] = [e.get("state")]
        if part is None:
            part = orjson.dumps({f: e[f] for f in SHARED_FIELDS if f in e})[:-1] + b","
            if values is not None:
                if len(self._shared) >= MAX_SHARED:
                    self._shared.clear()
                self._shared[values] = part
        return part, orjson.dumps(own)[1:]

    def _set(self, table: dict[Any, Event], key: Any, e: Event) -> None:
        size = len(orjson.dumps(e))
        self.bytes += size - self._sizes.get((id(table), key), 0)
        self._sizes[(id(table), key)] = size
        table[key] = e

    def _drop(self, table: dict[Any, Event], key: Any) -> None:
        if table.pop(key, None) is not None:
            self.bytes -= self._sizes.pop((id(table), key), 0)
            if table is self.failures:
                del self._failure_ends[key]

    def snapshot(self) -> list[Event | orjson.Fragment]:
        """This node's state as events, in the node stream's order (connections already encoded)."""
        self.expire_failures(time.time())
        out: list[Event | orjson.Fragment] = [e for table in INVENTORY for e in getattr(self, table).values()]
        out.extend(orjson.Fragment(row_json(row)) for row in self.connections.values())
        return out

    def prune(self, wanted: Any) -> int:
        """Drop the rows `wanted` (a subscription) no longer lets through; returns how many."""
        dropped = 0
        for table in (self.containers, self.ips, self.names, self.failures, self.ports):
            for key in [k for k, e in table.items() if not wanted.matches(e)]:
                self._drop(table, key)
                dropped += 1
        for key in [k for k, row in self.connections.items() if not wanted.matches(orjson.loads(row_json(row)))]:
            row = self.connections.pop(key)
            self.bytes -= len(row[0]) + len(row[1])
            dropped += 1
        return dropped

    def count(self) -> int:
        """The rows held (what --peer-max-rows bounds): six len()s, cheap enough for every frame."""
        return sum(map(len, (self.containers, self.ips, self.names, self.failures, self.ports, self.connections)))


class MergedState:
    """Every node's tables, plus a cluster-wide IP -> name index so any node's DNS names every connection."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeTables] = {}
        self.names: dict[Any, Any] = {}  # ip -> hostname, the latest learned on any node

    def replace(self, tables: NodeTables) -> None:
        """A node's fresh snapshot (first connect, reconnect or stream.reset) replaces what we had."""
        self.remove(tables.name)
        self.nodes[tables.name] = tables
        for ip, e in tables.names.items():
            self.names[ip] = e.get("hostname")

    def remove(self, node: str) -> NodeTables | None:
        tables = self.nodes.pop(node, None)
        if tables:
            for ip, e in tables.names.items():
                if self.names.get(ip) == e.get("hostname"):
                    del self.names[ip]
        return tables

    def apply(self, tables: NodeTables, events: list[Event]) -> None:
        """Live events of one node: name its connections from any node's DNS, then keep them."""
        names = self.names
        for e in events:
            t = e["type"]
            if t == CONNECTION_EVENT and names:
                for ip_field, name_field in (("remoteIP", "remoteHostname"), ("localIP", "localHostname")):
                    if name_field not in e and (name := names.get(e.get(ip_field))):  # type: ignore[arg-type]
                        e[name_field] = name
            elif t == DNS_RESOLVED:
                names[e.get("ip")] = e.get("hostname")
            elif t == DNS_EXPIRED and names.get(e.get("ip")) == e.get("hostname"):
                del names[e.get("ip")]
            tables.apply(e)

    def snapshot(self) -> Iterator[Event | orjson.Fragment]:
        """Every node's state in the node stream's order: containers, IPs, names, DNS failures, ports,
        connections. Lazy: a connection's JSON is joined as the hub encodes its frame, not all at once."""
        nodes = list(self.nodes.values())
        now = time.time()
        for n in nodes:
            n.expire_failures(now)
        # what is held now, as references (live events go on changing the tables meanwhile)
        inventory = [e for table in INVENTORY for n in nodes for e in getattr(n, table).values()]
        rows = [row for n in nodes for row in n.connections.values()]
        yield from inventory
        for row in rows:
            yield orjson.Fragment(row[0] + row[1])

    def containers(self, namespace: str | None, pod_name: str | None) -> list[Event]:
        """/api/containers on the mux port: every node's, each with its nodeName."""
        skip = ("type", "timestamp")
        return [
            {k: v for k, v in e.items() if k not in skip}
            for n in self.nodes.values()
            for e in n.containers.values()
            if (namespace is None or e.get("namespace") == namespace)
            and (pod_name is None or e.get("podName") == pod_name)
        ]


def _seconds(timestamp: Any) -> float:
    """An event's RFC 3339 timestamp as time.time() seconds; now for one that is not."""
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except (TypeError, ValueError):
        return time.time()
