"""From kernel record to event, in one direction: the node state (state/tracker.py) turns records into
table changes, enrichment (enrich/events.py) turns changes into events for the hub.

The agent drives it (a ring chunk in, a flush period's events out); tests and benchmarks drive the
same path without the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .enrich.events import EventBuilder
from .protocol import PORT_LISTENING
from .state.model import Conn, Listener
from .state.tables import Change
from .state.tracker import Tracker

Event = dict[str, Any]


class Pipeline:
    def __init__(self, tracker: Tracker, builder: EventBuilder) -> None:
        self.tracker = tracker
        self.builder = builder

    def ingest(self, chunk: bytes) -> None:
        self.builder.see_processes(self.tracker.ingest(chunk))

    def flush(self) -> list[Any]:
        """The events of everything pending (every flush period): dicts, and encoded ones."""
        return self.builder.render_flush(self.tracker.flush())

    def events(self, changes: Iterable[Change]) -> list[Event]:
        """Events of changes made outside a flush (a reconcile, a sweep, a netns scan)."""
        self.builder.begin_period()
        return self.builder.render(changes)

    def snapshot(self) -> Iterator[Event]:
        """The current state as events, made one at a time (the hub encodes them a frame at a time)."""
        self.builder.begin_period()
        return (self.builder.event(*change) for change in self.tracker.snapshot())

    def events_for(self, added: Iterable[Conn | Listener]) -> Iterator[Event]:
        """Events of what Tracker.seed() added, made one at a time."""
        self.builder.begin_period()
        for item in added:
            if type(item) is Listener:
                yield self.builder.port_event(item, PORT_LISTENING)
            else:
                yield self.builder.connection_event(item, [item.state])
