"""The DNSTap collector: both listeners, frames decoded into name facts.

`--dnstap-port` takes the DNS server of this node (or any sender that
targets this agent directly); `--dnstap-mux-port` is the one the regular
Service exposes, so a cluster DNS server can point at one stable address
and any agent behind it learns the names. Both feed the same cache; the
multiplexer shares the resulting `dns.resolved` events cluster-wide.

Only senders in the allow-list (`SenderAllowList`: loopback, this node's
addresses, `--dnstap-allow` CIDRs) are read: a forged answer would put a
wrong name on connections.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence

from ...metrics import Metric, histogram, single
from .decode import DecodeError, Failure, QueryTimes, Resolution, decode_message
from .framestream import REASONS, CollectorStats, Limits, serve

log = logging.getLogger("netstatd.dnstap")

LISTENERS = ("node", "mux")
DECODE_ERRORS = ("protobuf", "no_message", "dns")
LOOPBACK = ("127.0.0.0/8", "::1/128")
# netstatd_dns_latency_seconds: 0.5 ms (a cache hit) to 5 s (a resolver giving up on its upstreams)
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LATENCY_BUCKETS_MS = tuple(b * 1000 for b in LATENCY_BUCKETS_S)
# shown at 0 before any is seen, so a dashboard's series exist from the start
_COMMON_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class SenderAllowList:
    """Which peers may send DNSTap: `always` (loopback), this node's own addresses, and `cidrs`.

    A plain address in `cidrs` is a /32 or /128; an IPv4-mapped IPv6 peer (::ffff:a.b.c.d) is judged
    as its IPv4 address. `always` exists for tests that need loopback refused; the agent keeps it.
    """

    def __init__(self, cidrs: Sequence[str], *, always: Sequence[str] = LOOPBACK) -> None:
        self._networks = [_network(c) for c in (*always, *cidrs)]
        self._own: frozenset[Address] = frozenset()
        shown = ["loopback"] if tuple(always) == LOOPBACK else [str(_network(c)) for c in always]
        self._shown = ", ".join([*shown, "this node's addresses", *(str(_network(c)) for c in cidrs)])

    def set_own(self, addresses: Iterable[str]) -> None:
        """Replace this node's addresses (the agent calls it whenever it re-reads them)."""
        own = {_address(a) for a in addresses}
        if None in own:
            raise ValueError(f"not IP addresses: {sorted(a for a in addresses if _address(a) is None)}")
        self._own = frozenset(a for a in own if a is not None)

    def allows(self, ip: str) -> bool:
        """Once per accepted connection."""
        address = _address(ip)
        return address is not None and (address in self._own or any(address in n for n in self._networks))

    def __str__(self) -> str:
        return self._shown


def _address(ip: str) -> Address | None:
    """The address, IPv4-mapped IPv6 as IPv4, its zone (%eth0) dropped; None if it is not one."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(cidr, strict=False)  # host bits are ignored: 10.1.2.3/16 is 10.1.0.0/16
    except ValueError:
        raise ValueError(
            f"--dnstap-allow: {cidr!r} is not an IP address or CIDR network "
            "(expected e.g. 10.244.0.0/16, 192.0.2.7 or fd00::/8, comma-separated)"
        ) from None
    mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
    if mapped is not None and net.prefixlen >= 96:  # peers in ::ffff:0:0/96 are judged as IPv4
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


class DnstapCollector:
    def __init__(
        self,
        learn: Callable[[list[Resolution]], None],
        limits: Limits | None = None,
        allow: SenderAllowList | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        failed: Callable[[list[Failure]], None] | None = None,
    ) -> None:
        """learn: gets the names of each read's answers; failed: its failed answers (None: not wanted).
        allow: who may send (None: anyone). on_error: gets an unexpected exception from decoding, `learn`
        or `failed` (that sender is then closed as internal_error and reconnects); None: it is logged."""
        self._learn = learn
        self._failed = failed
        self.queries = QueryTimes()  # logged queries' times, for responses without one (unbound)
        self.rcodes = dict.fromkeys(_COMMON_RCODES, 0)  # client responses by RCODE name
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)  # per bucket (not cumulative), then +Inf
        self.latency_sum_ms = 0.0
        self.latency_unknown = 0  # responses without a query or response time
        self.limits = limits or Limits()
        self.allow = allow
        self._on_error = on_error
        self.stats = CollectorStats()
        self.messages = dict.fromkeys(LISTENERS, 0)  # frames decoded, per listener
        self.skipped = dict.fromkeys(DECODE_ERRORS, 0)  # frames that could not be decoded, by reason
        self.resolutions = 0
        self._servers: list[asyncio.Server] = []

    async def start(self, ports: dict[str, int], hosts: Sequence[str] | None = None) -> None:
        """ports: listener name ("node", "mux") -> TCP port. hosts: addresses to bind (None: every one)."""
        if hosts is not None and not hosts:
            raise ValueError("no address to listen on for DNSTap (hosts=None listens on every address)")
        for name, port in ports.items():
            try:
                server = await serve(
                    hosts, port,
                    lambda frames, name=name: self._on_frames(name, frames), name=name,
                    limits=self.limits, stats=self.stats, allow=self.allow, on_error=self._on_error,
                )  # fmt: skip
            except OSError as e:
                await self.stop()
                if e.errno == errno.EADDRINUSE:
                    raise OSError(e.errno, f"DNSTap port {port} is already in use (pass --dnstap-port)") from None
                if e.errno == errno.EADDRNOTAVAIL:
                    raise OSError(e.errno, f"DNSTap listener: {e.strerror} (not an address of this host?)") from None
                raise
            self._servers.append(server)  # framestream.serve logs each listener's addresses

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def metrics(self) -> list[Metric]:
        st = self.stats
        return [
            single("netstatd_dnstap_connections_total", "counter", "DNSTap senders that connected.", st.connections),
            single("netstatd_dnstap_senders", "gauge", "DNSTap senders connected now.", st.active),
            Metric(
                "netstatd_dnstap_connections_closed_total",
                "counter",
                "DNSTap connections closed, by reason (finished and eof are clean; docs/dnstap.md has the others).",
                [({"reason": r}, st.closed.get(r, 0)) for r in REASONS],
            ),
            Metric(
                "netstatd_dnstap_frames_total",
                "counter",
                "DNSTap data frames received, by listener (node: --dnstap-port, mux: --dnstap-mux-port).",
                [({"listener": k}, n) for k, n in self.messages.items()],
            ),
            single("netstatd_dnstap_bytes_total", "counter", "DNSTap data frame bytes received.", st.bytes),
            Metric(
                "netstatd_dnstap_frames_skipped_total",
                "counter",
                "DNSTap frames skipped because they could not be decoded, by reason.",
                [({"reason": k}, n) for k, n in self.skipped.items()],
            ),
            single(
                "netstatd_dns_answers_total", "counter", "Address records learned from responses.", self.resolutions
            ),
            Metric(
                "netstatd_dns_responses_total",
                "counter",
                "DNS answers to clients (DNSTap CLIENT_RESPONSE), by RCODE.",
                [({"rcode": k}, n) for k, n in self.rcodes.items()],
            ),
            histogram(
                "netstatd_dns_latency_seconds",
                "DNS answers to clients: response time minus query time, as the DNS server logged them.",
                LATENCY_BUCKETS_S,
                self.latency_counts,
                self.latency_sum_ms / 1000,
            ),
            single(
                "netstatd_dns_latency_unknown_total",
                "counter",
                "DNS answers to clients without a latency: no query time in the response and no logged query.",
                self.latency_unknown,
            ),
            single(
                "netstatd_dnstap_queries_dropped_total",
                "counter",
                f"Logged client queries forgotten before their response ({self.queries.max_entries} were waiting).",
                self.queries.dropped,
            ),
        ]

    def _on_frames(self, listener: str, frames: list[bytes]) -> None:
        learned: list[Resolution] = []
        failures: list[Failure] = []
        skipped, rcodes, queries = self.skipped, self.rcodes, self.queries
        counts, bounds = self.latency_counts, _LATENCY_BUCKETS_MS
        for frame in frames:
            try:
                response = decode_message(frame, queries)
            except DecodeError as e:
                if skipped[e.reason] == 0:
                    log.warning("skipping a DNSTap frame that cannot be decoded (%s): %s", e.reason, e)
                skipped[e.reason] += 1
                continue
            if response is None:
                continue
            rcodes[response.rcode] = rcodes.get(response.rcode, 0) + 1  # at most 16 names (dns.RCODE_NAMES)
            latency = response.latency_ms
            if latency is None:
                self.latency_unknown += 1
            else:
                counts[bisect.bisect_left(bounds, latency)] += 1  # le: the first bound >= the value
                self.latency_sum_ms += latency
            if response.failure is not None:
                failures.append(response.failure)
            elif response.resolutions:
                learned += response.resolutions
        self.messages[listener] += len(frames)
        self.resolutions += len(learned)
        if learned:
            self._learn(learned)
        if failures and self._failed is not None:
            self._failed(failures)
