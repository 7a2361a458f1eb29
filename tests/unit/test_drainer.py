"""sources/bpf/drainer.py with a fake reader: chunks reach deliver() on the event loop, in order; a loop
that falls behind stalls the thread (counted); a failing batch is counted and reported, and the next
goes on; an exception in the thread ends run(). No root, no kernel."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable

import pytest

from netstatd.sources.bpf.drainer import RingDrainer
from netstatd.sources.bpf.events import RECORD_SIZE, pack_record

pytestmark = pytest.mark.timeout(30)


class FakeReader:
    """RingSet.read() from a list of chunks (b"" once they are gone); read() runs on the drainer's thread."""

    def __init__(self, chunks: list[bytes], error: BaseException | None = None) -> None:
        self.chunks = deque(chunks)
        self.error = error  # raised by read() once the chunks are gone
        self.reads = 0

    def read(self) -> bytes:
        self.reads += 1
        if self.chunks:
            return self.chunks.popleft()
        if self.error is not None:
            raise self.error
        return b""


def chunk(first: int, n: int) -> bytes:
    return b"".join(pack_record(cookie=c) for c in range(first, first + n))


async def until(cond: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not true in time"
        await asyncio.sleep(0.005)


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def no_report(task: str, error: BaseException, what: str) -> None:
    raise AssertionError(f"unexpected report: {task} {error!r} {what}")


async def test_chunks_are_delivered_in_order_on_the_loop():
    chunks = [chunk(10 * i, i + 1) for i in range(5)]
    got: list[bytes] = []
    threads: set[int] = set()

    def deliver(c: bytes) -> None:
        got.append(c)
        threads.add(threading.get_ident())

    drainer = RingDrainer(FakeReader(chunks), asyncio.get_running_loop(), deliver, report=no_report, interval_s=0.001)
    task = asyncio.create_task(drainer.run())
    await until(lambda: len(got) == len(chunks))
    await stop(task)
    assert got == chunks
    assert threads == {threading.get_ident()}  # the loop's thread, not the drainer's
    assert drainer.stalls == 0 and drainer.failed_records == 0


async def test_a_loop_behind_by_max_backlog_stalls_the_thread_and_loses_nothing():
    chunks = [chunk(i, 1) for i in range(3)]
    reader = FakeReader(chunks)
    got: list[bytes] = []
    drainer = RingDrainer(
        reader, asyncio.get_running_loop(), got.append, report=no_report, interval_s=0.001, max_backlog=RECORD_SIZE
    )
    task = asyncio.create_task(drainer.run())
    await asyncio.sleep(0)  # run() has started its thread
    # The loop is busy (blocked here): the first chunk waits for it, and alone fills the backlog.
    deadline = time.monotonic() + 5
    while reader.reads == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.1)
    assert reader.reads == 1  # the thread stopped reading (the ring would fill, and the kernel count it)
    assert drainer.stalls > 0
    await until(lambda: len(got) == len(chunks))  # the loop catches up, the thread reads on
    await stop(task)
    assert got == chunks


async def test_a_backlog_is_taken_a_slice_at_a_time_with_the_loop_turning_in_between():
    """The loop's other work (WebSocket writes, timers) runs between slices of a backlog, not after it all."""
    n = 8
    chunks = [chunk(i, 1) for i in range(n)]
    reader = FakeReader(chunks)
    got: list[bytes] = []

    def deliver(c: bytes) -> None:
        time.sleep(0.003)  # a chunk that takes a while to decode
        got.append(c)

    loop = asyncio.get_running_loop()
    drainer = RingDrainer(reader, loop, deliver, report=no_report, interval_s=0.001, slice_s=0.005)
    task = asyncio.create_task(drainer.run())
    await asyncio.sleep(0)  # run() has started its thread
    # The loop is busy (blocked here) while the thread reads every chunk: a backlog.
    deadline = time.monotonic() + 5
    while reader.reads <= n and time.monotonic() < deadline:
        time.sleep(0.001)
    seen_between: list[int] = []
    while len(got) < n:
        await asyncio.sleep(0)  # a turn of the loop: what the other work sees
        seen_between.append(len(got))
    await stop(task)
    assert got == chunks
    assert any(0 < k < n for k in seen_between), seen_between


async def test_a_batch_that_fails_is_counted_and_reported_and_the_next_goes_on():
    chunks = [chunk(0, 1), chunk(10, 2), chunk(20, 3)]
    reports: list[tuple[str, BaseException, str]] = []
    got: list[bytes] = []
    bug = ValueError("tracker bug")

    def deliver(c: bytes) -> None:
        if c == chunks[1]:
            raise bug
        got.append(c)

    drainer = RingDrainer(
        FakeReader(chunks), asyncio.get_running_loop(), deliver, report=lambda *r: reports.append(r), interval_s=0.001
    )
    task = asyncio.create_task(drainer.run())
    await until(lambda: len(got) == 2)
    await stop(task)
    assert got == [chunks[0], chunks[2]]
    assert drainer.failed_records == 2
    assert reports == [("ingest", bug, "the 2 kernel records of this batch are lost")]


async def test_run_ends_with_the_exception_of_the_thread():
    boom = OSError("ring gone")
    got: list[bytes] = []
    drainer = RingDrainer(
        FakeReader([chunk(0, 1)], error=boom),
        asyncio.get_running_loop(),
        got.append,
        report=no_report,
        interval_s=0.001,
    )
    with pytest.raises(OSError, match="ring gone"):
        await asyncio.wait_for(drainer.run(), 5)
    assert got == [chunk(0, 1)]  # what it read before is still delivered
