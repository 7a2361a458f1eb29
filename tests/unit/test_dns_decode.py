"""dnstap CLIENT_RESPONSE decoding, checked against dnspython's reading of the same response."""

from __future__ import annotations

import io
import ipaddress
import struct

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from netstatd.sources.dnstap.decode import (
    DecodeError,
    Failure,
    QueryTimes,
    Resolution,
    Response,
    clear_caches,
    decode,
    decode_message,
)
from netstatd.sources.dnstap.protos import dnstap_pb2 as pb

CLIENT4 = bytes([10, 0, 0, 7])
Answers = list[tuple[str, str, tuple[str, ...], int]]


NS = 1_000_000_000


def payload(
    wire: bytes,
    qaddr: bytes | None = CLIENT4,
    mtype: int = pb.Message.CLIENT_RESPONSE,
    query_ns: int | None = 1_700_000_000 * NS + 1_000,
    response_ns: int | None = 1_700_000_000 * NS + 2_000,
    port: int = 40000,
) -> bytes:
    msg = pb.Message(type=mtype, socket_family=pb.INET if qaddr is None or len(qaddr) == 4 else pb.INET6)
    msg.socket_protocol = pb.UDP
    if qaddr is not None:
        msg.query_address = qaddr
        msg.query_port = port
    msg.response_address = b"\x0a\x00\x00\x0a"
    msg.response_port = 53
    if query_ns is not None:
        msg.query_time_sec, msg.query_time_nsec = divmod(query_ns, NS)
    if response_ns is not None:
        msg.response_time_sec, msg.response_time_nsec = divmod(response_ns, NS)
    if mtype == pb.Message.CLIENT_QUERY:
        msg.query_message = wire
    else:
        msg.response_message = wire
    return pb.Dnstap(identity=b"unbound", version=b"1.17", type=pb.Dnstap.MESSAGE, message=msg).SerializeToString()


def response(qname: str, rrsets: list[tuple[str, int, str, list[str]]], qtype: str = "A") -> dns.message.Message:
    r = dns.message.make_response(dns.message.make_query(qname, qtype, id=4242))
    for owner, ttl, rtype, rdatas in rrsets:
        r.answer.append(rr(owner, ttl, rtype, *rdatas))
    return r


def rr(owner: str, ttl: int, rtype: str, *rdatas: str) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(dns.name.from_text(owner), ttl, "IN", rtype, list(rdatas))


def uncompressed(m: dns.message.Message) -> bytes:
    """The message's wire form with every name written in full."""
    f = io.BytesIO()
    f.write(struct.pack("!HHHHHH", m.id, m.flags, 1, sum(len(r) for r in m.answer), 0, 0))
    q = m.question[0]
    q.name.to_wire(f)
    f.write(struct.pack("!HH", q.rdtype, q.rdclass))
    for rrset in m.answer:
        rrset.to_wire(f, None)
    return f.getvalue()


def oracle(wire: bytes) -> Answers:
    """What decode() must find, read by dnspython: (ip, hostname, aliases, ttl), sorted."""
    m = dns.message.from_wire(wire)
    if not m.flags & dns.flags.QR or m.flags & dns.flags.TC or m.opcode() or m.rcode() or len(m.question) != 1:
        return []
    qname = m.question[0].name
    if qname == dns.name.root:
        return []
    cnames: dict[dns.name.Name, dns.name.Name] = {}
    for rrset in m.answer:
        if rrset.rdtype == dns.rdatatype.CNAME and rrset.rdclass == dns.rdataclass.IN:
            cnames.setdefault(rrset.name, rrset[0].target)
    chain = [qname]
    while len(chain) <= 16 and cnames.get(chain[-1]) not in (None, dns.name.root, *chain):
        chain.append(cnames[chain[-1]])

    def text(n: dns.name.Name) -> str:
        return n.to_text(omit_final_dot=True).lower()

    out: Answers = []
    seen = set()
    for rrset in m.answer:
        if rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA) or rrset.rdclass != dns.rdataclass.IN:
            continue
        if rrset.name not in chain:
            continue
        aliases = tuple(text(n) for n in chain[1 : chain.index(rrset.name) + 1])
        for rd in rrset:
            ip = str(ipaddress.ip_address(rd.address))
            if ip not in seen:
                seen.add(ip)
                out.append((ip, text(qname), aliases, rrset.ttl if rrset.ttl < 2**31 else 0))
    return sorted(out)


def got(wire: bytes, qaddr: bytes | None = CLIENT4) -> Answers:
    clear_caches()
    res = decode(payload(wire, qaddr))
    return sorted((str(ipaddress.ip_address(r.ip)), r.hostname, r.aliases, r.ttl) for r in res)


def check(wire: bytes) -> Answers:
    want = oracle(wire)
    assert got(wire) == want
    return want


CHAIN = [
    ("www.example.com", 300, "CNAME", ["c1.example.net."]),
    ("c1.example.net", 300, "CNAME", ["c2.cdn.example.org."]),
    ("c2.cdn.example.org", 60, "A", ["192.0.2.1", "192.0.2.2"]),
    ("c2.cdn.example.org", 30, "AAAA", ["2001:db8::1"]),
]


def test_a_record_and_fields():
    wire = response("svc.example.com", [("svc.example.com", 42, "A", ["192.0.2.10"])]).to_wire()
    res = decode(payload(wire))
    # latency: the payload's response time (2000 ns) minus its query time (1000 ns), in ms
    assert res == [Resolution("192.0.2.10", "svc.example.com", (), 42, "10.0.0.7", 0.001)]
    check(wire)


def test_aaaa_text_is_canonical():
    wire = response("v6.example.com", [("v6.example.com", 5, "AAAA", ["2001:DB8:0:0:0:0:0:1"])], "AAAA").to_wire()
    assert [r.ip for r in decode(payload(wire))] == ["2001:db8::1"]
    check(wire)


@pytest.mark.parametrize("compress", [True, False])
def test_two_step_cname_chain(compress: bool):
    m = response("www.example.com", CHAIN)
    wire = m.to_wire() if compress else uncompressed(m)
    want = check(wire)
    assert {ip for ip, *_ in want} == {"192.0.2.1", "192.0.2.2", "2001:db8::1"}
    assert all(w[1:3] == ("www.example.com", ("c1.example.net", "c2.cdn.example.org")) for w in want)


@pytest.mark.parametrize("compress", [True, False])
def test_unrelated_records_ignored(compress: bool):
    m = response(
        "www.example.com",
        [
            *CHAIN,
            ("other.example.com", 60, "A", ["198.51.100.1"]),
            ("c1.example.net", 60, "TXT", ['"hello"']),
            ("www.example.com.attacker.test", 60, "A", ["198.51.100.2"]),
        ],
    )
    m.authority.append(rr("www.example.com", 60, "A", "198.51.100.3"))
    m.additional.append(rr("c2.cdn.example.org", 60, "A", "198.51.100.4"))
    wire = m.to_wire() if compress else uncompressed(m)
    ips = {ip for ip, *_ in check(wire)}
    assert ips == {"192.0.2.1", "192.0.2.2", "2001:db8::1"}


@pytest.mark.parametrize("compress", [True, False])
def test_mixed_case(compress: bool):
    m = response(
        "WwW.ExAmple.COM",
        [
            ("www.EXAMPLE.com", 300, "CNAME", ["C1.Example.NET."]),
            ("c1.example.net", 300, "CNAME", ["c2.CDN.example.org."]),
            ("C2.cdn.EXAMPLE.org", 60, "A", ["192.0.2.1"]),
        ],
    )
    wire = m.to_wire() if compress else uncompressed(m)
    assert check(wire) == [("192.0.2.1", "www.example.com", ("c1.example.net", "c2.cdn.example.org"), 60)]


def test_address_mid_chain_gets_aliases_up_to_its_owner():
    m = response("a.test", [("a.test", 60, "CNAME", ["b.test."]), ("b.test", 9, "A", ["192.0.2.5"])])
    assert check(m.to_wire()) == [("192.0.2.5", "a.test", ("b.test",), 9)]


def test_cname_loop():
    m = response(
        "a.test",
        [("a.test", 60, "CNAME", ["b.test."]), ("b.test", 60, "CNAME", ["a.test."]), ("b.test", 7, "A", ["192.0.2.7"])],
    )
    assert check(m.to_wire()) == [("192.0.2.7", "a.test", ("b.test",), 7)]


def test_cname_to_root_ends_the_chain():
    wire = header(2) + b"\x01a\x04test\x00\x00\x01\x00\x01"
    wire += b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x00\x3c\x00\x01\x00"  # a.test CNAME .
    wire += b"\xc0\x0c" + RR_A + b"\x00\x04\xc0\x00\x02\x05"
    assert check(wire) == [("192.0.2.5", "a.test", (), 60)]


def test_long_chain_is_bounded():
    rrsets = [(f"n{i}.test", 60, "CNAME", [f"n{i + 1}.test."]) for i in range(40)]
    rrsets.append(("n40.test", 60, "A", ["192.0.2.40"]))
    rrsets.append(("n3.test", 60, "A", ["192.0.2.3"]))
    want = [("192.0.2.3", "n0.test", ("n1.test", "n2.test", "n3.test"), 60)]
    assert got(response("n0.test", rrsets).to_wire()) == want


def test_nxdomain_tc_no_answer_and_query():
    m = response("svc.example.com", [("svc.example.com", 42, "A", ["192.0.2.10"])])
    m.set_rcode(dns.rcode.NXDOMAIN)
    assert decode(payload(m.to_wire())) == []
    m.set_rcode(dns.rcode.NOERROR)
    m.flags |= dns.flags.TC
    assert decode(payload(m.to_wire())) == []
    assert decode(payload(response("svc.example.com", []).to_wire())) == []
    q = dns.message.make_query("svc.example.com", "A").to_wire()
    assert decode(payload(q)) == []


def test_other_message_types_teach_nothing():
    wire = response("svc.example.com", [("svc.example.com", 42, "A", ["192.0.2.10"])]).to_wire()
    assert decode(payload(wire, mtype=pb.Message.CLIENT_QUERY)) == []
    assert decode(payload(wire, mtype=pb.Message.RESOLVER_RESPONSE)) == []
    no_response = pb.Dnstap(type=pb.Dnstap.MESSAGE, message=pb.Message(type=pb.Message.CLIENT_RESPONSE))
    assert decode(no_response.SerializeToString()) == []


def test_client_addresses():
    wire = response("svc.example.com", [("svc.example.com", 42, "A", ["192.0.2.10"])]).to_wire()
    mapped = b"\0" * 10 + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert decode(payload(wire, mapped))[0].client_ip == "10.1.2.3"
    v6 = ipaddress.ip_address("fd00::1:2").packed
    assert decode(payload(wire, v6))[0].client_ip == "fd00::1:2"
    assert decode(payload(wire, None))[0].client_ip == ""
    assert decode(payload(wire, b"\x01\x02"))[0].client_ip == ""


def test_bad_protobuf_and_no_message():
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x72\x10\x08"):
        with pytest.raises(DecodeError) as e:
            decode(garbage)
        assert e.value.reason == "protobuf"
    for empty in (b"", pb.Dnstap(type=pb.Dnstap.MESSAGE, identity=b"x").SerializeToString()):
        with pytest.raises(DecodeError) as e:
            decode(empty)
        assert e.value.reason == "no_message"


QA = b"\x01a\x00\x00\x01\x00\x01"  # question "a", type A, class IN
RR_A = b"\x00\x01\x00\x01\x00\x00\x00\x3c"  # type A, class IN, TTL 60 (RDLENGTH follows)


def header(an: int = 1) -> bytes:
    return struct.pack("!HHHHHH", 1, 0x8180, 1, an, 0, 0)


@pytest.mark.parametrize(
    "wire",
    [
        header() + b"\xc0\x0c\x00\x01\x00\x01",  # question points at itself
        header() + b"\x01a\xc0\x0c\x00\x01\x00\x01",  # question points into itself
        header() + QA + b"\xc0\x1f" + RR_A + b"\x00\x04\xc0\x00\x02\x01",  # forward pointer
        header() + QA + b"\xcf\xff" + RR_A + b"\x00\x04\xc0\x00\x02\x01",  # pointer out of bounds
        header() + QA + b"\xc0\x0c" + RR_A + b"\x00\x05\xc0\x00\x02\x01\x00",  # A with 5 bytes
        header() + QA + b"\xc0\x0c" + RR_A + b"\x00\x04\xc0\x00",  # rdata cut short
        header() + QA + b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x00\x3c\x00\x02\xc0\x1f",  # CNAME rdata points at itself
        header() + b"\x41a\x00\x00\x01\x00\x01",  # label type 0x40
        header() + b"\x3fa\x00\x00\x01\x00\x01",  # label runs past the end
        header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",  # name longer than 255
        b"\x00\x01\x81\x80",
    ],
)
def test_malformed_dns(wire: bytes):
    with pytest.raises(DecodeError) as e:
        decode(payload(wire))
    assert e.value.reason == "dns"


def test_pointer_chain_through_earlier_names():
    # The answer owner is "c" + a pointer to the "b.a" suffix in the middle of the question name.
    q = b"\x01c\x01b\x01a\x00"
    wire = header() + q + b"\x00\x01\x00\x01" + b"\x01c\xc0\x0e\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x01"
    assert check(wire) == [("192.0.2.1", "c.b.a", (), 60)]


def test_truncated_at_every_length():
    m = response(
        "www.example.com",
        [*CHAIN, ("other.example.com", 60, "A", ["198.51.100.1"])],
    )
    m.additional.append(rr("c2.cdn.example.org", 60, "A", "198.51.100.4"))
    for wire in (m.to_wire(), uncompressed(m)):
        full = set(oracle(wire))
        for n in range(len(wire)):
            try:
                part = got(wire[:n])
            except DecodeError as e:
                assert e.reason == "dns"
                continue
            assert set(part) <= full, n


def test_escaped_label_text_matches_dnspython():
    m = response("we(ird).ex@mple.test", [(r"we\(ird\).ex\@mple.test", 60, "A", ["192.0.2.1"])])
    check(m.to_wire())
    m = response(r"\000\255.test", [(r"\000\255.test", 60, "A", ["192.0.2.1"])])
    check(m.to_wire())


def test_cached_result_is_a_fresh_list_and_id_independent():
    m = response("svc.example.com", [("svc.example.com", 42, "A", ["192.0.2.10"])])
    clear_caches()
    first = decode(payload(m.to_wire()))
    first.clear()
    m.id ^= 0x1234
    again = decode(payload(m.to_wire()))
    assert [r.ip for r in again] == ["192.0.2.10"]
    assert decode(payload(m.to_wire(), ipaddress.ip_address("10.9.9.9").packed))[0].client_ip == "10.9.9.9"


def test_large_response_is_decoded_but_not_cached():
    ips = [f"10.1.{i // 256}.{i % 256}" for i in range(120)]
    m = response("big.test", [("big.test", 60, "A", ips)])
    wire = m.to_wire()
    assert len(wire) > 1232
    for _ in range(2):
        assert sorted(r.ip for r in decode(payload(wire))) == sorted(ips)


# --- failed answers and latency ---------------------------------------------------------------------


def failed(qname: str, rcode: int, qtype: str = "A") -> bytes:
    m = dns.message.make_response(dns.message.make_query(qname, qtype, id=77))
    m.set_rcode(rcode)
    return m.to_wire()


@pytest.mark.parametrize(
    ("rcode", "name"),
    [
        (dns.rcode.NXDOMAIN, "NXDOMAIN"),
        (dns.rcode.SERVFAIL, "SERVFAIL"),
        (dns.rcode.REFUSED, "REFUSED"),
        (dns.rcode.FORMERR, "FORMERR"),
        (dns.rcode.NOTAUTH, "NOTAUTH"),
        (12, "RCODE12"),
    ],
)
def test_a_failed_answer_is_a_failure_with_its_rcode_name_and_type(rcode: int, name: str):
    clear_caches()
    got = decode_message(payload(failed("Missing.Example.COM.", rcode, "AAAA")))
    want = Failure("missing.example.com", "AAAA", name, "10.0.0.7", 0.001)
    assert got == Response(name, 0.001, [], want)
    assert decode(payload(failed("missing.example.com.", rcode))) == []  # it teaches no name


def test_failure_question_forms():
    clear_caches()
    assert decode_message(payload(failed("x.test.", dns.rcode.SERVFAIL, "TYPE65280"))).failure.qtype == "TYPE65280"
    assert decode_message(payload(failed("x.test.", dns.rcode.SERVFAIL, "HTTPS"))).failure.qtype == "HTTPS"
    assert decode_message(payload(failed(".", dns.rcode.REFUSED, "NS"))).failure.name == "."
    no_question = struct.pack("!HHHHHH", 9, 0x8181, 0, 0, 0, 0)  # FORMERR, as some servers send it
    assert decode_message(payload(no_question)).failure == Failure("", "", "FORMERR", "10.0.0.7", 0.001)
    with pytest.raises(DecodeError) as e:
        decode_message(payload(failed("x.test.", dns.rcode.NXDOMAIN)[:20]))
    assert e.value.reason == "dns"


def test_nodata_truncated_and_other_opcodes_are_not_failures():
    clear_caches()
    nodata = decode_message(payload(response("svc.example.com", []).to_wire()))
    assert (nodata.rcode, nodata.failure, nodata.resolutions) == ("NOERROR", None, [])
    m = response("svc.example.com", [("svc.example.com", 42, "A", ["192.0.2.10"])])
    m.flags |= dns.flags.TC
    assert decode_message(payload(m.to_wire())).failure is None
    notify = dns.message.make_response(dns.message.make_query("x.test.", "SOA"))
    notify.set_opcode(dns.opcode.NOTIFY)
    notify.set_rcode(dns.rcode.REFUSED)
    got = decode_message(payload(notify.to_wire()))
    assert (got.rcode, got.failure) == ("REFUSED", None)  # counted by its RCODE, not a failed lookup


def test_the_same_failure_for_another_client_comes_from_the_cache():
    clear_caches()
    one = failed("gone.test.", dns.rcode.NXDOMAIN)
    other = b"\x12\x34" + one[2:]  # another DNS ID: the same cached result
    assert decode_message(payload(one)).failure.client_ip == "10.0.0.7"
    assert decode_message(payload(other, bytes([10, 0, 0, 8]))).failure == Failure(
        "gone.test", "A", "NXDOMAIN", "10.0.0.8", 0.001
    )


def test_latency_needs_both_times_and_is_never_negative():
    clear_caches()
    wire = response("svc.example.com", [("svc.example.com", 42, "A", ["192.0.2.10"])]).to_wire()
    t0 = 1_700_000_000 * NS + 999_999_000
    assert decode_message(payload(wire, query_ns=t0, response_ns=t0 + 1_500_123_456)).latency_ms == 1500.123
    assert decode_message(payload(wire, query_ns=None)).latency_ms is None
    assert decode_message(payload(wire, response_ns=None)).latency_ms is None
    assert decode_message(payload(wire, query_ns=t0, response_ns=t0 - 1)).latency_ms is None
    assert decode(payload(wire, query_ns=t0, response_ns=t0 + 250_000))[0].latency_ms == 0.25


def test_a_response_without_query_time_takes_its_logged_querys():
    """unbound logs the query time in CLIENT_QUERY only: matched by client address, port and DNS ID."""
    clear_caches()
    queries = QueryTimes()
    query = dns.message.make_query("gone.test.", "A", id=501).to_wire()
    answer = failed("gone.test.", dns.rcode.NXDOMAIN)
    answer = query[:2] + answer[2:]  # the response to that query
    t0 = 1_700_000_000 * NS
    q = payload(query, mtype=pb.Message.CLIENT_QUERY, query_ns=t0, response_ns=None)
    assert decode_message(q, queries) is None and len(queries) == 1
    # another client port, another ID: not its query
    r = payload(answer, query_ns=None, response_ns=t0 + 3_000_000, port=40001)
    assert decode_message(r, queries).latency_ms is None
    other_id = b"\x00\x01" + answer[2:]
    assert decode_message(payload(other_id, query_ns=None, response_ns=t0 + 3_000_000), queries).latency_ms is None
    r = payload(answer, query_ns=None, response_ns=t0 + 3_000_000)
    assert decode_message(r, queries).failure.latency_ms == 3.0
    assert len(queries) == 0  # taken
    assert decode_message(r, queries).latency_ms is None  # once
    # a response with its own query time (CoreDNS logs both) uses it, and frees the logged query
    decode_message(q, queries)
    assert (
        decode_message(payload(answer, query_ns=t0 + 1_000_000, response_ns=t0 + 3_000_000), queries).latency_ms == 2.0
    )
    assert len(queries) == 0


def test_logged_queries_are_bounded():
    queries = QueryTimes(max_entries=2)
    for port in (1, 2, 3):
        queries.put((b"\x0a\x00\x00\x07", port, b"\x00\x01"), port)
    assert len(queries) == 2 and queries.dropped == 1
    assert queries.pop((b"\x0a\x00\x00\x07", 1, b"\x00\x01")) is None  # the oldest went
    assert queries.pop((b"\x0a\x00\x00\x07", 3, b"\x00\x01")) == 3
