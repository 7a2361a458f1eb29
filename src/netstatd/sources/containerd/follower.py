"""Follows containerd: list, then follow events; reconnect. Reports changes, holds no node state.

On every (re)connect the event stream is opened first and the full listing taken after, so a change
made while listing arrives as an event and one made while containerd was down is in the listing; the
listing (changes.Listed) replaces the whole picture (stale containers deleted, missing ones added).
Events are applied by fetching that container again, so applying one twice or after the listing is
harmless. Every change goes to the on_change callback, in order; the agent applies it to the node state.

CRI is optional: when the CRI API fails (plugin disabled, not ready, hung), containers and tasks are
listed anyway and pods come from the containers' labels (inventory.py); it is logged once, and while
the failure looks passing the listing is taken again every CRI_RETRY_S until CRI answers.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from ...metrics import Metric, single
from ...supervisor import failpoint
from .changes import ContainerGone, ContainerSeen, Listed, OnChange, PodGone, PodSeen, TaskStarted
from .client import ContainerdClient, ContainerdEvent, ContainerdUnavailable, CriUnavailable, PodSandboxInfo
from .inventory import build_all, build_container, build_pod, host_netns, is_sandbox, sandbox_pod_from_labels
from .records import Pod

log = logging.getLogger("netstatd.containerd")

SUBSCRIBE_SETTLE_S = 0.05  # lets the Subscribe call reach the daemon before the listing starts
CRI_RETRY_S = 30.0  # CRI failed but containerd answers: list again this often until CRI does too


class ContainerdFollower:
    def __init__(
        self,
        socket_path: str,
        on_change: OnChange,
        *,
        proc_root: str = "/proc",
        cgroup_root: str = "",
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.socket_path = socket_path
        self.on_change = on_change
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root  # the cgroup v2 mount, for containers' cgroup ids ("" = none)
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.connected = False
        self.connects = 0  # successful listings, for the metrics
        self.cri_available = True  # False from a failed CRI call until one succeeds
        self._down_logged = False
        self._relist_at: float | None = None  # loop time of the next listing while CRI's failure looks passing
        # Pods known from their sandbox in this session (CRI, or the sandbox's labels), so a container
        # event needs no CRI call for a pod already seen. Only the follower's own memory: the node
        # state is the agent's.
        self._pods: dict[str, Pod] = {}
        self._host: frozenset[int] = frozenset()  # the host's netns inodes
        self.first_attempt = asyncio.Event()  # set once the first connect has succeeded or failed

    def metrics(self) -> list[Metric]:
        return [
            single(
                "netstatd_containerd_connected",
                "gauge",
                "1 while the containerd event stream is open.",
                int(self.connected),
            ),
            single(
                "netstatd_containerd_syncs_total",
                "counter",
                "Full listings of containerd (the first connect and every reconnect).",
                self.connects,
            ),
        ]

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

    def _cri_failed(self, why: str, passing: bool = False) -> None:
        """A CRI call failed. passing: not for want of the plugin, so list again later to pick it up."""
        # Once until CRI answers again: a node without the CRI plugin says it once.
        if self.cri_available:
            log.warning("CRI API at %s unavailable (%s); pods come from containers' labels", self.socket_path, why)
        self.cri_available = False
        if passing and self._relist_at is None:
            self._relist_at = asyncio.get_running_loop().time() + CRI_RETRY_S

    def _cri_answered(self) -> None:
        if not self.cri_available:
            log.info("CRI API at %s answers again", self.socket_path)
        self.cri_available = True

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
            pods, containers = await self._list(client)
            self.connected = True
            self.connects += 1
            self.first_attempt.set()
            if self._down_logged or self.connects == 1:
                log.info("containerd at %s: following %d containers in %d pods", self.socket_path, containers, pods)
            self._down_logged = False
            loop = asyncio.get_running_loop()
            while True:
                timeout = None if self._relist_at is None else max(0.0, self._relist_at - loop.time())
                try:
                    item = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:  # CRI was failing: a fresh listing, with it if it answers now
                    await self._list(client)
                    continue
                if isinstance(item, Exception):
                    raise item
                failpoint("containerd")
                await self._apply(client, item)
        finally:
            pump_task.cancel()
            await asyncio.gather(pump_task, return_exceptions=True)

    async def _list(self, client: ContainerdClient) -> tuple[int, int]:
        """The full listing, reported as one Listed change. Returns (pods, containers) counted."""
        self._host = host_netns(self.proc_root)
        containers = await client.list_containers()
        tasks = await client.list_tasks()
        sandboxes = await self._sandboxes(client)
        pods, records = build_all(containers, tasks, sandboxes, self.proc_root, self.cgroup_root, self._host)
        self._pods = {p.sandbox_id: p for p in pods}
        self.on_change(Listed(tuple(pods), tuple(records)))
        implied = {r.pod.sandbox_id for r in records if r.pod is not None} - self._pods.keys()
        return len(pods) + len(implied), len(records)

    async def _sandboxes(self, client: ContainerdClient) -> list[PodSandboxInfo]:
        """CRI's pod sandboxes; [] when CRI fails, and then containerd's own answers decide."""
        self._relist_at = None
        try:
            sandboxes = await client.list_pod_sandboxes()
        except CriUnavailable as e:  # no CRI plugin: it comes back only with a daemon restart (a reconnect)
            self._cri_failed(str(e))
            return []
        except ContainerdUnavailable as e:
            await client.namespaces()  # containerd itself gone too: that outage (raises), not CRI's
            self._cri_failed(str(e), passing=True)
        except grpc.aio.AioRpcError as e:  # e.g. "server is not initialized yet"
            self._cri_failed(f"{e.code().name} {e.details()}", passing=True)
        else:
            self._cri_answered()
            return sandboxes
        return []

    async def _apply(self, client: ContainerdClient, e: ContainerdEvent) -> None:
        if not e.container_id or e.exec_id:
            return
        if e.kind == "ContainerDelete":
            if self._pods.pop(e.container_id, None) is not None:
                self.on_change(PodGone(e.container_id))
            self.on_change(ContainerGone(e.container_id))
        elif e.kind in ("ContainerCreate", "ContainerUpdate", "TaskStart"):
            netns = await self._refresh(client, e.namespace, e.container_id)
            if e.kind == "TaskStart" and netns and e.pid:
                self.on_change(TaskStarted(netns, f"{self.proc_root}/{e.pid}/ns/net"))

    async def _refresh(self, client: ContainerdClient, namespace: str, container_id: str) -> int:
        """Fetch one container (and its pod when new) and report it. Returns its netns inode (0 unknown)."""
        found = await client.list_containers([namespace], filters=(f"id=={container_id}",))
        if not found:
            self.on_change(ContainerGone(container_id))
            return 0
        c = found[0]
        sandbox_id = c.pod_sandbox_id
        # The pod: when its sandbox starts, or for a container whose pod we have not seen.
        if sandbox_id and (is_sandbox(c) or sandbox_id not in self._pods):
            pod = await self._cri_pod(client, sandbox_id)
            if pod is None and is_sandbox(c) and not self.cri_available:
                pid = await self._task_pid(client, namespace, container_id)
                pod = sandbox_pod_from_labels(c, pid, self.proc_root, self._host)
            if pod is not None:
                self._pods[pod.sandbox_id] = pod
                self.on_change(PodSeen(pod))
        if is_sandbox(c):
            pod = self._pods.get(container_id)
            return pod.netns if pod else 0
        pid = await self._task_pid(client, namespace, container_id)
        record = build_container(c, self._pods, pid, self.proc_root, self.cgroup_root, self._host)
        self.on_change(ContainerSeen(record))
        return record.netns

    async def _cri_pod(self, client: ContainerdClient, sandbox_id: str) -> Pod | None:
        """The pod of a CRI sandbox; None when CRI does not have it (yet) or fails."""
        try:
            sandbox = await client.pod_sandbox(sandbox_id)
        except CriUnavailable as e:
            self._cri_failed(str(e))
            return None
        except ContainerdUnavailable as e:
            await client.namespaces()  # containerd itself gone too: that outage (raises), not CRI's
            self._cri_failed(str(e), passing=True)
            return None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # not in the CRI store yet: its TaskStart follows
                self._cri_answered()
                return None
            self._cri_failed(f"{e.code().name} {e.details()}", passing=True)
            return None
        self._cri_answered()
        return build_pod(sandbox, self.proc_root)

    async def _task_pid(self, client: ContainerdClient, namespace: str, container_id: str) -> int:
        pid = 0
        for t in await client.list_tasks([namespace]):
            if t.container_id == container_id and t.status == "RUNNING":
                pid = t.pid
        return pid
