"""IP inventory: host / pod / loopback kinds, host-network pods, the netns fallback, change events."""

from __future__ import annotations

from netstatd.sources.addresses import InterfaceAddress
from netstatd.state.containers import Pod
from netstatd.state.ips import IpInventory, build_inventory

HOST = [
    InterfaceAddress("127.0.0.1", 4, 8, "lo", "host"),
    InterfaceAddress("::1", 6, 128, "lo", "host"),
    InterfaceAddress("192.168.1.5", 4, 24, "eth0", "global"),
    InterfaceAddress("fd00::5", 6, 64, "eth0", "global"),
]
WEB = Pod("s1", "web", "shop", "u1", {}, False, ("10.232.0.10",), 4026532001, "/run/netns/web")
AGENT = Pod("s2", "agent", "kube-system", "u2", {}, True, (), 4026531840, "/proc/7/ns/net")
BARE = Pod("s3", "bare", "shop", "u3", {}, False, (), 4026532003, "/run/netns/bare")


def bare_netns(pod: Pod) -> list[InterfaceAddress]:
    assert pod is BARE  # only a pod without CRI IPs is read
    return [InterfaceAddress("127.0.0.1", 4, 8, "lo", "host"), InterfaceAddress("10.232.0.11", 4, 24, "eth0", "global")]


def test_kinds_pods_and_host_network_pods() -> None:
    inv = build_inventory(HOST, [WEB, AGENT, BARE], bare_netns)
    host = {ip: e["kind"] for (ip, sid), e in inv.items() if sid == ""}
    assert host == {"127.0.0.1": "loopback", "::1": "loopback", "192.168.1.5": "host", "fd00::5": "host"}
    assert inv[("192.168.1.5", "")]["podName"] is None and inv[("192.168.1.5", "")]["usesHostNetwork"] is False
    web = inv[("10.232.0.10", "s1")]
    assert (web["kind"], web["podName"], web["namespace"], web["podUID"], web["source"]) == (
        "pod",
        "web",
        "shop",
        "u1",
        "cri",
    )
    assert web["family"] == "IPv4" and web["usesHostNetwork"] is False
    # the host-network pod shows the host's non-loopback IPs, flagged and named
    agent = {ip: e for (ip, sid), e in inv.items() if sid == "s2"}
    assert set(agent) == {"192.168.1.5", "fd00::5"}
    assert all(e["kind"] == "host" and e["usesHostNetwork"] and e["podName"] == "agent" for e in agent.values())
    # no CRI IP: the pod netns's global addresses
    bare = {ip: e for (ip, sid), e in inv.items() if sid == "s3"}
    assert list(bare) == ["10.232.0.11"] and bare["10.232.0.11"]["source"] == "netns"
    assert bare["10.232.0.11"]["interface"] == "eth0"


def test_updates_stream_only_changes() -> None:
    inv = IpInventory("n1", lambda: "T")
    first = inv.update(build_inventory(HOST, [WEB], bare_netns))
    assert sorted(e["ip"] for e in first) == ["10.232.0.10", "127.0.0.1", "192.168.1.5", "::1", "fd00::5"]
    assert all(e["type"] == "ip.added" and e["nodeName"] == "n1" for e in first)
    assert inv.update(build_inventory(HOST, [WEB], bare_netns)) == []  # nothing changed, nothing sent
    moved = [*HOST[:2], InterfaceAddress("192.168.1.6", 4, 24, "eth0", "global"), HOST[3]]
    out = inv.update(build_inventory(moved, [], bare_netns))  # a new host IP, the pod is gone
    assert sorted((e["type"], e["ip"]) for e in out) == [
        ("ip.added", "192.168.1.6"),
        ("ip.removed", "10.232.0.10"),
        ("ip.removed", "192.168.1.5"),
    ]
    assert sorted(e["ip"] for e in inv.snapshot()) == ["127.0.0.1", "192.168.1.6", "::1", "fd00::5"]
