"""dnstap payload → IP/name facts (the `Resolution`s taught by one CLIENT_RESPONSE message).

The protobuf layer uses the generated stubs: the upb runtime parses a typical payload in ~1 µs,
about 4x faster than a hand-written wire walker in Python. Parsed answers are cached by the response
bytes minus the DNS ID, since resolvers hand the same answer to many clients and the ID is the only
part that changes between identical answers.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from google.protobuf.message import DecodeError as _PbDecodeError

from .dns import DnsError, parse_response
from .protos.dnstap_pb2 import Dnstap

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


@dataclass(slots=True, frozen=True)
class Resolution:
    ip: str  # canonical text (socket.inet_ntop, as elsewhere in netstatd)
    hostname: str  # question name, lowercase, no trailing dot
    aliases: tuple[str, ...]  # CNAME targets from the question name to the record's owner, in order
    ttl: int  # TTL of the A/AAAA record
    client_ip: str  # query_address; IPv4-mapped IPv6 normalised to dotted IPv4; "" if absent


_addr_text: dict[bytes, str] = {}
_client_text: dict[bytes, str] = {}
# Two generations: a hit in the old one is promoted, a full new one replaces the old (LRU-ish, O(1)).
# Values are tuples of (ip, hostname, aliases, ttl): only str/int inside, so the garbage collector
# untracks them and a large cache adds nothing to full collections (Resolution objects would).
_Cached = tuple[tuple[str, str, tuple[str, ...], int], ...]
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
    global _results_new, _results_old
    frame = Dnstap()
    try:
        frame.ParseFromString(payload)
    except _PbDecodeError as e:
        raise DecodeError("protobuf", str(e)) from None
    if not frame.HasField("message"):
        raise DecodeError("no_message")
    msg = frame.message
    if msg.type != CLIENT_RESPONSE or not msg.HasField("response_message"):
        return []
    wire = msg.response_message
    key = wire[2:]
    answers = _results_new.get(key)
    if answers is None:
        answers = _results_old.get(key)
        if answers is None:
            try:
                answers = tuple((_answer_ip(a), h, al, ttl) for a, h, al, ttl in parse_response(wire))
            except DnsError as e:
                raise DecodeError("dns", str(e)) from None
        if len(key) <= _RESULT_CACHE_MAX_WIRE:
            if len(_results_new) >= _RESULT_CACHE_MAX:
                _results_old = _results_new
                _results_new = {}
            _results_new[key] = answers
    if not answers:
        return []
    client = client_ip_text(msg.query_address)
    return [Resolution(ip, host, aliases, ttl, client) for ip, host, aliases, ttl in answers]


def clear_caches() -> None:
    """Forget cached results (benchmarks measure the uncached path with it)."""
    _results_new.clear()
    _results_old.clear()
