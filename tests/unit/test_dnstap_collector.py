"""The DNSTap collector's sender allow-list, and the collector over real loopback sockets: which
addresses it binds, who it lets send, and what happens when learning a name fails."""

from __future__ import annotations

import asyncio
import socket

import pytest

from netstatd.metrics import render
from netstatd.sources.dnstap.collector import DnstapCollector, SenderAllowList
from netstatd.sources.dnstap.decode import Failure, Resolution, clear_caches
from netstatd.sources.dnstap.framestream import ACCEPT, CONTENT_TYPE, READY, START, STOP, control_frame, data_frame
from netstatd.testing.agent import free_port
from netstatd.testing.dns import client_response
from tests.unit.test_dns_decode import NS, failed, payload, response

# --- SenderAllowList ------------------------------------------------------------------------------


def test_loopback_is_always_allowed_and_nothing_else_by_default() -> None:
    allow = SenderAllowList([])
    for ip in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert allow.allows(ip), ip
    for ip in ("10.0.0.1", "192.0.2.1", "fd00::1", "::", "0.0.0.0", "::ffff:10.0.0.1"):
        assert not allow.allows(ip), ip
    assert str(allow) == "loopback, this node's addresses"


def test_own_addresses_are_allowed_and_replaced_by_set_own() -> None:
    allow = SenderAllowList([])
    allow.set_own(["192.0.2.10", "2001:db8::10", "fe80::1%eth0"])
    for ip in ("192.0.2.10", "::ffff:192.0.2.10", "2001:db8::10", "fe80::1", "fe80::1%eth1"):
        assert allow.allows(ip), ip
    assert not allow.allows("192.0.2.11")
    allow.set_own(["192.0.2.20"])  # the node's addresses changed: the old ones are gone
    assert allow.allows("192.0.2.20")
    assert not allow.allows("192.0.2.10") and not allow.allows("2001:db8::10")
    assert allow.allows("127.0.0.1")  # loopback is not one of the "own" addresses that were replaced
    with pytest.raises(ValueError, match="'not-an-ip'"):
        allow.set_own(["not-an-ip"])


def test_cidrs_and_plain_addresses_add_networks() -> None:
    allow = SenderAllowList(["10.244.0.0/16", "192.0.2.7", "fd00:10::/32", "2001:db8::5", "172.20.8.7/16"])
    allowed = ["10.244.0.1", "10.244.255.254", "192.0.2.7", "fd00:10:ffff::1", "2001:db8::5", "172.20.1.1"]
    refused = ["10.245.0.1", "192.0.2.8", "fd00:11::1", "2001:db8::6", "172.21.0.1", "172.16.0.1"]
    for ip in allowed:
        assert allow.allows(ip), ip
    for ip in refused:
        assert not allow.allows(ip), ip
    # a plain address is a /32 or /128; host bits of a CIDR are ignored (172.20.8.7/16 is 172.20.0.0/16)
    assert str(allow) == (
        "loopback, this node's addresses, 10.244.0.0/16, 192.0.2.7/32, fd00:10::/32, 2001:db8::5/128, 172.20.0.0/16"
    )


def test_ipv4_mapped_ipv6_peer_is_judged_as_ipv4() -> None:
    allow = SenderAllowList(["10.244.0.0/16", "::ffff:192.0.2.0/120"])
    assert allow.allows("::ffff:10.244.1.2") and allow.allows("10.244.1.2")
    assert not allow.allows("::ffff:10.245.1.2")
    # a mapped network in the list is an IPv4 network: it takes both spellings of the peer
    assert allow.allows("192.0.2.9") and allow.allows("::ffff:192.0.2.9")
    assert not SenderAllowList(["::/0"]).allows("::ffff:10.0.0.1")  # IPv6 networks never take an IPv4 peer


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "10.0.0", "example.com", "", " 10.0.0.0/8", "fd00::/129"])
def test_a_bad_cidr_names_itself_and_what_is_expected(bad: str) -> None:
    with pytest.raises(ValueError) as ei:
        SenderAllowList(["10.0.0.0/8", bad])
    message = str(ei.value)
    assert repr(bad) in message and "--dnstap-allow" in message
    assert "expected e.g. 10.244.0.0/16, 192.0.2.7 or fd00::/8" in message
    assert "\n" not in message


def test_unparseable_peer_is_refused() -> None:
    allow = SenderAllowList(["0.0.0.0/0", "::/0"])
    for peer in ("", "?", "/run/x.sock", "10.0.0.300"):
        assert not allow.allows(peer), peer


def test_always_is_only_for_tests_that_refuse_loopback() -> None:
    allow = SenderAllowList(["10.0.0.0/8"], always=())
    assert not allow.allows("127.0.0.1") and not allow.allows("::1")
    assert allow.allows("10.1.1.1")
    assert str(allow) == "this node's addresses, 10.0.0.0/8"


# --- the collector over loopback --------------------------------------------------------------------


def send_one_answer(port: int, host: str = "127.0.0.1", name: str = "a.netstatd.test.", ip: str = "10.1.2.3") -> bytes:
    """A bidirectional sender: READY, ACCEPT?, START, one CLIENT_RESPONSE, STOP. Returns what it read."""
    return send_payloads(port, [client_response(name, ip)], host)


def send_payloads(port: int, payloads: list[bytes], host: str = "127.0.0.1") -> bytes:
    """READY, ACCEPT?, START, a data frame per payload, STOP. Returns what it read."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(control_frame(READY, (CONTENT_TYPE,)))
        got = recv_until_eof(s)
        if got == control_frame(ACCEPT, (CONTENT_TYPE,)):
            s.sendall(control_frame(START) + b"".join(map(data_frame, payloads)) + control_frame(STOP))
            got += recv_until_eof(s)  # FINISH, unless the collector closed the connection
        return got


def recv_until_eof(s: socket.socket) -> bytes:
    """What the collector sent, up to the end of its reply (ACCEPT or FINISH) or of the connection."""
    got = b""
    try:
        while len(got) < len(control_frame(ACCEPT, (CONTENT_TYPE,))) and (more := s.recv(100)):
            got += more
    except ConnectionResetError:
        pass
    return got


async def test_collector_binds_the_given_hosts_and_refuses_senders_not_allowed() -> None:
    learned: list[Resolution] = []
    allow = SenderAllowList([], always=())  # refuses loopback, as if it were any other address
    collector = DnstapCollector(learned.extend, allow=allow)
    port = free_port()
    await collector.start({"node": port}, hosts=["127.0.0.1", "::1"])
    try:
        with pytest.raises(ConnectionRefusedError):  # bound to those two addresses only
            await asyncio.to_thread(socket.create_connection, ("127.0.0.2", port), 2)
        assert await asyncio.to_thread(send_one_answer, port) == b""
        assert collector.stats.closed == {"not_allowed": 1}
        assert (collector.stats.frames, learned) == (0, [])

        allow.set_own(["127.0.0.1", "::1"])
        for host, ip in (("127.0.0.1", "10.1.2.3"), ("::1", "fd00::3")):
            assert await asyncio.to_thread(send_one_answer, port, host, "a.netstatd.test.", ip) != b""
        assert [r.ip for r in learned] == ["10.1.2.3", "fd00::3"]
        assert collector.stats.closed == {"not_allowed": 1, "finished": 2}
        assert collector.messages["node"] == 2
    finally:
        await collector.stop()


async def test_collector_hosts_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="no address"):
        await DnstapCollector(print).start({"node": free_port()}, hosts=[])


async def test_learn_failure_goes_to_on_error_and_that_sender_is_closed() -> None:
    errors: list[BaseException] = []

    def learn(resolutions: list[Resolution]) -> None:
        raise RuntimeError(f"cache bug on {resolutions[0].hostname}")

    collector = DnstapCollector(learn, allow=SenderAllowList([]), on_error=errors.append)
    port = free_port()
    await collector.start({"node": port}, hosts=["127.0.0.1"])
    try:
        got = await asyncio.to_thread(send_one_answer, port)
        assert got == control_frame(ACCEPT, (CONTENT_TYPE,))  # ACCEPT, then closed: no FINISH
        assert collector.stats.closed == {"internal_error": 1}
        assert [str(e) for e in errors] == ["cache bug on a.netstatd.test"]
    finally:
        await collector.stop()


async def test_responses_are_counted_by_rcode_and_latency_and_failures_handed_on() -> None:
    clear_caches()
    learned: list[Resolution] = []
    failures: list[Failure] = []
    collector = DnstapCollector(learned.extend, failed=failures.extend)
    port = free_port()
    t0 = 1_700_000_000 * NS
    ok = response("ok.test", [("ok.test", 60, "A", ["192.0.2.1"])]).to_wire()
    payloads = [
        payload(ok, query_ns=t0, response_ns=t0 + 300_000),  # 0.3 ms: the first bucket
        payload(ok, query_ns=t0, response_ns=t0 + 500_000),  # 0.5 ms: on the first bound, in it
        payload(failed("gone.test.", 3), query_ns=t0, response_ns=t0 + 2_000_000_000),  # NXDOMAIN, 2 s
        payload(failed("dead.test.", 2), query_ns=None),  # SERVFAIL, latency unknown
        payload(failed("dead.test.", 2), query_ns=t0, response_ns=t0 + 9 * NS),  # over the last bound
        payload(failed("x.test.", 12), query_ns=t0, response_ns=t0 + 1_000_000),
    ]
    await collector.start({"node": port}, hosts=["127.0.0.1"])
    try:
        assert await asyncio.to_thread(send_payloads, port, payloads) != b""
    finally:
        await collector.stop()
    assert [r.latency_ms for r in learned] == [0.3, 0.5]
    assert [(f.name, f.rcode, f.latency_ms) for f in failures] == [
        ("gone.test", "NXDOMAIN", 2000.0),
        ("dead.test", "SERVFAIL", None),
        ("dead.test", "SERVFAIL", 9000.0),
        ("x.test", "RCODE12", 1.0),
    ]
    text = render(collector.metrics())
    for line in (
        'netstatd_dns_responses_total{rcode="NOERROR"} 2',
        'netstatd_dns_responses_total{rcode="NXDOMAIN"} 1',
        'netstatd_dns_responses_total{rcode="SERVFAIL"} 2',
        'netstatd_dns_responses_total{rcode="REFUSED"} 0',
        'netstatd_dns_responses_total{rcode="RCODE12"} 1',
        'netstatd_dns_latency_seconds_bucket{le="0.0005"} 2',
        'netstatd_dns_latency_seconds_bucket{le="0.001"} 3',
        'netstatd_dns_latency_seconds_bucket{le="1.0"} 3',
        'netstatd_dns_latency_seconds_bucket{le="2.5"} 4',
        'netstatd_dns_latency_seconds_bucket{le="5.0"} 4',
        'netstatd_dns_latency_seconds_bucket{le="+Inf"} 5',
        "netstatd_dns_latency_seconds_count 5",
        "netstatd_dns_latency_seconds_sum 11.0018",
        "netstatd_dns_latency_unknown_total 1",
        "# TYPE netstatd_dns_latency_seconds histogram",
    ):
        assert line + "\n" in text, line
