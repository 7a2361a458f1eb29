"""From kernel record to event, in one direction: the node state (state/tracker.py) turns records into
table changes, enrichment (enrich/events.py) turns changes into events for the hub.

The agent drives it (a ring chunk in, a flush period's events out); tests and benchmarks drive the
same path without the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .enrich.events import EventBuilder
from .metrics import Metric, single
from .protocol import PORT_LISTENING
from .state.model import Conn, Listener
from .state.tables import Change
from .state.tracker import Tracker

Event = dict[str, Any]

FLUSH_INTERVAL_S = 0.05  # the coalescing window documented in docs/protocol.md
# While every client is more than BEHIND behind (the agent, not one slow client, cannot keep up), the
# window is LOADED_FLUSH_INTERVAL_S: more connections open and close within one and become one event each
# instead of two or three, and each flush's fixed costs are paid a quarter as often, which costs the agent
# about a quarter less per connection at full churn (bench/churn.py: 0.087-0.094 instead of 0.11-0.13 s of
# CPU per 100k records), so it catches up instead of resetting its clients. A window's events come in one
# burst: it widens only while a flush of the wide window takes at most ROOM of a client's queue bound.
# Back to the short window once a client has been under a tenth of BEHIND for CALM_S (sooner, the agent
# falls behind again at once).
LOADED_FLUSH_INTERVAL_S = 0.2
BEHIND = 0.025  # of a client's queue bound (--client-queue-events): 5,000 events of the default 200,000
ROOM = 0.25
CALM_S = 1.0


class FlushWindow:
    """How long the agent coalesces kernel records before it flushes them as events."""

    def __init__(self) -> None:
        self.seconds = FLUSH_INTERVAL_S
        self.widened = 0  # times it went to LOADED_FLUSH_INTERVAL_S
        self._calm = 0.0  # seconds the wide window has had a client caught up

    def update(self, backlog: float, flushed: int, bound: int) -> float:
        """The next window, given how far behind the client least behind is (Hub.backlog), the events
        of the last flush and the clients' queue bound."""
        fits = flushed * LOADED_FLUSH_INTERVAL_S / self.seconds <= ROOM * bound
        if self.seconds == FLUSH_INTERVAL_S:
            if backlog > BEHIND and fits:
                self.seconds, self._calm = LOADED_FLUSH_INTERVAL_S, 0.0
                self.widened += 1
        else:
            self._calm = self._calm + self.seconds if backlog < BEHIND / 10 else 0.0
            if self._calm >= CALM_S or not fits:
                self.seconds = FLUSH_INTERVAL_S
        return self.seconds

    def metrics(self) -> list[Metric]:
        return [
            single(
                "netstatd_flush_window_seconds",
                "gauge",
                "The coalescing window now: 0.05, or 0.2 while every WebSocket client is behind.",
                self.seconds,
            ),
            single(
                "netstatd_flush_window_widened_total",
                "counter",
                "Times the coalescing window went to 0.2 s because every WebSocket client was behind.",
                self.widened,
            ),
        ]


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
