"""A TCP connection's end, from the real kernel between two network namespaces: its counters (known
transfers), a failed connect's error (a closed port; a SYN dropped by iptables), and resets."""

import contextlib
import re
import subprocess

import pytest

from tests.integration import peers
from tests.integration.peers import close_of, start_peer

SENT, RECEIVED = 1_000_000, 12_345

# Takes a connection, leaves what it sent unread and closes: the kernel resets the connection.
UNREAD_SERVER = """
import socket, sys, time
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen()
print('ready', s.getsockname()[1], flush=True)
c, _ = s.accept()
while not c.recv(1, socket.MSG_PEEK):
    pass
c.close()
sys.stdin.read()
"""

PUSH_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print('ready', c.getsockname()[1], flush=True)
c.sendall(b'unread')
try:
    c.recv(1)
except ConnectionResetError:
    pass
c.close()
"""


# Sends its bytes, waits for the client's word that they all arrived, then for "close" on stdin.
SENDING_SERVER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen()
print('ready', s.getsockname()[1], flush=True)
c, _ = s.accept()
c.sendall(b's' * int(sys.argv[2]))
assert c.recv(1) == b'r'
print('sent', flush=True)
sys.stdin.readline()
c.close()
"""

# Reads its bytes, says so, and closes once the server has.
RECEIVING_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print('ready', c.getsockname()[1], flush=True)
need = int(sys.argv[3])
while need:
    need -= len(c.recv(min(need, 65536)))
c.sendall(b'r')
assert c.recv(1) == b''
c.close()
"""


def finish(*procs: subprocess.Popen) -> None:
    peers.finish(*procs, check=True)


def retrans_segs(host) -> int:
    """The host namespace's own count of TCP segments retransmitted (/proc/net/snmp, Tcp RetransSegs)."""
    names, values = [
        line.split() for line in host.run("cat", "/proc/net/snmp").stdout.splitlines() if line.startswith("Tcp:")
    ]
    return int(values[names.index("RetransSegs")])


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_both_ends_of_a_known_transfer_carry_its_exact_counters(hosts, stream, family):
    a, b = hosts.a, hosts.b
    b_ip = b.ipv4 if family == "ipv4" else b.ipv6
    retrans_before = retrans_segs(a), retrans_segs(b)
    server, port = start_peer(b, peers.TCP_EXCHANGE_SERVER, b_ip, str(SENT), str(RECEIVED))
    client, client_port = start_peer(a, peers.TCP_EXCHANGE_CLIENT, b_ip, str(port), str(SENT), str(RECEIVED))
    finish(client, server)
    # each namespace holds this one connection: its retransmissions are the namespace's. A loaded machine
    # may retransmit even on a veth pair (a loss probe or a timeout firing before a late ACK).
    retransmitted = retrans_segs(a) - retrans_before[0], retrans_segs(b) - retrans_before[1]
    client_close = close_of(stream, a.netns_inode, local_port=client_port)
    server_close = close_of(stream, b.netns_inode, remote_port=client_port)
    assert (client_close["bytesSent"], client_close["bytesReceived"]) == (SENT, RECEIVED)
    assert (server_close["bytesSent"], server_close["bytesReceived"]) == (RECEIVED, SENT)
    assert (client_close["retransmits"], server_close["retransmits"]) == retransmitted
    for e in (client_close, server_close):
        assert e["segmentsSent"] > 0 and e["segmentsReceived"] > 0
        assert 0 < e["rttUs"] < 1_000_000  # a veth pair: well under a second
        assert "error" not in e and "reset" not in e
    # ~1 MB in segments of at most a 64 KiB TSO burst or an MTU: more than 15 segments either way
    assert client_close["segmentsSent"] >= SENT // 65536
    assert server_close["segmentsReceived"] >= SENT // 65536


def test_a_connect_to_a_closed_port_is_refused_and_nothing_says_it_sent_a_reset(hosts, stream, agent):
    a, b = hosts.a, hosts.b
    before = agent.metric('netstatd_connect_failures_total{reason="ECONNREFUSED"}')
    client, port = start_peer(a, peers.TCP_CONNECT, b.ipv4, "9")  # nothing listens on 9 in b
    assert client.stdout.readline().strip() == "ECONNREFUSED"
    finish(client)
    close = close_of(stream, a.netns_inode, local_port=port)
    assert close["error"] == "ECONNREFUSED"
    assert "reset" not in close and close["bytesSent"] == 0
    assert agent.metric('netstatd_connect_failures_total{reason="ECONNREFUSED"}') == before + 1
    assert not stream.matching(lambda e: e.get("reset") == "sent" and e["netns"] in (a.netns_inode, b.netns_inode))


def test_a_connect_whose_syn_is_dropped_times_out(hosts, stream, agent):
    a, b = hosts.a, hosts.b
    port = 7  # nothing listens there: without the DROP the connect would be refused at once
    rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    b.run("iptables", "-w", "-A", *rule)
    a.run("sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1")  # ~3 s instead of ~2 min
    try:
        client, local_port = start_peer(a, peers.TCP_CONNECT, b.ipv4, str(port))
        assert client.stdout.readline().strip() == "ETIMEDOUT"
        finish(client)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            b.run("iptables", "-w", "-D", *rule)
        a.run("sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=6")
    close = close_of(stream, a.netns_inode, local_port=local_port)
    assert close["error"] == "ETIMEDOUT" and "reset" not in close
    # every segment it sent was the SYN: the first, then its retransmissions
    assert close["retransmits"] >= 1 and close["segmentsSent"] == close["retransmits"] + 1
    assert agent.metric('netstatd_connect_failures_total{reason="ETIMEDOUT"}') >= 1


def test_a_connect_that_lasts_is_shown_with_its_process_before_it_ends(hosts, stream):
    """The kernel folds a connect's SYN_SENT into its next record (docs/kernel.md): one still
    waiting at a stats read (--stats-interval, 5 s here) is reported then, with its process."""
    a, b = hosts.a, hosts.b
    port = 7
    rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    b.run("iptables", "-w", "-A", *rule)
    try:
        client, local_port = start_peer(a, peers.TCP_CONNECT, b.ipv4, str(port))
        try:
            mine = (a.netns_inode, local_port)
            attempt = stream.wait_for(
                lambda e: e["type"] == "connection.event" and (e["netns"], e["localPort"]) == mine, timeout=15
            )
        finally:
            client.kill()
            client.wait()
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            b.run("iptables", "-w", "-D", *rule)
    assert (attempt["state"], attempt["states"]) == ("SYN_SENT", ["SYN_SENT"])
    assert (attempt["pid"], attempt["direction"], attempt["remotePort"]) == (client.pid, "outbound", port)
    # its close does not report the attempt again
    assert close_of(stream, a.netns_inode, local_port=local_port)["states"] == ["CLOSE"]


def test_a_server_closing_with_unread_data_resets_and_both_ends_say_so(hosts, stream, agent):
    a, b = hosts.a, hosts.b
    sent_before = agent.metric('netstatd_tcp_resets_total{direction="sent"}')
    server, port = start_peer(b, UNREAD_SERVER, b.ipv4)
    client, client_port = start_peer(a, PUSH_CLIENT, b.ipv4, str(port))
    finish(client)
    finish(server)
    client_close = close_of(stream, a.netns_inode, local_port=client_port)
    server_close = close_of(stream, b.netns_inode, remote_port=client_port)
    assert server_close["reset"] == "sent" and "error" not in server_close
    assert client_close["reset"] == "received" and client_close["error"] == "ECONNRESET"
    assert server_close["bytesReceived"] == len(b"unread") and client_close["bytesSent"] == len(b"unread")
    assert agent.metric('netstatd_tcp_resets_total{direction="sent"}') >= sent_before + 1


def test_retransmits_under_loss_match_what_ss_reports(hosts, stream):
    """5% of the segments reaching the client's namespace dropped (iptables statistic): the server's
    close counts the retransmissions the kernel's own `ss -tin` reported for it once every byte had
    arrived and the loss had stopped. (A drop on the sender's own OUTPUT is no loss to TCP: the stack
    sees the local error and sends again, retransmitting nothing.) The server's veth sends one segment
    per packet: with its default GSO, a busy machine sent the 4 MB in ~54 packets, and 5% of them was
    sometimes none (CI-like load: 1 run in 8)."""
    a, b = hosts.a, hosts.b
    server, port = start_peer(b, SENDING_SERVER, b.ipv4, str(4 * SENT))
    rule = ["INPUT", "-p", "tcp", "--sport", str(port), "-m", "statistic", "--mode", "random"]
    rule += ["--probability", "0.05", "-j", "DROP"]
    veth = ["link", "set", f"vb{hosts.tag}", "gso_max_segs"]
    b.run("ip", *veth, "1")
    a.run("iptables", "-w", "-A", *rule)
    try:
        client, client_port = start_peer(a, RECEIVING_CLIENT, b.ipv4, str(port), str(4 * SENT))
        assert server.stdout.readline().strip() == "sent"
    finally:
        a.run("iptables", "-w", "-D", *rule)
        b.run("ip", *veth, "65535")
    ss = b.run("ss", "-Htin", "state", "established", "sport", f"= :{port}").stdout
    found = re.search(r"retrans:\d+/(\d+)", ss)
    assert found, f"no retransmission under 5% loss: {ss}"
    server.stdin.write("close\n")
    server.stdin.flush()
    finish(client, server)
    close = close_of(stream, b.netns_inode, remote_port=client_port)
    assert close["retransmits"] == int(found.group(1))
    assert close["bytesSent"] == 4 * SENT and close["bytesReceived"] == 1
