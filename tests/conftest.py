import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from netstatd.sources.bpf.loader import OBJECT_PATH
from netstatd.testing.agent import AgentProcess

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


def object_btf() -> dict[str, dict]:
    """The named types of the compiled BPF object's BTF (bpftool's JSON), by name."""
    if not OBJECT_PATH.exists():
        pytest.fail(f"{OBJECT_PATH} is not built: run 'make setup'")
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(OBJECT_PATH)], check=True, capture_output=True, text=True
    ).stdout
    return {t["name"]: t for t in json.loads(out)["types"] if t.get("name")}


def wait_until(cond: Callable[[], object], timeout: float = 15, what: str = "condition") -> None:
    """Polls cond until it is true; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not true within {timeout} s"
        time.sleep(0.1)


def own_agent(tmp_path_factory, *args: str, **kw: Any) -> Iterator[AgentProcess]:
    """A module fixture's agent (needs root), with these arguments (kw: AgentProcess's); the end of
    its log is printed after, for a failure's report."""
    require_root()
    log = tmp_path_factory.mktemp("agent") / "netstatd.log"
    with AgentProcess(*args, log_path=log, **kw) as proc:
        yield proc
    print(proc.log_text()[-3000:])
