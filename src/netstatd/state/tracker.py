"""The node state: kernel records in, table changes out.

    ingest(chunk)  ->  fold.py (pending changes; short connections packed by native.py)
    flush()        ->  tables.py applies the period  ->  Flush: changes, and the period's short connections
    seed.py        ->  sockets that predate the probes, and new pods' listeners

Enrichment and events are the next stage (enrich/events.py); pipeline.py joins the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..metrics import Metric, single
from ..sources.bpf import events as ev
from .fold import Folder
from .model import Conn, Listener
from .native import AVAILABLE, ShortConnections
from .seed import Seeding
from .tables import Change, Tables


@dataclass
class ShortTemplates:
    """The period's short connections (native.py): the packed connections, the template of each,
    and per template the connection standing for it, its states and how many it stands for."""

    packed: list[bytes]
    index: bytes
    templates: list[tuple[Conn, list[str], int]]


@dataclass
class Flush:
    """A flush period's changes, in order; the short connections' events go at `shorts_at`."""

    changes: list[Change]
    shorts: ShortTemplates | None = None
    shorts_at: int = 0


class Tracker:
    def __init__(self, *, native: bool = True, **caps: Any) -> None:
        """native: short TCP connections through the native helper when it is built. caps: Tables'."""
        self._shorts = ShortConnections() if native and AVAILABLE else None
        self.native = self._shorts is not None
        self.folder = Folder(self._shorts)
        self.tables = Tables(**caps)
        self.seeding = Seeding(self.tables)

    def ingest(self, chunk: bytes) -> list[tuple[int, bytes]]:
        """Take in a chunk of ring records. Returns (pid, raw comm) of the processes in it, for
        enrichment to read while they live."""
        t = self.tables
        return self.folder.ingest(chunk, (t.tcp, t.reconciled_cookies), every_close=self.seeding.running)

    @property
    def records_ingested(self) -> int:
        return self.folder.records_ingested

    def flush(self) -> Flush:
        """Everything pending, applied (called every flush period)."""
        period = self.folder.take()
        t = self.tables
        flush = Flush(t.apply_opens(period))
        if period.shorts:  # after the period's listeners, before their closes: as the fold applies them
            assert self._shorts is not None
            reps, index, uses = self._shorts.distinct(period.shorts)
            templates = [(t.short(rep, n), rep.states, n) for rep, n in zip(reps, uses, strict=True)]
            flush.shorts, flush.shorts_at = ShortTemplates(period.shorts, index, templates), len(flush.changes)
        flush.changes += t.apply(period)
        return flush

    def reconcile(self, tcp: set[int], udp: set[int], before_ns: int) -> list[Change]:
        return self.tables.reconcile(tcp, udp, before_ns)

    # -- seeding (seed.py) -------------------------------------------------------
    def begin_seed(self) -> None:
        self.seeding.begin()

    def seed(self, sockets: Iterable, owners: dict[int, int], include_loopback: bool) -> list[Conn | Listener]:
        return self.seeding.seed(sockets, owners, include_loopback)

    def add_listeners(self, sockets: Iterable, include_loopback: bool) -> list[Change]:
        unapplied = {rec[ev.COOKIE] for rec in self.folder.period.opens}  # their own event is coming
        return self.seeding.add_listeners(sockets, include_loopback, unapplied)

    def snapshot(self) -> Iterator[Change]:
        return self.tables.snapshot()

    def metrics(self) -> list[Metric]:
        t, f = self.tables, self.folder
        return [
            *f.metrics(),
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
            single(
                "netstatd_udp_flow_restarts_total",
                "counter",
                "UDP flows whose kernel counters started over while the flow went on (evicted from the "
                "kernel's flow map): their totals miss what the flow carried since its previous event.",
                t.udp_restarts,
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
            Metric(
                "netstatd_connect_failures_total",
                "counter",
                "TCP connects that ended before the connection was up, by the socket's error "
                "(closed: its application closed it while connecting).",
                [({"reason": r}, n) for r, n in sorted(t.connect_failures.items())],
            ),
            single(
                "netstatd_tcp_stats_refreshed_total",
                "counter",
                "Events of live TCP connections whose counters changed (every --stats-interval).",
                t.stats_refreshed,
            ),
            Metric(
                "netstatd_tcp_resets_total",
                "counter",
                "TCP connections ended by a reset, sent or received.",
                [({"direction": d}, n) for d, n in t.resets.items()],
            ),
            single(
                "netstatd_state_evictions_total",
                "counter",
                "Entries evicted because a state table reached its cap.",
                t.evicted,
            ),
        ]
