"""The multiplexer: discovery -> one upstream per peer -> merged state -> a second hub on --http-mux-port.

The mux port serves the node port's app (build_app: /, the UI, /netstat, /metrics), over a hub whose
snapshot is every node's state, so the UI is the same code whether it talks to one node or all.

Upstreams are open only while this mux has a client (and LINGER_S after the last one leaves): every
agent serves a mux, and N muxes each streaming all N nodes around the clock would cost every node the
whole cluster's event rate for nothing. Discovery runs always, so mux.status is ready for a client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .. import __version__
from ..api.front import Front
from ..hub import Hub, Subscriber
from ..metrics import Metric, single
from ..protocol import HOST_INFO, MUX_STATUS
from ..settings import Settings
from ..subscription import EVERYTHING, Subscription, covers, union
from ..supervisor import Supervisor, failpoint
from .discovery import Discovery
from .peer import CONNECTED, GARBAGE_REASONS, RECONNECTING, Peer, PeerStats, upstream_tls
from .state import Event, MergedState

log = logging.getLogger("netstatd.mux")

MAX_PEER_EVENTS_PER_S = 500_000  # 10x what a node delivers at full churn (tens of thousands/s, docs/benchmarks.md)
LINGER_S = 60.0  # upstreams stay open this long after the last client left (a page reload keeps them)
WAIT_S = 10.0  # a client held for its nodes' rows gets its snapshot after this long anyway
# A union narrowed by a client's new filter reaches the upstreams once it has lasted this long: a filter
# tried and cleared again (a port typed in the page) does not make every node send its rows twice, and
# the rows it brings back are here at once.
NARROW_AFTER_S = 5.0


class MuxHub(Hub):
    """A hub that tells the mux when its clients come, go or change filter: upstreams open on demand,
    and subscribe to what the clients want (push-down)."""

    mux: Mux

    def subscribe(self, peer: str, first: Event, filter: Subscription = EVERYTHING) -> Subscriber | None:
        sub = super().subscribe(peer, first, filter)
        if sub is not None:
            self.mux.client_changed(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        super().unsubscribe(sub)
        self.mux.client_left(sub)

    def resubscribe(self, sub: Subscriber, new: Subscription, partial: bool = False, version: int = 0) -> None:
        # the merged state's rows for it now, the nodes' live; its snapshot.complete waits for the nodes
        super().resubscribe(sub, new, partial, version)
        self.mux.client_changed(sub, narrow_later=True)


class Mux:
    def __init__(
        self,
        settings: Settings,
        now: Callable[[], str],
        front: Front,
        supervisor: Supervisor,
        *,
        max_peer_events_per_s: int = MAX_PEER_EVENTS_PER_S,
        linger_s: float = LINGER_S,
    ) -> None:
        self.settings = settings
        self.now = now
        self.front = front
        self.supervisor = supervisor
        self.max_peer_events_per_s = max_peer_events_per_s
        self.state = MergedState()
        self.hub = MuxHub(settings.node_name, self.snapshot, now, client_max_events=settings.client_queue_events)
        self.hub.mux = self
        # Push-down: the upstreams subscribe to the union of the clients' filters, versioned; a client
        # whose filter widened it is held until every connected node has sent the rows it adds.
        self.interest: Subscription = EVERYTHING
        self.interest_version = 0
        self.interest_changes = 0
        self.waits_expired = 0  # clients released by WAIT_S before every node had answered
        self._waiting: dict[Subscriber, tuple[int, float]] = {}  # held client -> (version, deadline)
        self._narrowing: asyncio.TimerHandle | None = None  # a narrower union, once it has lasted NARROW_AFTER_S
        self.linger_s = linger_s
        self.active = False  # upstreams open (a client is here, or left less than linger_s ago)
        self._idle_since = 0.0
        self.discovery = Discovery(settings.fanout_service, self._peers_changed)
        self.peers: dict[str, Peer] = {}
        self.owners: dict[str, Peer] = {}  # nodeName -> peer
        self.stats = PeerStats()
        self.peer_tls, self.peer_server_name = upstream_tls(settings)  # once: every upstream shares it
        self.gone = 0  # peers dropped because DNS stopped listing them
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, metrics_fn: Callable[[], list[Metric]]) -> None:
        """Serve --http-mux-port (OSError when it cannot listen), then start discovering peers."""
        port = self.settings.http_mux_port
        app = self.front.app(self.hub, self.host_info, metrics_fn, lambda pid: None, self.state.containers, port)
        self._runner = await self.front.serve(app, port, "--http-mux-port")
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5)
        # limit=0: the default pool of 100 would leave peers past the 100th waiting forever
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        self.supervisor.spawn("discovery", self.discovery.run)
        self.supervisor.spawn("mux-idle", self._idle_loop)
        log.info(
            "multiplexer on %s (WebSocket /netstat), peers from %r",
            self.front.urls(port),
            self.settings.fanout_service,
        )

    async def stop(self) -> None:
        """After the supervisor stopped its tasks (discovery, idle loop, peers)."""
        await self._deactivate()
        if self._session:
            await self._session.close()
        if self._runner:
            await self._runner.cleanup()

    # -- push-down ------------------------------------------------------------
    def client_changed(self, sub: Subscriber, narrow_later: bool = False) -> None:
        """A client came or changed filter: re-subscribe the upstreams if the union changed (narrow_later:
        if it only narrowed, once it has stayed so for NARROW_AFTER_S). Unless the merged state already
        holds every row the client wants, its snapshot.complete waits until the connected nodes have sent
        them (they reach it live meanwhile); the first client, whose upstreams open now, waits for its
        whole snapshot."""
        settled = all(p.acked >= self.interest_version or p.failing for p in self.peers.values())
        held_rows = self.interest  # what the merged state holds, once settled
        self._update_interest(narrow_later)
        if not self.active:
            self._activate()
            if not self.peers:
                return
            sub.held = True
        elif not any(p.node is not None for p in self.peers.values()) or (settled and covers(held_rows, sub.filter)):
            return
        else:
            sub.hold_completion()
        self._waiting[sub] = (self.interest_version, time.monotonic() + WAIT_S)
        asyncio.get_running_loop().call_later(WAIT_S, self._release_ready)

    def client_left(self, sub: Subscriber) -> None:
        self._waiting.pop(sub, None)
        self._update_interest()

    def _update_interest(self, narrow_later: bool = False) -> None:
        """The union of the clients' filters; when it changed, every upstream is re-subscribed and the
        rows it no longer lets through are dropped. No client: the last one stays (upstreams linger)."""
        new = union(s.filter for s in self.hub.subscribers)
        if new is None:
            return
        if self._narrowing is not None:
            self._narrowing.cancel()
            self._narrowing = None
        if new == self.interest:
            return
        if narrow_later and self.active and covers(self.interest, new):
            self._narrowing = asyncio.get_running_loop().call_later(NARROW_AFTER_S, self._narrow)
            return
        self.interest, self.interest_version = new, self.interest_version + 1
        self.interest_changes += 1
        for peer in self.peers.values():
            peer.resubscribe(self.interest_version, new)
        if not new.empty:
            for tables in self.state.nodes.values():
                tables.prune(new)

    def _narrow(self) -> None:
        self._narrowing = None
        self._update_interest()

    def _current_interest(self) -> tuple[int, Subscription]:
        return self.interest_version, self.interest

    def _release_ready(self) -> None:
        """Held clients whose nodes have all answered (or who waited WAIT_S) get their snapshot now. A peer
        that failed (reconnecting) is not waited for: its state comes live once it is back."""
        now = time.monotonic()
        for sub, (version, deadline) in list(self._waiting.items()):
            ready = all(p.acked >= version or p.failing for p in self.peers.values())
            if ready or now >= deadline:
                if not ready:
                    self.waits_expired += 1
                    log.warning(
                        "multiplexer: client %s waited %.0f s for its nodes' rows; sending what it has",
                        sub.peer,
                        WAIT_S,
                    )
                del self._waiting[sub]
                sub.release()

    def _activate(self) -> None:
        if not self.active:
            self.active = True
            self._idle_since = time.monotonic()
            log.info("multiplexer: first client; opening upstreams to %d peers", len(self.discovery.peers))
            self._peers_changed(self.discovery.peers)

    async def _deactivate(self) -> None:
        self.active = False
        peers, self.peers = list(self.peers.values()), {}
        for peer in peers:
            await peer.stop()

    def reload(self) -> None:
        """The upstreams' certificate and CA, when they changed: new upstreams use them."""
        if self.peer_tls:
            self.peer_tls.reload_if_changed()

    async def _idle_loop(self) -> None:
        while True:
            failpoint("mux-idle")
            await asyncio.sleep(min(5.0, self.linger_s))
            if self.hub.subscribers or not self.active:
                self._idle_since = time.monotonic()
            elif time.monotonic() - self._idle_since >= self.linger_s:
                log.info("multiplexer: no client for %.0fs; closing the upstreams", self.linger_s)
                await self._deactivate()

    def _share(self) -> int:
        """One agent's share of --mux-max-bytes: the budget over the agents listed now."""
        return self.settings.mux_max_bytes // max(1, len(self.peers))

    def _peers_changed(self, ips: set[str]) -> None:
        if not self.active:
            ips = set()  # discovery alone: no upstreams until a client comes
        for ip in ips - self.peers.keys():
            assert self._session is not None
            peer = Peer(
                ip,
                self.settings.http_port,
                self.state,
                self.owners,
                self.hub.publish,
                self.now,
                self._session,
                self.stats,
                max_events_per_s=self.max_peer_events_per_s,
                max_bytes_per_s=self.settings.peer_max_bytes_per_second,
                max_rows=self.settings.peer_max_rows,
                max_state_bytes=self._share,
                interest=self._current_interest,
                on_progress=self._release_ready,
                ssl=self.peer_tls.context if self.peer_tls else None,
                server_hostname=self.peer_server_name,
            )
            self.peers[ip] = peer
            peer.start(self.supervisor)
        for ip in self.peers.keys() - ips:
            peer = self.peers.pop(ip)
            self.gone += 1
            log.info("peer %s (%s) is no longer listed by %s: dropped", ip, peer.node or "?", self.discovery.service)
            peer.drop()
        self.hub.publish([self.status_event()])

    # -- what clients of the mux port get ----------------------------------
    def status_event(self) -> Event:
        d = self.discovery
        return {
            "type": MUX_STATUS,
            "timestamp": self.now(),
            "nodeName": self.settings.node_name,
            "fanoutService": d.service,
            "peers": sorted(d.peers),
            "message": d.message,
        }

    def host_info(self) -> dict[str, Any]:
        return {
            "type": HOST_INFO,
            "timestamp": self.now(),
            "nodeName": self.settings.node_name,
            "mux": True,  # peers refuse to stream from a mux (see peer.py)
            "version": __version__,
            "fanoutService": self.discovery.service,
        }

    def snapshot(self) -> Iterator[Event | orjson.Fragment]:
        """mux.status and each peer's status first, so the page can say what it is merging."""
        yield self.status_event()
        yield from [p.status for p in self.peers.values() if p.status]
        yield from self.state.snapshot()

    def metrics(self) -> list[Metric]:
        h, st = self.hub, self.stats
        by_status = {s: 0 for s in (CONNECTED, RECONNECTING)}
        for p in self.peers.values():
            if p.status:
                by_status[p.status["status"]] = by_status.get(p.status["status"], 0) + 1
        return [
            single(
                "netstatd_mux_active",
                "gauge",
                "1 while upstreams are open (a mux client, or linger).",
                int(self.active),
            ),
            Metric(
                "netstatd_mux_peers",
                "gauge",
                "Peers listed by FANOUT_SERVICE, by upstream status.",
                [({"status": s}, n) for s, n in by_status.items()],
            ),
            single(
                "netstatd_mux_peers_gone_total", "counter", "Peers dropped when DNS stopped listing them.", self.gone
            ),
            single("netstatd_mux_nodes", "gauge", "Nodes in the merged state.", len(self.state.nodes)),
            single(
                "netstatd_mux_rows",
                "gauge",
                "Rows in the merged state: connections, listening ports, containers, IP entries, names, DNS failures.",
                sum(t.count() for t in self.state.nodes.values()),
            ),
            single(
                "netstatd_mux_row_bytes",
                "gauge",
                "Bytes of JSON of the rows in the merged state (what --mux-max-bytes bounds).",
                sum(t.bytes for t in self.state.nodes.values()),
            ),
            single(
                "netstatd_mux_upstream_connections_total",
                "counter",
                "Upstream WebSocket connections opened to peers.",
                st.connections,
            ),
            Metric(
                "netstatd_mux_peer_garbage_total",
                "counter",
                "Peers disconnected for breaking the protocol, by reason.",
                [({"reason": r}, st.garbage.get(r, 0)) for r in GARBAGE_REASONS],
            ),
            single("netstatd_mux_peer_events_total", "counter", "Events received from peers.", st.events),
            single("netstatd_mux_peer_bytes_total", "counter", "Bytes of the frames received from peers.", st.bytes),
            single(
                "netstatd_mux_subscription_changes_total",
                "counter",
                "Times the union of the clients' filters changed and the upstreams were re-subscribed.",
                self.interest_changes,
            ),
            single(
                "netstatd_mux_client_waits_expired_total",
                "counter",
                "Clients given their snapshot before every node had sent the rows their filter adds.",
                self.waits_expired,
            ),
            single(
                "netstatd_mux_peer_events_dropped_total",
                "counter",
                "Events peers dropped for this mux (their stream.reset missedEvents); that node is then rebuilt.",
                st.missed_events,
            ),
            Metric(
                "netstatd_mux_discovery_lookups_total",
                "counter",
                "FANOUT_SERVICE lookups by result: ok, empty (no agent listed, or unset), failed (peers kept).",
                [({"result": r}, n) for r, n in self.discovery.lookups.items()],
            ),
            *h.metrics("netstatd_mux_"),
        ]
