"""The node agent: wires sources -> node state -> hub -> HTTP/WebSocket, and runs them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from aiohttp import web

from . import __version__
from .api.front import Front
from .diag import SockDiagChecks
from .enrich.attribution import Attribution
from .enrich.cgroups import PidContainers
from .enrich.events import EventBuilder
from .enrich.traffic import NamespaceTraffic
from .errors import StartupError
from .hub import Hub
from .listen import exposure
from .metrics import Metric, build_info
from .mux.server import Mux
from .pipeline import Pipeline
from .protocol import HOST_INFO, WallClock
from .settings import Settings
from .sources import addresses, procfs
from .sources.bpf.drainer import RingDrainer
from .sources.bpf.loader import KernelProbes, KernelSettings, LoadError, find_cgroup2_root
from .sources.bpf.ringbuf import NATIVE_MERGE, RingSet
from .sources.containerd.changes import Change, TaskStarted
from .sources.containerd.follower import ContainerdFollower
from .sources.dnstap.collector import DnstapCollector, SenderAllowList
from .state.containers import ContainerIndex, Pod
from .state.dnsfailures import DnsFailures
from .state.hostnames import Hostnames
from .state.ips import IpInventory, build_inventory
from .state.tracker import Tracker
from .supervisor import Supervisor, failpoint

log = logging.getLogger("netstatd")

FLUSH_INTERVAL_S = 0.05  # the coalescing window documented in docs/protocol.md
FIRST_SYNC_WAIT_S = 5.0  # how long the seed waits for containerd's first listing, so it is attributed
IP_REFRESH_S = 30.0  # host addresses change without a container event (DHCP, an admin): re-read this often


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
        self.clock = WallClock()
        self.tracker = Tracker()  # node state: kernel records -> table changes
        self.containers = ContainerIndex(settings.node_name, self.clock.now)
        self.cgroup_pids = PidContainers()
        self.ips = IpInventory(settings.node_name, self.clock.now)
        self._ips_changed = asyncio.Event()  # containers changed: refresh the inventory soon
        self._ips_failing = False
        self.hostnames = Hostnames(settings.node_name, self.clock, settings.dns_max_names)
        self.dns_failures = DnsFailures(
            settings.node_name, self.clock, self.containers.pod_fields, settings.dns_failed_interval
        )
        self.attribution = Attribution(self.containers, self.processes, self.cgroup_pids)
        # enrichment: table changes -> events with owners, pods and names
        traffic = NamespaceTraffic() if settings.metrics_per_namespace else None
        builder = EventBuilder(
            settings.node_name, self.clock, self.processes, self.attribution, self.hostnames, traffic
        )
        self.pipeline = Pipeline(self.tracker, builder)
        self.dnstap = DnstapCollector(
            self.hostnames.learn,
            allow=self.dnstap_allow,
            on_error=lambda e: self.supervisor.report("dnstap", e, "closing that sender"),
            failed=self.dns_failures.record,
        )
        self.hub = Hub(
            settings.node_name,
            self.snapshot,
            self.clock.now,
            client_max_events=settings.client_queue_events,
        )
        self.kernel = KernelProbes(
            KernelSettings(
                capture_tcp=not settings.disable_tcp,
                capture_udp=not settings.disable_udp,
                include_loopback=settings.loopback,
            )
        )
        self._reader: RingSet | None = None
        self._drainer: RingDrainer | None = None
        self._runner: web.AppRunner | None = None
        self.follower = ContainerdFollower(
            settings.containerd_socket, self._containerd_changed, cgroup_root=cgroup2_root()
        )
        self.mux: Mux | None = None  # cluster-wide view on --http-mux-port; 0 turns it off
        if settings.http_mux_port:
            try:
                self.mux = Mux(settings, self.clock.now, self.front, self.supervisor)
            except ValueError as e:
                raise StartupError(str(e)) from None
        self.checks = SockDiagChecks(self.pipeline, self.hub, self.kernel, self.supervisor, settings.loopback)
        # what /metrics reads, each its own (the ring's reader and drainer join once the probes load)
        self._collectors: list[Any] = [
            *([traffic] if traffic else []),
            self.kernel,
            self.supervisor,
            self.tracker,
            builder,
            self.checks,
            self.hub,
            self.front,
            self.dnstap,
            self.hostnames,
            self.dns_failures,
            self.ips,
            self.cgroup_pids,
            self.containers,
            self.follower,
            *([self.mux] if self.mux else []),
        ]

    # -- lifecycle: every start has its stop --------------------------------
    async def start(self) -> None:
        tune_gc()
        if not self.tracker.native:
            log.warning(
                "the native helper for short connections is not built (make setup builds it): "
                "they take the Python path, at about 3 times the agent's CPU under connection churn"
            )
        if not NATIVE_MERGE:
            log.warning(
                "the native helper that merges the CPUs' ring buffers is not built (make setup builds it): "
                "they are merged in Python, at ~1 us more CPU per kernel record"
            )
        warning = exposure(self.settings, self.front.addresses)
        if warning:
            log.warning("%s", warning)
        self._set_own_addresses(addresses.host_ips())  # before serving: requests may name us by any of them
        await self._start_http()
        if self.mux:
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
        self.tracker.tables.take_udp_flow = self.kernel.take_udp_flow  # counts of the UDP closes it decides
        self._reader = RingSet([(fd, self.kernel.ring_size) for fd in self.kernel.ring_fds])
        self._drainer = RingDrainer(
            self._reader, asyncio.get_running_loop(), self.pipeline.ingest, report=self.supervisor.report
        )
        self._collectors += [self._reader, self._drainer]
        spawn = self.supervisor.spawn
        spawn("ring", self._drainer.run)
        spawn("flush", self._flush_loop)
        spawn("containerd", self.follower.run)
        spawn("files", functools.partial(self.front.reload_forever, self.mux.reload if self.mux else lambda: None))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.follower.first_attempt.wait(), FIRST_SYNC_WAIT_S)
        await self.refresh_ips()
        spawn("ips", self._ip_loop)
        # Probes are live before the scan, so nothing falls between the two.
        await self.checks.seed()
        spawn("reconcile", self.checks.reconcile_loop)
        spawn("sweep", self.checks.sweep_loop)
        if self.settings.stats_interval and not self.settings.disable_tcp:
            spawn("stats", self._stats_loop)
        log.info(
            "netstatd %s serving node %s on %s (WebSocket /netstat)",
            __version__,
            self.settings.node_name,
            self.front.urls(self.settings.http_port),
        )

    async def stop(self) -> None:
        await self.supervisor.stop()
        if self.mux:
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

    def _set_own_addresses(self, ips: Iterable[str]) -> None:
        ips = set(ips)
        self.front.set_own_addresses(ips)
        self.dnstap_allow.set_own(ips)

    def _containerd_changed(self, change: Change) -> None:
        """A change from the follower: applied to the container index (its events published), or a scan."""
        if isinstance(change, TaskStarted):
            self._ips_changed.set()  # a sandbox start publishes nothing itself
            self.checks.scan_netns_soon(change.netns, change.path)
        else:
            self._publish_containers(self.containers.apply(change))

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

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            failpoint("flush")
            await self.hub.publish_in_turns(self.hostnames.flush() + self.dns_failures.flush() + self.pipeline.flush())
            if self.pipeline.tracker.tables.unbound_listeners:
                self.checks.bind_listeners_soon()

    async def _stats_loop(self) -> None:
        """Live TCP connections' counters, every --stats-interval: those that changed, as events with no
        state change (the kernel's stats iterator reports only those)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.stats_interval)
            failpoint("stats")
            netns = await loop.run_in_executor(None, procfs.list_netns)
            read_ns = time.monotonic_ns()
            records = await loop.run_in_executor(None, self.kernel.read_tcp_stats, netns)
            self.hub.publish(self.pipeline.flush())  # the connections opened before the read, first
            changes = self.pipeline.tracker.tables.refresh_stats(records, read_ns)
            self.hub.publish(self.pipeline.events(changes))

    # -- API callbacks -----------------------------------------------------
    def snapshot(self) -> Iterator[dict[str, Any]]:
        """The initial state of a client: containers first, so connections can refer to them."""
        yield from self.containers.snapshot()
        yield from self.ips.snapshot()
        yield from self.hostnames.snapshot()
        yield from self.dns_failures.snapshot()
        yield from self.pipeline.snapshot()

    def host_info(self) -> dict[str, Any]:
        try:
            ips = [a.ip for a in addresses.interface_addresses() if a.scope == "global"]
        except OSError as e:
            log.warning("cannot list host addresses: %s", e)
            ips = []
        return {
            "type": HOST_INFO,
            "timestamp": self.clock.now(),
            "nodeName": self.settings.node_name,
            "hostIPs": ips,
            "version": __version__,
            "kernelRelease": os.uname().release,
            "captureTCP": not self.settings.disable_tcp,
            "captureUDP": not self.settings.disable_udp,
            "loopback": self.settings.loopback,
        }

    def metrics(self) -> list[Metric]:
        """Every component's own metrics (read at scrape time)."""
        out: list[Metric] = []
        for component in self._collectors:
            out += component.metrics()
        out.append(build_info())
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


def pid_exe(pid: int) -> dict[str, Any] | None:
    if not os.path.isdir(f"/proc/{pid}"):
        return None
    info = procfs.ProcessCache(capacity=1).lookup(pid)
    return {"pid": pid, "exe": info.exe, "comm": info.comm}
