#!/usr/bin/env python3
"""User-space cost per TCP connection: ingest, flush and JSON encoding, without the kernel.

Feeds the node's pipeline (state, then enrichment: pipeline.py) kernel records shaped like the churn
benchmark's (both sides of each connection on this node, owned by this process so /proc lookups are
real), in ring-sized chunks, flushing
every 50 ms worth of connections as the agent does, and encodes what the hub would send. Reports
microseconds per connection, i.e. the agent's share of a core at N connections/s is N * us / 1e6.
Use it to compare changes to state/, enrich/events.py and hub.py quickly; bench/churn.py has the real figure.

    .venv/bin/python bench/tracker.py [--connections 200000] [--rate 40000] [--runs 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

from netstatd.enrich.attribution import Attribution
from netstatd.enrich.cgroups import PidContainers
from netstatd.enrich.events import EventBuilder
from netstatd.hub import encode_frames
from netstatd.pipeline import Pipeline
from netstatd.protocol import WallClock
from netstatd.sources.bpf import events as ev
from netstatd.sources.procfs import ProcessCache
from netstatd.state.containers import ContainerIndex
from netstatd.state.hostnames import Hostnames
from netstatd.state.tracker import Tracker

CLIENT_NS, SERVER_NS = 4026530001, 4026530002
CLIENT_IP, SERVER_IP = bytes([10, 99, 0, 1]) + bytes(12), bytes([10, 99, 0, 2]) + bytes(12)
SERVER_PORT = 7100
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN = 1, 2, 3, 4, 5, 7, 8, 9, 10
# (old state, new state, states folded into the record), as the kernel sends them (netstatd.bpf.c)
CLIENT_STEPS = ((SYN_SENT, ESTABLISHED, (SYN_SENT,)), (FIN_WAIT2, CLOSE, (FIN_WAIT1, FIN_WAIT2)))
SERVER_STEPS = ((SYN_RECV, ESTABLISHED, (SYN_RECV,)), (LAST_ACK, CLOSE, (CLOSE_WAIT, LAST_ACK)))


def record(
    ts: int,
    cookie: int,
    kind: int,
    netns: int,
    local: bytes,
    remote: bytes,
    sport: int,
    dport: int,
    old: int,
    new: int,
    folded: tuple[int, ...] = (),
) -> bytes:
    return ev.pack_record(
        ts_ns=ts,
        cookie=cookie,
        cgroup_id=1,
        tgid=os.getpid(),
        netns=netns,
        saddr=local,
        daddr=remote,
        sport=sport,
        dport=dport,
        kind=kind,
        family=4,
        oldstate=old,
        newstate=new,
        flags=ev.EVF_OWNER_STORED,
        comm=b"python3",
        folded=sum(st << (ev.FOLDED_BITS * i) for i, st in enumerate(folded)),
    )


def connection_records(i: int, ts: int) -> list[bytes]:
    """The records of connection i, both sides, in the order a 2-CPU machine roughly delivers them."""
    port = 10000 + i % 50000
    c, s = 2 * i + 1, 2 * i + 2
    client = [
        record(ts + n, c, ev.EV_TCP_STATE, CLIENT_NS, CLIENT_IP, SERVER_IP, port, SERVER_PORT, *step)
        for n, step in enumerate(CLIENT_STEPS)
    ]
    server = [
        record(ts + n, s, ev.EV_TCP_STATE, SERVER_NS, SERVER_IP, CLIENT_IP, SERVER_PORT, port, *step)
        for n, step in enumerate(SERVER_STEPS)
    ]
    accept = record(ts + 1, s, ev.EV_TCP_ACCEPT, SERVER_NS, SERVER_IP, CLIENT_IP, SERVER_PORT, port, 0, ESTABLISHED)
    return [client[0], server[0], accept, client[1], server[1]]


def run(connections: int, rate: int, native: bool) -> float:
    processes, clock = ProcessCache(), WallClock()
    attribution = Attribution(ContainerIndex("bench", clock.now), processes, PidContainers())
    names = Hostnames("bench", clock, 10_000)  # as the agent has them: no names known
    tracker = Pipeline(Tracker(native=native), EventBuilder("bench", clock, processes, attribution, names))
    per_chunk = max(1, rate // 100)  # the drainer reads every 10 ms
    per_flush = max(1, rate // 20)  # flushes every 50 ms
    now = time.monotonic_ns()
    chunks = [
        b"".join(r for i in range(start, min(start + per_chunk, connections)) for r in connection_records(i, now))
        for start in range(0, connections, per_chunk)
    ]
    gc.collect()
    events = 0
    started = time.perf_counter()
    since_flush = 0
    for chunk in chunks:
        tracker.ingest(chunk)
        since_flush += per_chunk
        if since_flush >= per_flush:
            since_flush = 0
            out = tracker.flush()
            events += len(out)
            encode_frames(out)
    out = tracker.flush()
    events += len(out)
    encode_frames(out)
    elapsed = time.perf_counter() - started
    if events != 2 * connections:
        raise SystemExit(f"expected {2 * connections} events, got {events}")
    return elapsed / connections * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=200_000)
    p.add_argument("--rate", type=int, default=40_000, help="connections/s the chunking and flushing mimic")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--python", action="store_true", help="without the native helper for short connections")
    args = p.parse_args()
    results = [run(args.connections, args.rate, not args.python) for _ in range(args.runs)]
    med = statistics.median(results)
    print(
        f"user-space cost per connection (both sides, {'Python' if args.python else 'native'} short path): "
        f"median {med:.2f} us "
        f"(range {min(results):.2f}-{max(results):.2f}, {args.runs} runs of {args.connections:,}); "
        f"at {args.rate:,} conn/s that is {med * args.rate / 1e6:.2f} core"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
