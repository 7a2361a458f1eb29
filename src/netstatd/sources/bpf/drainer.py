"""Drains the kernel ring buffer on its own thread and hands chunks to the event loop.

The thread only copies bytes out of the ring, so the ring stays nearly empty
even while the event loop is busy (a large snapshot, a GC pause). Decoding
happens on the loop. If the loop falls more than `max_backlog` bytes behind,
the thread stops draining: the ring fills and the kernel counts the loss
(netstatd_kernel_events_lost_total), so loss is counted in one place.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable

from .events import RECORD_SIZE
from .ringbuf import RingReader

log = logging.getLogger("netstatd.bpf")


class RingDrainer:
    def __init__(
        self,
        reader: RingReader,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[bytes], None],
        *,
        interval_s: float = 0.010,
        max_backlog: int = 64 << 20,
    ) -> None:
        self._reader = reader
        self._loop = loop
        self._deliver = deliver
        self._interval = interval_s
        self._max_backlog = max_backlog
        self._chunks: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._backlog = 0
        self._scheduled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ring-drainer", daemon=True)
        self.stalls = 0  # times the loop was too far behind to take more
        self.failed_records = 0  # records in batches that failed to apply (at most: a batch may fail part way)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                full = self._backlog >= self._max_backlog
            if full:
                self.stalls += 1
                continue
            chunk = self._reader.read()
            if not chunk:
                continue
            with self._lock:
                self._chunks.append(chunk)
                self._backlog += len(chunk)
                schedule = not self._scheduled
                self._scheduled = True
            if schedule:
                try:
                    self._loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # loop closed during shutdown
                    return

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._chunks:
                    self._scheduled = False
                    return
                chunk = self._chunks.popleft()
                self._backlog -= len(chunk)
            try:
                self._deliver(chunk)
            except Exception:
                self.failed_records += len(chunk) // RECORD_SIZE
                log.exception("failed to apply a batch of %d bytes of kernel records", len(chunk))
