"""pid -> container from /proc/PID/cgroup: every path shape, hybrid hosts, pid reuse, the LRU bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from netstatd.enrich.cgroups import CgroupOwner, PidContainers, container_from_cgroup_file, container_from_path
from tests.unit.test_procfs import stat_line

CID = "0123456789abcdef" * 4
UID = "8f2d6c1e-3b4a-4c5d-9e6f-7a8b9c0d1e2f"
UID_ = UID.replace("-", "_")

V1_HOST = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/b06be9e295fc5ec6c5bda1568822a3fd\n1:cpu:/\n"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/kubepods/besteffort/pod{UID}/{CID}", CgroupOwner(CID, UID)),
        (f"/kubepods/burstable/pod{UID}/{CID}", CgroupOwner(CID, UID)),
        (f"/kubepods/pod{UID}/{CID}", CgroupOwner(CID, UID)),  # guaranteed QoS has no qos level
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
            CgroupOwner(CID, UID),
        ),
        (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope", CgroupOwner(CID, UID)),
        (f"/k8s.io/{CID}", CgroupOwner(CID, "")),
        (f"/netstatd-test/{CID}", CgroupOwner(CID, "")),
        (f"/kubepods/besteffort/pod{UID}/{CID}/init.scope", CgroupOwner(CID, UID)),  # a child cgroup
        ("/", None),
        ("/system.slice/ssh.service", None),
        # /<namespace>/<id> with a non-hex id: maybe a ctr container, maybe a host cgroup (the index decides)
        ("/netstatd-test/plain-1", CgroupOwner("plain-1", "", certain=False)),
        ("/process_api/b06be9e295fc5ec6c5bda1568822a3fd", CgroupOwner("b06be9e295fc5ec6c5bda1568822a3fd", "", False)),
        ("/user.slice/user-0.slice", None),
        ("/a/b/c", None),
        (f"/kubepods/besteffort/pod{UID}", None),  # the pod's own cgroup holds no process of a container
    ],
)
def test_paths(path: str, expected: CgroupOwner | None) -> None:
    assert container_from_path(path) == expected


def test_unified_line() -> None:
    assert container_from_cgroup_file(f"0::/kubepods/besteffort/pod{UID}/{CID}\n") == CgroupOwner(CID, UID)


def test_hybrid_v1_line_when_unified_is_root() -> None:
    text = V1_HOST.replace("8:pids:/", f"8:pids:/kubepods/besteffort/pod{UID}/{CID}") + "0::/\n"
    assert container_from_cgroup_file(text) == CgroupOwner(CID, UID)


def test_hybrid_unified_line_wins() -> None:
    text = f"5:memory:/k8s.io/{'f' * 64}\n0::/kubepods/pod{UID}/{CID}\n"
    assert container_from_cgroup_file(text) == CgroupOwner(CID, UID)


def test_certain_match_beats_uncertain() -> None:
    text = f"4:memory:/process_api/{'b' * 32}\n8:pids:/kubepods/pod{UID}/{CID}\n0::/\n"
    assert container_from_cgroup_file(text) == CgroupOwner(CID, UID)


def test_host_process() -> None:
    assert container_from_cgroup_file("9:name=systemd:/\n1:cpu:/\n0::/\n") is None
    # this VM's own shape: only an uncertain /<a>/<b> match, which the container index will not know
    owner = container_from_cgroup_file(V1_HOST + "0::/\n")
    assert owner is not None and not owner.certain
    assert container_from_cgroup_file("") is None


def make_pid(proc: Path, pid: int, cgroup: str, start: int) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(stat_line(pid, "app", start))
    (d / "cgroup").write_text(cgroup)


def test_cache_by_pid_and_start_time(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    make_pid(proc, 42, f"0::/kubepods/pod{UID}/{CID}\n", start=1000)
    cache = PidContainers(str(proc))
    assert cache.lookup(42) == CgroupOwner(CID, UID)
    assert cache.lookup(42, 1000) == CgroupOwner(CID, UID)
    assert cache.misses == 1
    # pid 42 exits and is reused by a host process: a new start time, never the old container
    make_pid(proc, 42, "0::/\n", start=2000)
    assert cache.lookup(42) is None
    assert cache.lookup(42, 2000) is None
    assert cache.misses == 2
    # a caller still holding the old start time does not get the new process's answer cached under it
    assert cache.lookup(42, 1000) == CgroupOwner(CID, UID)


def test_stale_start_time_is_not_cached(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    make_pid(proc, 7, f"0::/k8s.io/{CID}\n", start=5)
    cache = PidContainers(str(proc))
    assert cache.lookup(7, 4) is None  # the caller's start time is of an earlier process
    assert len(cache) == 0


def test_gone_process(tmp_path: Path) -> None:
    cache = PidContainers(str(tmp_path))
    assert cache.lookup(99) is None
    assert cache.lookup(0) is None
    assert len(cache) == 0


def test_bounded(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid in range(1, 6):
        make_pid(proc, pid, f"0::/k8s.io/{CID}\n", start=pid)
    cache = PidContainers(str(proc), capacity=3)
    for pid in range(1, 6):
        cache.lookup(pid)
    assert len(cache) == 3
    cache.lookup(3)  # still cached
    assert cache.misses == 5
    cache.lookup(1)  # evicted first
    assert cache.misses == 6
