"""One upstream WebSocket per peer: its node's snapshot and live events into the merged state.

A peer is an agent's node port (`ws://IP:<http-port>/netstat`, `wss://` when the agents serve TLS), never
a mux port: that, and refusing a peer whose host.info says `"mux": true`, is what keeps the multiplexer
from feeding on itself. Frames are applied as they are read, so a slow mux backs up the peer's own bounded
client queue, which drops, counts and sends us a `stream.reset` (we then rebuild that node from its fresh
snapshot). What one peer may cost us is bounded: events/s and bytes/s of its live stream, rows held.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ssl import SSLCertVerificationError, SSLContext, SSLError
from typing import Any

import aiohttp
import orjson

from ..hub import FRAME_EVENTS
from ..protocol import HOST_INFO, NODE_EVENT_TYPES, NODE_REMOVED, PEER_STATUS, SNAPSHOT_COMPLETE, STREAM_RESET
from ..settings import Settings
from ..subscription import EVERYTHING, Subscription, filters_of
from ..supervisor import Supervisor, failpoint
from ..tls import TLSFiles, client_tls
from .state import Event, MergedState, NodeTables

log = logging.getLogger("netstatd.mux")

CONNECTED, RECONNECTING, GONE = "connected", "reconnecting", "gone"
MAX_FRAME_BYTES = 16 << 20  # a node's frames stay under ~1 MB (hub.FRAME_EVENTS)
FLOOD_WINDOWS = 3  # consecutive 1 s windows over a rate limit (events/s, bytes/s) before a peer is cut
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 10.0
CLOSE_WAIT_S = 1.0
# A peer that accepts TCP and never answers must not hold its upstream forever: it is retried instead.
CONNECT_TIMEOUT_S = 10.0  # TCP connect, TLS handshake and WebSocket upgrade
HELLO_TIMEOUT_S = 10.0  # from the upgrade to the peer's host.info
GARBAGE_REASONS = (
    "json",
    "shape",
    "type",
    "nodeName",
    "protocol",
    "oversized",
    "binary",
    "flood",
    "bytes",
    "rows",
    "budget",
    "mux",
    "duplicate",
)

# An agent's answers to an upgrade it refuses (api/access.py, api/app.py), and what to do about each.
REFUSALS = {
    401: "the agent requires authentication: give this multiplexer --peer-cert-file/--peer-key-file with a "
    "certificate from the agent's --peer-ca-file",
    403: "forbidden: the agent, or a proxy in front of it, does not let this multiplexer in",
    421: "the agent does not take its address as a name (Host header): add it to the agent's --allowed-hosts",
    429: "the agent takes no more WebSocket clients from this multiplexer's address (--max-clients-per-address)",
    503: "the agent has as many WebSocket clients as it takes",
}
CLIENT_CERT_REFUSED = (
    "the agent ended the TLS connection before answering the WebSocket upgrade: it did not accept this "
    "multiplexer's client certificate (none, or not issued by the agent's --peer-ca-file); give "
    "--peer-cert-file/--peer-key-file with a certificate from that CA"
)
NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


@dataclass
class PeerStats:
    """Counters of every peer together (metrics), kept by the mux: peers come and go, counters do not."""

    connections: int = 0  # upstreams opened
    events: int = 0  # events received
    bytes: int = 0  # bytes of the text frames received
    missed_events: int = 0  # events peers dropped for us (their stream.reset missedEvents)
    garbage: dict[str, int] = field(default_factory=dict)  # disconnects for bad input, by reason


class Garbage(Exception):
    """The peer broke the protocol (reason: one of GARBAGE_REASONS); it is disconnected."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Unreachable(ConnectionError):
    """The upstream could not be opened, or the peer did not speak; the message says why (peer.status)."""


class FloodGuard:
    """More than `limit` a second (events, or bytes) in FLOOD_WINDOWS consecutive seconds is a flood, not a
    busy node."""

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


def upstream_tls(settings: Settings) -> tuple[TLSFiles | None, str | None]:
    """The upstreams' TLS files and the name checked in the agents' certificates, or (None, None) for
    plain ws. Agents serve TLS when this agent does (one DaemonSet, one set of flags), or when we are given
    their CA or a client certificate. The name is not the peer's IP: a DaemonSet's pods share one
    certificate, issued for the headless Service's name. Called once (Mux.__init__): every upstream shares
    the context. ValueError naming the flags when the files cannot be loaded."""
    if not (settings.peer_ca_file or settings.peer_cert_file or settings.tls_cert_file):
        return None, None
    try:
        tls = client_tls(settings.peer_ca_file, settings.peer_cert_file, settings.peer_key_file)
    except (OSError, SSLError) as e:  # a configuration error, like a bad flag: say which files
        raise ValueError(
            f"cannot load the multiplexer's TLS files (--peer-ca-file {settings.peer_ca_file!r}, "
            f"--peer-cert-file {settings.peer_cert_file!r}, --peer-key-file {settings.peer_key_file!r}): {e}"
        ) from None
    name = (settings.peer_server_name or settings.fanout_service).rstrip(".")  # a trailing dot never matches
    return tls, name or None


def explain(e: BaseException, tls: SSLContext | None, server_hostname: str | None) -> str:
    """Why opening an upstream failed, for peer.status and the log: what a user can act on."""
    if isinstance(e, aiohttp.WSServerHandshakeError):
        return f"HTTP {e.status}: {REFUSALS.get(e.status) or f'the WebSocket upgrade was refused ({e.message})'}"
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        cert_error = e.certificate_error
        code = getattr(cert_error, "verify_code", None)
        if isinstance(cert_error, SSLCertVerificationError) and code in NAME_MISMATCH:
            return (
                f"TLS: the agent's certificate is not issued for {server_hostname or e.host!r}, the name checked "
                "(--peer-server-name, default FANOUT_SERVICE): issue it for that name, or set --peer-server-name"
            )
        detail = getattr(cert_error, "verify_message", None) or str(cert_error)
        return f"TLS: the agent's certificate is not trusted ({detail}): this multiplexer trusts {_trusted(tls)}"
    # An agent (Python's ssl) that rejects our client certificate just closes: in TLS 1.2 during the
    # handshake, in TLS 1.3 after it, while we wait for the upgrade's answer. Other servers send an alert.
    if tls is not None and (_closed_early(e) or "ALERT" in str(e)):
        return CLIENT_CERT_REFUSED
    if isinstance(e, aiohttp.ClientConnectorSSLError):
        reason = getattr(e.os_error, "reason", None) or str(e.os_error)
        hint = ": does the agent serve TLS (--tls-cert-file)?" if reason == "WRONG_VERSION_NUMBER" else ""
        return f"TLS handshake failed ({reason}){hint}"
    if _closed_early(e):
        return (
            "the agent closed the connection before answering the WebSocket upgrade (if the agents serve TLS, "
            "--tls-cert-file: give this multiplexer their CA with --peer-ca-file)"
        )
    if isinstance(e, aiohttp.ClientConnectorError):  # aiohttp's text, without the repr of our SSLContext
        return f"Cannot connect to host {e.host}:{e.port} [{e.strerror or repr(e.os_error)}]"
    return str(e) or type(e).__name__


def _closed_early(e: BaseException) -> bool:
    """The agent closed (FIN, or RST when our request was still unread) before answering the upgrade."""
    if isinstance(e, aiohttp.ClientConnectorError):
        return isinstance(e.os_error, ConnectionResetError)
    return isinstance(e, aiohttp.ServerDisconnectedError) or (
        isinstance(e, aiohttp.ClientOSError) and e.errno == errno.ECONNRESET
    )


def _trusted(tls: SSLContext | None) -> str:
    """The CAs a context trusts, by name when there are few (--peer-ca-file), for an error message."""
    cas = tls.get_ca_certs() if tls is not None else []
    if not 0 < len(cas) <= 3:
        return "the CAs of --peer-ca-file, or the system's without it"
    names = [next((v for rdn in c["subject"] for k, v in rdn if k == "commonName"), "?") for c in cas]
    return f"the CA {', '.join(map(repr, names))} (--peer-ca-file)"


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
        if not isinstance(t, str) or t not in NODE_EVENT_TYPES:
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
        max_bytes_per_s: int,
        max_rows: int,
        max_state_bytes: Callable[[], int] = lambda: 1 << 62,
        interest: Callable[[], tuple[int, Subscription]] = lambda: (0, EVERYTHING),
        on_progress: Callable[[], None] = lambda: None,
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.ip = ip
        host = f"[{ip}]" if ":" in ip else ip
        self.url = f"{'ws' if ssl is None else 'wss'}://{host}:{port}/netstat"
        self.ssl = ssl  # checks the agent's certificate against its CA and server_hostname, and shows ours
        self.server_hostname = server_hostname
        self.state = state
        self.owners = owners  # nodeName -> the peer streaming it: one peer per node
        self.publish = publish
        self.now = now
        self.session = session
        self.stats = stats
        self.max_events_per_s = max_events_per_s
        self.max_bytes_per_s = max_bytes_per_s
        self.max_rows = max_rows
        self.max_state_bytes = max_state_bytes  # its share of --mux-max-bytes (it shrinks as peers come)
        # Push-down: the upstream subscribes with what the mux's clients want (server.py), a version
        # and a subscription; `acked` is the version whose rows the node has sent. on_progress() is called
        # when that grows or the upstream fails: held clients may go.
        self.interest = interest
        self.on_progress = on_progress
        self.acked = -1
        self._opened_version = -1  # the version the upstream was opened with (its first snapshot's)
        self._send_lock = asyncio.Lock()  # re-subscriptions go out in the order they were made
        self._sends: set[asyncio.Task] = set()  # held until sent: the loop keeps only weak references
        self._adding = False  # inside a partial snapshot (rows a widened subscription adds)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self.node: str | None = None
        self.host_info: Event | None = None
        self.status: Event | None = None  # the latest peer.status, repeated in snapshots
        self._backoff = BACKOFF_MIN_S
        self._delivered = False  # the current upstream delivered a whole snapshot
        self._upgraded = False  # the current upstream got past the WebSocket upgrade
        self._logged_error: str | None = None  # the last error logged: one line per change, not per retry
        self.task: asyncio.Task | None = None

    def start(self, supervisor: Supervisor) -> None:
        self.task = supervisor.spawn(f"mux-peer-{self.ip}", self.run, label="peer")

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
            garbage = False
            try:
                error = await self._session()
            except Garbage as g:
                garbage = True
                self.stats.garbage[g.reason] = self.stats.garbage.get(g.reason, 0) + 1
                error = f"{g.reason}: {g}"
            except (aiohttp.ClientError, OSError) as e:  # TimeoutError is an OSError
                error = str(e) or type(e).__name__
            except Exception as e:  # a bug: the supervisor logs it and runs this again after a backoff
                self._lost()
                self._set_status(RECONNECTING, error=f"internal error: {e!r}")
                raise
            # a node that delivered its snapshot is retried quickly (it restarts); anything else backs off
            worked = self._delivered and not garbage
            self._log_error(error, worked)
            self._lost()
            self._backoff = BACKOFF_MIN_S if worked else min(self._backoff * 2, BACKOFF_MAX_S)
            delay = self._backoff * random.uniform(0.8, 1.2)  # jitter: every mux retries a restarted node
            self._set_status(RECONNECTING, retryInS=round(delay, 2), error=error)
            await asyncio.sleep(delay)

    def _log_error(self, error: str, worked: bool) -> None:
        """One line per change of error: a peer refused or cut the same way at every retry logs once, and
        the end of an upstream that worked is news again."""
        if worked:
            self._logged_error = None
        if error == self._logged_error:
            return
        self._logged_error = error
        name = self.node or (self.host_info or {}).get("nodeName") or "?"  # known from an earlier upstream
        log.warning("peer %s (%s) %s: %s", self.ip, name, "disconnected" if self._upgraded else "cannot connect", error)

    async def _session(self) -> str:
        """One upstream, read until it ends; returns how it was closed."""
        self._delivered = self._upgraded = False
        failpoint("peer")
        self._opened_version, opened = self.interest()
        self._adding = False
        ws = await self._connect(opened)
        self._upgraded = True
        self._ws = ws
        version, current = self.interest()
        if version != self._opened_version:  # the clients changed while it connected
            self.resubscribe(version, current)
        try:
            return await self._read(ws)
        finally:
            self._ws = None
            # Without a deadline, closing waits for the peer's close frame, which a flooding peer never sends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT_S):
                    await ws.close()

    async def _connect(self, subscription: Subscription) -> aiohttp.ClientWebSocketResponse:
        """TCP, TLS and the WebSocket upgrade within CONNECT_TIMEOUT_S; a failure says why (Unreachable)."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                wanted = {"filters": orjson.dumps(filters_of(subscription)).decode()}
                query = {} if subscription.empty else wanted
                return await self.session.ws_connect(
                    self.url,
                    params=query,
                    ssl=self.ssl if self.ssl is not None else True,  # True: aiohttp's default, unused by ws://
                    server_hostname=self.server_hostname if self.ssl is not None else None,
                    max_msg_size=MAX_FRAME_BYTES,
                    heartbeat=30,
                    compress=0,
                    decode_text=False,  # text frames as the bytes received: counted, and parsed without a copy
                )
        except TimeoutError:  # ours, or the session's connect timeout
            raise Unreachable(
                f"timed out: no WebSocket upgrade within {CONNECT_TIMEOUT_S:g} s (TCP connect, TLS, HTTP upgrade)"
            ) from None
        except aiohttp.ClientError as e:
            raise Unreachable(explain(e, self.ssl, self.server_hostname)) from e

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """Frames until the upstream is closed; returns how (the node's close code and reason, if any)."""
        self.stats.connections += 1
        flood = FloodGuard(self.max_events_per_s)
        volume = FloodGuard(self.max_bytes_per_s)
        staging: NodeTables | None = None  # the snapshot being read (first, or after a stream.reset)
        while True:
            try:  # a peer that upgrades and never speaks is retried, not waited for
                msg = await ws.receive(timeout=HELLO_TIMEOUT_S if self.node is None else None)
            except TimeoutError:
                raise Unreachable(f"timed out: no host.info within {HELLO_TIMEOUT_S:g} s of the upgrade") from None
            if msg.type == aiohttp.WSMsgType.TEXT:
                staging = self._frame(msg.data, staging, flood, volume)
                await asyncio.sleep(0)  # frames already buffered do not yield: let the node's own work run
                continue
            if msg.type == aiohttp.WSMsgType.BINARY:
                raise Garbage("binary", "a binary frame")
            elif msg.type == aiohttp.WSMsgType.ERROR:
                exc = ws.exception() or msg.data
                if isinstance(exc, aiohttp.WebSocketError) and exc.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                    raise Garbage("oversized", f"a frame over {MAX_FRAME_BYTES} bytes")
                raise ConnectionError(str(exc))
            if msg.type != aiohttp.WSMsgType.CLOSE:
                return "connection closed"
            return f"connection closed ({msg.data}: {msg.extra})" if msg.extra else f"connection closed ({msg.data})"

    def _frame(
        self, data: bytes, staging: NodeTables | None, flood: FloodGuard, volume: FloodGuard
    ) -> NodeTables | None:
        """One text frame, checked and applied; returns the snapshot still being read, if any."""
        events = parse_frame(data, self.node)
        self.stats.events += len(events)
        self.stats.bytes += len(data)
        # A snapshot may come fast (it is the node's whole state): bounded by rows, not by rate.
        if staging is None and self.node is not None:
            if flood.add(len(events)):
                raise Garbage("flood", f"more than {self.max_events_per_s} events/s for {FLOOD_WINDOWS} s")
            if volume.add(len(data)):
                raise Garbage("bytes", f"more than {self.max_bytes_per_s} bytes/s for {FLOOD_WINDOWS} s")
        if self.node is None:
            return self._hello(events)
        try:
            return self._apply(events, staging)
        except (TypeError, KeyError, AttributeError) as e:  # a field of the wrong kind, e.g. a list as key
            raise Garbage("shape", f"a malformed event: {e!r}") from None

    def _apply(self, events: list[Event], staging: NodeTables | None) -> NodeTables | None:
        """One frame after host.info; returns the snapshot still being read, if any."""
        assert self.node is not None
        live: list[Event] = []
        for e in events:
            t = e["type"]
            if t == HOST_INFO:
                raise Garbage("protocol", "a second host.info")
            if t == STREAM_RESET and e.get("partial"):
                self._adding = True  # rows a widened subscription adds, live, until its snapshot.complete
            elif t == STREAM_RESET:  # the peer dropped events for us; a fresh snapshot follows
                missed = e.get("missedEvents")
                self.stats.missed_events += missed if isinstance(missed, int) else 0
                staging = NodeTables(self.node)
            elif staging is None:
                if t == SNAPSHOT_COMPLETE and self._adding and e.get("partial"):
                    self._adding = False
                    self._acked(e.get("subscription"))
                elif t == SNAPSHOT_COMPLETE:
                    raise Garbage("protocol", "snapshot.complete outside a snapshot")
                else:
                    # A partial snapshot's rows too: a client held for them queues nothing and gets them in
                    # its snapshot; one released before they came (WAIT_S) gets them live.
                    live.append(e)
            elif t == SNAPSHOT_COMPLETE:
                self._check_rows(staging, "in its snapshot")
                self._replace(staging)
                staging, self._delivered = None, True
                self._acked(self._opened_version)
            else:
                self.state.apply(staging, [e])
        if staging is not None:
            self._check_rows(staging, "in its snapshot")
        interest = self.interest()[1]
        if live and not interest.empty:
            # after a narrower re-subscription, what the node sent before it took effect: no client wants
            # it, and the rows it would add would never be closed
            live = [e for e in live if interest.matches(e)]
        tables = self.state.nodes.get(self.node)
        if live and tables is not None:
            self.state.apply(tables, live)
            self._check_rows(tables, "after live events")  # before clients see them
            self.publish(live)
        return staging

    @property
    def failing(self) -> bool:
        """Its last upstream failed or ended (it is retried): a held client does not wait for it."""
        return self.status is not None and self.status["status"] == RECONNECTING

    def _acked(self, version: Any) -> None:
        if isinstance(version, int) and version > self.acked:
            self.acked = version
            self.on_progress()

    def resubscribe(self, version: int, subscription: Subscription) -> None:
        """What the mux's clients want changed: an open upstream is re-subscribed partially (the node sends
        the rows it adds; what it no longer sends the mux prunes itself); one opening catches up once open."""
        ws = self._ws
        if ws is None or ws.closed:
            return
        frame = {"type": "subscribe", "filters": filters_of(subscription), "partial": True, "version": version}

        async def send() -> None:
            async with self._send_lock:
                with contextlib.suppress(ConnectionError, RuntimeError):  # the upstream ended: it reopens with it
                    await ws.send_str(orjson.dumps(frame).decode())

        task = asyncio.get_running_loop().create_task(send(), name=f"mux-resubscribe-{self.ip}")
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _check_rows(self, tables: NodeTables, when: str) -> None:
        """Checked once per frame (count() is five len()s): a frame that takes the peer over max_rows, or
        over its share of the mux's byte budget, cuts it before anything of that frame reaches a client."""
        if tables.count() > self.max_rows:
            raise Garbage("rows", f"more than {self.max_rows} rows {when} (--peer-max-rows)")
        budget = self.max_state_bytes()
        if tables.bytes > budget:
            raise Garbage("budget", f"more than {budget} bytes of rows {when} (its share of --mux-max-bytes)")

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
        if status == RECONNECTING:
            self.on_progress()  # a held client stops waiting for it
