"""Property tests: decode() never fails with anything but DecodeError, and agrees with dnspython."""

from __future__ import annotations

import ipaddress
import itertools
import random

import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netstatd.sources.dnstap.decode import DecodeError, clear_caches, decode, decode_message
from tests.unit.test_dns_decode import CHAIN, got, oracle, payload, response, rr, uncompressed

FUZZ = settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ORACLE = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

SEED_WIRES = [
    response("www.example.com", CHAIN).to_wire(),
    uncompressed(response("www.example.com", CHAIN)),
    response("a.test", [("a.test", 60, "CNAME", ["b.test."]), ("b.test", 60, "A", ["192.0.2.5"])]).to_wire(),
]


def safe_decode(data: bytes) -> None:
    try:
        res = decode(data)
    except DecodeError as e:
        assert e.reason in ("protobuf", "no_message", "dns")
        return
    assert isinstance(res, list)


@FUZZ
@given(st.binary(max_size=400))
def test_random_payload(data: bytes):
    safe_decode(data)


@FUZZ
@given(st.binary(max_size=300))
def test_random_dns_bytes(data: bytes):
    safe_decode(payload(data))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEED_WIRES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0, 0x3F, 0x40, 0xC0, 0xFF, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif len(data) > 1:
            del data[i]
    return bytes(data)


@FUZZ
@given(mutated(), st.booleans())
def test_mutated_valid_response(wire: bytes, wrap: bool):
    if wrap:
        safe_decode(payload(wire))
        return
    # Whole-payload mutation: flip bytes of the protobuf framing too.
    data = bytearray(payload(SEED_WIRES[0]))
    data[len(wire) % len(data)] ^= 0xFF
    safe_decode(bytes(data))


label = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12)
name = st.lists(label, min_size=1, max_size=4).map(lambda labels: ".".join(labels) + ".")
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    """A response with a CNAME chain (maybe looping), addresses on chain and off it, shuffled."""
    qname = draw(name)
    chain = [qname, *draw(st.lists(name, max_size=4))]
    rrsets: list[tuple[str, int, str, list[str]]] = []
    for owner, target in itertools.pairwise(chain):
        rrsets.append((owner, draw(st.integers(0, 2**31 - 1)), "CNAME", [target]))
    if draw(st.booleans()) and len(chain) > 1:
        rrsets.append((chain[-1], 60, "CNAME", [draw(st.sampled_from(chain))]))
    for _ in range(draw(st.integers(0, 4))):
        owner = draw(st.one_of(st.sampled_from(chain), name))
        rtype = draw(st.sampled_from(["A", "AAAA"]))
        ips = draw(st.lists(ipv4 if rtype == "A" else ipv6, min_size=1, max_size=3, unique=True))
        rrsets.append((owner, draw(st.integers(0, 2**32 - 1)), rtype, ips))
    rrsets = draw(st.permutations(rrsets))
    m = response(qname, [])
    present = set()
    for owner, ttl, rtype, rdatas in rrsets:
        # One rrset per (owner, type): dnspython would merge a second one.
        if (owner.lower(), rtype) not in present:
            present.add((owner.lower(), rtype))
            m.answer.append(rr(owner, ttl, rtype, *rdatas))
    if draw(st.booleans()):
        m.additional.append(rr(draw(name), 60, "A", draw(ipv4)))
    compress = draw(st.booleans())
    state = random.getstate()  # dnspython shuffles multi-record rrsets with the global random
    try:
        return m.to_wire() if compress else uncompressed(m)
    finally:
        random.setstate(state)


@ORACLE
@given(answers())
def test_generated_answers_match_dnspython(wire: bytes):
    assert got(wire) == oracle(wire)


@st.composite
def failed_answers(draw: st.DrawFn) -> bytes:
    """A response with any RCODE and opcode, a question of any type (or none), maybe records."""
    m = response(draw(name), [], draw(st.sampled_from(["A", "AAAA", "MX", "TYPE65280", "HTTPS"])))
    m.set_rcode(draw(st.integers(0, 15)))
    m.set_opcode(draw(st.sampled_from([dns.opcode.QUERY, dns.opcode.QUERY, dns.opcode.NOTIFY])))
    if draw(st.booleans()):
        m.answer.append(rr(m.question[0].name.to_text(), 60, "A", draw(ipv4)))
    wire = bytearray(m.to_wire())
    if draw(st.booleans()):  # no question: keep the header only, QDCOUNT 0
        wire = wire[:4] + b"\0" * 8
    return bytes(wire)


@ORACLE
@given(failed_answers())
def test_failures_match_dnspython(wire: bytes):
    clear_caches()
    m = dns.message.from_wire(wire)
    rcode = m.flags & 0xF  # the header's RCODE (dnspython's rcode() adds EDNS's extended bits)
    response = decode_message(payload(wire))
    # dnspython names 0-10; 11 is DSOTYPENI (RFC 8490), 12-15 are unassigned
    want = dns.rcode.to_text(rcode) if rcode <= 10 else "DSOTYPENI" if rcode == 11 else f"RCODE{rcode}"
    assert response.rcode == want
    if rcode == 0 or m.opcode() != dns.opcode.QUERY:
        assert response.failure is None
        return
    q = m.question[0] if m.question else None
    want_name = "" if q is None else q.name.to_text(omit_final_dot=True).lower()
    want_type = "" if q is None else dns.rdatatype.to_text(q.rdtype)
    f = response.failure
    assert (f.name, f.qtype, f.rcode, f.client_ip) == (want_name, want_type, response.rcode, "10.0.0.7")
    assert response.resolutions == []
