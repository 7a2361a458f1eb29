"""The multiplexer's merged state: per node, the tables a client keeps, built from the node's stream.

No I/O: a peer feeds events in, the server asks for a snapshot. Keys follow docs/protocol.md (keep in
step with the node's own tables: state/containers.py, state/ips.py, state/names.py, state/tracker.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from ..hub import exact
from ..protocol import (
    CLOSED,
    CONNECTION_EVENT,
    CONTAINER_ADDED,
    CONTAINER_DELETED,
    DNS_EXPIRED,
    DNS_RESOLVED,
    IP_ADDED,
    IP_REMOVED,
    PORT_CLOSED,
    PORT_LISTENING,
    connection_key,
)

Event = dict[str, Any]


class ConnectionRow(NamedTuple):
    """A connection as the mux keeps it: its snapshot event already encoded (~1/3 of a parsed event's
    memory, and a snapshot of it costs no encoding), and the names it must keep for its lifetime."""

    event: orjson.Fragment  # the latest connection.event, with "states": [its state]
    remote_hostname: str | None
    local_hostname: str | None
    size: int  # bytes of its JSON (what --mux-max-bytes counts)


class NodeTables:
    """One node's current state, keyed as a client would keep it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.containers: dict[str, Event] = {}
        self.ips: dict[tuple[str, str], Event] = {}
        self.names: dict[str, Event] = {}
        self.ports: dict[int, Event] = {}
        self.connections: dict[tuple[Any, ...], ConnectionRow] = {}
        self.bytes = 0  # the JSON of every row held: what --mux-max-bytes bounds
        self._sizes: dict[tuple[int, Any], int] = {}  # (id of its table, key) -> bytes, for the dict tables

    def apply(self, e: Event) -> None:
        t = e["type"]
        if t == CONNECTION_EVENT:
            key = connection_key(e)
            old = self.connections.get(key)
            if old:
                self.bytes -= old.size
            if e.get("state") == CLOSED:
                self.connections.pop(key, None)
            else:
                if old:  # a name, once given, stays for the connection's lifetime (docs/protocol.md)
                    if old.remote_hostname is not None and "remoteHostname" not in e:
                        e["remoteHostname"] = old.remote_hostname
                    if old.local_hostname is not None and "localHostname" not in e:
                        e["localHostname"] = old.local_hostname
                text = exact(orjson.dumps({**e, "states": [e.get("state")]}))
                self.connections[key] = ConnectionRow(
                    orjson.Fragment(text), e.get("remoteHostname"), e.get("localHostname"), len(text)
                )
                self.bytes += len(text)
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

    def _set(self, table: dict[Any, Event], key: Any, e: Event) -> None:
        size = len(orjson.dumps(e))
        self.bytes += size - self._sizes.get((id(table), key), 0)
        self._sizes[(id(table), key)] = size
        table[key] = e

    def _drop(self, table: dict[Any, Event], key: Any) -> None:
        if table.pop(key, None) is not None:
            self.bytes -= self._sizes.pop((id(table), key), 0)

    def snapshot(self) -> list[Event | orjson.Fragment]:
        """This node's state as events, in the node stream's order (connections already encoded)."""
        out: list[Event | orjson.Fragment] = [
            *self.containers.values(),
            *self.ips.values(),
            *self.names.values(),
            *self.ports.values(),
        ]
        out.extend(row.event for row in self.connections.values())
        return out

    def prune(self, wanted: Any) -> int:
        """Drop the rows `wanted` (a subscription) no longer lets through; returns how many."""
        dropped = 0
        for table in (self.containers, self.ips, self.names, self.ports):
            for key in [k for k, e in table.items() if not wanted.matches(e)]:
                self._drop(table, key)
                dropped += 1
        for key in [k for k, row in self.connections.items() if not wanted.matches(row.event)]:
            self.bytes -= self.connections.pop(key).size
            dropped += 1
        return dropped

    def count(self) -> int:
        """The rows held (what --peer-max-rows bounds): five len()s, cheap enough for every frame."""
        return sum(map(len, (self.containers, self.ips, self.names, self.ports, self.connections)))


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

    def snapshot(self) -> list[Event | orjson.Fragment]:
        """Every node's state in the node stream's order: containers, IPs, names, ports, connections
        (these already encoded)."""
        nodes = list(self.nodes.values())
        out: list[Event | orjson.Fragment] = []
        for table in ("containers", "ips", "names", "ports"):
            for n in nodes:
                out.extend(getattr(n, table).values())
        for n in nodes:
            out.extend(row.event for row in n.connections.values())
        return out

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
