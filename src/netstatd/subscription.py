"""What a /netstat client subscribes to: a filter on the stream (docs/protocol.md, "Subscriptions").

Given as query parameters at connect, or later as a `subscribe` frame, each key a comma-separated list
(or a JSON list). An event passes when every given key that applies to its type (APPLIES) matches.
Events that describe the stream or the nodes themselves (host.info, snapshot.complete, stream.reset,
the multiplexer's status events) always pass, so a client always learns which nodes exist.

A filter is immutable and hashable: the hub encodes each batch once per distinct filter.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .protocol import (
    CLOSED,
    CONNECTION_EVENT,
    CONTAINER_ADDED,
    CONTAINER_DELETED,
    DNS_EXPIRED,
    DNS_FAILED,
    DNS_RESOLVED,
    HOST_INFO,
    IP_ADDED,
    IP_REMOVED,
    MUX_STATUS,
    NODE_REMOVED,
    PEER_STATUS,
    PORT_CLOSED,
    PORT_LISTENING,
    SNAPSHOT_COMPLETE,
    STREAM_RESET,
    TCP_STATES,
    UDP_ACTIVE,
)

Event = dict[str, Any]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

KEYS = ("namespace", "podName", "nodeName", "protocol", "state", "port", "ip", "host", "loopback")
ALWAYS = frozenset({HOST_INFO, SNAPSHOT_COMPLETE, STREAM_RESET, MUX_STATUS, PEER_STATUS, NODE_REMOVED})
PROTOCOLS = frozenset({"TCP", "UDP"})
OPEN, CLOSED_ROWS = "open", "closed"  # the UI's two pseudo-states: every state but CLOSE, and CLOSE
MAX_VALUES = 256  # per key: a subscription is a few names, not a list of every pod
# The keys that apply to each event type ("ip" also stands for loopback); other types: nodeName only.
NODE_ONLY = frozenset({"nodeName"})
_POD = frozenset({"nodeName", "namespace", "podName"})
APPLIES = {
    CONNECTION_EVENT: _POD | {"protocol", "state", "port", "ip", "host"},
    PORT_LISTENING: _POD | {"protocol", "port", "ip", "host"},
    PORT_CLOSED: _POD | {"protocol", "port", "ip", "host"},
    CONTAINER_ADDED: _POD,
    CONTAINER_DELETED: _POD,
    IP_ADDED: _POD | {"ip"},
    IP_REMOVED: _POD | {"ip"},
    DNS_RESOLVED: NODE_ONLY | {"ip"},
    DNS_EXPIRED: NODE_ONLY | {"ip"},
    DNS_FAILED: _POD | {"ip"},  # the client's pod and address
}
# The address fields an "ip" key (and loopback) looks at, by event type; other types: "ip".
IP_FIELDS = {CONNECTION_EVENT: ("localIP", "remoteIP"), DNS_FAILED: ("clientIP",)}
_IP = ("ip",)


class FilterError(ValueError):
    """A subscription that cannot be taken; the message names the key and what is wrong."""


@dataclass(frozen=True)
class Filter:
    namespace: frozenset[str] = frozenset()
    podName: frozenset[str] = frozenset()  # the protocol's field names
    nodeName: frozenset[str] = frozenset()
    protocol: frozenset[str] = frozenset()
    state: frozenset[str] = frozenset()
    port: frozenset[int] = frozenset()
    ip: tuple[Network, ...] = ()
    host: bool = True  # False: leave out host processes' sockets
    loopback: bool = True  # False: leave out loopback addresses

    @property
    def empty(self) -> bool:
        return self == EVERYTHING

    def to_json(self) -> dict[str, Any]:
        """The filter as a `subscribe` frame's `filter` (only the keys given)."""
        out: dict[str, Any] = {}
        for key in ("namespace", "podName", "nodeName", "protocol", "state"):
            if getattr(self, key):
                out[key] = sorted(getattr(self, key))
        if self.port:
            out["port"] = sorted(self.port)
        if self.ip:
            out["ip"] = [str(n) for n in self.ip]
        if not self.host:
            out["host"] = False
        if not self.loopback:
            out["loopback"] = False
        return out

    def matches(self, e: Event | orjson.Fragment) -> bool:
        e = _decoded(e)
        kind = e.get("type")
        if kind in ALWAYS:
            return True
        applies = APPLIES.get(kind, NODE_ONLY)
        if self.nodeName and e.get("nodeName") not in self.nodeName:
            return False
        # namespace and podName: either end of a connection (the remote one when it is a pod of the node);
        # a host process's socket or the host's address has none, so it never matches one
        if self.namespace and "namespace" in applies and not _either(e, "namespace", "remoteNamespace", self.namespace):
            return False
        if self.podName and "podName" in applies and not _either(e, "podName", "remotePodName", self.podName):
            return False
        if self.protocol and "protocol" in applies and e.get("protocol") not in self.protocol:
            return False
        if self.state and "state" in applies:
            # A CLOSE always passes: it is how a row the client holds goes away (a state filter is on a
            # value that changes; the client's row keeps its last matching state until then).
            state = e.get("state")
            if state != CLOSED and state not in self.state and OPEN not in self.state:
                return False
        if not self.host and "host" in applies and e.get("host") is True:
            return False
        if self.port and "port" in applies:
            if kind == CONNECTION_EVENT:
                if e.get("localPort") not in self.port and e.get("remotePort") not in self.port:
                    return False
            elif e.get("port") not in self.port:
                return False
        if (self.ip or not self.loopback) and "ip" in applies:
            parsed = [_parse(e.get(f) or "") for f in IP_FIELDS.get(kind, _IP)]
            if self.ip and not any(a is not None and any(a in n for n in self.ip) for a in parsed):
                return False
            if not self.loopback and any(a is not None and a.is_loopback for a in parsed):
                return False
        return True


EVERYTHING = Filter()


@dataclass(frozen=True)
class AnyOf:
    """Several filters: an event passes when one of them lets it through. What a multiplexer subscribes
    its upstream with: the union of its clients' filters (push-down). Two or more filters, none empty."""

    filters: frozenset[Filter]

    @property
    def empty(self) -> bool:
        return False

    def to_json(self) -> list[dict[str, Any]]:
        return sorted((f.to_json() for f in self.filters), key=lambda f: orjson.dumps(f, option=orjson.OPT_SORT_KEYS))

    def matches(self, e: Event | orjson.Fragment) -> bool:
        e = _decoded(e)
        return any(f.matches(e) for f in self.filters)


Subscription = Filter | AnyOf


def union(filters: Iterable[Filter]) -> Subscription | None:
    """The subscription that lets through what any of `filters` does; None for no filter at all."""
    distinct = frozenset(filters)
    if not distinct:
        return None
    if EVERYTHING in distinct:
        return EVERYTHING
    return next(iter(distinct)) if len(distinct) == 1 else AnyOf(distinct)


@dataclass(frozen=True)
class Added:
    """What `new` lets through and `old` did not: the rows a widened subscription sends (a partial
    snapshot), on top of what the client holds."""

    new: Subscription
    old: Subscription

    empty = False

    def matches(self, e: Event | orjson.Fragment) -> bool:
        e = _decoded(e)
        return self.new.matches(e) and not self.old.matches(e)


def covers(old: Subscription, new: Subscription) -> bool:
    """True when `old` lets through everything `new` does (so a holder of old's rows has new's). False
    when unsure: a caller then asks for the rows."""
    if isinstance(new, AnyOf):
        return all(covers(old, f) for f in new.filters)
    if isinstance(old, AnyOf):
        return any(covers(f, new) for f in old.filters)
    for key in ("namespace", "podName", "nodeName", "protocol", "state", "port"):
        wanted, held = getattr(new, key), getattr(old, key)
        if held and not (wanted and wanted <= held):
            return False
    if old.ip and not (new.ip and all(any(n.version == o.version and n.subnet_of(o) for o in old.ip) for n in new.ip)):
        return False
    return (old.host or not new.host) and (old.loopback or not new.loopback)


def _decoded(e: Event | orjson.Fragment) -> Event:
    """An event encoded already (short connections from the native helper, the mux's rows) read back,
    which only filtered subscribers pay."""
    return e if isinstance(e, dict) else orjson.loads(orjson.dumps(e))


def _either(e: Event, key: str, remote_key: str, wanted: frozenset[str]) -> bool:
    return e.get(key) in wanted or e.get(remote_key) in wanted


@functools.lru_cache(maxsize=8192)  # a node's peers repeat: parsing is most of an ip filter's cost
def _parse(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# -- parsing: query parameters and subscribe frames ---------------------------------------------------


def _values(key: str, raw: Any) -> list[str]:
    if isinstance(raw, str):
        items = [x.strip() for x in raw.split(",")]
    elif isinstance(raw, list) and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in raw):
        items = [str(x).strip() for x in raw]
    elif isinstance(raw, int) and not isinstance(raw, bool):
        items = [str(raw)]
    else:
        raise FilterError(f"{key}: expected a comma-separated string or a list, got {type(raw).__name__}")
    items = [x for x in items if x]
    if len(items) > MAX_VALUES:
        raise FilterError(f"{key}: at most {MAX_VALUES} values")
    return items


def _flag(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
        return raw.lower() in ("true", "1")
    raise FilterError(f"{key}: expected true or false, got {raw!r}")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise FilterError(f"port: {text!r} is not a port (0-65535)")
    return int(text)


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise FilterError(f"ip: {text!r} is not an address or a CIDR") from None


STATES = (*TCP_STATES.values(), UDP_ACTIVE, OPEN, CLOSED_ROWS)


def _state(text: str) -> str:
    if text in STATES:
        return text
    raise FilterError(f"state: {text!r} is not a state (one of {', '.join(STATES)})")


def _protocol(text: str) -> str:
    if text.upper() not in PROTOCOLS:
        raise FilterError(f"protocol: {text!r} is not TCP or UDP")
    return text.upper()


_SETS: dict[str, Callable[[str], Any]] = {
    "namespace": str,
    "podName": str,
    "nodeName": str,
    "protocol": _protocol,
    "state": _state,
    "port": _port,
}


def parse(given: Mapping[str, Any]) -> Filter:
    """A filter from query parameters or a subscribe frame's `filter`; FilterError names what is wrong."""
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise FilterError(f"unknown key {unknown[0]!r} (keys: {', '.join(KEYS)})")
    fields: dict[str, Any] = {}
    for key, convert in _SETS.items():
        if key in given:
            fields[key] = frozenset(convert(v) for v in _values(key, given[key]))
    if "ip" in given:
        fields["ip"] = tuple(sorted({_network(v) for v in _values("ip", given["ip"])}, key=str))
    for key in ("host", "loopback"):
        if key in given:
            fields[key] = _flag(key, given[key])
    return Filter(**fields)


def parse_subscription(given: Any) -> Subscription:
    """A `subscribe` frame's `filter` (one filter: an object) or `filters` (a list of objects, any of
    which lets an event through; [] is everything)."""
    if isinstance(given, Mapping):
        return parse(given)
    if not isinstance(given, list) or not all(isinstance(f, Mapping) for f in given):
        raise FilterError("filters: expected a list of filter objects")
    if len(given) > MAX_VALUES:
        raise FilterError(f"filters: at most {MAX_VALUES}")
    return union(parse(f) for f in given) or EVERYTHING


def filters_of(subscription: Subscription) -> list[dict[str, Any]]:
    """A subscription as a `filters` list, what parse_subscription reads back ([] is everything)."""
    if isinstance(subscription, AnyOf):
        return subscription.to_json()
    return [] if subscription.empty else [subscription.to_json()]
