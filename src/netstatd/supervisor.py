"""One supervisor for every background loop: an unexpected exception is handled the same way everywhere.

A loop that raises anything but CancelledError is logged once at ERROR with its traceback, counted in
netstatd_internal_errors_total{task}, and started again after a backoff (doubling from MIN_BACKOFF_S
to MAX_BACKOFF_S, back to the minimum once a run lasted HEALTHY_S). A loop that returns is done.
Work that is not a loop (a DNSTap frame consumer, a WebSocket sender) reports through report().

Fault injection, for tests: NETSTATD_FAILPOINTS=flush,reconcile,... arms those names; each loop calls
failpoint(its name) once per iteration, and an armed name raises InjectedFault there, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable

from .metrics import Metric

log = logging.getLogger("netstatd")

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
HEALTHY_S = 60.0

_armed: set[str] = {x.strip() for x in os.environ.get("NETSTATD_FAILPOINTS", "").split(",") if x.strip()}


class InjectedFault(RuntimeError):
    """Raised by an armed failpoint (NETSTATD_FAILPOINTS)."""


def failpoint(name: str) -> None:
    if _armed and name in _armed:
        _armed.discard(name)
        raise InjectedFault(f"fault injected into {name} (NETSTATD_FAILPOINTS)")


def arm(*names: str) -> None:
    """Arm failpoints in this process (tests)."""
    _armed.update(names)


class Supervisor:
    def __init__(self, min_backoff_s: float = MIN_BACKOFF_S, max_backoff_s: float = MAX_BACKOFF_S) -> None:
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.errors: dict[str, int] = {}  # task name -> unexpected exceptions
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, name: str, loop: Callable[[], Awaitable[None]], *, label: str | None = None) -> asyncio.Task:
        """Run loop() until it returns, restarting it after an unexpected exception.

        label: the task's name in the metric and the log when `name` is one of many (peer-10.0.0.1 -> peer).
        """
        self.errors.setdefault(label or name, 0)  # every task shows in the metric, at 0 until it fails
        task = asyncio.create_task(self._run(label or name, loop), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, label: str, loop: Callable[[], Awaitable[None]]) -> None:
        backoff = self.min_backoff_s
        while True:
            started = time.monotonic()
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if time.monotonic() - started >= HEALTHY_S:
                    backoff = self.min_backoff_s
                self.report(label, e, f"restarting in {backoff:.1f} s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def declare(self, *labels: str) -> None:
        """Tasks that only report (no loop of their own): shown in the metric at 0 from the start."""
        for label in labels:
            self.errors.setdefault(label, 0)

    def report(self, label: str, exc: BaseException, consequence: str) -> None:
        """An unexpected exception in `label`: one ERROR line with its traceback, and the counter."""
        self.errors[label] = self.errors.get(label, 0) + 1
        log.error("internal error in %s (%s): %s", label, consequence, exc, exc_info=exc)

    async def stop(self) -> None:
        """Cancel every task still running and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def metrics(self) -> list[Metric]:
        return [
            Metric(
                "netstatd_internal_errors_total",
                "counter",
                "Unexpected exceptions by task; each is logged with its traceback, and the task restarted.",
                [({"task": t}, n) for t, n in sorted(self.errors.items())],
            )
        ]
