"""The container index, the records built from containerd listings, and socket attribution."""

from __future__ import annotations

from pathlib import Path

from netstatd.enrich.attribution import Attribution
from netstatd.enrich.cgroups import PidContainers
from netstatd.sources.containerd.client import ContainerInfo, PodSandboxInfo, TaskInfo
from netstatd.sources.containerd.inventory import build_all
from netstatd.sources.procfs import ProcessCache
from netstatd.state.containers import Container, ContainerIndex, Pod
from tests.unit.test_procfs import stat_line

UID = "8f2d6c1e-3b4a-4c5d-9e6f-7a8b9c0d1e2f"
APP, SIDE, PLAIN, SANDBOX = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def pod(**kw) -> Pod:
    base = {
        "sandbox_id": SANDBOX,
        "name": "web",
        "namespace": "shop",
        "uid": UID,
        "labels": {"app": "web"},
        "ips": ("10.232.0.10",),
        "netns": 4026532001,
    }
    return Pod(**{**base, **kw})


def index_with_pod(p: Pod | None = None) -> ContainerIndex:
    index = ContainerIndex("n1", lambda: "T")
    p = p or pod()
    index.put_pod(p)
    index.put(Container(APP, "k8s.io", "img:1", p, "app", p.labels, p.host_network, p.netns))
    index.put(Container(SIDE, "k8s.io", "img:1", p, "sidecar", p.labels, p.host_network, p.netns))
    return index


def test_added_deleted_and_fields() -> None:
    index = ContainerIndex("n1", lambda: "T")
    p = pod()
    index.put_pod(p)
    c = Container(APP, "k8s.io", "img:1", p, "app", p.labels, False, p.netns)
    [added] = index.put(c)
    assert added == {
        "type": "container.added",
        "timestamp": "T",
        "nodeName": "n1",
        "containerId": APP,
        "name": "shop/web/app",
        "podName": "web",
        "namespace": "shop",
        "podUID": UID,
        "containerName": "app",
        "image": "img:1",
        "labels": {"app": "web"},
        "usesHostNetwork": False,
        "podIPs": ["10.232.0.10"],
        "netns": 4026532001,
    }
    assert index.put(c) == []  # unchanged: no event
    assert index.snapshot() == [added]
    assert index.remove(APP) == [{"type": "container.deleted", "timestamp": "T", "nodeName": "n1", "containerId": APP}]
    assert index.remove(APP) == []


def test_query_filters() -> None:
    index = index_with_pod()
    assert {c["containerName"] for c in index.query()} == {"app", "sidecar"}
    assert len(index.query(namespace="shop", pod_name="web")) == 2
    assert index.query(namespace="nope") == []
    assert index.query(pod_name="nope") == []
    assert index.query(namespace="shop", pod_name="other") == []


def test_replace_resyncs() -> None:
    index = index_with_pod()
    p = pod()
    fresh = [
        Container(APP, "k8s.io", "img:1", p, "app", p.labels, False, p.netns),  # unchanged
        Container(PLAIN, "netstatd-test", "img:2", None, PLAIN, {}, True, 0),  # new
    ]
    events = index.replace([p], fresh)  # the sidecar was removed while we were away
    assert [(e["type"], e["containerId"]) for e in events] == [
        ("container.deleted", SIDE),
        ("container.added", PLAIN),
    ]
    assert set(index.containers) == {APP, PLAIN}


def test_netns_and_ip_lookups() -> None:
    index = index_with_pod()
    assert index.netns_fields(4026532001) == {
        "host": False,
        "podName": "web",
        "namespace": "shop",
        "podUID": UID,
        "usesHostNetwork": False,
    }
    assert index.remote_fields("10.232.0.10") == {
        "remotePodName": "web",
        "remoteNamespace": "shop",
        "remotePodUID": UID,
    }
    assert index.pod_fields("10.232.0.10") == {"podName": "web", "namespace": "shop", "podUID": UID}  # dns.failed
    assert index.netns_fields(1) is None and index.remote_fields("10.0.0.1") is None
    assert index.pod_fields("10.0.0.1") is None
    index.remove_pod(SANDBOX)
    assert index.netns_fields(4026532001) is None and index.remote_fields("10.232.0.10") is None
    assert index.pod_fields("10.232.0.10") is None


def test_host_network_pod_keeps_host_netns_and_ips() -> None:
    index = index_with_pod(pod(host_network=True, ips=("192.168.1.5",), netns=4026531840))
    assert index.netns_fields(4026531840) is None  # the host's netns stays the host's
    assert index.remote_fields("192.168.1.5") is None and index.pod_fields("192.168.1.5") is None
    assert index.container_fields(APP)["usesHostNetwork"] is True
    assert index.query()[0]["podIPs"] == []


def test_build_all(tmp_path: Path) -> None:
    netns = tmp_path / "netns"
    netns.write_text("")
    sandbox = PodSandboxInfo(
        SANDBOX, "web", "shop", UID, True, ("10.232.0.10",), False, 100, str(netns), {"app": "web"}, {}, 0.0
    )

    def info(cid: str, ns: str, labels: dict, annotations: dict, namespaces: dict) -> ContainerInfo:
        return ContainerInfo(ns, cid, "img:1", labels, "runc", "", namespaces, annotations, 0.0)

    sandbox_id = {"io.kubernetes.cri.sandbox-id": SANDBOX}
    containers = [
        info(SANDBOX, "k8s.io", {"io.cri-containerd.kind": "sandbox"}, sandbox_id, {"network": str(netns)}),
        info(APP, "k8s.io", {"io.kubernetes.container.name": "app"}, sandbox_id, {"network": "/proc/100/ns/net"}),
        info(PLAIN, "netstatd-test", {"x": "y"}, {}, {"pid": ""}),  # no network entry: the host's
    ]
    pods, records = build_all(containers, [TaskInfo("netstatd-test", PLAIN, 0, "RUNNING")], [sandbox], str(tmp_path))
    assert pods[0].netns == netns.stat().st_ino
    by_id = {c.id: c for c in records}
    assert set(by_id) == {APP, PLAIN}  # the pause container is the pod, not a container
    assert by_id[APP].pod == pods[0] and by_id[APP].container_name == "app" and by_id[APP].netns == pods[0].netns
    assert by_id[PLAIN].pod is None and by_id[PLAIN].host_network and by_id[PLAIN].labels == {"x": "y"}


def fake_proc(root: Path, pid: int, cgroup: str, start: int = 10) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(stat_line(pid, "app", start))
    (d / "comm").write_text("app\n")
    (d / "cgroup").write_text(cgroup)


def test_attribution(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_proc(proc, 10, f"0::/kubepods/besteffort/pod{UID}/{APP}\n")
    fake_proc(proc, 11, f"0::/kubepods/besteffort/pod{UID}/{SIDE}\n")
    fake_proc(proc, 12, "0::/system.slice/sshd.service\n")
    fake_proc(proc, 13, f"0::/kubepods/besteffort/pod{UID}/{'e' * 64}\n")  # not announced yet
    fake_proc(proc, 14, "0::/netstatd-test/plain-1\n")  # a ctr container with a non-hex id
    fake_proc(proc, 15, "0::/process_api/0123abcd\n")  # a host cgroup of the same shape
    index = index_with_pod()
    a = Attribution(index, ProcessCache(str(proc)), PidContainers(str(proc)))
    # sidecars share the netns; the pid tells them apart
    assert a.owner(10, 4026532001)["containerName"] == "app"
    assert a.owner(11, 4026532001)["containerName"] == "sidecar"
    assert a.owner(12, 4026531840) == {"host": True}
    # pid unknown, socket in the pod's netns (a namespace scan, a softirq event): the pod
    assert a.owner(0, 4026532001)["podName"] == "web"
    assert "containerId" not in a.owner(0, 4026532001)
    # a container containerd has not announced: its id from the cgroup, the pod from the netns
    early = a.owner(13, 4026532001)
    assert early["containerId"] == "e" * 64 and early["podName"] == "web" and early["host"] is False
    assert a.remote("10.232.0.10")["remotePodName"] == "web"
    assert a.owner(14, 1) == {"host": True}  # not (yet) known: the shape alone is not enough
    index.put(Container("plain-1", "netstatd-test", "img:2", None, "plain-1", {}, True, 0))
    assert a.owner(14, 1)["containerId"] == "plain-1"
    assert a.owner(15, 1) == {"host": True}


def test_attribution_by_cgroup_id_after_exit() -> None:
    index = index_with_pod()
    p = index.pods[SANDBOX]
    index.put(Container(APP, "k8s.io", "img:1", p, "app", p.labels, False, p.netns, cgroup_id=777))
    a = Attribution(index, ProcessCache("/nonexistent"), PidContainers("/nonexistent"))
    # the process is gone (no /proc entry): the kernel's cgroup id still names the container
    assert a.fields(a.container_of(4242), p.netns, 777)["containerName"] == "app"
    assert a.fields(None, p.netns, 0)["podName"] == "web"


def test_follower_scans_the_netns_of_a_started_task(tmp_path: Path) -> None:
    """TaskStart of the sandbox and of a container each ask for a scan of the pod's netns."""
    import asyncio

    from netstatd.sources.containerd.changes import TaskStarted
    from netstatd.sources.containerd.client import ContainerdEvent
    from netstatd.sources.containerd.follower import ContainerdFollower

    netns = tmp_path / "netns"
    netns.write_text("")
    sandbox = PodSandboxInfo(
        SANDBOX, "web", "shop", UID, True, ("10.232.0.10",), False, 100, str(netns), {"app": "web"}, {}, 0.0
    )
    sandbox_id = {"io.kubernetes.cri.sandbox-id": SANDBOX}
    listed = {
        SANDBOX: ContainerInfo(
            "k8s.io", SANDBOX, "pause", {"io.cri-containerd.kind": "sandbox"}, "runc", "", {}, sandbox_id, 0.0
        ),
        APP: ContainerInfo(
            "k8s.io", APP, "img:1", {"io.kubernetes.container.name": "app"}, "runc", "", {}, sandbox_id, 0.0
        ),
    }

    class FakeClient:
        async def list_containers(self, namespaces=None, filters=()):
            return [listed[filters[0].removeprefix("id==")]]

        async def pod_sandbox(self, sandbox_id):
            return sandbox

        async def list_tasks(self, namespaces=None):
            return [TaskInfo("k8s.io", APP, 200, "RUNNING")]

    scans: list[tuple[int, str]] = []
    index = ContainerIndex("n1", lambda: "T")

    def on_change(change) -> None:  # as the agent does: the index, or a scan
        if isinstance(change, TaskStarted):
            scans.append((change.netns, change.path))
        else:
            index.apply(change)

    follower = ContainerdFollower("/nonexistent", on_change, proc_root="/p")

    async def apply() -> None:
        client = FakeClient()
        for cid, pid in ((SANDBOX, 100), (APP, 200)):
            await follower._apply(client, ContainerdEvent(0.0, "k8s.io", "/containers/create", "ContainerCreate", cid))
            await follower._apply(client, ContainerdEvent(0.0, "k8s.io", "/tasks/start", "TaskStart", cid, pid))

    asyncio.run(apply())
    ino = netns.stat().st_ino
    assert scans == [(ino, "/p/100/ns/net"), (ino, "/p/200/ns/net")]  # creates alone scan nothing
    assert index.containers[APP].netns == ino
