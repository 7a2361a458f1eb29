"""One upstream WebSocket per peer: its node's snapshot and live events into the merged state.

A peer is an agent's node port (`ws://IP:<http-port>/netstat`), never a mux port: that, and refusing a
peer whose host.info says `"mux": true`, is what keeps the multiplexer from feeding on itself.
Frames are applied as they are read, so a slow mux backs up the peer's own bounded client queue, which
drops, counts and sends us a `stream.reset` (we then rebuild that node from its fresh snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from ..hub import FRAME_EVENTS
from ..protocol import (
    CONNECTION_EVENT,
    CONTAINER_ADDED,
    CONTAINER_DELETED,
    DNS_EXPIRED,
    DNS_RESOLVED,
    HOST_INFO,
    IP_ADDED,
    IP_REMOVED,
    PORT_CLOSED,
    PORT_LISTENING,
    SNAPSHOT_COMPLETE,
    STREAM_RESET,
)
from .state import Event, MergedState, NodeTables

log = logging.getLogger("netstatd.mux")

PEER_STATUS = "peer.status"
NODE_REMOVED = "node.removed"
CONNECTED, RECONNECTING, GONE = "connected", "reconnecting", "gone"

# Every type a node stream carries (docs/protocol.md); anything else is garbage.
NODE_TYPES = frozenset(
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
        SNAPSHOT_COMPLETE,
        STREAM_RESET,
    )
)
MAX_FRAME_BYTES = 16 << 20  # a node's frames stay under ~1 MB (hub.FRAME_EVENTS)
FLOOD_WINDOWS = 3  # consecutive 1 s windows over the limit before a peer counts as flooding
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 10.0
CLOSE_WAIT_S = 1.0
# Above a node's own caps (tracker: 1M TCP, 200k UDP flows, 65k listeners; --dns-max-names 100k; ...).
MAX_SNAPSHOT_EVENTS = 4_000_000
GARBAGE_REASONS = ("json", "shape", "type", "nodeName", "protocol", "oversized", "binary", "flood", "mux", "duplicate")


@dataclass
class PeerStats:
    """Counters of every peer together (metrics), kept by the mux: peers come and go, counters do not."""

    connections: int = 0  # upstreams opened
    events: int = 0  # events received
    missed_events: int = 0  # events peers dropped for us (their stream.reset missedEvents)
    garbage: dict[str, int] = field(default_factory=dict)  # disconnects for bad input, by reason


class Garbage(Exception):
    """The peer broke the protocol (reason: one of GARBAGE_REASONS); it is disconnected."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class FloodGuard:
    """More than `limit` events/s in FLOOD_WINDOWS consecutive seconds is a flood, not a busy node."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self.window_start = clock()
        self.count = 0
        self.over = 0

    def add(self, n: int) -> bool:
        now = self.clock()
        if now - self.window_start >= 1.0:
            self.over = self.over + 1 if self.count > self.limit else 0
            self.window_start, self.count = now, 0
        self.count += n
        # The current window counts once it alone is over the limit, so a flood is cut within the Nth second.
        return self.over + (self.count > self.limit) >= FLOOD_WINDOWS


def parse_frame(data: str | bytes, node: str | None) -> list[Event]:
    """A frame's events, checked: objects with a known `type` and the peer's own `nodeName`."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise Garbage("json", f"not JSON: {e}") from None
    events = obj if isinstance(obj, list) else [obj]
    if not 0 < len(events) <= FRAME_EVENTS:
        raise Garbage("shape", f"a frame of {len(events)} events (1 to {FRAME_EVENTS} allowed)")
    for e in events:
        if not isinstance(e, dict):
            raise Garbage("shape", f"an event that is not an object: {str(e)[:80]!r}")
        t = e.get("type")
        if not isinstance(t, str) or t not in NODE_TYPES:
            raise Garbage("type", f"unknown event type {str(e.get('type'))[:80]!r}")
        name = e.get("nodeName")
        if not isinstance(name, str) or not name or (node is not None and name != node):
            raise Garbage("nodeName", f"nodeName {str(name)[:80]!r} (the peer is {node!r})")
    return events


class Peer:
    """Keeps one upstream to `ip` open, with backoff; owns that node's tables in the merged state."""

    def __init__(
        self,
        ip: str,
        port: int,
        state: MergedState,
        owners: dict[str, Peer],
        publish: Callable[[list[Event]], None],
        now: Callable[[], str],
        session: aiohttp.ClientSession,
        stats: PeerStats,
        *,
        max_events_per_s: int,
    ) -> None:
        self.ip = ip
        host = f"[{ip}]" if ":" in ip else ip
        self.url = f"ws://{host}:{port}/netstat"
        self.state = state
        self.owners = owners  # nodeName -> the peer streaming it: one peer per node
        self.publish = publish
        self.now = now
        self.session = session
        self.stats = stats
        self.max_events_per_s = max_events_per_s
        self.node: str | None = None
        self.host_info: Event | None = None
        self.status: Event | None = None  # the latest peer.status, repeated in snapshots
        self._backoff = BACKOFF_MIN_S
        self._delivered = False  # the current upstream delivered a whole snapshot
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"mux-peer-{self.ip}")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        self._lost()

    def drop(self) -> None:
        """DNS no longer lists the peer: its node goes now; the task ends at its next await."""
        if self.task:
            self.task.cancel()
            self.task = None
        self._lost()
        self._set_status(GONE)

    async def run(self) -> None:
        while True:
            error, garbage = "connection closed", False
            try:
                await self._session()
            except Garbage as g:
                garbage = True
                self.stats.garbage[g.reason] = self.stats.garbage.get(g.reason, 0) + 1
                error = f"{g.reason}: {g}"
                log.warning("peer %s (%s) disconnected: %s", self.ip, self.node or "?", error)
            except (aiohttp.ClientError, OSError) as e:  # TimeoutError is an OSError
                error = str(e) or type(e).__name__
            except Exception as e:  # a bug here must not end this peer's upstream for good
                log.exception("peer %s (%s): internal error; reconnecting", self.ip, self.node or "?")
                error = f"internal error: {e!r}"
            self._lost()
            # a node that delivered its snapshot is retried quickly (it restarts); anything else backs off
            worked = self._delivered and not garbage
            self._backoff = BACKOFF_MIN_S if worked else min(self._backoff * 2, BACKOFF_MAX_S)
            delay = self._backoff * random.uniform(0.8, 1.2)  # jitter: every mux retries a restarted node
            self._set_status(RECONNECTING, retryInS=round(delay, 2), error=error)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One upstream, read until it ends."""
        self._delivered = False
        ws = await self.session.ws_connect(self.url, max_msg_size=MAX_FRAME_BYTES, heartbeat=30, compress=0)
        try:
            await self._read(ws)
        finally:
            # Without a deadline, closing waits for the peer's close frame, which a flooding peer never sends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT_S):
                    await ws.close()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.stats.connections += 1
        flood = FloodGuard(self.max_events_per_s)
        staging: NodeTables | None = None  # the snapshot being read (first, or after a stream.reset)
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                events = parse_frame(msg.data, self.node)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                raise Garbage("binary", "a binary frame")
            elif msg.type == aiohttp.WSMsgType.ERROR:
                exc = ws.exception() or msg.data
                if isinstance(exc, aiohttp.WebSocketError) and exc.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                    raise Garbage("oversized", f"a frame over {MAX_FRAME_BYTES} bytes")
                raise ConnectionError(str(exc))
            else:
                return  # closed
            self.stats.events += len(events)
            # A snapshot may come fast (it is the node's whole state): bounded by size, not by rate.
            if staging is None and self.node is not None and flood.add(len(events)):
                raise Garbage("flood", f"more than {self.max_events_per_s} events/s for {FLOOD_WINDOWS} s")
            if staging is not None and staging.count() > MAX_SNAPSHOT_EVENTS:
                raise Garbage("oversized", f"a snapshot of more than {MAX_SNAPSHOT_EVENTS} entries")
            if self.node is None:
                staging = self._hello(events)
                continue
            try:
                staging = self._apply(events, staging)
            except (TypeError, KeyError, AttributeError) as e:  # a field of the wrong kind, e.g. a list as key
                raise Garbage("shape", f"a malformed event: {e!r}") from None
            await asyncio.sleep(0)  # frames already buffered do not yield: let the node's own work run

    def _apply(self, events: list[Event], staging: NodeTables | None) -> NodeTables | None:
        """One frame after host.info; returns the snapshot still being read, if any."""
        assert self.node is not None
        live: list[Event] = []
        for e in events:
            t = e["type"]
            if t == HOST_INFO:
                raise Garbage("protocol", "a second host.info")
            if t == STREAM_RESET:  # the peer dropped events for us; a fresh snapshot follows
                missed = e.get("missedEvents")
                self.stats.missed_events += missed if isinstance(missed, int) else 0
                staging = NodeTables(self.node)
            elif staging is None:
                if t == SNAPSHOT_COMPLETE:
                    raise Garbage("protocol", "snapshot.complete outside a snapshot")
                live.append(e)
            elif t == SNAPSHOT_COMPLETE:
                self._replace(staging)
                staging, self._delivered = None, True
            else:
                self.state.apply(staging, [e])
        if live:
            tables = self.state.nodes.get(self.node)
            if tables is not None:
                self.state.apply(tables, live)
                self.publish(live)
        return staging

    def _hello(self, events: list[Event]) -> NodeTables:
        """The first frame: the peer's host.info, which names its node."""
        info = events[0]
        if len(events) != 1 or info["type"] != HOST_INFO:
            raise Garbage("protocol", f"the first event is {info['type']!r}, not host.info")
        if info.get("mux"):
            raise Garbage("mux", "the peer is a multiplexer, not a node port")
        name = info["nodeName"]
        other = self.owners.get(name)
        if other is not None and other is not self:
            raise Garbage("duplicate", f"node {name!r} is already streamed by peer {other.ip}")
        self.owners[name] = self
        self.node, self.host_info = name, info
        self._set_status(CONNECTED)
        return NodeTables(name)

    def _replace(self, tables: NodeTables) -> None:
        existed = self.state.nodes.get(tables.name) is not None
        self.state.replace(tables)
        self.publish(([self._node_removed()] if existed else []) + tables.snapshot())

    def _lost(self) -> None:
        """The upstream ended: its node's state goes (it would go stale), and clients are told."""
        if self.node is None:
            return
        if self.state.remove(self.node) is not None:
            self.publish([self._node_removed()])
        if self.owners.get(self.node) is self:
            del self.owners[self.node]
        self.node = None

    def _node_removed(self) -> Event:
        return {"type": NODE_REMOVED, "timestamp": self.now(), "nodeName": self.node}

    def _set_status(self, status: str, **extra: Any) -> None:
        e: Event = {"type": PEER_STATUS, "timestamp": self.now(), "peer": self.ip, "status": status}
        name = self.node or (self.host_info or {}).get("nodeName")
        if name:
            e["nodeName"] = name
        if status == CONNECTED and self.host_info:
            e["hostInfo"] = self.host_info
        e.update(extra)
        self.status = e
        self.publish([e])
