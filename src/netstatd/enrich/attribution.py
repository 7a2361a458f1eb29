"""Who owns a socket: a container (by the owner's pid), else a pod (by the socket's netns), else the host.

Called per connection and port event at flush time, never per kernel record. Every step is a cached
lookup: the process cache already holds the pid's start time, PidContainers maps (pid, start time) to
a container id, and the index maps that to prebuilt fields.
"""

from __future__ import annotations

from typing import Any

from ..sources.procfs import ProcessCache
from ..state.containers import HOST_FIELDS, ContainerIndex
from .cgroups import CgroupOwner, PidContainers

Event = dict[str, Any]


class Attribution:
    def __init__(self, index: ContainerIndex, processes: ProcessCache, pids: PidContainers) -> None:
        self.index = index
        self.processes = processes
        self.pids = pids

    def container_of(self, pid: int) -> CgroupOwner | None:
        """The container of a live pid (also warms the cache: the tracker calls it when a pid is new)."""
        if not pid:
            return None
        return self.pids.lookup(pid, self.processes.lookup(pid).start_time)

    def owner(self, pid: int, netns: int) -> Event:
        """Fields to add to an event whose socket is owned by pid and lives in netns."""
        return self.fields(self.container_of(pid), netns)

    def fields(self, found: CgroupOwner | None, netns: int, cgroup_id: int = 0) -> Event:
        """Fields for a socket of a process in container `found` (None: not in one or gone), living in netns.

        cgroup_id (from the kernel record) names the container when the process exited before /proc
        could be read. HOST_FIELDS (that very object) when none of them says.
        """
        index = self.index
        if found is None and cgroup_id:
            fields = index.cgroup_fields(cgroup_id)
            if fields is not None:
                return fields
        if found is not None:
            fields = index.container_fields(found.container_id)
            if fields is not None:
                return fields
            if not found.certain:  # a host cgroup shaped like /<namespace>/<id>
                found = None
        if found is not None:
            # A container containerd has not told us about yet (it just started, or containerd is
            # down): what the cgroup and the netns say.
            pod = index.netns_fields(netns) or {"host": False, "podUID": found.pod_uid or None}
            return {**pod, "containerId": found.container_id}
        pod = index.netns_fields(netns)
        if pod is not None:
            return pod
        return HOST_FIELDS

    def remote(self, ip: str) -> Event | None:
        return self.index.remote_fields(ip)
