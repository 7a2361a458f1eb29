"""Keeps the node's container index in step with containerd: list, then follow events; reconnect.

On every (re)connect the event stream is opened first and the full listing taken after, so a change
made while listing arrives as an event and one made while containerd was down is in the listing; the
listing replaces the index (stale containers deleted, missing ones added). Events are applied by
fetching that container again, so applying one twice or after the listing is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc

from ...state.containers import ContainerIndex
from ...supervisor import failpoint
from .client import ContainerdClient, ContainerdEvent, ContainerdUnavailable
from .inventory import build_all, build_container, build_pod, is_sandbox

log = logging.getLogger("netstatd.containerd")

Event = dict[str, Any]
SUBSCRIBE_SETTLE_S = 0.05  # lets the Subscribe call reach the daemon before the listing starts


class ContainerdFollower:
    def __init__(
        self,
        socket_path: str,
        index: ContainerIndex,
        publish: Callable[[list[Event]], None],
        *,
        proc_root: str = "/proc",
        cgroup_root: str = "",
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        on_task_start: Callable[[int, str], None] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.index = index
        self.publish = publish
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root  # the cgroup v2 mount, for containers' cgroup ids ("" = none)
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        # (netns inode, a path that opens it) of a task that started: the agent scans its listeners
        self.on_task_start = on_task_start
        self.connected = False
        self.connects = 0  # successful listings, for the metrics
        self._down_logged = False
        self.first_attempt = asyncio.Event()  # set once the first connect has succeeded or failed

    async def run(self) -> None:
        """Forever: connect, list, follow; when containerd is down or restarts, log once, back off, retry.
        Anything else is a bug, for the supervisor (it logs it and starts this again)."""
        delay = self.min_backoff_s
        while True:
            before = self.connects
            client = ContainerdClient(self.socket_path)
            try:
                await self._session(client)
            except ContainerdUnavailable as e:
                self._went_down(str(e))
            except grpc.aio.AioRpcError as e:
                self._went_down(f"containerd at {self.socket_path}: {e.code().name} {e.details()}")
            finally:
                self.connected = False
                await client.close()
            self.first_attempt.set()
            if self.connects != before:
                delay = self.min_backoff_s  # it was up: a restart, come back quickly
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)

    def _went_down(self, why: str) -> None:
        # Once per outage: a node without containerd stays quiet after this line.
        if not self._down_logged:
            self._down_logged = True
            log.warning("%s; serving host data only, retrying in the background", why)

    async def _session(self, client: ContainerdClient) -> None:
        client.connect()
        queue: asyncio.Queue[ContainerdEvent | Exception] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for e in client.events():
                    queue.put_nowait(e)
            except Exception as exc:  # handed to the session, which raises it
                queue.put_nowait(exc)

        pump_task = asyncio.create_task(pump(), name="containerd-events")
        try:
            await asyncio.sleep(SUBSCRIBE_SETTLE_S)
            containers = await client.list_containers()
            tasks = await client.list_tasks()
            sandboxes = await client.list_pod_sandboxes()
            pods, records = build_all(containers, tasks, sandboxes, self.proc_root, self.cgroup_root)
            self.publish(self.index.replace(pods, records))
            self.connected = True
            self.connects += 1
            self.first_attempt.set()
            if self._down_logged or self.connects == 1:
                log.info(
                    "containerd at %s: following %d containers in %d pods", self.socket_path, len(records), len(pods)
                )
            self._down_logged = False
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                failpoint("containerd")
                await self._apply(client, item)
        finally:
            pump_task.cancel()
            await asyncio.gather(pump_task, return_exceptions=True)

    async def _apply(self, client: ContainerdClient, e: ContainerdEvent) -> None:
        if not e.container_id or e.exec_id:
            return
        if e.kind == "ContainerDelete":
            self.index.remove_pod(e.container_id)
            self.publish(self.index.remove(e.container_id))
        elif e.kind in ("ContainerCreate", "ContainerUpdate", "TaskStart"):
            netns = await self._refresh(client, e.namespace, e.container_id)
            if e.kind == "TaskStart" and netns and e.pid and self.on_task_start is not None:
                self.on_task_start(netns, f"{self.proc_root}/{e.pid}/ns/net")

    async def _refresh(self, client: ContainerdClient, namespace: str, container_id: str) -> int:
        """Fetch one container (and its pod when new) into the index. Returns its netns inode (0 unknown)."""
        found = await client.list_containers([namespace], filters=(f"id=={container_id}",))
        if not found:
            self.publish(self.index.remove(container_id))
            return 0
        c = found[0]
        sandbox_id = c.pod_sandbox_id
        # The pod: when its sandbox starts, or for a container whose pod we have not seen.
        if sandbox_id and (is_sandbox(c) or sandbox_id not in self.index.pods):
            try:
                self.index.put_pod(build_pod(await client.pod_sandbox(sandbox_id), self.proc_root))
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:  # not in the CRI store yet: its TaskStart follows
                    raise
        if is_sandbox(c):
            pod = self.index.pods.get(container_id)
            return pod.netns if pod else 0
        pid = 0
        for t in await client.list_tasks([namespace]):
            if t.container_id == container_id and t.status == "RUNNING":
                pid = t.pid
        record = build_container(c, self.index.pods, pid, self.proc_root, self.cgroup_root)
        self.publish(self.index.put(record))
        return record.netns
