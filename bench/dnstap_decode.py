"""dnstap decoding throughput: decode() + NameCache.learn() per second on one core (no I/O, no framing).

Payloads are CLIENT_RESPONSE messages built with dnspython (compressed, like real resolvers):
  typical  question -> CNAME -> CNAME -> 2 A records
  mixed    a third each of: typical, a direct A record, a CNAME to 2 AAAA records
"uncached" decodes N distinct answers (every one a cache miss); "repeated" decodes N payloads drawn
from a pool of --pool distinct answers with fresh DNS IDs and --clients different clients.

    .venv/bin/python bench/dnstap_decode.py [--n 50000] [--pool 1000] [--clients 50] [--rounds 3]
        [--gc-threshold N]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time

import dns.message
import dns.name
import dns.rrset

from netstatd.sources.dnstap import decode as dec
from netstatd.sources.dnstap.protos import dnstap_pb2 as pb
from netstatd.state.names import NameCache


def rrset(owner: str, ttl: int, rtype: str, *rdatas: str) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(dns.name.from_text(owner), ttl, "IN", rtype, list(rdatas))


def answer(i: int, shape: str) -> bytes:
    q = f"svc{i}.ns{i % 97}.svc.cluster.local."
    a, b, c = (i >> 16) & 255, (i >> 8) & 255, i & 255
    r = dns.message.make_response(dns.message.make_query(q, "AAAA" if shape == "aaaa" else "A", id=i & 0xFFFF))
    if shape == "typical":
        c1, c2 = f"lb{i}.edge.example.net.", f"e{i}.cdn.example.org."
        r.answer += [rrset(q, 300, "CNAME", c1), rrset(c1, 300, "CNAME", c2)]
        r.answer.append(rrset(c2, 60, "A", f"10.{a}.{b}.{c}", f"11.{a}.{b}.{c}"))
    elif shape == "direct":
        r.answer.append(rrset(q, 30, "A", f"10.{a}.{b}.{c}"))
    else:
        c1 = f"v6-{i}.example.net."
        r.answer += [rrset(q, 300, "CNAME", c1), rrset(c1, 60, "AAAA", f"2001:db8::{a:x}:{b:x}:{c:x}", f"fd00::{i:x}")]
    return r.to_wire()


def client(k: int) -> bytes:
    v4 = bytes([10, 244, k >> 8 & 255, k & 255])
    return b"\0" * 10 + b"\xff\xff" + v4 if k % 2 else v4  # half as CoreDNS sends them (v4-mapped)


def wrap(wire: bytes, qaddr: bytes) -> bytes:
    msg = pb.Message(type=pb.Message.CLIENT_RESPONSE, socket_family=pb.INET, socket_protocol=pb.UDP)
    msg.query_address, msg.query_port = qaddr, 40000
    msg.response_address, msg.response_port = b"\x0a\x60\x00\x0a", 53
    msg.query_time_sec, msg.query_time_nsec = 1_700_000_000, 1_000
    msg.response_time_sec, msg.response_time_nsec = 1_700_000_000, 90_000
    msg.response_message = wire
    return pb.Dnstap(identity=b"coredns-0", version=b"1.11", type=pb.Dnstap.MESSAGE, message=msg).SerializeToString()


def run(payloads: list[bytes], learn: bool, clear: bool) -> tuple[float, int]:
    """Seconds for one pass over payloads, and the number of Resolutions learnt."""
    if clear:
        dec.clear_caches()
    cache = NameCache()
    decode, now, n = dec.decode, time.monotonic(), 0
    t0 = time.perf_counter()
    if learn:
        for p in payloads:
            for r in decode(p):
                cache.learn(r, now)
                n += 1
    else:
        for p in payloads:
            n += len(decode(p))
    return time.perf_counter() - t0, n


def measure(payloads: list[bytes], rounds: int, learn: bool, clear: bool) -> dict[str, float]:
    times = []
    for _ in range(rounds):
        secs, learnt = run(payloads, learn, clear)
        times.append(secs)
    secs = statistics.median(times)
    return {
        "msgs_per_s": round(len(payloads) / secs),
        "us_per_msg": round(secs / len(payloads) * 1e6, 2),
        "resolutions_per_msg": round(learnt / len(payloads), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gc-threshold", type=int, default=0, help="gc.set_threshold(N) for gen0 (0: Python default)")
    args = ap.parse_args()
    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold)
    rng = random.Random(1)

    t0 = time.perf_counter()
    shapes = ("typical", "direct", "aaaa")
    typical = [wrap(answer(i, "typical"), client(i % args.clients)) for i in range(args.n)]
    # A third of the mixed set is the typical shape: reuse those payloads (dnspython builds slowly).
    mixed = [
        p if i % 3 == 0 else wrap(answer(i, shapes[i % 3]), client(i % args.clients)) for i, p in enumerate(typical)
    ]
    pool = [answer(i, shapes[i % 3]) for i in range(args.pool)]
    repeated = []
    for _ in range(args.n):
        wire = pool[rng.randrange(len(pool))]
        repeated.append(wrap(rng.randbytes(2) + wire[2:], client(rng.randrange(args.clients))))
    build_s = time.perf_counter() - t0

    out = {
        "n": args.n,
        "pool": args.pool,
        "clients": args.clients,
        "rounds": args.rounds,
        "gc_threshold": gc.get_threshold(),
        "build_s": round(build_s, 1),
        "typical_bytes": len(typical[0]),
        "uncached_typical_decode": measure(typical, args.rounds, learn=False, clear=True),
        "uncached_typical_decode_learn": measure(typical, args.rounds, learn=True, clear=True),
        "uncached_mixed_decode_learn": measure(mixed, args.rounds, learn=True, clear=True),
        "repeated_mixed_decode_learn": measure(repeated, args.rounds, learn=True, clear=False),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
