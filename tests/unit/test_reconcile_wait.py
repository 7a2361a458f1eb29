"""The sock_diag check waits for the kernel records written before it (agent.records_taken_in).

A socket that closed just before the dump is missing from it while its CLOSE record is still on
its way; checking before that record is taken in would close the connection as "gone" and drop the
states the record carries.
"""

import asyncio
import time

from netstatd.agent import records_taken_in
from netstatd.sources.bpf import events as ev
from netstatd.sources.procfs import ProcessCache
from netstatd.state.tracker import Tracker

from .test_tracker import rec

FIN_WAIT2 = 5


async def test_waits_until_the_records_written_so_far_are_taken_in(tmp_path):
    tracker = Tracker("n", ProcessCache(proc_root=str(tmp_path)))
    record = rec(ev.EV_TCP_STATE, cookie=7, old=FIN_WAIT2, new=ev.TCP_CLOSE)

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
    tracker = Tracker("n", ProcessCache(proc_root=str(tmp_path)))
    t0 = time.monotonic()
    assert not await records_taken_in(tracker, emitted=3, timeout_s=0.1)
    assert time.monotonic() - t0 < 1.0
