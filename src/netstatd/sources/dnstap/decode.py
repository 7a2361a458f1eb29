"""dnstap payload → what one CLIENT_RESPONSE message says: its RCODE and latency, the IP/name facts it
teaches (`Resolution`s), or the failure it is (`Failure`).

The protobuf layer uses the generated stubs: the upb runtime parses a typical payload in ~1 µs,
about 4x faster than a hand-written wire walker in Python. Parsed answers are cached by the response
bytes minus the DNS ID, since resolvers hand the same answer to many clients and the ID is the only
part that changes between identical answers.

Latency is the response time minus the query time. A sender that leaves the query time out of its
responses (unbound) gets it from its CLIENT_QUERY messages instead, when it logs them: `QueryTimes`
keeps their times until the response with the same client address, port and DNS ID comes.
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from typing import NamedTuple

from google.protobuf.message import DecodeError as _PbDecodeError

from .dns import RCODE_NAMES, DnsError, parse_failure, parse_response
from .protos.dnstap_pb2 import Dnstap

CLIENT_QUERY = 5
CLIENT_RESPONSE = 6
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
_TEXT_CACHE_MAX = 65536
# Memory bound: at most 2 x 8192 cached responses of at most 1232 bytes (the usual EDNS UDP size).
_RESULT_CACHE_MAX = 8192
_RESULT_CACHE_MAX_WIRE = 1232


class DecodeError(Exception):
    """A payload that cannot be decoded. `reason` is a metric label: "protobuf", "no_message" or "dns"."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# The decoded records are NamedTuples, not frozen dataclasses: one or more is made for every message,
# and a tuple is made about 4x faster (a frozen dataclass sets each field through object.__setattr__);
# decode_message() makes them with tuple.__new__, twice as fast again as calling the class.


class Resolution(NamedTuple):
    """An address a client's answer maps to a name."""

    ip: str  # canonical text (socket.inet_ntop, as elsewhere in netstatd)
    hostname: str  # question name, lowercase, no trailing dot
    aliases: tuple[str, ...]  # CNAME targets from the question name to the record's owner, in order
    ttl: int  # TTL of the A/AAAA record
    client_ip: str  # query_address; IPv4-mapped IPv6 normalised to dotted IPv4; "" if absent
    latency_ms: float | None = None  # of the answer that taught it (Response.latency_ms)


class Failure(NamedTuple):
    """A failed client answer: its RCODE is not NOERROR (a NOERROR without records, NODATA, is not one)."""

    name: str  # question name as Resolution.hostname spells it; "." for the root, "" without a question
    qtype: str  # "A", "AAAA", ..., "TYPE65280"; "" without a question
    rcode: str  # "NXDOMAIN", "SERVFAIL", ... (dns.RCODE_NAMES)
    client_ip: str  # as Resolution.client_ip
    latency_ms: float | None  # as Response.latency_ms


class Response(NamedTuple):
    """One CLIENT_RESPONSE message."""

    rcode: str  # dns.RCODE_NAMES: "NOERROR", "NXDOMAIN", ...
    latency_ms: float | None  # response time - query time in ms, to the µs; None when either is unknown
    resolutions: list[Resolution]  # the addresses a NOERROR answer maps to names ([] for a failure)
    failure: Failure | None  # set when the RCODE is not NOERROR


class QueryTimes:
    """The query times of logged CLIENT_QUERY messages, by (client address, client port, DNS ID), until
    the response that lacks one takes it. Bounded: over `max_entries` the oldest is forgotten (`dropped`)."""

    def __init__(self, max_entries: int = 16384) -> None:
        self.max_entries = max_entries
        self.dropped = 0
        # OrderedDict: popping the oldest of a plain dict scans the slots its deletions left (names.py)
        self._times: OrderedDict[tuple[bytes, int, bytes], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._times)

    def put(self, key: tuple[bytes, int, bytes], query_ns: int) -> None:
        times = self._times
        if len(times) >= self.max_entries and key not in times:
            times.popitem(last=False)
            self.dropped += 1
        times[key] = query_ns

    def pop(self, key: tuple[bytes, int, bytes]) -> int | None:
        return self._times.pop(key, None)


_new = tuple.__new__
_addr_text: dict[bytes, str] = {}
_client_text: dict[bytes, str] = {}
# Two generations: a hit in the old one is promoted, a full new one replaces the old (LRU-ish, O(1)).
# Values are (answers, failure): answers are tuples of (ip, hostname, aliases, ttl), a failure is
# (rcode, name, qtype) or None. Only str/int inside, so the garbage collector untracks them and a large
# cache adds nothing to full collections.
_Answers = tuple[tuple[str, str, tuple[str, ...], int], ...]
_Cached = tuple[_Answers, tuple[int, str, str] | None]
_results_new: dict[bytes, _Cached] = {}
_results_old: dict[bytes, _Cached] = {}


def _answer_ip(addr: bytes) -> str:
    text = _addr_text.get(addr)
    if text is None:
        text = socket.inet_ntop(socket.AF_INET if len(addr) == 4 else socket.AF_INET6, addr)
        if len(_addr_text) >= _TEXT_CACHE_MAX:
            _addr_text.clear()
        _addr_text[addr] = text
    return text


def client_ip_text(addr: bytes) -> str:
    """query_address bytes → text; CoreDNS sends IPv4 clients as ::ffff:a.b.c.d."""
    text = _client_text.get(addr)
    if text is None:
        if len(addr) == 16:
            if addr.startswith(_V4_MAPPED):
                text = socket.inet_ntop(socket.AF_INET, addr[12:])
            else:
                text = socket.inet_ntop(socket.AF_INET6, addr)
        elif len(addr) == 4:
            text = socket.inet_ntop(socket.AF_INET, addr)
        else:
            return ""  # absent or malformed; not cached so odd sizes cannot fill memory
        if len(_client_text) >= _TEXT_CACHE_MAX:
            _client_text.clear()
        _client_text[addr] = text
    return text


def decode(payload: bytes) -> list[Resolution]:
    """Resolutions taught by one dnstap payload; [] for other message types or useless responses."""
    response = decode_message(payload)
    return response.resolutions if response is not None else []


def decode_message(payload: bytes, queries: QueryTimes | None = None) -> Response | None:
    """The CLIENT_RESPONSE in one dnstap payload; None for other message types (a CLIENT_QUERY's time is
    kept in `queries`, when given, for its response). Raises DecodeError for a payload it cannot read."""
    global _results_new, _results_old
    frame = Dnstap()
    try:
        frame.ParseFromString(payload)
    except _PbDecodeError as e:
        raise DecodeError("protobuf", str(e)) from None
    if not frame.HasField("message"):
        raise DecodeError("no_message")
    msg = frame.message
    mtype = msg.type
    if mtype != CLIENT_RESPONSE or not msg.HasField("response_message"):
        if mtype == CLIENT_QUERY and queries is not None and (query_s := msg.query_time_sec):
            queries.put(
                (msg.query_address, msg.query_port, msg.query_message[:2]),
                query_s * 1_000_000_000 + msg.query_time_nsec,
            )
        return None
    wire = msg.response_message
    key = wire[2:]
    cached = _results_new.get(key)
    if cached is None:
        cached = _results_old.get(key)
        if cached is None:
            try:
                failed = parse_failure(wire)
                answers = () if failed else tuple((_answer_ip(a), h, al, t) for a, h, al, t in parse_response(wire))
            except DnsError as e:
                raise DecodeError("dns", str(e)) from None
            cached = (answers, failed)
        if len(key) <= _RESULT_CACHE_MAX_WIRE:
            if len(_results_new) >= _RESULT_CACHE_MAX:
                _results_old = _results_new
                _results_new = {}
            _results_new[key] = cached
    # The query time: in the response (CoreDNS, dnsdist), or from the logged query (unbound). A time's
    # seconds read 0 when absent (HasField costs twice as much, and no server logs 1970).
    qaddr = msg.query_address
    query_ns = queries.pop((qaddr, msg.query_port, wire[:2])) if queries is not None else None
    query_s = msg.query_time_sec
    if query_s:
        query_ns = query_s * 1_000_000_000 + msg.query_time_nsec
    latency = None
    if query_ns is not None:
        response_s = msg.response_time_sec
        took = response_s * 1_000_000_000 + msg.response_time_nsec - query_ns
        if response_s and took >= 0:
            latency = took // 1000 / 1000  # ms, to the µs
    answers, failed = cached
    client = client_ip_text(qaddr) if answers or failed else ""
    if failed is not None:
        rcode = RCODE_NAMES[failed[0]]
        return _new(Response, (rcode, latency, [], _new(Failure, (failed[1], failed[2], rcode, client, latency))))
    resolutions = [_new(Resolution, (ip, host, aliases, ttl, client, latency)) for ip, host, aliases, ttl in answers]
    return _new(Response, (RCODE_NAMES[wire[3] & 0xF], latency, resolutions, None))


def clear_caches() -> None:
    """Forget cached results (benchmarks measure the uncached path with it)."""
    _results_new.clear()
    _results_old.clear()
