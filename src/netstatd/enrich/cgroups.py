"""pid -> container, from /proc/PID/cgroup.

A container's processes live in a cgroup whose path ends in the container id. The three shapes kubelet
and containerd produce:

- cgroupfs driver: `/kubepods/<qos>/pod<uid>/<id>` (guaranteed QoS: `/kubepods/pod<uid>/<id>`);
- systemd driver: `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope`
  (the pod uid with `_` for `-`);
- plain containerd: `/<namespace>/<id>` (any containerd id: only an uncertain match unless 64 hex).

On a hybrid host the unified (`0::`) line can be `/` while a v1 controller line carries the path, or the
other way round, so every line is tried, the unified one first.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

from ..metrics import Metric, single
from ..sources.procfs import parse_stat

_ID = re.compile(r"[0-9a-f]{64}")
# a systemd scope named after the runtime: cri-containerd-<id>.scope, also docker-/crio- on other nodes
_SCOPE = re.compile(r"(?:cri-containerd|containerd|docker|crio)-([0-9a-f]{64})\.scope")
# the pod component: `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_>.slice` (systemd)
_POD = re.compile(r"(?:^|-)pod([0-9a-fA-F_-]+?)(?:\.slice)?$")


# containerd's id rule; a `/<namespace>/<id>` path with such an id may be a container (ctr run ids need
# not be hex), or a host cgroup like /user.slice/...: only the container index can tell.
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,75}")
_UNIT_SUFFIXES = (".slice", ".scope", ".service", ".mount", ".socket")


@dataclass(frozen=True, slots=True)
class CgroupOwner:
    container_id: str
    pod_uid: str  # "" outside a kubepods hierarchy
    certain: bool = True  # False: a plain `/<namespace>/<id>` path whose id is not 64 hex digits


def container_from_path(path: str) -> CgroupOwner | None:
    """The container a cgroup path belongs to, or None for a host cgroup.

    The deepest component that names a container wins: processes may sit in a child cgroup of the
    container's own (systemd inside a container, cgroup v2 leaf rules).
    """
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts) - 1, -1, -1):
        part = parts[i]
        m = _SCOPE.fullmatch(part)
        cid = m[1] if m else (part if _ID.fullmatch(part) else "")
        if not cid:
            continue
        uid = ""
        if any(p.startswith("kubepods") for p in parts[:i]):
            for p in reversed(parts[:i]):
                pm = _POD.search(p)
                if pm:
                    uid = pm[1].replace("_", "-")
                    break
        return CgroupOwner(cid, uid)
    plain = len(parts) == 2 and not parts[0].startswith("kubepods") and _PLAIN_ID.fullmatch(parts[1])
    if plain and not any(p.endswith(_UNIT_SUFFIXES) for p in parts):
        return CgroupOwner(parts[1], "", certain=False)
    return None


def container_from_cgroup_file(text: str) -> CgroupOwner | None:
    """Parse the text of /proc/PID/cgroup (`hierarchy:controllers:path` lines)."""
    paths = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        _, _, path = rest.partition(":")
        if hierarchy == "0":
            paths.insert(0, path)  # the unified hierarchy first
        else:
            paths.append(path)
    uncertain = None
    for path in paths:
        owner = container_from_path(path)
        if owner is not None:
            if owner.certain:
                return owner
            uncertain = uncertain or owner
    return uncertain


class PidContainers:
    """(pid, start time) -> CgroupOwner | None, read from /proc on a miss; bounded LRU.

    The start time (field 22 of /proc/PID/stat) is part of the key, so a reused pid is a different key
    and is never given the previous process's container. A process that is gone is not cached.
    """

    def __init__(self, proc_root: str = "/proc", capacity: int = 16384) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.proc_root = proc_root
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, int], CgroupOwner | None] = OrderedDict()
        self.misses = 0  # /proc reads, for the metrics

    def metrics(self) -> list[Metric]:
        return [
            single(
                "netstatd_cgroup_lookups_total",
                "counter",
                "/proc/PID/cgroup reads (pid -> container cache misses).",
                self.misses,
            )
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def start_time(self, pid: int) -> int | None:
        try:
            with open(f"{self.proc_root}/{pid}/stat", "rb") as f:
                return parse_stat(f.read().decode(errors="replace"))[1]
        except (OSError, ValueError, IndexError):
            return None

    def lookup(self, pid: int, start_time: int | None = None) -> CgroupOwner | None:
        """The container of pid; start_time from the caller's process cache when it has one (0 = unknown)."""
        if pid <= 0:
            return None
        if not start_time:
            start_time = self.start_time(pid)
            if start_time is None:
                return None
        key = (pid, start_time)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        try:
            with open(f"{self.proc_root}/{pid}/cgroup", "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        # The pid may have been reused between the caller's stat read and ours: check again after.
        if self.start_time(pid) != start_time:
            return None
        owner = container_from_cgroup_file(text)
        self._entries[key] = owner
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return owner
