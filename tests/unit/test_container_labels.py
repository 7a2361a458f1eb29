"""Pods from containers' own io.kubernetes.pod.* labels (no CRI sandbox), in records, index and follower."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest

from netstatd.enrich.attribution import Attribution
from netstatd.enrich.cgroups import PidContainers
from netstatd.sources.containerd.changes import (
    ContainerGone,
    ContainerSeen,
    Listed,
    PodGone,
    PodSeen,
    TaskStarted,
)
from netstatd.sources.containerd.client import (
    ContainerdEvent,
    ContainerInfo,
    CriUnavailable,
    PodSandboxInfo,
    TaskInfo,
)
from netstatd.sources.containerd.follower import CRI_RETRY_S, ContainerdFollower
from netstatd.sources.containerd.inventory import build_all, build_container, build_pod, host_netns
from netstatd.sources.containerd.labels import pod_from_labels, pod_identity
from netstatd.sources.procfs import ProcessCache
from netstatd.state.containers import ContainerIndex
from tests.unit.test_procfs import stat_line

UID = "0b7e4d2a-1c3f-4e5a-8b9c-0d1e2f3a4b5c"
HOST_UID = "5c4b3a2f-1e0d-4c9b-8a5e-3f1c2a4d7e0b"
MAIN, SIDE, HOSTNET, SANDBOX, APP = ("1" * 64, "2" * 64, "3" * 64, "4" * 64, "5" * 64)
POD_LABELS = {
    "io.kubernetes.pod.name": "web",
    "io.kubernetes.pod.namespace": "shop",
    "io.kubernetes.pod.uid": UID,
}
LABEL_SID = f"labels:shop/web/{UID}"


def info(
    cid: str,
    labels: dict[str, str],
    network: str | None = "/run/netns/x",
    annotations: dict[str, str] | None = None,
    namespace: str = "netstatd-test",
) -> ContainerInfo:
    namespaces = {"pid": "", "mount": ""} if network is None else {"pid": "", "network": network}
    return ContainerInfo(namespace, cid, "img:1", labels, "runc", "", namespaces, annotations or {}, 0.0)


def labelled(cid: str, name: str, **kw) -> ContainerInfo:
    return info(cid, {**POD_LABELS, "io.kubernetes.container.name": name, "extra": "x"}, **kw)


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A /proc whose tasks 100 and 101 share one netns, 102 is in the host's (PID 1's), 103 in another."""
    root = tmp_path / "proc"
    shared = tmp_path / "netns-shared"
    shared.write_text("")
    for pid in (1, 100, 101, 102, 103):
        (root / str(pid) / "ns").mkdir(parents=True)
    (root / "1" / "ns" / "net").write_text("")
    (root / "103" / "ns" / "net").write_text("")
    (root / "100" / "ns" / "net").hardlink_to(shared)
    (root / "101" / "ns" / "net").hardlink_to(shared)
    (root / "102" / "ns" / "net").hardlink_to(root / "1" / "ns" / "net")
    return root


def ino(path: Path) -> int:
    return path.stat().st_ino


# ---- records from labels


def test_pod_identity_needs_all_three_labels() -> None:
    assert pod_identity(POD_LABELS) == ("web", "shop", UID)
    for key in POD_LABELS:
        assert pod_identity({k: v for k, v in POD_LABELS.items() if k != key}) is None
        assert pod_identity({**POD_LABELS, key: ""}) is None
    assert pod_from_labels(info(MAIN, {"io.kubernetes.pod.name": "web"}), False, 7, "") is None


def test_sandbox_id_from_the_annotation_else_from_the_identity() -> None:
    plain = pod_from_labels(labelled(MAIN, "main"), False, 7, "/p/100/ns/net")
    assert plain is not None
    assert (plain.sandbox_id, plain.name, plain.namespace, plain.uid) == (LABEL_SID, "web", "shop", UID)
    assert (plain.host_network, plain.netns, plain.netns_path, plain.ips) == (False, 7, "/p/100/ns/net", ())
    assert plain.labels == POD_LABELS  # only the identity: every container of the pod gives the same
    cri = pod_from_labels(labelled(MAIN, "main", annotations={"io.kubernetes.cri.sandbox-id": SANDBOX}), False, 7, "")
    assert cri is not None and cri.sandbox_id == SANDBOX


def test_ctr_containers_with_pod_labels(proc: Path) -> None:
    """Main and sidecar in one netns share one pod; --net-host and a host netns are host network."""
    host = frozenset({ino(proc / "1" / "ns" / "net")})
    pods = {}
    main = build_container(labelled(MAIN, "main"), pods, 100, str(proc), host=host)
    side = build_container(labelled(SIDE, "sidecar", network="/proc/100/ns/net"), pods, 101, str(proc), host=host)
    assert main.pod is not None and main.pod == side.pod
    assert (main.container_name, side.container_name) == ("main", "sidecar")
    assert main.netns == side.netns == ino(proc / "100" / "ns" / "net") == main.pod.netns
    assert not main.host_network and not main.pod.host_network
    assert main.labels["extra"] == "x"  # the container's own labels: CRI's pod labels are not known
    net_host = build_container(labelled(HOSTNET, "h", network=None), pods, 103, str(proc), host=host)
    assert net_host.host_network and net_host.pod is not None and net_host.pod.host_network
    joined_host = build_container(labelled(HOSTNET, "h", network="/proc/1/ns/net"), pods, 102, str(proc), host=host)
    assert joined_host.host_network and joined_host.pod is not None and joined_host.pod.host_network
    not_started = build_container(labelled(SIDE, "sidecar"), pods, 0, str(proc), host=host)
    assert not_started.pod is not None and not_started.pod.netns == 0 and not not_started.host_network
    unlabelled = build_container(info(APP, {"x": "y"}), pods, 103, str(proc), host=host)
    assert unlabelled.pod is None and unlabelled.netns == ino(proc / "103" / "ns" / "net")


def test_host_netns_is_pid_1s_and_our_own(proc: Path) -> None:
    assert host_netns(str(proc)) == {ino(proc / "1" / "ns" / "net"), ino(Path("/proc/self/ns/net"))}


def test_build_all_cri_pod_wins_and_labels_fill_in(proc: Path, tmp_path: Path) -> None:
    netns = tmp_path / "cri-netns"
    netns.write_text("")
    sandbox = PodSandboxInfo(SANDBOX, "cri", "shop", "u1", True, ("10.0.0.5",), False, 7, str(netns), {}, {}, 0.0)
    sid = {"io.kubernetes.cri.sandbox-id": SANDBOX}
    app = info(APP, {**POD_LABELS, "io.kubernetes.container.name": "app"}, annotations=sid, namespace="k8s.io")
    tasks = [TaskInfo("netstatd-test", MAIN, 100, "RUNNING"), TaskInfo("netstatd-test", SIDE, 101, "RUNNING")]
    containers = [app, labelled(MAIN, "main"), labelled(SIDE, "sidecar")]
    pods, records = build_all(containers, tasks, [sandbox], str(proc))
    by_id = {c.id: c for c in records}
    assert [p.sandbox_id for p in pods] == [SANDBOX]  # label pods travel in their containers
    assert by_id[APP].pod == pods[0] and by_id[APP].pod.name == "cri"  # CRI's sandbox, not the labels
    assert by_id[MAIN].pod == by_id[SIDE].pod and by_id[MAIN].pod.sandbox_id == LABEL_SID
    # CRI not answering: the same app container's pod from its labels, under CRI's sandbox id
    _, records = build_all(containers, tasks, [], str(proc))
    assert next(c for c in records if c.id == APP).pod.sandbox_id == SANDBOX


def test_build_all_without_cri_takes_pods_from_sandbox_containers(proc: Path) -> None:
    """CRI off or failing on a node of CRI pods: the pause container's labels are the pod's."""
    host = frozenset({ino(proc / "1" / "ns" / "net")})
    sid = {"io.kubernetes.cri.sandbox-id": SANDBOX}
    sandbox_labels = {**POD_LABELS, "app": "web", "io.cri-containerd.kind": "sandbox"}
    containers = [
        info(SANDBOX, sandbox_labels, network="/var/run/netns/cni-1", annotations=sid, namespace="k8s.io"),
        info(APP, {**POD_LABELS, "io.kubernetes.container.name": "app"}, annotations=sid, namespace="k8s.io"),
    ]
    tasks = [TaskInfo("k8s.io", SANDBOX, 100, "RUNNING"), TaskInfo("k8s.io", APP, 101, "RUNNING")]
    pods, records = build_all(containers, tasks, [], str(proc), host=host)
    [pod] = pods
    assert (pod.sandbox_id, pod.name, pod.labels) == (SANDBOX, "web", {**POD_LABELS, "app": "web"})
    assert pod.netns == ino(proc / "100" / "ns" / "net") and not pod.host_network
    [app] = records  # the pause container is the pod
    assert app.pod == pod and app.labels == pod.labels and app.container_name == "app"


# ---- the index: implied pods


def test_index_shares_an_implied_pod_and_drops_it_with_its_last_container(proc: Path) -> None:
    host = frozenset({ino(proc / "1" / "ns" / "net")})
    index = ContainerIndex("n1", lambda: "T")
    main = build_container(labelled(MAIN, "main"), {}, 100, str(proc), host=host)
    side_early = build_container(labelled(SIDE, "sidecar"), {}, 0, str(proc), host=host)  # created, not started
    side = build_container(labelled(SIDE, "sidecar"), {}, 101, str(proc), host=host)
    [added] = index.apply(ContainerSeen(main))
    assert (added["podName"], added["namespace"], added["podUID"]) == ("web", "shop", UID)
    assert added["name"] == "shop/web/main" and added["usesHostNetwork"] is False and added["podIPs"] == []
    index.apply(ContainerSeen(side_early))  # does not forget the netns its pod is in
    assert list(index.pods) == [LABEL_SID] and index.pods[LABEL_SID].netns == main.netns
    index.apply(ContainerSeen(side))
    assert index.netns_fields(main.netns) == {
        "host": False,
        "podName": "web",
        "namespace": "shop",
        "podUID": UID,
        "usesHostNetwork": False,
    }
    assert {c["containerId"] for c in index.query(namespace="shop", pod_name="web")} == {MAIN, SIDE}
    index.apply(ContainerGone(MAIN))
    assert index.netns_fields(main.netns)["podName"] == "web"  # the sidecar still names it
    index.apply(ContainerGone(SIDE))
    assert index.pods == {} and index.netns_fields(main.netns) is None


def test_index_host_network_implied_pod_keeps_the_host_netns(proc: Path) -> None:
    host_ino = ino(proc / "1" / "ns" / "net")
    index = ContainerIndex("n1", lambda: "T")
    labels = {**POD_LABELS, "io.kubernetes.pod.name": "hostpod", "io.kubernetes.pod.uid": HOST_UID}
    c = build_container(info(HOSTNET, labels, network=None), {}, 102, str(proc), host=frozenset({host_ino}))
    [added] = index.apply(ContainerSeen(c))
    assert added["usesHostNetwork"] is True and added["podName"] == "hostpod" and added["netns"] == host_ino
    assert index.netns_fields(host_ino) is None  # the host's netns stays the host's
    assert index.container_fields(HOSTNET)["usesHostNetwork"] is True
    assert index.pods[c.pod.sandbox_id].host_network  # shown with the host's IPs in the IP inventory


def test_index_given_pod_wins_over_labels_and_listing_resets(proc: Path, tmp_path: Path) -> None:
    index = ContainerIndex("n1", lambda: "T")
    sid = {"io.kubernetes.cri.sandbox-id": SANDBOX}
    early = build_container(labelled(APP, "app", annotations=sid), {}, 100, str(proc))  # CRI did not have it yet
    index.apply(ContainerSeen(early))
    assert index.pods[SANDBOX].ips == () and index.pods[SANDBOX].name == "web"
    cri = PodSandboxInfo(SANDBOX, "web", "shop", UID, True, ("10.0.0.5",), False, 100, "", {}, {}, 0.0)
    pod = build_pod(cri, str(proc))
    index.apply(PodSeen(pod))
    index.apply(ContainerSeen(early))  # the container's older view does not replace CRI's pod
    assert index.pods[SANDBOX] == pod and index.remote_fields("10.0.0.5")["remotePodName"] == "web"
    index.apply(PodGone(SANDBOX))
    assert SANDBOX not in index.pods
    main = build_container(labelled(MAIN, "main"), {}, 100, str(proc))
    events = index.apply(Listed((), (main,)))
    assert [(e["type"], e["containerId"]) for e in events] == [("container.deleted", APP), ("container.added", MAIN)]
    assert list(index.pods) == [LABEL_SID]


# ---- attribution through the usual path: pid -> cgroup -> container, else netns -> pod


def test_attribution_of_label_pod_processes(proc: Path) -> None:
    for pid, cgroup in (
        (100, f"0::/kubepods/besteffort/pod{UID}/{MAIN}\n"),
        (
            101,
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice"
            f"/cri-containerd-{SIDE}.scope\n",
        ),
    ):
        (proc / str(pid) / "stat").write_text(stat_line(pid, "nc", 10))
        (proc / str(pid) / "comm").write_text("nc\n")
        (proc / str(pid) / "cgroup").write_text(cgroup)
    index = ContainerIndex("n1", lambda: "T")
    main = build_container(labelled(MAIN, "main"), {}, 100, str(proc))
    side = build_container(labelled(SIDE, "sidecar"), {}, 101, str(proc))
    index.apply(Listed((), (main, side)))
    a = Attribution(index, ProcessCache(str(proc)), PidContainers(str(proc)))
    for pid, cid, name in ((100, MAIN, "main"), (101, SIDE, "sidecar")):
        owner = a.owner(pid, main.netns)
        assert (owner["containerId"], owner["containerName"], owner["host"]) == (cid, name, False)
        assert (owner["podName"], owner["namespace"], owner["podUID"]) == ("web", "shop", UID)
    by_netns = a.owner(0, main.netns)  # a socket whose process is unknown, in the pod's netns
    assert (by_netns["podName"], by_netns["podUID"]) == ("web", UID) and "containerId" not in by_netns


# ---- the follower: CRI failing, deletes


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeClient:
    """containerd's own API answers; CRI raises `cri_error` (None: CRI has no sandboxes)."""

    def __init__(self, containers: list[ContainerInfo], tasks: list[TaskInfo], cri_error: Exception | None) -> None:
        self.containers, self.tasks, self.cri_error = containers, tasks, cri_error

    async def namespaces(self) -> list[str]:
        return sorted({c.namespace for c in self.containers})

    async def list_containers(self, namespaces=None, filters=()):
        wanted = {f.removeprefix("id==") for f in filters}
        return [c for c in self.containers if not wanted or c.id in wanted]

    async def list_tasks(self, namespaces=None):
        return self.tasks

    async def list_pod_sandboxes(self):
        if self.cri_error is not None:
            raise self.cri_error
        return []

    async def pod_sandbox(self, sandbox_id):
        if self.cri_error is not None:
            raise self.cri_error
        raise rpc_error(grpc.StatusCode.NOT_FOUND, "not found")


def follower_with_log(proc: Path) -> tuple[ContainerdFollower, list]:
    changes: list = []
    return ContainerdFollower("/nonexistent.sock", changes.append, proc_root=str(proc)), changes


@pytest.mark.parametrize(
    ("error", "retries"),
    [
        (CriUnavailable("unknown service runtime.v1.RuntimeService"), False),  # plugin disabled
        (rpc_error(grpc.StatusCode.UNKNOWN, "server is not initialized yet"), True),
    ],
)
def test_listing_without_cri_still_gives_pods(proc: Path, caplog, error: Exception, retries: bool) -> None:
    containers = [labelled(MAIN, "main"), labelled(SIDE, "sidecar", network="/proc/100/ns/net")]
    tasks = [TaskInfo("netstatd-test", MAIN, 100, "RUNNING"), TaskInfo("netstatd-test", SIDE, 101, "RUNNING")]
    client = FakeClient(containers, tasks, error)
    follower, changes = follower_with_log(proc)

    async def twice() -> float | None:
        await follower._list(client)
        await follower._list(client)
        return follower._relist_at and follower._relist_at - asyncio.get_running_loop().time()

    with caplog.at_level(logging.INFO, logger="netstatd.containerd"):
        relist_in = asyncio.run(twice())
    [listed, _] = changes
    assert isinstance(listed, Listed) and listed.pods == ()
    assert {c.pod.sandbox_id for c in listed.containers} == {LABEL_SID}
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1  # said once
    assert "unavailable" in caplog.records[0].message and "labels" in caplog.records[0].message
    assert not follower.cri_available
    assert (relist_in is not None and 0 < relist_in <= CRI_RETRY_S) == retries
    # CRI answers again: said once, and the next listing has no retry pending
    client.cri_error = None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="netstatd.containerd"):
        asyncio.run(follower._list(client))
    assert follower.cri_available and follower._relist_at is None
    assert any("answers again" in r.message for r in caplog.records)


def test_events_without_cri(proc: Path) -> None:
    """A sandbox's start gives its pod from its labels; its delete says the pod is gone too."""
    sid = {"io.kubernetes.cri.sandbox-id": SANDBOX}
    sandbox_labels = {**POD_LABELS, "io.cri-containerd.kind": "sandbox"}
    containers = [
        info(SANDBOX, sandbox_labels, annotations=sid, namespace="k8s.io"),
        info(APP, {**POD_LABELS, "io.kubernetes.container.name": "app"}, annotations=sid, namespace="k8s.io"),
    ]
    tasks = [TaskInfo("k8s.io", SANDBOX, 100, "RUNNING"), TaskInfo("k8s.io", APP, 101, "RUNNING")]
    client = FakeClient(containers, tasks, CriUnavailable("no CRI"))
    follower, changes = follower_with_log(proc)
    follower.cri_available = False  # as after the listing

    async def events() -> None:
        for kind, cid, pid in (("TaskStart", SANDBOX, 100), ("TaskStart", APP, 101)):
            await follower._apply(client, ContainerdEvent(0.0, "k8s.io", "/tasks/start", kind, cid, pid))
        for cid in (APP, SANDBOX):
            await follower._apply(client, ContainerdEvent(0.0, "k8s.io", "/containers/delete", "ContainerDelete", cid))

    asyncio.run(events())
    netns = ino(proc / "100" / "ns" / "net")
    pod_seen, scan1, app_seen, scan2, app_gone, pod_gone, sandbox_gone = changes
    assert isinstance(pod_seen, PodSeen) and (pod_seen.pod.sandbox_id, pod_seen.pod.netns) == (SANDBOX, netns)
    assert scan1 == TaskStarted(netns, f"{proc}/100/ns/net") and scan2 == TaskStarted(netns, f"{proc}/101/ns/net")
    assert isinstance(app_seen, ContainerSeen) and app_seen.container.pod == pod_seen.pod
    assert (app_gone, pod_gone, sandbox_gone) == (ContainerGone(APP), PodGone(SANDBOX), ContainerGone(SANDBOX))
