"""UDP flow counters from the real kernel, between two network namespaces: known exchanges, both
ends, IPv4 and IPv6, connected sockets (send/recv) and unconnected ones (sendto/recvfrom); the
totals of a re-announced flow; and a socket with more flows than its release sends itself."""

import subprocess
import sys

import pytest

from tests.integration import peers

N, ASK, ANSWER = 1000, 100, 37

# Answers each datagram with argv[3] bytes, argv[2] times; connected (argv[4] == "1": it connects to
# the peer stdin names, and says "connected") or not. Closes its socket on a line on stdin.
SERVER = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.settimeout(10)
print('ready', s.getsockname()[1], flush=True)
n, answer = int(sys.argv[2]), b'a' * int(sys.argv[3])
if sys.argv[4] == '1':
    ip, port = sys.stdin.readline().split()
    s.connect((ip, int(port)))
    print('connected', flush=True)
    for _ in range(n):
        s.recv(2048)
        s.send(answer)
else:
    for _ in range(n):
        _, peer = s.recvfrom(2048)
        s.sendto(answer, peer)
print('served', flush=True)
sys.stdin.readline()
s.close()
print('closed', flush=True)
sys.stdin.read()
"""

# Sends argv[3] datagrams of argv[4] bytes once a line arrives on stdin, each after the answer to the
# one before; connected (argv[5] == "1") or not. Before the datagrams argv[6] lists (by index) it says
# "at I" and waits for a line; before datagram argv[7] (when given) it sleeps argv[8] seconds. Then
# it closes its socket.
CLIENT = """
import socket, sys, time
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
c = socket.socket(fam, socket.SOCK_DGRAM)
c.bind(('::' if fam == socket.AF_INET6 else '0.0.0.0', 0))
c.settimeout(10)
print('ready', c.getsockname()[1], flush=True)
sys.stdin.readline()
dst, n, data, connected = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3]), b's' * int(sys.argv[4]), sys.argv[5] == '1'
stops = {int(i) for i in sys.argv[6].split(',')}
pause_before = int(sys.argv[7]) if len(sys.argv) > 7 else -1
if connected:
    c.connect(dst)
for i in range(n):
    if i in stops:
        print('at', i, flush=True)
        sys.stdin.readline()
    if i == pause_before:
        time.sleep(float(sys.argv[8]))
    if connected:
        c.send(data)
        c.recv(2048)
    else:
        c.sendto(data, dst)
        c.recvfrom(2048)
c.close()
print('done', flush=True)
"""

# Sockets that each send argv[i] datagrams of 10 * argv[i] bytes, unconnected, each after the answer
# to the one before; prints their ports, then closes them all.
MANY_CLIENTS = """
import socket, sys
dst, counts = (sys.argv[1], int(sys.argv[2])), [int(a) for a in sys.argv[3:]]
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in counts]
for s, n in zip(socks, counts):
    s.settimeout(10)
    for _ in range(n):
        s.sendto(b'm' * (10 * n), dst)
        s.recvfrom(2048)
print('ready', *(s.getsockname()[1] for s in socks), flush=True)
for s in socks:
    s.close()
"""

COUNTS = ("bytesSent", "bytesReceived", "packetsSent", "packetsReceived")


def start(host, script: str, *args: str) -> tuple[subprocess.Popen, list[str]]:
    proc = host.popen(sys.executable, "-c", script, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", f"peer failed to start: {line}"
    return proc, line[1:]


def say(proc: subprocess.Popen, line: str = "") -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def expect(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline().strip()
    assert line == word, f"peer said {line!r}, not {word!r} (exit {proc.poll()})"


def finish(*procs: subprocess.Popen) -> None:
    peers.finish(*procs, check=True)


def counts(e: dict) -> tuple[int, int, int, int]:
    return tuple(e[k] for k in COUNTS)


def flow_events(stream, netns: int, local_port: int | None = None, remote_port: int | None = None) -> list[dict]:
    return stream.matching(
        lambda e: (
            e["type"] == "connection.event"
            and e["protocol"] == "UDP"
            and e["netns"] == netns
            and (local_port is None or e["localPort"] == local_port)
            and (remote_port is None or e["remotePort"] == remote_port)
        )
    )


def event_in(stream, state: str, netns: int, local_port: int, remote_port: int | None, with_counts=None) -> dict:
    return stream.wait_for(
        lambda e: (
            e["type"] == "connection.event"
            and e["protocol"] == "UDP"
            and e["netns"] == netns
            and e["localPort"] == local_port
            and (remote_port is None or e["remotePort"] == remote_port)
            and e["state"] == state
            and (with_counts is None or counts(e) == with_counts)
        )
    )


def active(stream, netns: int, local_port: int, remote_port: int | None, with_counts) -> dict:
    return event_in(stream, "ACTIVE", netns, local_port, remote_port, with_counts)


def close_of(stream, netns: int, local_port: int, remote_port: int | None = None) -> dict:
    return event_in(stream, "CLOSE", netns, local_port, remote_port)


Counts = tuple[int, int, int, int]


def exchange(hosts, stream, family: str, connected: bool, stops: dict[int, tuple[Counts, Counts]], *pause: str):
    """A client in a sends N datagrams of ASK bytes to a server in b, which answers each with ANSWER
    bytes; both close. Before the datagrams `stops` names (by index) the client waits until the stream
    shows an ACTIVE event of each end's flow with the counts given (client's, server's). Returns the
    client's and the server's port and the server's address."""
    a, b = hosts.a, hosts.b
    b_ip = b.ipv4 if family == "ipv4" else b.ipv6
    a_ip = a.ipv4 if family == "ipv4" else a.ipv6
    flag = "1" if connected else "0"
    server, (port,) = start(b, SERVER, b_ip, str(N), str(ANSWER), flag)
    at = ",".join(map(str, stops))
    client, (client_port,) = start(a, CLIENT, b_ip, port, str(N), str(ASK), flag, at, *pause)
    if connected:
        say(server, f"{a_ip} {client_port}")
        expect(server, "connected")
    say(client)  # go
    for i, (client_counts, server_counts) in stops.items():
        expect(client, f"at {i}")
        active(stream, a.netns_inode, int(client_port), None, client_counts)
        active(stream, b.netns_inode, int(port), int(client_port), server_counts)
        say(client)
    expect(client, "done")
    expect(server, "served")
    say(server)  # close
    expect(server, "closed")
    finish(client, server)
    return int(client_port), int(port), b_ip


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "unconnected"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_known_exchange_closes_with_exact_totals_on_both_ends(hosts, stream, family, connected):
    a, b = hosts.a, hosts.b
    # each end's flow is announced at its first datagram, with that datagram alone
    client_port, port, b_ip = exchange(hosts, stream, family, connected, {1: ((ASK, 0, 1, 0), (0, ASK, 0, 1))})
    # the sockets are closed: each flow's CLOSE carries its totals, read from the kernel at the release
    client_close = close_of(stream, a.netns_inode, local_port=client_port)
    server_close = close_of(stream, b.netns_inode, local_port=port, remote_port=client_port)
    assert counts(client_close) == (N * ASK, N * ANSWER, N, N)
    assert counts(server_close) == (N * ANSWER, N * ASK, N, N)
    assert (client_close["remoteIP"], client_close["remotePort"]) == (b_ip, port)
    assert (client_close["direction"], server_close["direction"]) == ("outbound", "inbound")
    # one flow a side: that announcement, then its close
    client_flow = flow_events(stream, a.netns_inode, local_port=client_port)
    server_flow = flow_events(stream, b.netns_inode, local_port=port, remote_port=client_port)
    for flow in (client_flow, server_flow):
        assert len({(e["sockCookie"], e["remoteIP"], e["remotePort"]) for e in flow}) == 1
        assert [(e["state"], e["states"]) for e in flow] == [("ACTIVE", ["ACTIVE"]), ("CLOSE", ["CLOSE"])]


def test_a_flow_announced_again_carries_its_totals_at_that_datagram(hosts, stream):
    """The kernel announces a busy flow again once its last announcement is 5 s old (KernelSettings
    udp_refresh_s), at the datagram that finds it so: the client pauses 5.2 s after 10 exchanges, so
    its 11th datagram is the one, on both ends (the client's send, before the answer; the server's
    receive)."""
    a, b = hosts.a, hosts.b
    stops = {
        1: ((ASK, 0, 1, 0), (0, ASK, 0, 1)),
        11: ((11 * ASK, 10 * ANSWER, 11, 10), (10 * ANSWER, 11 * ASK, 10, 11)),
    }
    client_port, port, _ = exchange(hosts, stream, "ipv4", True, stops, "10", "5.2")
    close_of(stream, a.netns_inode, local_port=client_port)
    close_of(stream, b.netns_inode, local_port=port, remote_port=client_port)
    client_flow = flow_events(stream, a.netns_inode, local_port=client_port)
    server_flow = flow_events(stream, b.netns_inode, local_port=port, remote_port=client_port)
    assert [counts(e) for e in client_flow] == [*(c for c, _ in stops.values()), (N * ASK, N * ANSWER, N, N)]
    assert [counts(e) for e in server_flow] == [*(c for _, c in stops.values()), (N * ANSWER, N * ASK, N, N)]
    for flow in (client_flow, server_flow):
        assert [e["state"] for e in flow] == ["ACTIVE", "ACTIVE", "CLOSE"]


def test_a_socket_with_more_flows_than_its_release_sends_closes_each_with_its_totals(hosts, stream):
    """A socket's release sends the totals of its first 4 flows; user space reads the others' from the
    kernel when the socket's close arrives. Six clients: every flow of the server exact."""
    a, b = hosts.a, hosts.b
    sizes = [1, 2, 3, 4, 5, 6]
    server, (port,) = start(b, SERVER, b.ipv4, str(sum(sizes)), "7", "0")
    clients, client_ports = start(a, MANY_CLIENTS, b.ipv4, port, *map(str, sizes))
    expect(server, "served")
    say(server)
    expect(server, "closed")
    finish(clients, server)
    for n, client_port in zip(sizes, map(int, client_ports), strict=True):
        server_close = close_of(stream, b.netns_inode, local_port=int(port), remote_port=client_port)
        assert counts(server_close) == (7 * n, 10 * n * n, n, n), n
        client_close = close_of(stream, a.netns_inode, local_port=client_port)
        assert counts(client_close) == (10 * n * n, 7 * n, n, n), n
