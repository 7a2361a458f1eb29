"""Stream hub: fans serialized event batches out to WebSocket subscribers.

Each batch is serialized once and shared by every subscriber. A subscriber
has a bounded queue; a client too slow to keep up loses its queue, which is
counted, and is then sent a `stream.reset` (with the number of events it
missed) followed by a fresh snapshot, so its view is whole again.

A snapshot is encoded one frame at a time as the client's send loop asks for
it, so memory holds one frame per client, not the whole state twice, and the
event loop is never blocked for the length of a large snapshot. Live events
queued meanwhile follow the snapshot; each is the latest word on its
connection, so the client converges on the current state.

Each subscriber has a filter (subscription.py): its snapshot holds only what
matches, and each batch is encoded once per distinct filter. A new filter
replaces what is queued with a stream.reset and the snapshot for that filter.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson

from .metrics import Metric, single
from .protocol import SNAPSHOT_COMPLETE, STREAM_RESET
from .subscription import EVERYTHING, Added, Subscription

log = logging.getLogger("netstatd.hub")

Event = dict[str, Any]
FRAME_EVENTS = 2000  # events per WebSocket frame: keeps frames under ~1 MB
# A snapshot's first frame is smaller: its rows are what a user waits for (a page's first screen, the
# rows a widened filter adds), and each hop (node, mux, page) handles a frame whole before passing it on.
FIRST_FRAME_EVENTS = 200
# While a snapshot is being sent, a client's queue may hold this many times its bounds: the live events
# behind a large snapshot (a cluster's, through the mux) are needed after it, and an overflow would only
# start the snapshot again.
SNAPSHOT_SLACK = 4


def encode_frames(events: list[Event]) -> list[tuple[bytes, int]]:
    """JSON arrays of at most FRAME_EVENTS events: (payload, event count)."""
    return [
        (exact(orjson.dumps(events[i : i + FRAME_EVENTS])), len(events[i : i + FRAME_EVENTS]))
        for i in range(0, len(events), FRAME_EVENTS)
    ]


def exact(data: bytes) -> bytes:
    """data in memory of its own size, for orjson output that is kept: under ~4 KiB it holds its
    ~8 KiB buffer (a queue of small frames would hold 20 times what its byte bound counts; the mux's
    encoded rows, 16 times their size)."""
    return memoryview(data).tobytes() if len(data) < 8192 else data


class Subscriber:
    """One client's bounded queue of frames."""

    def __init__(self, hub: Hub, peer: str, max_events: int, max_bytes: int, filter: Subscription = EVERYTHING) -> None:
        self.hub = hub
        self.peer = peer
        self.filter = filter
        self.held = False  # nothing is sent while held (a mux client waiting for its nodes: server.py)
        # Its snapshot.complete waits for release(), after what is queued by then (a mux client whose
        # nodes are still sending the rows its new filter adds: they reach it live meanwhile).
        self.completion_held = False
        self._completions: list[Event] = []  # held snapshot.completes whose rows were sent
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.queue: deque[tuple[bytes, int]] = deque()
        self.queued_events = 0
        self.queued_bytes = 0
        self.missed = 0  # events lost since the last stream.reset
        self.needs_reset = False
        self.wake = asyncio.Event()
        self._head: list[bytes] = []  # host.info, or a stream.reset notice: sent before anything else
        self._snapshot: Iterator[bytes] | None = None  # frames still to encode, sent before the queue

    def offer(self, frames: list[tuple[bytes, int]]) -> None:
        if self.held:  # its snapshot is made once it is released: nothing older is worth keeping
            return
        for frame, n in frames:
            if self.needs_reset:
                self.missed += n
                self.hub.dropped_events += n
                continue
            # Bounded, but one frame always fits: a flush can exceed a small bound by itself.
            slack = SNAPSHOT_SLACK if self._snapshot is not None else 1
            over = (
                self.queued_events + n > self.max_events * slack
                or self.queued_bytes + len(frame) > self.max_bytes * slack
            )
            if over and self.queue:
                lost = self.queued_events + n
                self.missed += lost
                self.hub.dropped_events += lost
                self.hub.overflows += 1
                self.queue.clear()
                self.queued_events = self.queued_bytes = 0
                self.needs_reset = True
                if self.completion_held:
                    # A widening too large to come live (a mux client whose nodes send many rows): it waits
                    # for them instead, and its stream.reset and snapshot, from the merged state, follow.
                    self.held = True
                    log.info("client %s: the rows its filter adds overflowed its queue; it waits for them", self.peer)
                    return
                log.warning(
                    "client %s is too slow: dropped %d queued events; it will get a stream.reset", self.peer, lost
                )
                continue
            self.queue.append((frame, n))
            self.queued_events += n
            self.queued_bytes += len(frame)
        self.wake.set()

    def start_snapshot(self, head: bytes) -> None:
        self._head.append(head)
        self.completion_held, self._completions = False, []
        self._snapshot = self._frames_of(self.filter)
        self.wake.set()

    def hold_completion(self) -> None:
        """The snapshot in progress goes on, its snapshot.complete waits for release()."""
        self.completion_held = True

    def _frames_of(self, filter: Subscription | Added, **fields: Any) -> Iterator[bytes]:
        """What `filter` lets through of the state, encoded frame by frame as take() asks, its
        snapshot.complete (with `fields`) in the last frame, unless held by then."""
        count, tail = 0, []
        for batch, last in self.hub.snapshot_batches(filter):
            count += len(batch)
            if last:
                tail = batch
            else:
                yield orjson.dumps(batch)
        completion = self.hub.event(SNAPSHOT_COMPLETE, count=count, **fields)
        if self.completion_held:
            self._completions.append(completion)
        else:
            tail.append(completion)
        if tail:
            yield orjson.dumps(tail)

    def resubscribe(self, new: Subscription) -> None:
        """A new filter: what is queued goes (the new snapshot supersedes it), then a stream.reset
        (reason "subscribe": drop every row), the new filter's snapshot and snapshot.complete."""
        self.filter = new
        self.queue.clear()
        self.queued_events = self.queued_bytes = 0
        self.needs_reset, self.missed = False, 0
        self.start_snapshot(orjson.dumps(self.hub.event(STREAM_RESET, reason="subscribe", filter=new.to_json())))

    def widen(self, new: Subscription, version: int) -> None:
        """A partial re-subscription (what a mux sends its upstreams, and the page when a filter only
        widens): nothing is dropped; after any snapshot in progress come a stream.reset marked partial,
        the rows `new` lets through that the old filter did not, and a snapshot.complete marked
        partial, both carrying `version`."""
        old, self.filter = self.filter, new
        marker = self.hub.event(STREAM_RESET, reason="subscribe", partial=True, subscription=version)
        added = self._frames_of(Added(new, old), partial=True, subscription=version)
        frames = itertools.chain((orjson.dumps(marker),), added)
        self._snapshot = frames if self._snapshot is None else itertools.chain(self._snapshot, frames)
        self.wake.set()

    def release(self) -> None:
        """No longer held: its snapshot, made from now on, follows (or its held snapshot.complete)."""
        self.held = self.completion_held = False
        self.wake.set()

    def notify(self, event: Event) -> None:
        """An event for this client alone (subscribe.error), sent before anything queued."""
        self._head.append(orjson.dumps(event))
        self.wake.set()

    def take(self) -> list[bytes]:
        """Frames to send now: the head, then the snapshot one frame per call, then the queue.

        While snapshot frames remain, `wake` stays set so the send loop comes straight back.
        """
        if self.held:
            self.wake.clear()
            return []
        if self.needs_reset:
            self.needs_reset = False
            self.start_snapshot(orjson.dumps(self.hub.event(STREAM_RESET, reason="overflow", missedEvents=self.missed)))
            self.missed = 0
        frames, self._head = self._head, []
        if self._snapshot is not None:
            frame = next(self._snapshot, None)
            if frame is not None:
                frames.append(frame)
                return frames
            self._snapshot = None
        while self.queue:
            frame, n = self.queue.popleft()
            self.queued_events -= n
            self.queued_bytes -= len(frame)
            frames.append(frame)
        if self._completions and not self.completion_held:
            frames += [orjson.dumps(c) for c in self._completions]
            self._completions = []
        self.wake.clear()
        return frames


class Hub:
    def __init__(
        self,
        node_name: str,
        snapshot: Callable[[], Iterable[Event]],
        now: Callable[[], str],
        *,
        max_clients: int = 256,
        client_max_events: int = 200_000,
        client_max_bytes: int = 64 << 20,
    ) -> None:
        self.node_name = node_name
        self._snapshot = snapshot
        self.now = now
        self.max_clients = max_clients
        self.client_max_events = client_max_events
        self.client_max_bytes = client_max_bytes
        self.subscribers: set[Subscriber] = set()
        self._held: deque[list[Event]] = deque()  # publish_in_turns()'s frames' worth not offered yet
        # metrics
        self.dropped_events = 0
        self.stalled = 0  # clients closed for taking no frame for api.app.STALL_S
        self.overflows = 0
        self.clients_total = 0
        self.subscribe_errors = 0  # subscribe frames refused (the client got a subscribe.error)

    def event(self, kind: str, **fields: Any) -> Event:
        """An event of this hub's own (a reset, a refusal): its fields, then timestamp and nodeName."""
        return {"type": kind, **fields, "timestamp": self.now(), "nodeName": self.node_name}

    def metrics(self, prefix: str = "netstatd_") -> list[Metric]:
        """Its clients, under `prefix` (the node's hub "netstatd_", the multiplexer's "netstatd_mux_")."""
        return [
            single(f"{prefix}clients_connected", "gauge", "WebSocket clients connected now.", len(self.subscribers)),
            single(
                f"{prefix}client_connections_total", "counter", "WebSocket clients ever connected.", self.clients_total
            ),
            single(
                f"{prefix}client_events_dropped_total",
                "counter",
                "Events dropped for WebSocket clients too slow to keep up.",
                self.dropped_events,
            ),
            single(
                f"{prefix}client_overflows_total",
                "counter",
                "Times a client's queue overflowed (it then got a stream.reset).",
                self.overflows,
            ),
            single(
                f"{prefix}subscribe_errors_total",
                "counter",
                "Subscribe frames refused: malformed, or an unknown key (the client got a subscribe.error).",
                self.subscribe_errors,
            ),
            single(
                f"{prefix}clients_stalled_total",
                "counter",
                "WebSocket clients closed as too slow: they took no frame for 30 s.",
                self.stalled,
            ),
        ]

    def snapshot_batches(self, filter: Subscription | Added = EVERYTHING) -> Iterator[tuple[list[Event], bool]]:
        """The current state (what `filter` lets through) in lists of FRAME_EVENTS events (the first of
        FIRST_FRAME_EVENTS), made as they are asked for (one event ahead, to tell the last list)."""
        events = self._snapshot()
        it = iter(events if filter.empty else filter_events(filter, events))
        batch = list(itertools.islice(it, FIRST_FRAME_EVENTS))
        while batch:
            after = next(it, None)
            yield batch, after is None
            if after is None:
                return
            batch = [after, *itertools.islice(it, FRAME_EVENTS - 1)]

    def subscribe(self, peer: str, first: Event, filter: Subscription = EVERYTHING) -> Subscriber | None:
        """New client: `first` (host.info), the snapshot, then live frames. None when full."""
        if len(self.subscribers) >= self.max_clients:
            return None
        sub = Subscriber(self, peer, self.client_max_events, self.client_max_bytes, filter)
        sub.start_snapshot(orjson.dumps(first))
        self.subscribers.add(sub)
        self.clients_total += 1
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def resubscribe(self, sub: Subscriber, new: Subscription, partial: bool = False, version: int = 0) -> None:
        """A client's subscribe frame (the mux's hub defers it until its nodes have the rows)."""
        if partial:
            sub.widen(new, version)
        else:
            sub.resubscribe(new)

    def publish(self, events: list[Event]) -> None:
        self._offer_held()
        if events and self.subscribers:
            self._offer(events)

    def _offer(self, events: list[Event]) -> None:
        """Each subscriber the frames of what its filter lets through, encoded once per filter."""
        frames_by_filter: dict[Subscription, list[tuple[bytes, int]]] = {}
        for sub in self.subscribers:
            frames = frames_by_filter.get(sub.filter)
            if frames is None:
                selected = events if sub.filter.empty else list(filter_events(sub.filter, events))
                frames = frames_by_filter[sub.filter] = encode_frames(selected)
            if frames:
                sub.offer(frames)

    async def publish_in_turns(self, events: list[Event]) -> None:
        """publish() a frame's worth at a time, the event loop turning in between: clients' send loops
        write the first frames while the next are encoded. WebSocket writes happen only at the loop's
        turns, a socket taking a few MB each: a flush period of a backlog published at once (tens of MB)
        would wait in the queues and overflow them, while the clients keep up. A publish() meanwhile
        (newer events: a sweep's, a reconcile's) first offers what is still held, so order is kept."""
        self._held.extend(events[start : start + FRAME_EVENTS] for start in range(0, len(events), FRAME_EVENTS))
        while self._held:
            self._offer_next_held()
            await asyncio.sleep(0)

    def _offer_held(self) -> None:
        while self._held:
            self._offer_next_held()

    def _offer_next_held(self) -> None:
        batch = self._held.popleft()
        if self.subscribers:
            self._offer(batch)

    def publish_lazily(self, events: Iterable[Event]) -> None:
        """publish() for events made on demand (a start-up seed of 100k sockets): made a frame's worth
        at a time, and not at all while nobody listens."""
        self._offer_held()
        if not self.subscribers:
            return
        it = iter(events)
        while batch := list(itertools.islice(it, FRAME_EVENTS)):
            self._offer(batch)


def filter_events(filter: Subscription | Added, events: Iterable[Event]) -> Iterator[Event]:
    return (e for e in events if filter.matches(e))
