"""The node state checked against sock_diag, where the kernel's records cannot tell it all.

- seed(): at start-up, the sockets of every netns that predate the probes.
- scan_netns_soon(): when a container starts, the listeners of its netns the kernel has not reported.
- reconcile_loop(): after a kernel gap (ring full, skipped transitions), and every RECONCILE_MIN_S
  for the few sockets the kernel frees without a traced close (docs/kernel.md), closes what is gone.
- sweep_loop(): sets the states the kernel folded that a socket stays in (CLOSE_WAIT, ...).

Dumps run in executor threads, one netns at a time where it matters, never per client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .hub import Hub
from .metrics import Metric, single
from .pipeline import Pipeline
from .protocol import PORT_LISTENING
from .sources import netlink, procfs, sockdiag
from .sources.bpf import events as ev
from .sources.bpf.loader import KernelProbes
from .state.model import Listener
from .state.seed import is_listening
from .state.sweep import FOLDED_STATES, sweep_folded
from .state.tracker import Tracker
from .supervisor import Supervisor, failpoint

log = logging.getLogger("netstatd")

# A check runs every RECONCILE_MIN_S, or less often when it is slow, so that checks take at most
# RECONCILE_CPU_SHARE of a core (their CPU time): a check of 100k connections takes ~0.25 s, so it
# then runs every ~12 s.
RECONCILE_MIN_S = 5.0
RECONCILE_MAX_S = 60.0
RECONCILE_CPU_SHARE = 0.02
MAX_NETNS_SCANS = 64  # netns scans queued at once (container starts); more are dropped and counted
SCAN_SETTLE_S = 0.06  # after a dump: ring records from before it are drained and flushed first
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


class SockDiagChecks:
    def __init__(
        self,
        pipeline: Pipeline,
        hub: Hub,
        kernel: KernelProbes,
        supervisor: Supervisor,
        include_loopback: bool,
    ) -> None:
        self.pipeline = pipeline
        self.tracker = pipeline.tracker
        self.hub = hub
        self.kernel = kernel
        self.supervisor = supervisor
        self.include_loopback = include_loopback
        self._scans: dict[int, asyncio.Task] = {}  # netns inode -> its scan in progress (one per netns)
        self._binding: set[int] = set()  # cookies of unbound listeners being looked up
        self.unbound_listeners_lost = 0  # listen() without bind() whose port sock_diag did not give
        self.netns_scans = {"done": 0, "failed": 0, "dropped": 0}
        self.swept = 0  # connection states set by the folded-state sweep
        self._sweep_failing = False

    async def seed(self) -> None:
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
            added = self.tracker.seed(sockets, owners, self.include_loopback)
            del sockets
            self.hub.publish_lazily(self.pipeline.events_for(added))
            seeded += len(added)
        log.info(
            "seeded %d existing sockets from %d network namespaces in %.2fs", seeded, len(netns), time.monotonic() - t0
        )

    def scan_netns_soon(self, netns: int, path: str) -> None:
        """A container's task started: add the listeners of its netns the kernel has not reported.
        One scan per netns at a time (sidecars start together), at most MAX_NETNS_SCANS at once."""
        if netns in self._scans:
            return
        if len(self._scans) >= MAX_NETNS_SCANS:
            self.netns_scans["dropped"] += 1
            return
        self._scans[netns] = self.supervisor.spawn(
            f"scan-{netns}", functools.partial(self._scan_netns, netns, path), label="netns-scan"
        )

    def bind_listeners_soon(self) -> None:
        """listen() without bind() was reported before its port was picked: sock_diag has the port."""
        for cookie, lst in list(self.tracker.tables.unbound_listeners.items()):
            if cookie not in self._binding:
                self._binding.add(cookie)
                self.supervisor.spawn(
                    f"bind-{cookie}", functools.partial(self._bind_listener, cookie, lst), label="listener-port"
                )

    async def _bind_listener(self, cookie: int, lst: Listener) -> None:
        loop = asyncio.get_running_loop()
        try:
            sockets = await loop.run_in_executor(None, sockdiag.dump_sockets, lst.netns, f"/proc/{lst.pid}/ns/net")
        except (FileNotFoundError, ProcessLookupError):
            sockets = []  # the process is gone, or left that netns: the listener's close follows
        except OSError as e:
            sockets = []
            log.warning("cannot find the port of a listener of pid %d (netns %d): %s", lst.pid, lst.netns, e)
        finally:
            self._binding.discard(cookie)
        port = next((s.sport for s in sockets if s.cookie == cookie and is_listening(s)), 0)
        tables = self.tracker.tables
        if not port:
            # one look only: its netns could not be entered (its process left), or it no longer listens
            # (its close record is on its way). Counted; a later netns scan would still add it.
            tables.unbound_listeners.pop(cookie, None)
            self.unbound_listeners_lost += 1
            return
        bound = tables.bind_listener(cookie, port)
        if bound is not None:
            self.hub.publish(self.pipeline.events([(bound, PORT_LISTENING, None)]))

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
            await self.hub.publish_in_turns(self.pipeline.flush())
        except (FileNotFoundError, ProcessLookupError):
            result = "failed"  # the task exited already (or its netns changed): nothing to scan
        except OSError as e:
            result = "failed"
            log.warning("cannot scan the listeners of netns %d (%s): %s", netns, path, e)
        finally:
            changes = self.tracker.add_listeners(sockets, self.include_loopback)  # also ends the scan
            self._scans.pop(netns, None)
        events = self.pipeline.events(changes)
        self.hub.publish(events)
        self.netns_scans[result] += 1
        log.debug("scanned netns %d: %d sockets, %d new listeners", netns, len(sockets), len(events))

    def _kernel_gaps(self) -> int:
        """Events the kernel could not deliver: ring full, or skipped on re-entry."""
        counters = self.kernel.counters()
        return counters[ev.CNT_LOST] + self.kernel.skipped_state_events(counters)

    async def reconcile_loop(self) -> None:
        """A gap can hide a close; without this the connection would stay "open" forever.
        Counted in netstatd_state_reconciled_total."""
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
            await self.hub.publish_in_turns(self.pipeline.flush())
            changes, compare_s = _with_cpu_time(self.tracker.reconcile, tcp, udp, before)
            self.hub.publish(self.pipeline.events(changes))
            # CPU time, not wall time: under load the dump waits for the CPU, which costs nothing
            interval = min(max((cpu_s + compare_s) / RECONCILE_CPU_SHARE, RECONCILE_MIN_S), RECONCILE_MAX_S)

    async def sweep_loop(self) -> None:
        """Show TCP sockets that stay in a state the kernel folded (docs/kernel.md "Folded states").

        Only after the kernel folded a transition since the previous sweep began: without folds
        nothing can be stale, so an idle host does no work. Counted in netstatd_state_swept_total.
        """
        loop = asyncio.get_running_loop()
        dump = functools.partial(sockdiag.tcp_states, states=sockdiag.state_mask(FOLDED_STATES))
        seen = 0
        while True:
            failpoint("sweep")
            await asyncio.sleep(SWEEP_EVERY_S)
            folded = self.kernel.counters()[ev.CNT_FOLDED]
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
            await self.hub.publish_in_turns(self.pipeline.flush())
            events = self.pipeline.events(sweep_folded(self.tracker.tables, states, before))
            self.swept += len(events)
            self.hub.publish(events)

    def metrics(self) -> list[Metric]:
        return [
            single(
                "netstatd_state_swept_total",
                "counter",
                "Connection states set from sock_diag because the socket stayed in a folded state.",
                self.swept,
            ),
            Metric(
                "netstatd_netns_scans_total",
                "counter",
                "sock_diag scans of one network namespace after a container started, by result.",
                [({"result": r}, n) for r, n in self.netns_scans.items()],
            ),
            single(
                "netstatd_listeners_unresolved_total",
                "counter",
                "Listeners of a listen() without bind() whose port sock_diag did not give: not announced.",
                self.unbound_listeners_lost,
            ),
        ]
