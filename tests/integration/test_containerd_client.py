"""The containerd/CRI client against a real private containerd with real CRI pods."""

import asyncio
import ipaddress
import os
import secrets
import socket
import time

import pytest

from netstatd.sources.containerd.client import (
    CRI_NAMESPACE,
    ContainerdClient,
    ContainerdEvent,
    ContainerdUnavailable,
    CriUnavailable,
)
from netstatd.testing.containerd import PLAIN_NS, PrivateContainerd, systemd_scope_path

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pods(ctd):
    web = ctd.run_pod("web", {"app": ["sleep", "3600"], "sidecar": ["sleep", "3600"]}, namespace="shop")
    hostnet = ctd.run_pod("agent", {"main": ["sleep", "3600"]}, namespace="kube-system", host_network=True)
    return web, hostnet


async def test_containers_and_tasks(ctd, pods):
    web, hostnet = pods
    async with ContainerdClient(ctd.socket) as client:
        assert CRI_NAMESPACE in await client.namespaces()
        containers = {c.id: c for c in await client.list_containers()}
        tasks = {t.container_id: t for t in await client.list_tasks()}
        for pod in (web, hostnet):
            for name, cid in pod.containers.items():
                c = containers[cid]
                assert c.namespace == CRI_NAMESPACE
                assert c.image == "netstatd.test/busybox:1"
                assert c.labels["io.kubernetes.pod.name"] == pod.name
                assert c.labels["io.kubernetes.pod.namespace"] == pod.namespace
                assert c.labels["io.kubernetes.pod.uid"] == pod.uid
                assert c.labels["io.kubernetes.container.name"] == name
                assert c.pod_sandbox_id == pod.sandbox_id
                # kubelet's cgroupfs layout: /kubepods/<qos>/pod<uid>/<container id>
                assert c.cgroups_path == f"/kubepods/besteffort/pod{pod.uid}/{cid}"
                assert "network" in c.linux_namespaces  # joins the sandbox's (or, host network, the host's)
                assert tasks[cid].status == "RUNNING"
                assert tasks[cid].pid == ctd.container_pid(cid)
                assert tasks[cid].pid in await client.list_pids(CRI_NAMESPACE, cid)
            sandbox = containers[pod.sandbox_id]
            assert sandbox.labels["io.cri-containerd.kind"] == "sandbox"
            assert sandbox.pod_sandbox_id == pod.sandbox_id


async def test_pod_sandboxes(ctd, pods):
    web, hostnet = pods
    async with ContainerdClient(ctd.socket) as client:
        sandboxes = {s.id: s for s in await client.list_pod_sandboxes()}
    s = sandboxes[web.sandbox_id]
    assert (s.name, s.namespace, s.uid, s.ready, s.host_network) == ("web", "shop", web.uid, True, False)
    assert len(s.ips) == 1 and ipaddress.ip_address(s.ips[0]) in ipaddress.ip_network(ctd.subnet)
    assert s.pid == ctd.container_pid(web.sandbox_id)
    # the netns mount and the sandbox process are the same namespace
    assert os.stat(s.netns_path).st_ino == os.stat(f"/proc/{s.pid}/ns/net").st_ino
    h = sandboxes[hostnet.sandbox_id]
    assert (h.name, h.namespace, h.host_network, h.netns_path) == ("agent", "kube-system", True, "")
    assert os.stat(f"/proc/{h.pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino


async def test_cgroup_shapes(ctd, pods):
    """kubelet's systemd-driver shape (built by hand: no systemd here) and containerd's plain /<ns>/<id>."""
    web = pods[0]
    scoped_id = secrets.token_hex(32)
    scope = systemd_scope_path(web.uid, scoped_id)
    labels = {"io.kubernetes.pod.uid": web.uid, "io.kubernetes.container.name": "scoped"}
    web_netns = f"/proc/{ctd.container_pid(web.sandbox_id)}/ns/net"
    scoped_pid = ctd.run_plain_container(scoped_id, ["sleep", "3600"], scope, labels=labels, netns_path=web_netns)
    plain_pid = ctd.run_plain_container("plain-1", ["sleep", "3600"])
    async with ContainerdClient(ctd.socket) as client:
        containers = {(c.namespace, c.id): c for c in await client.list_containers()}
        tasks = {(t.namespace, t.container_id): t.pid for t in await client.list_tasks()}
    assert containers[(PLAIN_NS, scoped_id)].cgroups_path == scope
    assert labels.items() <= containers[(PLAIN_NS, scoped_id)].labels.items()
    assert containers[(PLAIN_NS, scoped_id)].linux_namespaces["network"] == web_netns
    assert containers[(PLAIN_NS, "plain-1")].cgroups_path == f"/{PLAIN_NS}/plain-1"
    assert tasks[(PLAIN_NS, scoped_id)] == scoped_pid and tasks[(PLAIN_NS, "plain-1")] == plain_pid
    with open(f"/proc/{scoped_pid}/cgroup") as f:
        assert f"0::{scope}" in f.read().splitlines()
    with open(f"/proc/{plain_pid}/cgroup") as f:
        assert f"0::/{PLAIN_NS}/plain-1" in f.read().splitlines()


async def test_events_within_one_second(ctd, pods):
    received: list[tuple[float, ContainerdEvent]] = []

    async def collect(client: ContainerdClient) -> None:
        async for ev in client.events():
            received.append((time.monotonic(), ev))

    async def wait_for(kind: str, container_id: str, since: float) -> ContainerdEvent:
        deadline = since + 1.0
        while time.monotonic() < deadline:
            for _t, ev in received:
                if ev.kind == kind and ev.container_id == container_id:
                    return ev
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {kind} for {container_id} within 1 s; got {[e for _, e in received]}")

    async with ContainerdClient(ctd.socket) as client:
        task = asyncio.create_task(collect(client))
        try:
            await asyncio.sleep(0.3)  # let the subscription reach the daemon
            web = pods[0]
            cid = await asyncio.to_thread(ctd.start_container, web, "job", ["sh", "-c", "sleep 0.3; exit 3"])
            started = time.monotonic()
            create = await wait_for("ContainerCreate", cid, started)
            assert create.namespace == CRI_NAMESPACE and create.topic == "/containers/create"
            start = await wait_for("TaskStart", cid, started)
            assert start.pid > 0
            exit_ = await wait_for("TaskExit", cid, time.monotonic() + 0.3)
            assert (exit_.pid, exit_.exit_status, exit_.exec_id) == (start.pid, 3, "")
            await asyncio.to_thread(ctd.remove_container, cid)
            removed = time.monotonic()
            await wait_for("TaskDelete", cid, removed)
            await wait_for("ContainerDelete", cid, removed)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_unavailable_when_socket_missing(tmp_path):
    missing = ContainerdClient(str(tmp_path / "containerd.sock"))
    with pytest.raises(ContainerdUnavailable, match="does not exist"):
        await missing.list_containers()
    with pytest.raises(ContainerdUnavailable):
        await anext(aiter(missing.events()))

    # a socket file nobody accepts on (a daemon that died without removing it)
    path = str(tmp_path / "dead.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
    async with ContainerdClient(path, timeout=2) as dead:
        with pytest.raises(ContainerdUnavailable):
            await dead.list_tasks()
        with pytest.raises(ContainerdUnavailable):
            await dead.list_pod_sandboxes()


async def test_without_the_cri_plugin():
    """containerd's own API answers; the CRI calls say CriUnavailable (not ContainerdUnavailable)."""
    cid = f"bare-{secrets.token_hex(3)}"  # ctr's runc state and cgroup are shared with other daemons
    with PrivateContainerd(cri=False) as bare:
        bare.run_plain_container(cid, ["sleep", "3600"])
        async with ContainerdClient(bare.socket) as client:
            assert [c.id for c in await client.list_containers([PLAIN_NS])] == [cid]
            with pytest.raises(CriUnavailable):
                await client.list_pod_sandboxes()
            with pytest.raises(CriUnavailable):
                await client.pod_sandbox("x" * 64)


async def test_daemon_restart_breaks_the_stream_and_tasks_survive(ctd, pods):
    """Last in the module: it kills the daemon. A client keeps its channel across the restart."""
    async with ContainerdClient(ctd.socket, timeout=2) as client:
        before = {t.container_id: t.pid for t in await client.list_tasks()}
        pending = asyncio.ensure_future(anext(aiter(client.events())))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(ctd.stop_daemon, True)  # SIGKILL, as a crash
        with pytest.raises(ContainerdUnavailable):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(ContainerdUnavailable):
            await client.list_tasks()
        await asyncio.to_thread(ctd.start_daemon)
        deadline = time.monotonic() + 10
        while True:  # the channel reconnects with gRPC's own backoff
            try:
                after = {t.container_id: t.pid for t in await client.list_tasks()}
                break
            except ContainerdUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        print(f"reconnected {10 - (deadline - time.monotonic()):.2f} s after the daemon was ready")
        assert after == before
        assert {s.id for s in await client.list_pod_sandboxes()} >= {p.sandbox_id for p in pods}
