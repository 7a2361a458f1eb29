"""The node agent: wires sources -> node state -> hub -> HTTP/WebSocket, and runs them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from aiohttp import web

from . import __version__
from .api.front import RELOAD_EVERY_S, Front
from .enrich.attribution import Attribution
from .enrich.cgroups import PidContainers
from .hub import Hub
from .listen import exposure
from .metrics import Metric, record_metrics, single
from .mux.server import Mux
from .protocol import HOST_INFO
from .settings import Settings
from .sources import addresses, netlink, procfs, sockdiag
from .sources.bpf import events as ev
from .sources.bpf.drainer import RingDrainer
from .sources.bpf.loader import KernelProbes, KernelSettings, LoadError, find_cgroup2_root
from .sources.bpf.ringbuf import RingReader
from .sources.containerd.follower import ContainerdFollower
from .sources.dnstap.collector import DnstapCollector, SenderAllowList
from .sources.dnstap.framestream import REASONS as CLOSE_REASONS
from .state.containers import ContainerIndex, Pod
from .state.hostnames import Hostnames
from .state.ips import IpInventory, build_inventory
from .state.sweep import FOLDED_STATES, sweep_folded
from .state.tracker import Tracker
from .supervisor import Supervisor, failpoint

log = logging.getLogger("netstatd")

FLUSH_INTERVAL_S = 0.05  # the coalescing window documented in docs/protocol.md
# A sock_diag check of the state even when the kernel reports no gap: a few client sockets per 100k
# end with no CLOSE record (docs/kernel.md, "Closes that never arrive"). It runs every
# RECONCILE_MIN_S, or less often when a check is slow, so that checks take at most RECONCILE_CPU_SHARE
# of a core (their CPU time): a check of 100k connections takes ~0.25 s, so it then runs every ~12 s.
RECONCILE_MIN_S = 5.0
RECONCILE_MAX_S = 60.0
RECONCILE_CPU_SHARE = 0.02
FIRST_SYNC_WAIT_S = 5.0  # how long the seed waits for containerd's first listing, so it is attributed
MAX_NETNS_SCANS = 64  # netns scans queued at once (container starts); more are dropped and counted
IP_REFRESH_S = 30.0  # host addresses change without a container event (DHCP, an admin): re-read this often
SCAN_SETTLE_S = 0.06  # after a netns dump: ring records of listens before it are drained and flushed first
SWEEP_EVERY_S = 2.0  # a socket staying in a folded TCP state (CLOSE_WAIT, ...) is shown within this


T = TypeVar("T")


def _live_cookies_everywhere() -> tuple[set[int], set[int]]:
    return sockdiag.live_cookies(procfs.list_netns())


def _with_cpu_time(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """fn(*args) and the CPU seconds the calling thread spent in it."""
    t0 = time.thread_time()
    result = fn(*args)
    return result, time.thread_time() - t0


async def records_taken_in(tracker: Tracker, emitted: int, timeout_s: float = 10.0) -> bool:
    """Wait until the tracker has taken in `emitted` kernel records. Bounded, so that a stalled
    loop cannot stop a sock_diag check; False if it timed out."""
    deadline = time.monotonic() + timeout_s
    while tracker.records_ingested < emitted:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


class StartupError(RuntimeError):
    """Start-up cannot continue; the message is the one line to print."""


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.supervisor = Supervisor()
        self.supervisor.declare("ingest", "dnstap", "websocket")  # they report, with no loop of their own
        try:
            self.front = Front(settings, self.supervisor.report)  # HTTP listeners: addresses, TLS, access
            self.dnstap_allow = SenderAllowList(settings.dnstap_allow)
        except ValueError as e:
            raise StartupError(str(e)) from None
        self.processes = procfs.ProcessCache()
        self.tracker = Tracker(settings.node_name, self.processes)
        self.containers = ContainerIndex(settings.node_name, self.tracker.clock.now)
        self.cgroup_pids = PidContainers()
        self.ips = IpInventory(settings.node_name, self.tracker.clock.now)
        self._ips_changed = asyncio.Event()  # containers changed: refresh the inventory soon
        self._ips_failing = False
        self.tracker.attribution = Attribution(self.containers, self.processes, self.cgroup_pids)
        self.hostnames = Hostnames(settings.node_name, self.tracker.clock, settings.dns_max_names)
        self.tracker.hostnames = self.hostnames
        self.dnstap = DnstapCollector(
            self.hostnames.learn,
            allow=self.dnstap_allow,
            on_error=lambda e: self.supervisor.report("dnstap", e, "closing that sender"),
        )
        self.hub = Hub(
            settings.node_name,
            self.snapshot,
            self.tracker.clock.now,
            client_max_events=settings.client_queue_events,
        )
        self.kernel = KernelProbes(
            KernelSettings(
                capture_tcp=not settings.disable_tcp,
                capture_udp=not settings.disable_udp,
                include_loopback=settings.loopback,
            )
        )
        self._reader: RingReader | None = None
        self._drainer: RingDrainer | None = None
        self._runner: web.AppRunner | None = None
        self.swept = 0  # connection states set by the folded-state sweep
        self._sweep_failing = False
        self.follower = ContainerdFollower(
            settings.containerd_socket,
            self.containers,
            self._publish_containers,
            cgroup_root=cgroup2_root(),
            on_task_start=self.scan_netns_soon,
        )
        self._scans: dict[int, asyncio.Task] = {}  # netns inode -> its scan in progress (one per netns)
        self.netns_scans = {"done": 0, "failed": 0, "dropped": 0}
        try:  # cluster-wide view on --http-mux-port
            self.mux = Mux(settings, self.tracker.clock.now, self.front, self.supervisor)
        except ValueError as e:
            raise StartupError(str(e)) from None

    # -- lifecycle: every start has its stop --------------------------------
    async def start(self) -> None:
        tune_gc()
        if not self.tracker.native:
            log.warning(
                "the native helper for short connections is not built (make setup builds it): "
                "they take the Python path, at about 3 times the agent's CPU under connection churn"
            )
        warning = exposure(self.settings, self.front.addresses)
        if warning:
            log.warning("%s", warning)
        self._set_own_addresses(host_addresses())  # before serving: requests may name us by any of them
        await self._start_http()
        try:
            await self.mux.start(self.metrics)
        except OSError as e:
            raise StartupError(e.strerror or str(e)) from None
        try:
            ports = {"node": self.settings.dnstap_port, "mux": self.settings.dnstap_mux_port}
            await self.dnstap.start(ports, self.front.addresses)
        except OSError as e:
            raise StartupError(f"cannot start the DNSTap collector: {e.strerror or e}") from None
        try:
            self.kernel.open()
        except LoadError as e:
            raise StartupError(str(e)) from None
        self._reader = RingReader(self.kernel.ring_fd, self.kernel.ring_size)
        self._drainer = RingDrainer(
            self._reader, asyncio.get_running_loop(), self.tracker.ingest, report=self.supervisor.report
        )
        spawn = self.supervisor.spawn
        spawn("ring", self._drainer.run)
        spawn("flush", self._flush_loop)
        spawn("containerd", self.follower.run)
        spawn("files", self._reload_loop)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.follower.first_attempt.wait(), FIRST_SYNC_WAIT_S)
        await self.refresh_ips()
        spawn("ips", self._ip_loop)
        # Probes are live before the scan, so nothing falls between the two.
        await self._seed()
        spawn("reconcile", self._reconcile_loop)
        spawn("sweep", self._sweep_loop)
        log.info(
            "netstatd %s serving node %s on %s (WebSocket /netstat)",
            __version__,
            self.settings.node_name,
            self.front.urls(self.settings.http_port),
        )

    async def stop(self) -> None:
        await self.supervisor.stop()
        await self.mux.stop()
        await self.dnstap.stop()
        if self._reader:
            self._reader.close()
        self.kernel.close()
        if self._runner:
            await self._runner.cleanup()

    async def _start_http(self) -> None:
        port = self.settings.http_port
        app = self.front.app(self.hub, self.host_info, self.metrics, pid_exe, self.containers.query, port)
        try:
            self._runner = await self.front.serve(app, port, "--http-port")
        except OSError as e:
            raise StartupError(e.strerror or str(e)) from None

    async def _reload_loop(self) -> None:
        """Token and certificate files re-read when they change (a Secret or cert-manager update)."""
        while True:
            failpoint("files")
            await self.front.reload()
            self.mux.reload()
            await asyncio.sleep(RELOAD_EVERY_S)

    def _set_own_addresses(self, ips: Iterable[str]) -> None:
        ips = set(ips)
        self.front.set_own_addresses(ips)
        self.dnstap_allow.set_own(ips)

    async def _seed(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        netns = await loop.run_in_executor(None, procfs.list_netns)
        owners = await loop.run_in_executor(None, procfs.socket_owners)
        seeded = 0
        # One netns at a time, its events made a frame's worth at a time: a host with 100k sockets
        # never holds them all as dumped sockets, nor as events, at once.
        for inode, path in netns.items():
            self.tracker.begin_seed()  # from here the netns's closes are remembered: its dump cannot revive them
            sockets = await loop.run_in_executor(None, sockdiag.dump_all_netns, {inode: path})
            added = self.tracker.seed(sockets, owners, self.settings.loopback)
            del sockets
            self.hub.publish_lazily(len(added), self.tracker.events_for(added))
            seeded += len(added)
        log.info(
            "seeded %d existing sockets from %d network namespaces in %.2fs",
            seeded,
            len(netns),
            time.monotonic() - t0,
        )

    def _publish_containers(self, events: list[dict[str, Any]]) -> None:
        self.hub.publish(events)
        self._ips_changed.set()  # called for every change the follower applies, pods included

    async def _ip_loop(self) -> None:
        while True:
            failpoint("ips")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ips_changed.wait(), IP_REFRESH_S)
            await asyncio.sleep(FLUSH_INTERVAL_S)  # one refresh for a burst of container events
            self._ips_changed.clear()
            await self.refresh_ips()

    async def refresh_ips(self) -> None:
        """Re-read the host's addresses (and pods' without CRI IPs) in a thread; publish the changes."""
        pods = list(self.containers.pods.values())
        try:
            fresh = await asyncio.get_running_loop().run_in_executor(None, read_inventory, pods)
        except OSError as e:
            if not self._ips_failing:  # once per failure streak, not every 30 s
                log.warning("cannot list host addresses for the IP inventory: %s", e)
            self._ips_failing = True
            return
        self._ips_failing = False
        self._set_own_addresses(ip for ip, sandbox in fresh if not sandbox)
        self.hub.publish(self.ips.update(fresh))

    def scan_netns_soon(self, netns: int, path: str) -> None:
        """A container's task started: add the listeners of its netns the kernel has not reported.

        One scan per netns at a time (sidecars start together), bounded; sock_diag of that netns only,
        in an executor thread, never per client.
        """
        self._ips_changed.set()  # a sandbox start publishes nothing itself
        if netns in self._scans:
            return
        if len(self._scans) >= MAX_NETNS_SCANS:
            self.netns_scans["dropped"] += 1
            return
        self._scans[netns] = self.supervisor.spawn(
            f"scan-{netns}", functools.partial(self._scan_netns, netns, path), label="netns-scan"
        )

    async def _scan_netns(self, netns: int, path: str) -> None:
        loop = asyncio.get_running_loop()
        self.tracker.begin_seed()  # closes from now on are remembered, so the dump cannot revive them
        sockets: list[sockdiag.DiagSocket] = []
        result = "done"
        try:
            failpoint("netns-scan")
            # a host-network pod's netns is ours: no setns thread needed
            own_path = None if netns == netlink.netns_inode() else path
            sockets = await loop.run_in_executor(None, sockdiag.dump_sockets, netns, own_path)
            await asyncio.sleep(SCAN_SETTLE_S)
            self.hub.publish(self.tracker.flush())
        except (FileNotFoundError, ProcessLookupError):
            result = "failed"  # the task exited already (or its netns changed): nothing to scan
        except OSError as e:
            result = "failed"
            log.warning("cannot scan the listeners of netns %d (%s): %s", netns, path, e)
        finally:
            events = self.tracker.add_listeners(sockets, self.settings.loopback)  # also ends the scan
            self._scans.pop(netns, None)
        self.hub.publish(events)
        self.netns_scans[result] += 1
        log.debug("scanned netns %d: %d sockets, %d new listeners", netns, len(sockets), len(events))

    def _kernel_gaps(self) -> int:
        """Events the kernel could not deliver: ring full, or skipped on re-entry."""
        counters = self.kernel.counters()
        return counters[ev.CNT_LOST] + self.kernel.skipped_state_events(counters)

    async def _reconcile_loop(self) -> None:
        """After a kernel gap, and periodically (RECONCILE_MIN_S), compare the state with sock_diag.

        A gap can hide a close; without this the connection would stay
        "open" forever. Counted in netstatd_state_reconciled_total.
        """
        loop = asyncio.get_running_loop()
        seen_gaps, last = self._kernel_gaps(), time.monotonic()
        interval = RECONCILE_MIN_S
        while True:
            failpoint("reconcile")
            await asyncio.sleep(1.0)
            gaps = self._kernel_gaps()
            if gaps == seen_gaps and time.monotonic() - last < interval:
                continue
            if gaps != seen_gaps:
                log.warning(
                    "the kernel skipped or lost %d events; checking the state against sock_diag", gaps - seen_gaps
                )
            seen_gaps, last = gaps, time.monotonic()
            before = time.monotonic_ns()
            try:
                (tcp, udp), cpu_s = await loop.run_in_executor(None, _with_cpu_time, _live_cookies_everywhere)
            except OSError as e:
                log.warning("reconcile: cannot dump sockets (%s); retrying in %.0f s", e, interval)
                continue
            # A socket that closed before or during the dump is not in it, and its CLOSE record may
            # still be in the ring: take in every record written so far, or it would look "gone".
            await records_taken_in(self.tracker, self.kernel.counters()[ev.CNT_EMITTED])
            self.hub.publish(self.tracker.flush())
            events, compare_s = _with_cpu_time(self.tracker.reconcile, tcp, udp, before)
            self.hub.publish(events)
            # CPU time, not wall time: under load the dump waits for the CPU, which costs nothing
            interval = min(max((cpu_s + compare_s) / RECONCILE_CPU_SHARE, RECONCILE_MIN_S), RECONCILE_MAX_S)

    def _kernel_folded(self) -> int:
        return self.kernel.counters()[ev.CNT_FOLDED]

    async def _sweep_loop(self) -> None:
        """Show TCP sockets that stay in a state the kernel folded (docs/kernel.md "Folded states").

        Only after the kernel folded a transition since the previous sweep began:
        without folds nothing can be stale, so an idle host does no work.
        Counted in netstatd_state_swept_total.
        """
        loop = asyncio.get_running_loop()
        dump = functools.partial(sockdiag.tcp_states, states=sockdiag.state_mask(FOLDED_STATES))
        seen = 0
        while True:
            failpoint("sweep")
            await asyncio.sleep(SWEEP_EVERY_S)
            folded = self._kernel_folded()
            if folded == seen:
                continue
            seen = folded  # folds from now on make the next sweep
            before = time.monotonic_ns()
            try:
                netns = await loop.run_in_executor(None, procfs.list_netns)
                states = await loop.run_in_executor(None, dump, netns)
            except OSError as e:
                if not self._sweep_failing:  # once per failure streak, not every 2 s
                    log.warning(
                        "folded-state sweep: cannot dump TCP sockets (%s); CLOSE_WAIT, FIN_WAIT2 and other "
                        "lasting states may show as ESTABLISHED until the socket closes",
                        e,
                    )
                self._sweep_failing = True
                seen = 0  # retry at the next period
                continue
            self._sweep_failing = False
            # records emitted before the dump are drained and applied first: they are older than it
            await asyncio.sleep(SCAN_SETTLE_S)
            self.hub.publish(self.tracker.flush())
            events = sweep_folded(self.tracker, states, before)
            self.swept += len(events)
            self.hub.publish(events)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            failpoint("flush")
            self.hub.publish(self.hostnames.flush() + self.tracker.flush())

    def _dns_metrics(self) -> list[Metric]:
        d, st, names = self.dnstap, self.dnstap.stats, self.hostnames
        return [
            single("netstatd_dnstap_connections_total", "counter", "DNSTap senders that connected.", st.connections),
            single("netstatd_dnstap_senders", "gauge", "DNSTap senders connected now.", st.active),
            Metric(
                "netstatd_dnstap_connections_closed_total",
                "counter",
                "DNSTap connections closed, by reason (finished and eof are clean; docs/dnstap.md has the others).",
                [({"reason": r}, st.closed.get(r, 0)) for r in CLOSE_REASONS],
            ),
            Metric(
                "netstatd_dnstap_frames_total",
                "counter",
                "DNSTap data frames received, by listener (node: --dnstap-port, mux: --dnstap-mux-port).",
                [({"listener": k}, n) for k, n in d.messages.items()],
            ),
            single("netstatd_dnstap_bytes_total", "counter", "DNSTap data frame bytes received.", st.bytes),
            Metric(
                "netstatd_dnstap_frames_skipped_total",
                "counter",
                "DNSTap frames skipped because they could not be decoded, by reason.",
                [({"reason": k}, n) for k, n in d.skipped.items()],
            ),
            single("netstatd_dns_answers_total", "counter", "Address records learned from responses.", d.resolutions),
            single("netstatd_dns_names", "gauge", "IP -> hostname entries in the cache.", len(names.cache)),
            single(
                "netstatd_dns_names_evicted_total",
                "counter",
                "Entries dropped because the cache was full (raise --dns-max-names).",
                names.cache.evicted,
            ),
            single("netstatd_dns_names_expired_total", "counter", "Entries whose TTL ran out.", names.expired),
        ]

    # -- API callbacks -----------------------------------------------------
    def snapshot(self) -> Iterator[dict[str, Any]]:
        """The initial state of a client: containers first, so connections can refer to them."""
        yield from self.containers.snapshot()
        yield from self.ips.snapshot()
        yield from self.hostnames.snapshot()
        yield from self.tracker.iter_snapshot()

    def host_info(self) -> dict[str, Any]:
        try:
            ips = [a.ip for a in addresses.interface_addresses() if a.scope == "global"]
        except OSError as e:
            log.warning("cannot list host addresses: %s", e)
            ips = []
        return {
            "type": HOST_INFO,
            "timestamp": self.tracker.clock.now(),
            "nodeName": self.settings.node_name,
            "hostIPs": ips,
            "version": __version__,
            "kernelRelease": os.uname().release,
            "captureTCP": not self.settings.disable_tcp,
            "captureUDP": not self.settings.disable_udp,
            "loopback": self.settings.loopback,
        }

    def metrics(self) -> list[Metric]:
        t, h = self.tracker, self.hub
        counters = self.kernel.counters() if self.kernel.ring_fd >= 0 else [0] * ev.CNT_MAX
        emitted, lost, deduped, nested, folded = (
            counters[i] for i in (ev.CNT_EMITTED, ev.CNT_LOST, ev.CNT_UDP_DEDUPED, ev.CNT_NESTED, ev.CNT_FOLDED)
        )
        misses = self.kernel.program_misses()
        out = record_metrics(t.record_counts)
        out += [
            single("netstatd_kernel_events_emitted_total", "counter", "Events the kernel programs wrote.", emitted),
            single(
                "netstatd_kernel_events_lost_total",
                "counter",
                "Events lost in the kernel: the ring buffer was full.",
                lost,
            ),
            single(
                "netstatd_kernel_events_skipped_total",
                "counter",
                "TCP transitions neither state program took (the kernel skips a program already running on that CPU).",
                self.kernel.skipped_state_events(counters),
            ),
            single(
                "netstatd_kernel_nested_events_total",
                "counter",
                "TCP transitions the second state program took because the first was already running on that CPU.",
                nested,
            ),
            Metric(
                "netstatd_kernel_program_misses_total",
                "counter",
                "Runs the kernel skipped per BPF program because it was already running on that CPU.",
                [({"program": name}, n) for name, n in sorted(misses.items())],
            ),
            single(
                "netstatd_kernel_states_folded_total",
                "counter",
                "TCP transitions the kernel carried in the socket's next record instead of one of their own.",
                folded,
            ),
            single(
                "netstatd_kernel_udp_deduplicated_total",
                "counter",
                "UDP datagrams folded into an already announced flow.",
                deduped,
            ),
            single(
                "netstatd_ring_records_malformed_total",
                "counter",
                "Ring records of an unexpected size.",
                self._reader.malformed if self._reader else 0,
            ),
            single("netstatd_ring_buffer_bytes", "gauge", "Size of the kernel ring buffer.", self.kernel.ring_size),
            single(
                "netstatd_ring_buffer_high_water_bytes",
                "gauge",
                "Most bytes ever waiting in the ring buffer when it was drained.",
                self._reader.high_water if self._reader else 0,
            ),
            *self.supervisor.metrics(),
            single(
                "netstatd_ring_records_failed_total",
                "counter",
                "Kernel records lost in batches that failed to apply (internal errors of task ingest).",
                self._drainer.failed_records if self._drainer else 0,
            ),
            single(
                "netstatd_ring_drain_stalls_total",
                "counter",
                "Drain ticks skipped because the event loop was behind.",
                self._drainer.stalls if self._drainer else 0,
            ),
            single(
                "netstatd_client_events_dropped_total",
                "counter",
                "Events dropped for WebSocket clients too slow to keep up.",
                h.dropped_events,
            ),
            single(
                "netstatd_client_overflows_total",
                "counter",
                "Times a client's queue overflowed (it then got a stream.reset).",
                h.overflows,
            ),
            single(
                "netstatd_clients_stalled_total",
                "counter",
                "WebSocket clients closed as too slow: they took no frame for 30 s.",
                h.stalled,
            ),
            *self.front.metrics(),
            *self._dns_metrics(),
            *self.mux.metrics(),
            single("netstatd_clients_connected", "gauge", "WebSocket clients connected now.", len(h.subscribers)),
            single(
                "netstatd_client_connections_total", "counter", "WebSocket clients ever connected.", h.clients_total
            ),
            Metric(
                "netstatd_connections",
                "gauge",
                "Live connections (TCP) and flows (UDP).",
                [({"protocol": "TCP"}, len(t.tcp)), ({"protocol": "UDP"}, len(t.udp))],
            ),
            Metric(
                "netstatd_connections_opened_total",
                "counter",
                "Connections and flows seen opening.",
                [({"protocol": p}, n) for p, n in t.opened.items()],
            ),
            Metric(
                "netstatd_connections_closed_total",
                "counter",
                "Connections and flows seen closing.",
                [({"protocol": p}, n) for p, n in t.closed.items()],
            ),
            single("netstatd_listening_ports", "gauge", "Listening TCP and bound UDP sockets.", len(t.listeners)),
            single(
                "netstatd_unattributed_connections_total",
                "counter",
                "Connections whose owning process could not be found.",
                t.unattributed,
            ),
            single(
                "netstatd_state_reconciled_total",
                "counter",
                "Connections, flows and ports closed by a sock_diag check (closeReason gone): "
                "after a kernel gap, or freed without a traced CLOSE.",
                t.reconciled,
            ),
            single(
                "netstatd_state_swept_total",
                "counter",
                "Connection states set from sock_diag because the socket stayed in a folded state.",
                self.swept,
            ),
            single(
                "netstatd_state_evictions_total",
                "counter",
                "Entries evicted because a state table reached its cap.",
                t.evicted,
            ),
            single(
                "netstatd_fentry_available",
                "gauge",
                "1 when fexit programs load on this kernel.",
                int(self.kernel.uses_fexit),
            ),
        ]
        a, f = self.tracker.attribution, self.follower
        out += [
            single(
                "netstatd_containers", "gauge", "Containers known from containerd.", len(self.containers.containers)
            ),
            single("netstatd_pods", "gauge", "CRI pod sandboxes known from containerd.", len(self.containers.pods)),
            single(
                "netstatd_containerd_connected",
                "gauge",
                "1 while the containerd event stream is open.",
                int(f.connected),
            ),
            single(
                "netstatd_containerd_syncs_total",
                "counter",
                "Full listings of containerd (the first connect and every reconnect).",
                f.connects,
            ),
            Metric(
                "netstatd_events_attributed_total",
                "counter",
                "Connection and port events built (live and in snapshots) by owner: a container or pod, or the host.",
                [({"owner": "container"}, a.resolved if a else 0), ({"owner": "host"}, a.host if a else 0)],
            ),
            Metric(
                "netstatd_netns_scans_total",
                "counter",
                "sock_diag scans of one network namespace after a container started, by result.",
                [({"result": r}, n) for r, n in self.netns_scans.items()],
            ),
            single(
                "netstatd_ips",
                "gauge",
                "Entries in the IP inventory (ip.added minus ip.removed).",
                len(self.ips.entries),
            ),
            single(
                "netstatd_cgroup_lookups_total",
                "counter",
                "/proc/PID/cgroup reads (pid -> container cache misses).",
                self.cgroup_pids.misses,
            ),
        ]
        out.append(Metric("netstatd_build_info", "gauge", "Agent version.", [({"version": __version__}, 1)]))
        return out


def read_inventory(pods: list[Pod]) -> dict:
    """The IP inventory from netlink (blocking: run it in a thread). OSError when the host's cannot be read."""

    def pod_addresses(pod: Pod) -> list[addresses.InterfaceAddress]:
        if not pod.netns_path:
            return []
        try:
            return addresses.interface_addresses(pod.netns_path)
        except OSError as e:  # the pod is going away: CRI had no IP, so it shows none
            log.debug("cannot read the addresses of pod %s/%s: %s", pod.namespace, pod.name, e)
            return []

    return build_inventory(addresses.interface_addresses(), pods, pod_addresses)


def cgroup2_root() -> str:
    try:
        return find_cgroup2_root()
    except LoadError:
        return ""  # the probes will refuse to load and say so


def tune_gc() -> None:
    """Fewer, larger young-generation collections.

    The hot path allocates a tuple per kernel record and a dict per event, and
    almost none of it forms cycles; the default threshold (700) made the
    collector cost as much as the decoding itself (measured: 16.9 -> 31 us
    per connection). Start-up objects are frozen out of every collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def host_addresses() -> list[str]:
    try:
        return [a.ip for a in addresses.interface_addresses()]
    except OSError as e:
        log.warning("cannot list host addresses: %s", e)
        return []


def pid_exe(pid: int) -> dict[str, Any] | None:
    if not os.path.isdir(f"/proc/{pid}"):
        return None
    info = procfs.ProcessCache(capacity=1).lookup(pid)
    return {"pid": pid, "exe": info.exe, "comm": info.comm}


async def run(settings: Settings) -> None:
    agent = Agent(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
        await stop.wait()
        log.info("stopping")
    finally:
        await agent.stop()
