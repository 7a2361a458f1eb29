"""The sock_diag check waits for the kernel records written before it (diag.records_taken_in).

A socket that closed just before the dump is missing from it while its CLOSE record is still on
its way; checking before that record is taken in would close the connection as "gone" and drop the
states the record carries.
"""

import asyncio
import time

from netstatd.diag import records_taken_in
from netstatd.protocol import TCP_CLOSE, TCP_FIN_WAIT2
from netstatd.sources.bpf import events as ev
from netstatd.state.tracker import Tracker

from .test_tracker import rec


async def test_waits_until_the_records_written_so_far_are_taken_in(tmp_path):
    tracker = Tracker()
    record = rec(ev.EV_TCP_STATE, cookie=7, old=TCP_FIN_WAIT2, new=TCP_CLOSE)

    async def arrive() -> None:
        await asyncio.sleep(0.15)
        tracker.ingest(record)

    late = asyncio.create_task(arrive())
    t0 = time.monotonic()
    assert await records_taken_in(tracker, emitted=1)
    assert time.monotonic() - t0 >= 0.1
    assert tracker.records_ingested == 1
    await late


async def test_gives_up_after_its_timeout(tmp_path):
    tracker = Tracker()
    t0 = time.monotonic()
    assert not await records_taken_in(tracker, emitted=3, timeout_s=0.1)
    assert time.monotonic() - t0 < 1.0
