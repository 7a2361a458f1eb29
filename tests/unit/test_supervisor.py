"""The supervisor: an unexpected exception is logged with its traceback, counted and the loop started
again with backoff; a cancel stops it; failpoints fire once."""

import asyncio
import logging

import pytest

from netstatd import supervisor as sup
from netstatd.supervisor import InjectedFault, Supervisor, arm, failpoint


async def test_a_failing_loop_is_logged_counted_and_restarted(caplog):
    s = Supervisor(min_backoff_s=0.01, max_backoff_s=0.04)
    runs = 0
    done = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise KeyError(f"bug {runs}")
        done.set()
        await asyncio.sleep(3600)

    with caplog.at_level(logging.ERROR, logger="netstatd"):
        s.spawn("flush", loop)
        await asyncio.wait_for(done.wait(), 5)
    assert runs == 4 and s.errors == {"flush": 3}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all(r.exc_info and "flush" in r.getMessage() for r in errors)
    metric = s.metrics()[0]
    assert metric.name == "netstatd_internal_errors_total" and list(metric.samples) == [({"task": "flush"}, 3)]
    await s.stop()


async def test_the_backoff_doubles_up_to_the_maximum(monkeypatch):
    s = Supervisor(min_backoff_s=0.5, max_backoff_s=2.0)
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(0)

    async def always_fails() -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(sup.asyncio, "sleep", fake_sleep)
    task = s.spawn("x", always_fails)
    while len(sleeps) < 5:
        await real_sleep(0.001)
    task.cancel()
    assert sleeps[:5] == [0.5, 1.0, 2.0, 2.0, 2.0]


async def test_a_loop_that_returns_is_done_and_stop_cancels_the_others():
    s = Supervisor()
    finished = s.spawn("once", lambda: asyncio.sleep(0))
    forever = s.spawn("forever", lambda: asyncio.sleep(3600))
    await asyncio.wait_for(finished, 1)
    await s.stop()
    assert forever.cancelled() and s.errors == {"once": 0, "forever": 0}


async def test_one_label_for_many_tasks():
    s = Supervisor()
    s.spawn("peer-10.0.0.1", lambda: asyncio.sleep(3600), label="peer")
    s.spawn("peer-10.0.0.2", lambda: asyncio.sleep(3600), label="peer")
    assert s.errors == {"peer": 0}
    await s.stop()


def test_a_failpoint_fires_once():
    failpoint("not-armed")
    arm("x")
    with pytest.raises(InjectedFault):
        failpoint("x")
    failpoint("x")
