"""DNSTap from real senders (unbound, dnsdist, fstrm_replay, the dnstap CLI) into a real agent.

The names live in a private zone (netstatd.test) served by a second unbound,
so nothing leaves the machine. Addresses in 10.231.250.0/24 and
fd42:231:250::/64 are never connected to; the connection test uses the
test hosts' own addresses.
"""

import socket
import subprocess
import time

import pytest

from netstatd.testing.agent import free_port
from netstatd.testing.dns import Dnsdist, Resolver, Zone, answer_addresses
from netstatd.testing.stream import StreamClient
from tests.integration import peers
from tests.integration.test_kernel_events import finish, start_peer

CHAIN = ("www.netstatd.test", ["edge.netstatd.test", "web.netstatd.test"])


@pytest.fixture(scope="module")
def zone(hosts):
    records = [
        "www.netstatd.test. 300 IN CNAME edge.netstatd.test.",
        "edge.netstatd.test. 300 IN CNAME web.netstatd.test.",
        f"web.netstatd.test. 300 IN A {hosts.b.ipv4}",
        f"web.netstatd.test. 300 IN AAAA {hosts.b.ipv6}",
        "plain.netstatd.test. 120 IN A 10.231.250.2",
        "replay.netstatd.test. 120 IN A 10.231.250.3",
        "short.netstatd.test. 2 IN A 10.231.250.4",
        "after-restart.netstatd.test. 120 IN A 10.231.250.5",
        "cached.netstatd.test. 120 IN A 10.231.250.6",
        "bystander.netstatd.test. 120 IN A 10.231.250.7",
    ]
    with Zone(records) as z:
        yield z


@pytest.fixture(scope="module")
def resolver(zone, agent):
    with Resolver(zone, agent.dnstap_port) as r:
        yield r


def resolved(stream, ip: str, timeout: float = 10) -> dict:
    return stream.wait_for(lambda e: e["type"] == "dns.resolved" and e["ip"] == ip, timeout)


def wait_metric(agent, name: str, at_least: float, timeout: float = 10) -> float:
    deadline = time.monotonic() + timeout
    while (value := agent.metric(name)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def test_unbound_answers_name_addresses_with_their_cname_chain_and_connections(agent, hosts, resolver, stream):
    a, b = hosts.a, hosts.b
    assert answer_addresses(resolver.query("www.netstatd.test.", "A")) == [b.ipv4]
    assert answer_addresses(resolver.query("www.netstatd.test.", "AAAA")) == [b.ipv6]
    for ip in (b.ipv4, b.ipv6):
        e = resolved(stream, ip)
        assert (e["hostname"], e["aliases"]) == CHAIN
        assert 0 < e["ttl"] <= 300
        assert e["clientIP"] == "127.0.0.1"

    # A connection to the looked-up address carries the name on both sides.
    server, port = start_peer(b, peers.TCP_SERVER, b.ipv4)
    client, _ = start_peer(a, peers.TCP_CLIENT, b.ipv4, str(port))
    finish(client, server)
    out = stream.wait_for(
        lambda e: e["type"] == "connection.event" and e["netns"] == a.netns_inode and e["remotePort"] == port
    )
    assert out["remoteHostname"] == CHAIN[0]
    inbound = stream.wait_for(
        lambda e: e["type"] == "connection.event" and e["netns"] == b.netns_inode and e["localPort"] == port
    )
    assert inbound["localHostname"] == CHAIN[0]

    # A client connecting later gets the live names in its initial state.
    with StreamClient(agent.ws_url) as later:
        done = later.wait_snapshot()
        initial = later.events[: later.events.index(done)]
        names = {e["ip"]: (e["hostname"], e["aliases"]) for e in initial if e["type"] == "dns.resolved"}
        assert names[b.ipv4] == CHAIN and names[b.ipv6] == CHAIN


def test_dnsdist_logs_responses_cache_hits_and_self_answers_to_the_mux_port(agent, resolver, stream):
    self_ip = "10.231.250.9"
    with Dnsdist(resolver, agent.dnstap_mux_port, {"self.netstatd.test.": self_ip}) as dd:
        before = agent.metric('netstatd_dnstap_frames_total{listener="mux"}')
        assert answer_addresses(dd.query("cached.netstatd.test.")) == ["10.231.250.6"]
        e = resolved(stream, "10.231.250.6")
        assert e["hostname"] == "cached.netstatd.test" and e["aliases"] == []
        # first answer (from the backend) arrived; the repeat is a dnsdist cache hit, logged too
        seen = wait_metric(agent, 'netstatd_dnstap_frames_total{listener="mux"}', before + 1)
        assert dd.query("cached.netstatd.test.").answer
        assert wait_metric(agent, 'netstatd_dnstap_frames_total{listener="mux"}', seen + 1) >= seen + 1
        assert answer_addresses(dd.query("self.netstatd.test.")) == [self_ip]
        assert resolved(stream, self_ip)["hostname"] == "self.netstatd.test"


def test_a_capture_replays_through_fstrm_replay_and_the_dnstap_cli(agent, zone, stream, tmp_path):
    capture = tmp_path / "unbound.fstrm"
    port = free_port()
    recorder = subprocess.Popen(
        ["fstrm_capture", "-t", "protobuf:dnstap.Dnstap", "-a", "127.0.0.1", "-p", str(port), "-w", str(capture)],
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port)
        with Resolver(zone, port) as r:
            assert answer_addresses(r.query("replay.netstatd.test.")) == ["10.231.250.3"]
            time.sleep(2.5)  # unbound sends DNSTap 1-2 s after the answer
    finally:
        recorder.terminate()
        recorder.wait(10)
    assert capture.stat().st_size > 0

    frames = 'netstatd_dnstap_frames_total{listener="node"}'
    before = agent.metric(frames)
    target = ["-a", "127.0.0.1", "-p", str(agent.dnstap_port)]
    replay = ["fstrm_replay", "-t", "protobuf:dnstap.Dnstap", "-r", str(capture), *target]
    subprocess.run(replay, check=True, timeout=20, capture_output=True)
    e = resolved(stream, "10.231.250.3")
    assert e["hostname"] == "replay.netstatd.test"
    one_replay = wait_metric(agent, frames, before + 2) - before
    assert one_replay >= 2  # the check query and the replay query, at least
    cli = ["dnstap", "-r", str(capture), "-T", f"127.0.0.1:{agent.dnstap_port}"]
    subprocess.run(cli, check=True, timeout=20, capture_output=True)
    assert wait_metric(agent, frames, before + 2 * one_replay) == before + 2 * one_replay
    bad = {k: v for k, v in _closed(agent).items() if v and k not in ("finished", "eof")}
    assert not bad, f"a replay was refused: {bad}"


def test_unbound_restarted_reconnects(agent, resolver, stream):
    resolver.restart()
    assert answer_addresses(resolver.query("after-restart.netstatd.test.")) == ["10.231.250.5"]
    assert resolved(stream, "10.231.250.5", timeout=15)["hostname"] == "after-restart.netstatd.test"


def test_ttl_expiry_removes_a_name(agent, resolver, stream):
    assert answer_addresses(resolver.query("short.netstatd.test.")) == ["10.231.250.4"]
    learned = resolved(stream, "10.231.250.4")
    assert learned["ttl"] <= 2
    gone = stream.wait_for(lambda e: e["type"] == "dns.expired" and e["ip"] == "10.231.250.4", timeout=10)
    assert gone["hostname"] == "short.netstatd.test"
    with StreamClient(agent.ws_url) as later:
        done = later.wait_snapshot()
        assert not [e for e in later.events[: later.events.index(done)] if e.get("ip") == "10.231.250.4"]


@pytest.mark.parametrize(
    ("reason", "payload"),
    [
        ("http", b"GET /netstat HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("tls", bytes.fromhex("160301020001000200030300") + b"\0" * 64),
        ("frame_too_large", b"\xff\xff\xff\xff"),
        ("garbage", b"hello, this is not Frame Streams"),
        ("bad_control", b"\x00\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00\x63"),
        ("data_before_start", b"\x00\x00\x00\x05hello"),
    ],
)
def test_a_bad_sender_is_closed_and_counted_while_unbound_keeps_flowing(agent, resolver, stream, reason, payload):
    before = _closed(agent).get(reason, 0)
    with socket.create_connection(("127.0.0.1", agent.dnstap_port), timeout=5) as s:
        s.sendall(payload)
        assert s.recv(100) == b"", "the agent kept a bad sender's connection open"
    assert _closed(agent).get(reason, 0) == before + 1, _closed(agent)
    if reason == "tls":
        assert "TLS" in agent.log_text()
    # the good sender is unaffected
    frames = 'netstatd_dnstap_frames_total{listener="node"}'
    before_frames = agent.metric(frames)
    assert answer_addresses(resolver.query("bystander.netstatd.test.")) == ["10.231.250.7"]
    assert wait_metric(agent, frames, before_frames + 1) >= before_frames + 1
    assert resolved(stream, "10.231.250.7")["hostname"] == "bystander.netstatd.test"


def _closed(agent) -> dict[str, float]:
    prefix = 'netstatd_dnstap_connections_closed_total{reason="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in agent.metrics().splitlines()
        if line.startswith(prefix)
    }


def _wait_listening(port: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def test_undecodable_frames_are_skipped_and_the_stream_continues(agent, stream):
    import dns.message
    import dns.rrset

    from netstatd.sources.dnstap.framestream import CONTENT_TYPE, READY, START, STOP, control_frame, data_frame
    from netstatd.sources.dnstap.protos import dnstap_pb2 as pb

    query = dns.message.make_query("after-garbage.netstatd.test.", "A")
    answer = dns.message.make_response(query)
    answer.answer.append(dns.rrset.from_text("after-garbage.netstatd.test.", 60, "IN", "A", "10.231.250.8"))
    good = pb.Dnstap(
        type=pb.Dnstap.MESSAGE,
        message=pb.Message(
            type=pb.Message.CLIENT_RESPONSE, query_address=bytes([10, 0, 0, 9]), response_message=answer.to_wire()
        ),
    ).SerializeToString()
    broken_dns = pb.Dnstap(
        type=pb.Dnstap.MESSAGE,
        message=pb.Message(type=pb.Message.CLIENT_RESPONSE, response_message=answer.to_wire()[:20]),
    ).SerializeToString()
    skipped = "netstatd_dnstap_frames_skipped_total"
    before = agent.metric(skipped)
    with socket.create_connection(("127.0.0.1", agent.dnstap_port), timeout=5) as s:
        s.sendall(control_frame(READY, (CONTENT_TYPE,)))
        assert s.recv(100)  # ACCEPT
        s.sendall(control_frame(START, (CONTENT_TYPE,)))
        no_message = pb.Dnstap(identity=b"no message").SerializeToString()
        s.sendall(data_frame(b"\xff\xff not protobuf") + data_frame(no_message))
        s.sendall(data_frame(broken_dns) + data_frame(good) + control_frame(STOP))
        assert s.recv(100)  # FINISH: the connection survived the bad frames
    e = resolved(stream, "10.231.250.8")
    assert (e["hostname"], e["clientIP"]) == ("after-garbage.netstatd.test", "10.0.0.9")
    assert agent.metric(skipped) == before + 3
