"""The multiplexer with real agents: every "node" is a network namespace on one bridge, with its own agent.

The agents share this machine's kernel, so each sees all of its traffic and loads its own programs
(the cgroup hooks are bpf links, which coexist: every agent below reports connections). Peers come from
a real unbound answering `netstatd-headless.netstatd.test.` (found through the search domain); nothing
leaves the machine (testing/cluster.py).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from netstatd.testing.agent import free_port, netstatd_binary
from netstatd.testing.cluster import DOMAIN, Cluster, garbage_peer_cmd, in_netns
from netstatd.testing.stream import StreamClient
from tests.conftest import require_root, wait_until

pytestmark = pytest.mark.timeout(120)

AGENTS = 3


@pytest.fixture(scope="module")
def cluster():
    require_root()
    with Cluster(AGENTS + 1) as c:  # the last node gets its agent (and DNS record) in a test
        c.set_records([n.ipv4 for n in c.nodes[:AGENTS]])
        c.start_agents([c.agent(i) for i in range(AGENTS)])
        try:
            yield c
        finally:
            for i, a in c.agents.items():
                print(f"--- agent {i} log (tail)\n{a.log_text()[-1500:]}")


@contextlib.contextmanager
def mux_client(c: Cluster, i: int = 0) -> Iterator[StreamClient]:
    with in_netns(c.switch.netns_path):  # the client's thread stays in the switch netns
        client = StreamClient(c.agents[i].mux_ws_url).start()
    try:
        client.wait_snapshot()
        yield client
    finally:
        client.stop()


def node_of(c: Cluster, i: int) -> dict:
    return {"name": f"node-{i}", "ip": c.nodes[i].ipv4}


def wait_since(client: StreamClient, mark: int, pred: Callable[[dict], bool], timeout: float = 10) -> dict:
    """The first event matching pred among those received after the first `mark` events."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in client.events[mark:] if pred(e)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no matching event within {timeout}s"
        time.sleep(0.05)


def wait_for_nodes(client: StreamClient, c: Cluster, nodes: range, timeout: float = 15, since: int = 0) -> None:
    """Each node's own address (its ip.added, which only that agent has) has reached the client."""
    for i in nodes:
        n = node_of(c, i)
        wait_since(
            client,
            since,
            lambda e, n=n: e["type"] == "ip.added" and e["nodeName"] == n["name"] and e["ip"] == n["ip"],
            timeout,
        )


def tcp_exchange(c: Cluster, client_node: int, server_node: int) -> int:
    """One TCP connection between two nodes; returns the server's port."""
    port = free_port()
    server = c.popen(
        c.nodes[server_node],
        "python3",
        "-c",
        "import socket,sys;s=socket.create_server(('',int(sys.argv[1])));c,_=s.accept();c.recv(9);c.close()",
        str(port),
    )
    deadline = time.monotonic() + 5
    while (
        c.nodes[client_node].run("python3", "-c", CONNECT, c.nodes[server_node].ipv4, str(port), check=False).returncode
    ):
        assert time.monotonic() < deadline, "the test server did not listen"
        time.sleep(0.1)
    server.wait(5)
    return port


UDP_SERVER = (
    "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('',int(sys.argv[1])));"
    "print('ready',flush=True);s.recvfrom(9)"
)
UDP_SEND = (
    "import socket,sys;socket.socket(socket.AF_INET,socket.SOCK_DGRAM).sendto(b'x',(sys.argv[1],int(sys.argv[2])))"
)
CONNECT = "import socket,sys;socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1).sendall(b'x')"


def test_one_client_sees_every_node(cluster):
    with mux_client(cluster) as client:
        info = client.events[0]
        assert info["type"] == "host.info" and info["mux"] is True and info["nodeName"] == "node-0"
        status = client.wait_for(lambda e: e["type"] == "mux.status")
        assert status["fanoutService"] == "netstatd-headless" and status["message"] is None
        assert status["peers"] == sorted(n.ipv4 for n in cluster.nodes[:AGENTS])
        wait_for_nodes(client, cluster, range(AGENTS))
        for i in range(AGENTS):
            s = client.wait_for(lambda e, i=i: e["type"] == "peer.status" and e.get("nodeName") == f"node-{i}")
            assert s["status"] == "connected" and s["peer"] == cluster.nodes[i].ipv4
        # Live events, each keeping its origin: every agent sees this kernel's connection.
        port = tcp_exchange(cluster, 1, 2)
        for i in range(AGENTS):
            client.wait_for(
                lambda e, i=i: (
                    e["type"] == "connection.event" and e["nodeName"] == f"node-{i}" and e["remotePort"] == port
                ),
                timeout=10,
            )


def test_cgroup_hooks_of_every_agent_coexist(cluster):
    """UDP bind and sendto are seen through the cgroup hooks (bpf links): every agent's run, not only one's."""
    port = free_port()
    server = cluster.popen(cluster.nodes[2], "python3", "-c", UDP_SERVER, str(port), stdout=subprocess.PIPE, text=True)
    with mux_client(cluster) as client:
        assert server.stdout.readline().strip() == "ready"
        cluster.nodes[1].run("python3", "-c", UDP_SEND, cluster.nodes[2].ipv4, str(port))
        server.wait(5)
        for i in range(AGENTS):
            client.wait_for(
                lambda e, i=i: e["type"] == "port.listening" and e["nodeName"] == f"node-{i}" and e["port"] == port
            )
            client.wait_for(
                lambda e, i=i: (
                    e["type"] == "connection.event"
                    and e["nodeName"] == f"node-{i}"
                    and e["protocol"] == "UDP"
                    and e["remotePort"] == port
                )
            )


def test_a_name_learned_on_one_node_names_connections_of_all(cluster):
    """node-1's DNS cache reports web.netstatd.test over DNSTap; node-0's connection to it shows the name."""
    target = cluster.nodes[2].ipv4
    cluster.add_record(f"web.{DOMAIN}. 300 IN A {target}")
    cluster.dnstap_resolver(cluster.nodes[1], cluster.agents[1].dnstap_port)
    with mux_client(cluster) as client:
        wait_for_nodes(client, cluster, range(AGENTS))
        assert cluster.resolve(cluster.nodes[1], f"web.{DOMAIN}.") == [target]
        learned = client.wait_for(lambda e: e["type"] == "dns.resolved" and e["ip"] == target, timeout=10)
        assert learned["nodeName"] == "node-1" and learned["hostname"] == f"web.{DOMAIN}"
        port = tcp_exchange(cluster, 0, 2)
        e = client.wait_for(
            lambda e: (
                e["type"] == "connection.event"
                and e["nodeName"] == "node-0"
                and e["remoteIP"] == target
                and e["remotePort"] == port
            )
        )
        assert e["remoteHostname"] == f"web.{DOMAIN}"
    # Only node-1 learned it: node-0's own stream has no such name.
    with in_netns(cluster.switch.netns_path):
        direct = StreamClient(cluster.agents[0].ws_url).start()
    try:
        done = direct.wait_snapshot()
        assert not [e for e in direct.events[: direct.events.index(done)] if e["type"] == "dns.resolved"]
    finally:
        direct.stop()


def test_clients_share_one_upstream_per_peer(cluster):
    """A mux opens one upstream per peer for all its clients; a mux without clients opens none."""
    connected = 'netstatd_mux_peers{status="connected"}'
    total = "netstatd_client_connections_total"
    with mux_client(cluster, 0) as first:
        wait_for_nodes(first, cluster, range(AGENTS))
        wait_until(lambda: cluster.metric(0, connected) == AGENTS)
        assert cluster.metric(1, "netstatd_mux_active") == 0  # nobody watches node-1's mux yet
        before = [cluster.metric(i, total) for i in range(AGENTS)]
        with mux_client(cluster, 0) as second:
            wait_for_nodes(second, cluster, range(AGENTS))
            assert cluster.metric(0, "netstatd_mux_clients_connected") == 2
            assert [cluster.metric(i, total) for i in range(AGENTS)] == before
            with mux_client(cluster, 1) as third, mux_client(cluster, 1) as fourth:
                for client in (third, fourth):
                    wait_for_nodes(client, cluster, range(AGENTS))
                # node-1's mux: one more upstream at each peer, for both of its clients
                assert [cluster.metric(i, total) for i in range(AGENTS)] == [n + 1 for n in before]
                # each node port streams to the two active muxes, and to nothing else (no mux feeds a mux)
                assert [cluster.metric(i, "netstatd_clients_connected") for i in range(AGENTS)] == [2] * AGENTS


def test_stopped_node_leaves_and_comes_back(cluster):
    stopped = node_of(cluster, 2)
    with mux_client(cluster) as client:
        wait_for_nodes(client, cluster, range(AGENTS))
        cluster.agents[2].stop()
        client.wait_for(lambda e: e["type"] == "node.removed" and e["nodeName"] == "node-2", timeout=10)
        s = client.wait_for(lambda e: e["type"] == "peer.status" and e["status"] == "reconnecting")
        assert s["peer"] == stopped["ip"] and s["retryInS"] > 0 and s["error"]
        with mux_client(cluster) as fresh:  # the merged state has no trace of node-2
            done = fresh.wait_snapshot()
            state = fresh.events[: fresh.events.index(done)]
            assert not [e for e in state if e["nodeName"] == "node-2" and e["type"] != "peer.status"]
            assert {e["nodeName"] for e in state if e["type"] == "ip.added"} == {"node-0", "node-1"}
        mark = len(client.events)
        cluster.start_agents([cluster.agents[2]])
        s = wait_since(client, mark, lambda e: e["type"] == "peer.status" and e["status"] == "connected", 25)
        assert s["nodeName"] == "node-2" and s["peer"] == stopped["ip"]
        wait_for_nodes(client, cluster, range(2, 3), since=mark)


def test_empty_service_says_so_and_a_new_record_appears(cluster):
    # Node 3's agent looks for a name that does not exist: its mux page says why it shows nothing.
    new = AGENTS
    cluster.start_agents([cluster.agent(new, env={"FANOUT_SERVICE": "netstatd-none"})])
    with mux_client(cluster, new) as own:
        status = own.wait_for(lambda e: e["type"] == "mux.status")
        assert status["peers"] == [] and "netstatd-none" in status["message"]
    assert "resolves to no address" in cluster.agents[new].log_text()
    with mux_client(cluster) as client:
        wait_for_nodes(client, cluster, range(AGENTS))
        assert not client.matching(lambda e: e["nodeName"] == f"node-{new}")
        cluster.set_records([n.ipv4 for n in cluster.nodes[: new + 1]])
        wait_for_nodes(client, cluster, range(new, new + 1), timeout=15)  # next lookup within 5 s
        cluster.set_records([n.ipv4 for n in cluster.nodes[:new]])
        gone = client.wait_for(lambda e: e["type"] == "peer.status" and e["status"] == "gone", timeout=15)
        assert gone["peer"] == cluster.nodes[new].ipv4 and gone["nodeName"] == f"node-{new}"
        client.wait_for(lambda e: e["type"] == "node.removed" and e["nodeName"] == f"node-{new}")


def test_garbage_peer_is_dropped_and_others_carry_on(cluster):
    fake = cluster.add_host()
    peer = cluster.popen(
        fake, *garbage_peer_cmd("0.0.0.0", 5280, "json,oversized,type,mux"), stdout=subprocess.PIPE, text=True
    )
    assert peer.stdout.readline().strip() == "ready"
    with mux_client(cluster) as client:
        cluster.set_records([n.ipv4 for n in cluster.nodes[:AGENTS]] + [fake.ipv4])
        # It first looks fine (its snapshot is merged), then is cut off at the first garbage frame.
        client.wait_for(lambda e: e["type"] == "port.listening" and e["nodeName"] == "fake", timeout=10)
        client.wait_for(lambda e: e["type"] == "node.removed" and e["nodeName"] == "fake", timeout=10)
        deadline = time.monotonic() + 20
        reasons = ("json", "oversized", "type", "mux")
        while time.monotonic() < deadline:  # backoff 1, 2, 4 s between the four connections
            counts = {r: cluster.metric(0, f'netstatd_mux_peer_garbage_total{{reason="{r}"}}') for r in reasons}
            if all(counts.values()):
                break
            time.sleep(0.5)
        assert all(counts.values()), counts
        s = client.matching(lambda e: e["type"] == "peer.status" and e["peer"] == fake.ipv4)[-1]
        assert s["status"] == "reconnecting" and s["error"]
        # The real nodes stayed connected and keep streaming.
        assert cluster.metric(0, 'netstatd_mux_peers{status="connected"}') == AGENTS
        port = tcp_exchange(cluster, 0, 1)
        for i in range(AGENTS):
            client.wait_for(
                lambda e, i=i: (
                    e["type"] == "connection.event" and e["nodeName"] == f"node-{i}" and e["remotePort"] == port
                ),
                timeout=10,
            )
    assert "disconnected: json" in cluster.agents[0].log_text()


def test_mux_port_in_use_is_one_clear_line():
    require_root()
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        argv = [netstatd_binary(), "--http-port", str(free_port()), "--http-mux-port", str(port)]
        argv += ["--dnstap-port", str(free_port()), "--dnstap-mux-port", str(free_port())]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    (line,) = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert f"port {port} is already in use" in line and "--http-mux-port" in line
