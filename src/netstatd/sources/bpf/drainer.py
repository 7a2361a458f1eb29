"""Drains the kernel ring buffers (every CPU's, merged: ringbuf.RingSet) on its own thread and hands
chunks to the event loop.

The thread only copies bytes out of the ring, so the ring stays nearly empty
even while the event loop is busy (a large snapshot, a GC pause). Decoding
happens on the loop, `slice_s` at a time: a backlog is taken in turns with the
loop's other work (its WebSocket writes above all), never in one long run. If
the loop falls more than `max_backlog` bytes behind,
the thread stops draining: the ring fills and the kernel counts the loss
(netstatd_kernel_events_lost_total), so loss is counted in one place.

run() is the supervised task: it lasts as long as the thread, and an exception in the thread ends
it, so the supervisor logs it and starts a new thread. A batch that fails to apply is reported
(task "ingest") and its records are counted as lost; the next batch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from ...metrics import Metric, single
from ...supervisor import failpoint
from .events import RECORD_SIZE
from .ringbuf import RingSet

log = logging.getLogger("netstatd.bpf")


class RingDrainer:
    def __init__(
        self,
        reader: RingSet,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[bytes], None],
        *,
        report: Callable[[str, BaseException, str], None],
        interval_s: float = 0.010,
        slice_s: float = 0.010,
        max_backlog: int = 64 << 20,
    ) -> None:
        self._reader = reader
        self._loop = loop
        self._deliver = deliver
        self._report = report
        self._interval = interval_s
        self._slice = slice_s
        self._max_backlog = max_backlog
        self._chunks: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._backlog = 0
        self._scheduled = False
        self._stop = threading.Event()
        self.stalls = 0  # times the loop was too far behind to take more
        self.failed_records = 0  # records in batches that failed to apply (at most: a batch may fail part way)

    async def run(self) -> None:
        """Drain on a thread of its own until cancelled; raises what the thread raised."""
        done = self._loop.create_future()

        def finish(error: BaseException | None) -> None:
            if not done.done():
                done.set_exception(error) if error else done.set_result(None)

        def thread_main() -> None:
            error = None
            try:
                self._run()
            except BaseException as e:
                error = e
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                self._loop.call_soon_threadsafe(finish, error)

        self._stop.clear()
        thread = threading.Thread(target=thread_main, name="ring-drainer", daemon=True)
        thread.start()
        try:
            await done
        finally:
            self._stop.set()
            thread.join(timeout=2)  # it wakes every interval_s

    def metrics(self) -> list[Metric]:
        return [
            single(
                "netstatd_ring_records_failed_total",
                "counter",
                "Kernel records lost in batches that failed to apply (internal errors of task ingest).",
                self.failed_records,
            ),
            single(
                "netstatd_ring_drain_stalls_total",
                "counter",
                "Drain ticks skipped because the event loop was behind.",
                self.stalls,
            ),
        ]

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            failpoint("ring")
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
        until = time.monotonic() + self._slice
        while True:
            if time.monotonic() > until:
                # the rest at the loop's next turn, after the I/O and timers due meanwhile
                self._loop.call_soon(self._drain)
                return
            with self._lock:
                if not self._chunks:
                    self._scheduled = False
                    return
                chunk = self._chunks.popleft()
                self._backlog -= len(chunk)
            try:
                self._deliver(chunk)
            except Exception as e:
                self.failed_records += len(chunk) // RECORD_SIZE
                self._report("ingest", e, f"the {len(chunk) // RECORD_SIZE} kernel records of this batch are lost")
