"""The agent as a user meets it: initial state, slow clients, /metrics, /api/pid-exe, start-up errors."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from netstatd.testing.agent import AgentProcess
from netstatd.testing.stream import StreamClient
from tests.integration import peers
from tests.integration.test_kernel_events import PYTHON_EXE, finish, start_peer

REPO = Path(__file__).resolve().parents[2]


def test_connection_opened_before_the_agent_is_in_the_initial_state(hosts, tmp_path):
    a, b = hosts.a, hosts.b
    server, port = start_peer(b, peers.TCP_HOLD_SERVER, b.ipv4)
    client, client_port = start_peer(a, peers.TCP_HOLD_CLIENT, b.ipv4, str(port))
    try:
        with AgentProcess(log_path=tmp_path / "agent.log") as agent, StreamClient(agent.ws_url) as stream:
            done = stream.wait_snapshot()
            first = stream.events[0]
            assert first["type"] == "host.info"
            assert {"nodeName", "hostIPs", "version", "kernelRelease", "timestamp"} <= first.keys()
            initial = stream.events[: stream.events.index(done)]
            out = [
                e
                for e in initial
                if e["type"] == "connection.event" and e["netns"] == a.netns_inode and e["localPort"] == client_port
            ]
            inb = [
                e
                for e in initial
                if e["type"] == "connection.event" and e["netns"] == b.netns_inode and e["remotePort"] == client_port
            ]
            lst = [e for e in initial if e["type"] == "port.listening" and e["port"] == port]
            assert len(out) == 1 and len(inb) == 1 and len(lst) == 1
            assert (out[0]["pid"], out[0]["exe"], out[0]["state"]) == (client.pid, PYTHON_EXE, "ESTABLISHED")
            assert (out[0]["direction"], out[0]["remoteIP"], out[0]["remotePort"]) == ("outbound", b.ipv4, port)
            assert (inb[0]["pid"], inb[0]["exe"], inb[0]["direction"]) == (server.pid, PYTHON_EXE, "inbound")
            assert lst[0]["pid"] == server.pid
            # ...and its close is delivered like any other
            finish(client)
            closed = stream.wait_for(
                lambda e: (
                    e["type"] == "connection.event"
                    and e["state"] == "CLOSE"
                    and e["sockCookie"] == out[0]["sockCookie"]
                )
            )
            assert closed["pid"] == client.pid
    finally:
        finish(client, server)


def test_slow_client_does_not_stall_a_fast_one_and_is_told_it_missed_events(hosts, tmp_path):
    with AgentProcess("--client-queue-events", "10000", log_path=tmp_path / "agent.log") as agent:
        _slow_and_fast_clients(hosts, agent)


def _slow_and_fast_clients(hosts, agent):
    a, b = hosts.a, hosts.b
    # A client that never reads: its socket buffers fill, then its queue of 10000 events.
    slow = socket.create_connection(("127.0.0.1", agent.port))
    slow.sendall(
        b"GET /netstat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    dropped_before = agent.metric("netstatd_client_events_dropped_total")
    n = 15000
    with StreamClient(agent.ws_url) as fast:
        fast.wait_snapshot()
        server = b.popen(sys.executable, "-c", CHURN_SERVER, b.ipv4, stdout=subprocess.PIPE, text=True)
        port = int(server.stdout.readline().split()[1])
        a.run(sys.executable, "-c", CHURN_CLIENT, b.ipv4, str(port), str(n))
        server.kill()
        server.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            closed = {
                e["sockCookie"]
                for e in fast.matching(
                    lambda e: (
                        e["type"] == "connection.event"
                        and e["netns"] == a.netns_inode
                        and e["remotePort"] == port
                        and e["state"] == "CLOSE"
                    )
                )
            }
            if len(closed) >= n:
                break
            time.sleep(0.2)
        resets = fast.matching(lambda e: e["type"] == "stream.reset")
        assert not resets, f"the fast client was reset: {resets}"
        if len(closed) != n:
            seen = fast.matching(
                lambda e: e["type"] == "connection.event" and e["netns"] == a.netns_inode and e["remotePort"] == port
            )
            last = {e["sockCookie"]: e["states"] for e in seen if e["sockCookie"] not in closed}
            problems = [line for line in agent.log_text().splitlines() if " WARNING " in line or " ERROR " in line]
            raise AssertionError(
                f"the fast client saw {len(closed)} of {n} closes; kernel lost "
                f"{agent.metric('netstatd_kernel_events_lost_total')}, skipped "
                f"{agent.metric('netstatd_kernel_events_skipped_total')}; {len(last)} open without a close, e.g. "
                f"{list(last.items())[:5]}; agent log: {problems[-10:]}; metrics: "
                f"{[m for m in agent.metrics().splitlines() if 'netstatd_events_by_state' in m and 'TCP' in m]}"
            )
    assert agent.metric("netstatd_client_events_dropped_total") > dropped_before
    # When the slow client finally reads, it is told what it missed, then gets a fresh snapshot.
    slow.settimeout(10)
    buf = bytearray()
    reset_at = -1
    while True:
        chunk = slow.recv(1 << 20)
        assert chunk, "agent closed the slow client instead of resetting it"
        start = max(len(buf) - 32, 0)
        buf += chunk
        if reset_at < 0:
            reset_at = buf.find(b'"stream.reset"', start)
        if reset_at >= 0 and buf.find(b'"snapshot.complete"', max(start, reset_at)) >= 0:
            break
    assert b'"missedEvents"' in buf[reset_at : reset_at + 200]
    slow.close()


CHURN_SERVER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1024)
print('ready', s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""

CHURN_CLIENT = """
import socket, sys
for _ in range(int(sys.argv[3])):
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    c.close()
"""


def test_metrics_pass_promtool_and_count_events(agent, hosts):
    a, b = hosts.a, hosts.b
    before = agent.metric("netstatd_events_total")
    server, port = start_peer(b, peers.TCP_SERVER, b.ipv4)
    client, _ = start_peer(a, peers.TCP_CLIENT, b.ipv4, str(port))
    finish(client, server)
    deadline = time.monotonic() + 5
    while agent.metric("netstatd_events_total") < before + 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    body = agent.metrics()
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in (
        "netstatd_events_total{",
        "netstatd_events_by_state{",
        "netstatd_kernel_events_lost_total ",
        "netstatd_client_events_dropped_total ",
        "netstatd_clients_connected ",
        "netstatd_kernel_states_folded_total ",
        "netstatd_state_swept_total ",
    ):
        assert name in body, name
    assert 'netstatd_events_by_state{protocol="TCP",family="IPv4",state="ESTABLISHED"}' in body
    # records: ESTABLISHED, CLOSE on each side (SYN_SENT and SYN_RECV folded); listen, the listener's
    # close (no accept record: the listener's process accepted). The other transitions are folded
    # (docs/kernel.md).
    assert agent.metric("netstatd_events_total") >= before + 6
    assert agent.metric("netstatd_kernel_events_lost_total") == 0


def test_metrics_are_the_ones_docs_metrics_md_lists(agent):
    """Every metric family /metrics exposes is documented, and every documented one is exposed (the
    auth and TLS ones only with --auth-token-file and --tls-cert-file, which this agent has not)."""
    exposed = {line.split()[2] for line in agent.metrics().splitlines() if line.startswith("# TYPE ")}
    table = (REPO / "docs/metrics.md").read_text()
    documented = {
        name
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(netstatd_\w+)`", row.split("|")[1])
    }
    only_with_flags = {
        "netstatd_namespace_bytes_total",
        "netstatd_namespace_bytes_overflow_total",
        "netstatd_auth_failures_total",
        "netstatd_auth_token_reloads_total",
        "netstatd_clients_revoked_total",
        "netstatd_tls_reloads_total",
    }
    assert exposed - documented == set(), "exposed but not in docs/metrics.md"
    assert documented - exposed - only_with_flags == set(), "in docs/metrics.md but not exposed"


def _get(url: str) -> tuple[int, dict]:
    import json

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_pid_exe_api(agent):
    status, body = _get(f"{agent.url}/api/pid-exe?pid={os.getpid()}")
    assert (status, body["pid"], body["exe"]) == (200, os.getpid(), PYTHON_EXE)
    unused = next(pid for pid in range(4_194_303, 0, -1) if not os.path.exists(f"/proc/{pid}"))
    status, body = _get(f"{agent.url}/api/pid-exe?pid={unused}")
    assert status == 404 and "error" in body
    for bad in ("abc", "-1", "", "1.5", "999999999"):
        status, body = _get(f"{agent.url}/api/pid-exe?pid={bad}")
        assert status == 400 and "error" in body, bad


def test_root_page_is_served(agent):
    with urllib.request.urlopen(agent.url + "/", timeout=5) as r:
        assert r.status == 200 and b"netstatd" in r.read()


@pytest.mark.parametrize("flag", ["--disable-udp", "--disable-tcp"])
def test_disable_flags(hosts, tmp_path, flag):
    a, b = hosts.a, hosts.b
    with AgentProcess(flag, log_path=tmp_path / "agent.log") as agent, StreamClient(agent.ws_url) as stream:
        stream.wait_snapshot()
        tcp_server, tport = start_peer(b, peers.TCP_SERVER, b.ipv4)
        tcp_client, _ = start_peer(a, peers.TCP_CLIENT, b.ipv4, str(tport))
        udp_server, uport = start_peer(b, peers.UDP_SERVER, b.ipv4, "1")
        udp_client, _ = start_peer(a, peers.UDP_SENDTO_CLIENT, b.ipv4, str(uport))
        finish(tcp_client, tcp_server, udp_client, udp_server)
        kept = "TCP" if flag == "--disable-udp" else "UDP"
        stream.wait_for(
            lambda e: e["type"] == "connection.event" and e["protocol"] == kept and e["netns"] == a.netns_inode
        )
        time.sleep(0.3)
        gone = "UDP" if kept == "TCP" else "TCP"
        assert not stream.matching(
            lambda e: e.get("protocol") == gone and e.get("netns") in (a.netns_inode, b.netns_inode)
        )
