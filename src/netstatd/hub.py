"""Stream hub: fans serialized event batches out to WebSocket subscribers.

Each batch is serialized once and shared by every subscriber. A subscriber
has a bounded queue; a client too slow to keep up loses its queue, which is
counted, and is then sent a `stream.reset` (with the number of events it
missed) followed by a fresh snapshot, so its view is whole again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from .protocol import SNAPSHOT_COMPLETE, STREAM_RESET

log = logging.getLogger("netstatd.hub")

Event = dict[str, Any]
FRAME_EVENTS = 2000  # events per WebSocket frame: keeps frames under ~1 MB


def encode_frames(events: list[Event]) -> list[tuple[bytes, int]]:
    """JSON arrays of at most FRAME_EVENTS events: (payload, event count)."""
    return [
        (orjson.dumps(events[i : i + FRAME_EVENTS]), len(events[i : i + FRAME_EVENTS]))
        for i in range(0, len(events), FRAME_EVENTS)
    ]


class Subscriber:
    """One client's bounded queue of frames."""

    def __init__(self, hub: Hub, peer: str, max_events: int, max_bytes: int) -> None:
        self.hub = hub
        self.peer = peer
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.queue: deque[tuple[bytes, int]] = deque()
        self.queued_events = 0
        self.queued_bytes = 0
        self.missed = 0  # events lost since the last stream.reset
        self.needs_reset = False
        self.wake = asyncio.Event()

    def offer(self, frames: list[tuple[bytes, int]]) -> None:
        for frame, n in frames:
            if self.needs_reset:
                self.missed += n
                self.hub.dropped_events += n
                continue
            # Bounded, but one frame always fits: a flush can exceed a small bound by itself.
            over = self.queued_events + n > self.max_events or self.queued_bytes + len(frame) > self.max_bytes
            if over and self.queue:
                lost = self.queued_events + n
                self.missed += lost
                self.hub.dropped_events += lost
                self.hub.overflows += 1
                self.queue.clear()
                self.queued_events = self.queued_bytes = 0
                self.needs_reset = True
                log.warning(
                    "client %s is too slow: dropped %d queued events; it will get a stream.reset", self.peer, lost
                )
                continue
            self.queue.append((frame, n))
            self.queued_events += n
            self.queued_bytes += len(frame)
        self.wake.set()

    def take(self) -> list[bytes]:
        """Frames to send now; after an overflow, a reset notice and a fresh snapshot first."""
        frames = []
        if self.needs_reset:
            self.needs_reset = False
            frames.append(
                orjson.dumps(
                    {
                        "type": STREAM_RESET,
                        "reason": "overflow",
                        "missedEvents": self.missed,
                        "timestamp": self.hub.now(),
                        "nodeName": self.hub.node_name,
                    }
                )
            )
            self.missed = 0
            frames.extend(f for f, _ in self.hub.snapshot_frames())
        while self.queue:
            frame, n = self.queue.popleft()
            self.queued_events -= n
            self.queued_bytes -= len(frame)
            frames.append(frame)
        self.wake.clear()
        return frames


class Hub:
    def __init__(
        self,
        node_name: str,
        snapshot: Callable[[], list[Event]],
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
        # metrics
        self.dropped_events = 0
        self.overflows = 0
        self.clients_total = 0
        self.published_events = 0

    def snapshot_frames(self) -> list[tuple[bytes, int]]:
        events = self._snapshot()
        events.append(
            {"type": SNAPSHOT_COMPLETE, "timestamp": self.now(), "nodeName": self.node_name, "count": len(events)}
        )
        return encode_frames(events)

    def subscribe(self, peer: str, first: Event) -> Subscriber | None:
        """New client: `first` (host.info), the snapshot, then live frames. None when full."""
        if len(self.subscribers) >= self.max_clients:
            return None
        sub = Subscriber(self, peer, self.client_max_events, self.client_max_bytes)
        # Queued directly, outside the bounds: a snapshot is as big as the state.
        sub.queue.append((orjson.dumps(first), 0))
        for frame, _ in self.snapshot_frames():
            sub.queue.append((frame, 0))
        sub.wake.set()
        self.subscribers.add(sub)
        self.clients_total += 1
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def publish(self, events: list[Event]) -> None:
        if not events:
            return
        self.published_events += len(events)
        if not self.subscribers:
            return
        frames = encode_frames(events)
        for sub in self.subscribers:
            sub.offer(frames)
