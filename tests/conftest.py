import os
import time
from collections.abc import Callable

import pytest

IN_CI = bool(os.environ.get("CI"))


def require(condition: object, reason: str) -> None:
    """What a test needs from the machine (root, a Debian package): without it, skip with the reason
    printed locally, and fail in CI (`CI` set), where everything a test needs is installed."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason}, and CI is set: this test must run there")
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    """Kernel and namespace tests need root."""
    require(os.geteuid() == 0, "needs root (loads eBPF programs / creates network namespaces); run 'make test' as root")


def wait_until(cond: Callable[[], object], timeout: float = 15, what: str = "condition") -> None:
    """Polls cond until it is true; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not true within {timeout} s"
        time.sleep(0.1)
