"""The native path for short TCP connections (state/shortconn.c, state/native.py) against the fold.

Both nodes take the same records in the same chunks and flushes; they must send the same events and
count the same metrics. A node without the native helper (Tracker(native=False)) is the reference:
every connection then takes the fold and the tables (tests/unit/test_tracker.py).
"""

import errno
import random
import socket

import orjson
import pytest

from netstatd import protocol as wire
from netstatd.enrich.attribution import Attribution
from netstatd.enrich.cgroups import PidContainers
from netstatd.enrich.traffic import NamespaceTraffic
from netstatd.sources.bpf import events as ev
from netstatd.sources.dnstap.decode import Resolution
from netstatd.sources.procfs import ProcessCache
from netstatd.state import native as native_module
from netstatd.state.containers import ContainerIndex
from netstatd.state.hostnames import Hostnames
from tests.unit.node import Node
from tests.unit.test_tracker import rec

CLOSE, SYN_SENT, SYN_RECV, ESTABLISHED = wire.TCP_CLOSE, wire.TCP_SYN_SENT, wire.TCP_SYN_RECV, wire.TCP_ESTABLISHED
FIN_WAIT1, FIN_WAIT2, LAST_ACK, LISTEN = wire.TCP_FIN_WAIT1, wire.TCP_FIN_WAIT2, wire.TCP_LAST_ACK, wire.TCP_LISTEN

# (family, local, remote): IPv4, IPv6, and IPv4 on an IPv6 socket (reported as IPv4)
ADDRESSES = [
    (4, socket.inet_aton("10.0.0.1") + bytes(12), socket.inet_aton("10.0.0.2") + bytes(12)),
    (6, socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "fd00::2")),
    (6, socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.1"), socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.3")),
]
OWNERS = [(100, b"curl"), (101, b'50%"cpu\xc3\xa9'), (0, b"")]  # 0: the kernel did not know the owner


def record(kind, cookie, old, new, *, ts, tgid=100, comm=b"curl", address=0, sport=80, dport=5000, folded=()):
    family, saddr, daddr = ADDRESSES[address]
    close = {}
    if new == CLOSE and kind == ev.EV_TCP_STATE:  # counters of its own, and now and then an error
        close = {
            "bytes_acked": cookie * 1000 + 1,
            "bytes_received": cookie * 7,
            "segs_out": cookie % 97,
            "segs_in": cookie % 89,
            "srtt_us": 100 + cookie,
            "total_retrans": cookie % 3,
            "error": (0, 0, 0, errno.ECONNRESET, errno.ETIMEDOUT)[cookie % 5],
        }
    return rec(
        kind,
        cookie=cookie,
        old=old,
        new=new,
        ts=ts,
        tgid=tgid,
        comm=comm,
        cgroup_id=7 if tgid else 0,
        family=family,
        saddr=saddr,
        daddr=daddr,
        sport=sport,
        dport=dport,
        folded=folded,
        **close,
    )


def connection(rng: random.Random, cookie: int, ts: int) -> list[bytes]:
    """The records of one connection, as the kernel sends them (folded), of a random kind."""
    tgid, comm = rng.choice(OWNERS)
    at = {"tgid": tgid, "comm": comm, "address": rng.randrange(len(ADDRESSES))}
    port = 30000 + rng.randrange(20000)
    shape = rng.randrange(6)
    if shape == 0:  # outbound: the local port is 0 until it connects
        return [
            record(ev.EV_TCP_STATE, cookie, CLOSE, SYN_SENT, ts=ts, sport=0, dport=80, **at),
            record(ev.EV_TCP_STATE, cookie, SYN_SENT, ESTABLISHED, ts=ts + 1, sport=port, dport=80, **at),
            record(ev.EV_TCP_STATE, cookie, FIN_WAIT2, CLOSE, ts=ts + 9, sport=port, dport=80, folded=(4, 5), **at),
        ]
    if shape in (1, 2):  # inbound on the listener's port 80, accepted (1) or not seen accepted (2)
        out = [record(ev.EV_TCP_STATE, cookie, SYN_RECV, ESTABLISHED, ts=ts, dport=port, folded=(3,), **at)]
        if shape == 1:
            out.append(record(ev.EV_TCP_ACCEPT, cookie, 0, ESTABLISHED, ts=ts + 1, tgid=200, comm=b"worker"))
        last = record(ev.EV_TCP_STATE, cookie, LAST_ACK, CLOSE, ts=ts + 9, dport=port, folded=(8, 9), **at)
        return [*out, last]
    if shape == 3:  # a socket the kernel saw only closing (opened before the agent): its port decides
        sport = rng.choice((80, 8080))
        return [record(ev.EV_TCP_STATE, cookie, ESTABLISHED, CLOSE, ts=ts, sport=sport, dport=port, **at)]
    if shape == 4:  # more states than the native path packs: the Python path takes it
        cycle = (SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2) * 4
        return [
            record(ev.EV_TCP_STATE, cookie, CLOSE, SYN_SENT, ts=ts, sport=port, folded=cycle[:15], **at),
            record(ev.EV_TCP_STATE, cookie, SYN_SENT, ESTABLISHED, ts=ts + 1, sport=port, folded=cycle[:15], **at),
            record(ev.EV_TCP_STATE, cookie, FIN_WAIT2, CLOSE, ts=ts + 2, sport=port, folded=cycle[:15], **at),
        ]
    # a long connection: opens now, closes some chunks later (or never)
    out = [record(ev.EV_TCP_STATE, cookie, CLOSE, SYN_SENT, ts=ts, sport=0, **at)]
    out.append(record(ev.EV_TCP_STATE, cookie, SYN_SENT, ESTABLISHED, ts=ts + 1, sport=port, **at))
    return out


def stream(seed: int, connections: int = 400) -> list[bytes]:
    """Connections interleaved as several CPUs deliver them, with listener and UDP records between."""
    rng = random.Random(seed)
    records = [record(ev.EV_TCP_LISTEN, 1, 0, LISTEN, ts=1, tgid=55, comm=b"nginx", dport=0)]
    live: list[list[bytes]] = []
    ts = 1000
    for cookie in range(10, 10 + connections):
        ts += 100
        live.append(connection(rng, cookie, ts))
        if rng.random() < 0.05:
            records.append(record(ev.EV_UDP_SEND, 5000 + cookie, 0, 0, ts=ts, dport=53))
        while live and (len(live) > 3 or rng.random() < 0.5):
            steps = live[rng.randrange(len(live))]
            records.append(steps.pop(0))
            if not steps:
                live.remove(steps)
    records += [r for steps in live for r in steps]
    records.append(record(ev.EV_TCP_STATE, 1, LISTEN, CLOSE, ts=ts + 1000, tgid=55, comm=b"nginx", dport=0))
    return records


def make_tracker(tmp_path, native: bool, clock=None) -> Node:
    t = Node(tmp_path, native=native, clock=clock)  # one clock for both: timestamps compare exactly
    t.attribution = Attribution(ContainerIndex("node-1", t.clock.now), t.processes, PidContainers(str(tmp_path)))
    t.hostnames = Hostnames("node-1", t.clock)
    t.builder.traffic = NamespaceTraffic()
    t.hostnames.learn([Resolution("10.0.0.2", "api.example.test", (), 300, "10.0.0.1")])
    return t


def run(t: Node, records: list[bytes], seed: int) -> list[dict]:
    """Feeds records in random chunks, flushing every few chunks; returns every event sent."""
    rng = random.Random(seed)
    events = []
    i = 0
    while i < len(records):
        n = rng.randrange(1, 40)
        t.ingest(b"".join(records[i : i + n]))
        i += n
        if rng.random() < 0.3:
            events += t.flush()
    events += t.flush()
    return [orjson.loads(orjson.dumps(e)) for e in events]


def metrics(t: Node) -> dict:
    return {
        "opened": t.opened,
        "closed": t.closed,
        "unattributed": t.unattributed,
        "resets": dict(t.resets),
        "connect_failures": dict(t.connect_failures),
        "attribution": dict(t.builder.attributed),
        "namespace_bytes": {ns: list(v) for ns, v in t.builder.traffic.bytes.items()},
        "live": sorted(t.tcp),
        "records": (t.records_ingested, dict(t.record_counts)),
        "listeners": sorted(t.listeners),
    }


def test_the_native_helper_is_built():
    assert native_module.AVAILABLE, "make setup builds it (setup.py); the agent runs slower without"


@pytest.mark.parametrize("seed", range(6))
def test_native_and_python_paths_send_the_same_events_and_count_the_same(tmp_path, seed):
    records = stream(seed)
    python = make_tracker(tmp_path, native=False)
    native = make_tracker(tmp_path, native=True, clock=python.clock)
    python_events = run(python, records, seed)
    native_events = run(native, records, seed)

    def order(e: dict) -> tuple:
        return (e.get("sockCookie", 0), e["timestamp"], orjson.dumps(e, option=orjson.OPT_SORT_KEYS))

    assert sorted(native_events, key=order) == sorted(python_events, key=order)
    assert metrics(native) == metrics(python)
    assert len(python_events) > 300
    closes = [e for e in native_events if e.get("state") == "CLOSE" and e["protocol"] == "TCP"]
    assert all(e["bytesSent"] == e["sockCookie"] * 1000 + 1 for e in closes)  # each its own counters
    assert {e.get("reset") for e in closes} == {None, "sent", "received"}
    # every closed connection's bytes counted once, whichever path built its event (host processes)
    sent, received = sum(e["bytesSent"] for e in closes), sum(e["bytesReceived"] for e in closes)
    assert native.builder.traffic.bytes == {"_host": [sent, received]}


def test_native_path_takes_the_short_connections_out_of_the_chunk(tmp_path):
    """The native path is really taken: a chunk of short connections leaves no pending entries."""
    t = make_tracker(tmp_path, native=True)
    chunk = b"".join(
        record(ev.EV_TCP_STATE, cookie, CLOSE, SYN_SENT, ts=cookie, sport=0)
        + record(ev.EV_TCP_STATE, cookie, SYN_SENT, CLOSE, ts=cookie + 1, sport=0)
        for cookie in range(10, 20)
    )
    t.ingest(chunk)
    period = t.tracker.folder.period
    assert period.shorts and not period.entries
    events = t.flush()
    assert all(isinstance(e, orjson.Fragment) for e in events) and len(events) == 10


def test_a_connection_across_chunks_of_one_flush_is_carried_and_still_open_at_the_flush_is_sent(tmp_path):
    t = make_tracker(tmp_path, native=True)
    t.ingest(
        record(ev.EV_TCP_STATE, 5, CLOSE, SYN_SENT, ts=1, sport=0) + record(ev.EV_TCP_STATE, 6, CLOSE, SYN_SENT, ts=2)
    )
    shorts, period = t.tracker._shorts, t.tracker.folder.period
    assert shorts._carry and not period.entries  # both still open: carried, not folded
    t.ingest(record(ev.EV_TCP_STATE, 5, SYN_SENT, CLOSE, ts=3, sport=0))
    assert len(period.shorts) == 1 and not period.entries
    short, opened = (orjson.loads(orjson.dumps(e)) for e in t.flush())
    assert (short["sockCookie"], short["states"]) == (5, ["SYN_SENT", "CLOSE"])
    assert (opened["sockCookie"], opened["state"]) == (6, "SYN_SENT") and 6 in t.tcp and not shorts._carry


def test_a_socket_reused_within_a_chunk_stays_one_connection(tmp_path):
    """connect() failed, then succeeded on the same socket: its last state is not CLOSE, so the chunk's
    records go to the Python fold and the connection stays live."""
    t = make_tracker(tmp_path, native=True)
    t.ingest(
        record(ev.EV_TCP_STATE, 5, CLOSE, SYN_SENT, ts=1, sport=0)
        + record(ev.EV_TCP_STATE, 5, SYN_SENT, CLOSE, ts=2, sport=0)
        + record(ev.EV_TCP_STATE, 5, CLOSE, SYN_SENT, ts=3, sport=0)
        + record(ev.EV_TCP_STATE, 5, SYN_SENT, ESTABLISHED, ts=4, sport=41000)
    )
    (event,) = t.flush()
    assert (event["state"], event["states"]) == ("ESTABLISHED", ["SYN_SENT", "CLOSE", "SYN_SENT", "ESTABLISHED"])
    assert 5 in t.tcp


def test_a_reconciled_socket_gets_no_second_close(tmp_path):
    """reconcile() delivered its close already ("gone"): a late kernel CLOSE is no new connection."""
    t = make_tracker(tmp_path, native=True)
    t.tables.reconciled_cookies[5] = None
    t.ingest(record(ev.EV_TCP_STATE, 5, CLOSE, SYN_SENT, ts=1) + record(ev.EV_TCP_STATE, 5, SYN_SENT, CLOSE, ts=2))
    assert t.flush() == []


def test_split_refuses_a_chunk_of_partial_records():
    with pytest.raises(ValueError, match="not whole records"):
        native_module._shortconn.split(b"\0" * 100, ())


def test_record_counts_match_the_python_count_with_many_distinct_kinds(tmp_path):
    """count_kinds() empties its table into the dict when half full: 700 distinct words still add up."""
    chunk = b"".join(record(ev.EV_TCP_STATE, 1, old, new, ts=1) for old in range(28) for new in range(25)) * 2
    python, native = make_tracker(tmp_path, native=False), make_tracker(tmp_path, native=True)
    for t in (python, native):
        t.record_counts[ev.EV_UDP_SEND] = 5  # counts already there are added to
        t.ingest(chunk)
    assert native.record_counts == python.record_counts and len(python.record_counts) == 701


def test_owners_are_looked_up_when_their_records_arrive_not_at_the_flush():
    """A short-lived process may be gone by the flush: its exe is read as its records come in, for
    connections packed and carried alike."""
    import os

    t = Node("/proc", native=True)
    me = os.getpid()
    t.ingest(record(ev.EV_TCP_STATE, 5, CLOSE, SYN_SENT, ts=1, tgid=me, comm=b"python3"))
    assert t.tracker._shorts._carry and me in t.processes
    t.builder.processes = t.processes = ProcessCache()
    t.ingest(record(ev.EV_TCP_STATE, 5, SYN_SENT, CLOSE, ts=2, tgid=me, comm=b"python3"))
    assert t.tracker.folder.period.shorts and me in t.processes


def test_split_and_render_keep_no_memory_behind():
    """Every object the C code makes is released: 200 rounds over 400 connections hold no more than one."""
    import gc
    import tracemalloc

    shortconn = native_module._shortconn
    chunk = b"".join(stream(3))

    def round_trip() -> int:
        _rest, packed, owners, _carry = shortconn.split(chunk, ({},))
        reps, index, _uses = shortconn.distinct([packed])
        texts = shortconn.render([packed], index, [(b"<", *[b"|"] * 9, b">")] * len(reps), 0)
        shortconn.count_kinds(chunk, {})
        return len(texts) + len(owners)

    assert round_trip() > 100
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            round_trip()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 << 10, f"{grown} bytes left behind"
