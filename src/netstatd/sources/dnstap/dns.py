"""Minimal DNS response parser: which A/AAAA addresses answer the question name (RFC 1035 wire format).

Reads only the header, the question and the answer section; authority and additional records are
never mapped, so they are not parsed. Names are kept as "keys" (their wire labels, lowercased,
without the root label) and compared as bytes; text is built only for the question name and its
CNAME chain. Compression pointers must point strictly backwards and never into the name being
read (the rule dnspython applies too), so a pointer loop cannot hang the parser.
"""

from __future__ import annotations

import re
import struct

MAX_CNAME_HOPS = 16
MAX_POINTER_HOPS = 16

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
CLASS_IN = 1
NOERROR = 0
# The header's 4-bit RCODE (RFC 1035, 2136, 8490): every value has a name, "RCODE12" for the unassigned.
_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET", "NXRRSET")
RCODE_NAMES = (*_RCODES, "NOTAUTH", "NOTZONE", "DSOTYPENI", *(f"RCODE{i}" for i in range(12, 16)))
_QTYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
    35: "NAPTR", 43: "DS", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 99: "SPF", 255: "ANY", 257: "CAA",
}  # fmt: skip
_ADDR_LEN = {TYPE_A: 4, TYPE_AAAA: 16}

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_QTAIL = 4  # QTYPE + QCLASS after the question name
# Labels made of these print as they are; anything else goes through _label_text (escapes).
_PLAIN_RE = re.compile(rb"[a-z0-9_-]*")
_ESCAPED = frozenset(b'"().;\\@$')
_TEXT_CACHE_MAX = 16384
_text_cache: dict[bytes, str] = {}


class DnsError(Exception):
    """Malformed DNS message: bad pointer, bad label type, truncated record, name too long."""


# (address rdata bytes, question name, CNAME targets up to the record's owner, ttl)
Answer = tuple[bytes, str, tuple[str, ...], int]


def _name(w: bytes, i: int, n: int, memo: dict[int, bytes]) -> tuple[bytes, int]:
    """Read the name at w[i]; return (key, offset after the name). n bounds the first segment."""
    start = seg = limit = i  # every pointer must point below `limit` (strictly backwards)
    parts: list[bytes] | None = None  # segments before a pointer; None for a name written in full
    after = -1  # offset after the name: set at the first pointer, or at the root label
    hops = 0
    while True:
        if i >= n:
            raise DnsError("name runs past its bounds")
        c = w[i]
        if c == 0:
            tail = w[seg:i]
            if after < 0:
                after = i + 1
            break
        if c < 64:
            i += c + 1
            continue
        if c < 0xC0 or i + 1 >= n:
            raise DnsError("bad label type or truncated pointer")
        if parts is None:
            parts = []
            after = i + 2
        parts.append(w[seg:i])
        p = ((c & 0x3F) << 8) | w[i + 1]
        hops += 1
        if p >= limit or hops > MAX_POINTER_HOPS:
            raise DnsError("compression pointer not backwards")
        tail = memo.get(p)
        if tail is not None:
            break
        # The target must not overlap the segment that pointed to it.
        n = seg
        limit = i = seg = p
    if parts is not None:
        parts.append(tail)
        tail = b"".join(parts)
    key = tail.lower()
    if len(key) > 254:
        raise DnsError("name too long")
    memo[start] = key
    return key, after


def _label_text(label: bytes) -> str:
    # dnspython's escaping, so text matches what other tools print.
    out = []
    for b in label:
        if b in _ESCAPED:
            out.append("\\" + chr(b))
        elif 0x20 < b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def name_text(key: bytes) -> str:
    """Key → lowercase text without the trailing dot.

    Cached per suffix, so a new name under a known domain (x.svc.cluster.local) costs one label.
    """
    text = _text_cache.get(key)
    if text is None:
        if not key:
            return ""
        ln = key[0]
        label = key[1 : 1 + ln]
        text = label.decode("ascii") if _PLAIN_RE.fullmatch(label) else _label_text(label)
        if len(key) > ln + 1:
            text = text + "." + name_text(key[ln + 1 :])
        if len(_text_cache) >= _TEXT_CACHE_MAX:
            _text_cache.clear()
        _text_cache[key] = text
    return text


def qtype_text(qtype: int) -> str:
    """A QTYPE's mnemonic, "TYPE65280" (RFC 3597's form) for one without a name here."""
    return _QTYPES.get(qtype) or f"TYPE{qtype}"


def parse_failure(w: bytes) -> tuple[int, str, str] | None:
    """(RCODE, question name, QTYPE) of a failed answer: a response to a standard query whose RCODE is not
    NOERROR. None for any other message. The name is "" when the response has no question (some FORMERR
    and NOTIMP answers), "." for the root. Raises DnsError for a malformed question."""
    try:
        _id, flags, qd, _an, _ns, _ar = _HEADER.unpack_from(w, 0)
    except struct.error:
        raise DnsError("short header") from None
    rcode = flags & 0xF
    if flags & 0xF800 != 0x8000 or rcode == NOERROR:  # a response, opcode QUERY
        return None
    if qd == 0:
        return rcode, "", ""
    qkey, i = _name(w, 12, len(w), {})
    if i + _QTAIL > len(w):
        raise DnsError("truncated question")
    return rcode, name_text(qkey) if qkey else ".", qtype_text((w[i] << 8) | w[i + 1])


def parse_response(w: bytes) -> list[Answer]:
    """The A/AAAA answers for the question name or its CNAME chain; [] when the response teaches nothing.

    Raises DnsError for malformed data in the parts it reads.
    """
    try:
        _id, flags, qd, an, _ns, _ar = _HEADER.unpack_from(w, 0)
    except struct.error:
        raise DnsError("short header") from None
    # Response, opcode QUERY, not truncated, NOERROR, exactly one question, some answers.
    if flags & 0xFA0F != 0x8000 or qd != 1 or an == 0:
        return []
    n = len(w)
    memo: dict[int, bytes] = {}
    qkey, i = _name(w, 12, n, memo)
    i += _QTAIL
    if i > n:
        raise DnsError("truncated question")
    if not qkey:
        return []  # the root name has no hostname to learn
    cnames: dict[bytes, bytes] = {}
    addrs: list[tuple[bytes, int, bytes]] = []
    unpack_rr = _RR.unpack_from
    for _ in range(an):
        # Fast path: the owner is a pointer to a name already read (what compressors emit).
        owner = None
        if i + 1 < n and w[i] >= 0xC0:
            owner = memo.get(((w[i] & 0x3F) << 8) | w[i + 1])  # memo holds only offsets before i
        if owner is None:
            owner, i = _name(w, i, n, memo)
        else:
            i += 2
        try:
            rtype, rclass, ttl, rdlen = unpack_rr(w, i)
        except struct.error:
            raise DnsError("truncated record") from None
        i += 10
        end = i + rdlen
        if end > n:
            raise DnsError("truncated rdata")
        if rclass == CLASS_IN:
            alen = _ADDR_LEN.get(rtype)
            if alen is not None:
                if rdlen != alen:
                    raise DnsError("bad address length")
                addrs.append((owner, ttl, w[i:end]))
            elif rtype == TYPE_CNAME:
                target, after = _name(w, i, end, memo)
                if after != end:
                    raise DnsError("trailing bytes in CNAME")
                cnames.setdefault(owner, target)
        i = end
    if not addrs:
        return []
    # Walk the chain from the question name; position = how many aliases lead to that owner.
    pos = {qkey: 0}
    chain: list[bytes] = []
    cur = qkey
    while cnames and len(chain) < MAX_CNAME_HOPS:
        nxt = cnames.get(cur)
        if not nxt or nxt in pos:  # end, CNAME to the root name, or a loop
            break
        chain.append(nxt)
        pos[nxt] = len(chain)
        cur = nxt
    host = name_text(qkey)
    aliases = tuple(map(name_text, chain))
    out: list[Answer] = []
    seen: set[bytes] = set()
    for owner, ttl, addr in addrs:
        k = pos.get(owner)
        if k is None or addr in seen:
            continue
        seen.add(addr)
        # RFC 2181 §8: a TTL with the top bit set means zero.
        out.append((addr, host, aliases[:k], ttl if ttl < 0x80000000 else 0))
    return out
