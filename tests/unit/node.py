"""A node's state and events wired as the agent wires them (pipeline.py), without a kernel: the tests
feed it ring records and read its events and tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netstatd.enrich.events import EventBuilder
from netstatd.pipeline import Pipeline
from netstatd.protocol import WallClock
from netstatd.sources.procfs import ProcessCache
from netstatd.state.tracker import Tracker


class Node:
    def __init__(self, proc_root: str | Path, *, native: bool = True, clock: WallClock | None = None, **caps) -> None:
        """proc_root: the procfs that owners are looked up in (an empty folder: no process is found)."""
        self.clock = clock or WallClock()
        self.processes = ProcessCache(proc_root=str(proc_root))
        self.tracker = Tracker(native=native, **caps)
        self.builder = EventBuilder("node-1", self.clock, self.processes)
        self.pipeline = Pipeline(self.tracker, self.builder)
        self.tables = self.tracker.tables

    # enrichment, set by the test that needs it
    @property
    def attribution(self) -> Any:
        return self.builder.attribution

    @attribution.setter
    def attribution(self, value: Any) -> None:
        self.builder.attribution = value

    @property
    def hostnames(self) -> Any:
        return self.builder.hostnames

    @hostnames.setter
    def hostnames(self, value: Any) -> None:
        self.builder.hostnames = value

    # the path from record to event
    def ingest(self, chunk: bytes) -> None:
        self.pipeline.ingest(chunk)

    def flush(self) -> list[Any]:
        return self.pipeline.flush()

    def snapshot(self) -> list[dict]:
        return list(self.pipeline.snapshot())

    def begin_seed(self) -> None:
        self.tracker.begin_seed()

    def seed(self, sockets, owners, include_loopback: bool):
        return self.tracker.seed(sockets, owners, include_loopback)

    def events_for(self, added) -> list[dict]:
        return list(self.pipeline.events_for(added))

    def add_listeners(self, sockets, include_loopback: bool) -> list[dict]:
        return self.pipeline.events(self.tracker.add_listeners(sockets, include_loopback))

    def reconcile(self, tcp: set[int], udp: set[int], before_ns: int) -> list[dict]:
        return self.pipeline.events(self.tracker.reconcile(tcp, udp, before_ns))

    # the tables and the counters
    @property
    def tcp(self) -> dict:
        return self.tables.tcp

    @property
    def udp(self) -> dict:
        return self.tables.udp

    @property
    def listeners(self) -> dict:
        return self.tables.listeners

    @property
    def record_counts(self) -> dict:
        return self.tracker.folder.record_counts

    @property
    def records_ingested(self) -> int:
        return self.tracker.records_ingested

    def __getattr__(self, name: str) -> Any:  # opened, closed, unattributed, evicted, reconciled
        return getattr(self.tables, name)
