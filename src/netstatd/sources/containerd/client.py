"""containerd and CRI over gRPC (grpc.aio): containers, tasks, pod sandboxes and events.

One socket serves both APIs: containerd's own services (namespaced by the `containerd-namespace`
metadata) and, when the CRI plugin is loaded, Kubernetes' runtime.v1 RuntimeService (always the
k8s.io namespace). Every failure to reach the daemon surfaces as ContainerdUnavailable, so the agent
catches one type, logs once and retries with backoff.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import orjson
from google.protobuf import timestamp_pb2

from netstatd.sources.containerd.protos import (
    containers_pb2,
    containers_pb2_grpc,
    cri_pb2,
    cri_pb2_grpc,
    event_types_pb2,
    events_pb2,
    events_pb2_grpc,
    namespaces_pb2,
    namespaces_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
CRI_NAMESPACE = "k8s.io"  # where the CRI plugin keeps pods and their containers
# Container and task lifecycle (exec included); images, snapshots and content are not needed.
DEFAULT_EVENT_FILTERS = ('topic~="^/(tasks|containers)/"',)

# Codes that mean "the daemon (or this API) is not there right now", not "the request was wrong".
_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
_EVENT_TYPES = {
    f"containerd.events.{name}": getattr(event_types_pb2, name)
    for name in (
        "ContainerCreate",
        "ContainerUpdate",
        "ContainerDelete",
        "TaskCreate",
        "TaskStart",
        "TaskExit",
        "TaskDelete",
        "TaskExecAdded",
        "TaskExecStarted",
    )
}


class ContainerdUnavailable(Exception):
    """containerd cannot be reached (no socket, refused, daemon gone, timed out)."""


class CriUnavailable(Exception):
    """containerd answers but serves no CRI API (the CRI plugin is disabled or did not load)."""


@dataclass(frozen=True)
class ContainerInfo:
    namespace: str  # containerd namespace (k8s.io for CRI pods)
    id: str
    image: str
    labels: dict[str, str] = field(hash=False)
    runtime: str
    cgroups_path: str  # OCI spec linux.cgroupsPath, verbatim ("" when the spec has none)
    linux_namespaces: dict[str, str] = field(hash=False)  # type -> path ("" = a new namespace)
    annotations: dict[str, str] = field(hash=False)  # OCI spec annotations (CRI puts the sandbox id here)
    created_at: float  # seconds since the epoch

    @property
    def pod_sandbox_id(self) -> str:
        """The CRI sandbox this container belongs to (its own id for a sandbox; "" outside CRI)."""
        return self.annotations.get("io.kubernetes.cri.sandbox-id", "")


@dataclass(frozen=True)
class TaskInfo:
    namespace: str
    container_id: str
    pid: int
    status: str  # CREATED, RUNNING, STOPPED, PAUSED, ...


@dataclass(frozen=True)
class PodSandboxInfo:
    id: str
    name: str
    namespace: str  # Kubernetes namespace
    uid: str
    ready: bool
    ips: tuple[str, ...]  # primary first
    host_network: bool  # network namespace mode NODE
    pid: int | None  # sandbox (pause) pid, from verbose info
    netns_path: str  # the netns bind mount; "" for host network or when not reported
    labels: dict[str, str] = field(hash=False)
    annotations: dict[str, str] = field(hash=False)
    created_at: float


@dataclass(frozen=True)
class ContainerdEvent:
    timestamp: float
    namespace: str
    topic: str  # e.g. /tasks/start
    kind: str  # message name, e.g. TaskStart; "" when the payload type is not one we decode
    container_id: str
    pid: int = 0
    exec_id: str = ""  # exec id (TaskExecAdded/Started, TaskExit/Delete of an exec'd process)
    exit_status: int | None = None
    image: str = ""


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _spec_fields(spec_json: bytes) -> tuple[str, dict[str, str], dict[str, str]]:
    """linux.cgroupsPath, linux.namespaces and annotations from an OCI runtime spec (JSON in an Any)."""
    try:
        spec = orjson.loads(spec_json) if spec_json else {}
    except orjson.JSONDecodeError:
        spec = {}
    if not isinstance(spec, dict):
        spec = {}
    linux = spec.get("linux") or {}
    namespaces = {ns.get("type", ""): ns.get("path", "") for ns in linux.get("namespaces") or []}
    return linux.get("cgroupsPath", ""), namespaces, dict(spec.get("annotations") or {})


def container_from_proto(namespace: str, c: containers_pb2.Container) -> ContainerInfo:
    cgroups_path, linux_namespaces, annotations = _spec_fields(c.spec.value)
    return ContainerInfo(
        namespace=namespace,
        id=c.id,
        image=c.image,
        labels=dict(c.labels),
        runtime=c.runtime.name,
        cgroups_path=cgroups_path,
        linux_namespaces=linux_namespaces,
        annotations=annotations,
        created_at=_seconds(c.created_at),
    )


def event_from_envelope(env: events_pb2.Envelope) -> ContainerdEvent:
    type_name = env.event.type_url.rsplit("/", 1)[-1]  # bare in containerd 1.6, may carry a prefix
    cls = _EVENT_TYPES.get(type_name)
    base = {"timestamp": _seconds(env.timestamp), "namespace": env.namespace, "topic": env.topic}
    if cls is None:
        return ContainerdEvent(kind="", container_id="", **base)
    msg = cls.FromString(env.event.value)
    kind = cls.DESCRIPTOR.name
    if kind.startswith("Container"):
        return ContainerdEvent(kind=kind, container_id=msg.id, image=getattr(msg, "image", ""), **base)
    exec_id = getattr(msg, "exec_id", "")
    if kind in ("TaskExit", "TaskDelete") and msg.id != msg.container_id:
        exec_id = msg.id  # the init process carries the container id here, an exec its exec id
    exit_status = msg.exit_status if kind in ("TaskExit", "TaskDelete") else None
    return ContainerdEvent(
        kind=kind,
        container_id=msg.container_id,
        pid=getattr(msg, "pid", 0),
        exec_id=exec_id,
        exit_status=exit_status,
        **base,
    )


def _sandbox_from_status(resp: cri_pb2.PodSandboxStatusResponse) -> PodSandboxInfo:
    st = resp.status
    ips = tuple(ip for ip in (st.network.ip, *(a.ip for a in st.network.additional_ips)) if ip)
    pid, netns_path = None, ""
    # containerd's verbose info: {"info": "<json with pid, netNamespacePath, runtimeSpec, ...>"}
    if "info" in resp.info:
        try:
            info = orjson.loads(resp.info["info"])
        except orjson.JSONDecodeError:
            info = {}
        pid = info.get("pid") or None
        # containerd 1.6 has no netNamespacePath key; the sandbox's runtime spec names the netns mount
        netns_path = info.get("netNamespacePath") or ""
        spec_ns = ((info.get("runtimeSpec") or {}).get("linux") or {}).get("namespaces") or []
        netns_path = netns_path or next((n.get("path", "") for n in spec_ns if n.get("type") == "network"), "")
    return PodSandboxInfo(
        id=st.id,
        name=st.metadata.name,
        namespace=st.metadata.namespace,
        uid=st.metadata.uid,
        ready=st.state == cri_pb2.SANDBOX_READY,
        ips=ips,
        host_network=st.linux.namespaces.options.network == cri_pb2.NODE,
        pid=pid,
        netns_path=netns_path,
        labels=dict(st.labels),
        annotations=dict(st.annotations),
        created_at=st.created_at / 1e9,
    )


class ContainerdClient:
    """Async client for one containerd socket. Use as `async with ContainerdClient(path) as c:`."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 5.0) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> ContainerdClient:
        self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def connect(self) -> None:
        # gRPC would keep retrying a missing socket until the deadline; say it plainly instead.
        if not os.path.exists(self.socket_path):
            raise ContainerdUnavailable(f"containerd socket {self.socket_path} does not exist")
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                f"unix://{self.socket_path}",
                # verbose CRI status and OCI specs can exceed the 4 MiB default on busy nodes
                options=[("grpc.max_receive_message_length", 64 << 20)],
            )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self.connect()
        assert self._channel is not None
        return self._channel

    async def _call(self, rpc, request, namespace: str | None = None):
        metadata = (("containerd-namespace", namespace),) if namespace else None
        try:
            return await rpc(request, timeout=self.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            if e.code() in _UNAVAILABLE_CODES:
                raise ContainerdUnavailable(f"containerd at {self.socket_path}: {e.details()}") from e
            raise

    # ---- containerd

    async def namespaces(self) -> list[str]:
        stub = namespaces_pb2_grpc.NamespacesStub(self.channel)
        resp = await self._call(stub.List, namespaces_pb2.ListNamespacesRequest())
        return sorted(ns.name for ns in resp.namespaces)

    async def list_containers(
        self, namespaces: Sequence[str] | None = None, filters: Sequence[str] = ()
    ) -> list[ContainerInfo]:
        """Containers of the given containerd namespaces (default: all of them).

        filters: containerd filter expressions, e.g. `id==<id>` for one container.
        """
        stub = containers_pb2_grpc.ContainersStub(self.channel)
        out: list[ContainerInfo] = []
        request = containers_pb2.ListContainersRequest(filters=list(filters))
        for ns in namespaces if namespaces is not None else await self.namespaces():
            resp = await self._call(stub.List, request, ns)
            out.extend(container_from_proto(ns, c) for c in resp.containers)
        return out

    async def list_tasks(self, namespaces: Sequence[str] | None = None) -> list[TaskInfo]:
        """Init processes of running (or created/stopped, not yet deleted) tasks."""
        stub = tasks_pb2_grpc.TasksStub(self.channel)
        out: list[TaskInfo] = []
        for ns in namespaces if namespaces is not None else await self.namespaces():
            resp = await self._call(stub.List, tasks_pb2.ListTasksRequest(), ns)
            for t in resp.tasks:
                # containerd 1.6 puts the container id in `id` and leaves container_id empty
                cid = t.container_id or t.id
                out.append(TaskInfo(ns, cid, t.pid, tasks_pb2.Status.Name(t.status)))
        return out

    async def list_pids(self, namespace: str, container_id: str) -> list[int]:
        """Every pid in the container's task (init, children and execs)."""
        stub = tasks_pb2_grpc.TasksStub(self.channel)
        resp = await self._call(stub.ListPids, tasks_pb2.ListPidsRequest(container_id=container_id), namespace)
        return [p.pid for p in resp.processes]

    async def events(self, filters: Sequence[str] = DEFAULT_EVENT_FILTERS) -> AsyncIterator[ContainerdEvent]:
        """Events of every namespace, as they happen, until the stream breaks (ContainerdUnavailable).

        No namespace metadata: containerd then streams all namespaces. No deadline: the stream is
        meant to stay open; the caller cancels the iteration to stop.
        """
        stub = events_pb2_grpc.EventsStub(self.channel)
        call = stub.Subscribe(events_pb2.SubscribeRequest(filters=list(filters)))
        try:
            async for env in call:
                yield event_from_envelope(env)
        except grpc.aio.AioRpcError as e:
            if e.code() in _UNAVAILABLE_CODES:
                raise ContainerdUnavailable(f"containerd event stream at {self.socket_path}: {e.details()}") from e
            raise
        finally:
            call.cancel()
        # The server ended the stream without an error: also a disconnect for the caller.
        raise ContainerdUnavailable(f"containerd event stream at {self.socket_path} ended")

    # ---- CRI (runtime.v1)

    @property
    def cri(self) -> cri_pb2_grpc.RuntimeServiceStub:
        return cri_pb2_grpc.RuntimeServiceStub(self.channel)

    async def _cri_call(self, rpc, request):
        try:
            return await self._call(rpc, request)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise CriUnavailable(f"containerd at {self.socket_path}: {e.details()}") from e
            raise

    async def list_pod_sandboxes(self, verbose: bool = True) -> list[PodSandboxInfo]:
        """Every CRI pod sandbox with its IPs and network mode; CriUnavailable without the CRI plugin."""
        resp = await self._cri_call(self.cri.ListPodSandbox, cri_pb2.ListPodSandboxRequest())
        out = []
        for item in resp.items:
            req = cri_pb2.PodSandboxStatusRequest(pod_sandbox_id=item.id, verbose=verbose)
            try:
                status = await self._cri_call(self.cri.PodSandboxStatus, req)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:  # removed between list and status
                    continue
                raise
            out.append(_sandbox_from_status(status))
        return out

    async def pod_sandbox(self, sandbox_id: str, verbose: bool = True) -> PodSandboxInfo:
        req = cri_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose)
        return _sandbox_from_status(await self._cri_call(self.cri.PodSandboxStatus, req))
