"""Real kernel, real traffic between two network namespaces, events read off the WebSocket."""

import os
import subprocess
import sys

import pytest

from tests.integration import peers
from tests.integration.peers import close_of, finish, start_peer

PYTHON_EXE = os.path.realpath(sys.executable)
CLIENT_STATES = ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
SERVER_STATES = ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"]


def events_of(stream, cookie_filter) -> list[dict]:
    return stream.matching(lambda e: e["type"] == "connection.event" and cookie_filter(e))


def states_of(events: list[dict]) -> list[str]:
    return [s for e in events for s in e["states"]]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tcp_both_sides_have_their_owner_netns_and_states_in_order(hosts, stream, family):
    a, b = hosts.a, hosts.b
    b_ip = b.ipv4 if family == "ipv4" else b.ipv6
    a_ip = a.ipv4 if family == "ipv4" else a.ipv6
    server, port = start_peer(b, peers.TCP_SERVER, b_ip)
    client, client_port = start_peer(a, peers.TCP_CLIENT, b_ip, str(port))
    finish(client, server)

    def client_side(e):
        return e["netns"] == a.netns_inode and e["localPort"] == client_port and e["remotePort"] == port

    def server_side(e):
        return e["netns"] == b.netns_inode and e["localPort"] == port and e["remotePort"] == client_port

    cclose = stream.wait_for(lambda e: e["type"] == "connection.event" and client_side(e) and e["state"] == "CLOSE")
    sclose = stream.wait_for(lambda e: e["type"] == "connection.event" and server_side(e) and e["state"] == "CLOSE")
    # by cookie: every event of each socket, whatever its ports say
    cev = events_of(stream, lambda e: e["sockCookie"] == cclose["sockCookie"])
    sev = events_of(stream, lambda e: e["sockCookie"] == sclose["sockCookie"])

    assert states_of(cev) == CLIENT_STATES
    assert states_of(sev) == SERVER_STATES
    fam = "IPv4" if family == "ipv4" else "IPv6"
    for e in cev:
        assert (e["pid"], e["exe"]) == (client.pid, PYTHON_EXE)
        assert e["comm"]
        assert (e["remoteIP"], e["remotePort"], e["family"], e["protocol"]) == (b_ip, port, fam, "TCP")
        assert e["netns"] == a.netns_inode
        assert e["direction"] == "outbound"
        assert e["nodeName"] and e["timestamp"].endswith("Z")
    # The passive side's ESTABLISHED and CLOSE run in softirq, often while the
    # client process is on the CPU: the owner must still be the server.
    for e in sev:
        assert e["pid"] == server.pid, e
        assert e["exe"] == PYTHON_EXE
        assert (e["localIP"], e["remoteIP"], e["family"]) == (b_ip, a_ip, fam)
        assert e["netns"] == b.netns_inode
        assert e["direction"] == "inbound"
    assert cev[-1]["localIP"] == a_ip


def test_listen_reports_port_and_owner_and_close(hosts, stream):
    b = hosts.b
    proc, port = start_peer(b, peers.TCP_SERVER, b.ipv4)
    ev = stream.wait_for(lambda e: e["type"] == "port.listening" and e["port"] == port and e["netns"] == b.netns_inode)
    assert (ev["protocol"], ev["ip"], ev["pid"], ev["exe"]) == ("TCP", b.ipv4, proc.pid, PYTHON_EXE)
    proc.kill()
    proc.wait()
    closed = stream.wait_for(lambda e: e["type"] == "port.closed" and e["port"] == port)
    assert closed["netns"] == b.netns_inode


def test_listen_on_ephemeral_port_reports_the_real_port(hosts, stream):
    b = hosts.b
    proc, port = start_peer(b, peers.TCP_LISTEN_EPHEMERAL)
    try:
        assert port != 0
        ev = stream.wait_for(
            lambda e: e["type"] == "port.listening" and e["netns"] == b.netns_inode and e["pid"] == proc.pid
        )
        assert ev["port"] == port
    finally:
        finish(proc)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_connected_exchange_both_sides(hosts, stream, family):
    a, b = hosts.a, hosts.b
    b_ip = b.ipv4 if family == "ipv4" else b.ipv6
    server, port = start_peer(b, peers.UDP_SERVER, b_ip, "3")
    client, client_port = start_peer(a, peers.UDP_CONNECTED_CLIENT, b_ip, str(port))
    try:
        listening = stream.wait_for(
            lambda e: e["type"] == "port.listening" and e["protocol"] == "UDP" and e["port"] == port
        )
        assert listening["pid"] == server.pid
        out = stream.wait_for(
            lambda e: (
                e["type"] == "connection.event"
                and e["protocol"] == "UDP"
                and e["netns"] == a.netns_inode
                and e["localPort"] == client_port
            )
        )
        assert (out["remoteIP"], out["remotePort"], out["pid"], out["exe"]) == (b_ip, port, client.pid, PYTHON_EXE)
        assert (out["direction"], out["state"]) == ("outbound", "ACTIVE")
        inb = stream.wait_for(
            lambda e: (
                e["type"] == "connection.event"
                and e["protocol"] == "UDP"
                and e["netns"] == b.netns_inode
                and e["remotePort"] == client_port
            )
        )
        assert (inb["localPort"], inb["pid"], inb["direction"]) == (port, server.pid, "inbound")
        # three datagrams each way, deduplicated to one flow per side
        flows = stream.matching(
            lambda e: (
                e["type"] == "connection.event"
                and e["protocol"] == "UDP"
                and e["netns"] == a.netns_inode
                and e["localPort"] == client_port
            )
        )
        # The kernel announces a flow's sends and its receives at most once each per 5 s; the two
        # become one event when they fall in the same 50 ms flush.
        assert {(e["sockCookie"], e["remoteIP"], e["remotePort"]) for e in flows} == {(out["sockCookie"], b_ip, port)}
        assert len(flows) <= 2, flows
    finally:
        finish(client, server)
    closed = stream.wait_for(
        lambda e: (
            e["type"] == "connection.event"
            and e["protocol"] == "UDP"
            and e["netns"] == a.netns_inode
            and e["localPort"] == client_port
            and e["state"] == "CLOSE"
        )
    )
    assert closed["pid"] == client.pid


def test_udp_unconnected_sendto_reports_its_destination(hosts, stream):
    a, b = hosts.a, hosts.b
    server, port = start_peer(b, peers.UDP_SERVER, b.ipv4, "1")
    client, client_port = start_peer(a, peers.UDP_SENDTO_CLIENT, b.ipv4, str(port))
    try:
        out = stream.wait_for(
            lambda e: (
                e["type"] == "connection.event"
                and e["protocol"] == "UDP"
                and e["netns"] == a.netns_inode
                and e["pid"] == client.pid
            )
        )
        assert (out["remoteIP"], out["remotePort"], out["localPort"]) == (b.ipv4, port, client_port)
        assert out["direction"] == "outbound"
    finally:
        finish(client, server)


def test_loopback_is_excluded_by_default(hosts, stream):
    b = hosts.b
    server, port = start_peer(b, peers.TCP_SERVER, "127.0.0.1")
    client, _ = start_peer(b, peers.TCP_CLIENT, "127.0.0.1", str(port))
    finish(client, server)
    marker, mport = start_peer(b, peers.TCP_SERVER, b.ipv4)  # a later event proves the stream moved on
    stream.wait_for(lambda e: e["type"] == "port.listening" and e["port"] == mport)
    marker.kill()
    assert not stream.matching(
        lambda e: e.get("netns") == b.netns_inode and (e.get("localIP") == "127.0.0.1" or e.get("ip") == "127.0.0.1")
    )


def test_accepted_connection_belongs_to_the_accepting_process(hosts, stream):
    a, b = hosts.a, hosts.b
    server = b.popen(sys.executable, "-c", peers.TCP_PREFORK_SERVER, b.ipv4, stdout=subprocess.PIPE, text=True)
    _, port, worker = server.stdout.readline().split()
    port, worker = int(port), int(worker)
    client, client_port = start_peer(a, peers.TCP_CLIENT, b.ipv4, str(port))
    finish(client, server)
    close = close_of(stream, b.netns_inode, remote_port=client_port)
    assert worker != server.pid
    assert close["pid"] == worker  # not the listener's pid
    assert close["direction"] == "inbound"
    listening = stream.wait_for(lambda e: e["type"] == "port.listening" and e["port"] == port)
    assert listening["pid"] == server.pid
