"""Node state from kernel records to events: coalescing, ownership, listeners, UDP flows, seeding."""

import socket

import orjson
import pytest

from netstatd.protocol import TCP_CLOSE
from netstatd.sources.bpf import events as ev
from netstatd.sources.sockdiag import DiagSocket
from tests.unit.node import Node

NETNS = 4026532000


def v4(ip: str) -> bytes:
    return socket.inet_aton(ip) + bytes(12)


def rec(
    kind=ev.EV_TCP_STATE,
    *,
    cookie=1,
    tgid=100,
    comm=b"srv",
    old=0,
    new=0,
    saddr: str | bytes = "10.0.0.1",
    sport=80,
    daddr: str | bytes = "10.0.0.2",
    dport=5000,
    family=4,
    ts=1,
    netns=NETNS,
    flags=ev.EVF_OWNER_STORED,
    cgroup_id=0,
    folded: tuple[int, ...] = (),
    **close: int,
) -> bytes:
    """A ring record; addresses as IPv4 text or as the kernel's 16 bytes; close: a CLOSE record's
    counters and error (events.py names)."""
    return ev.pack_record(
        ts_ns=ts,
        cookie=cookie,
        cgroup_id=cgroup_id,
        tgid=tgid,
        netns=netns,
        saddr=v4(saddr) if isinstance(saddr, str) else saddr,
        daddr=v4(daddr) if isinstance(daddr, str) else daddr,
        sport=sport,
        dport=dport,
        kind=kind,
        family=family,
        oldstate=old,
        newstate=new,
        flags=flags,
        comm=comm,
        folded=sum(state << (ev.FOLDED_BITS * i) for i, state in enumerate(folded)),
        **close,
    )


def tracker(tmp_path) -> Node:
    return Node(tmp_path)


def decoded(out):
    """flush() output as dicts: short connections come already encoded (orjson.Fragment)."""
    return [orjson.loads(orjson.dumps(e)) if isinstance(e, orjson.Fragment) else e for e in out]


def conn_events(out):
    return [e for e in decoded(out) if e["type"] == "connection.event"]


def test_transitions_within_one_flush_become_one_event_with_every_state(tmp_path):
    t = tracker(tmp_path)
    t.ingest(rec(old=7, new=2, sport=0, tgid=7, comm=b"curl") + rec(old=2, new=1, sport=40000, tgid=7, comm=b"curl"))
    t.ingest(
        rec(old=1, new=4, sport=40000, tgid=7)
        + rec(old=4, new=5, sport=40000, tgid=7)
        + rec(old=5, new=7, sport=40000, tgid=7, comm=b"curl")
    )
    (e,) = conn_events(t.flush())
    assert e["states"] == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
    assert (e["state"], e["localPort"], e["pid"], e["comm"], e["direction"]) == ("CLOSE", 40000, 7, "curl", "outbound")
    assert (e["nodeName"], e["netns"], e["sockCookie"], e["family"]) == ("node-1", NETNS, 1, "IPv4")
    assert t.tcp == {}  # closed connections leave the state


def test_open_and_close_in_separate_flushes_are_both_delivered(tmp_path):
    t = tracker(tmp_path)
    t.ingest(rec(old=10, new=3) + rec(old=3, new=1))
    (opened,) = conn_events(t.flush())
    assert (opened["states"], opened["direction"]) == (["SYN_RECV", "ESTABLISHED"], "inbound")
    assert [e["state"] for e in conn_events(t.snapshot())] == ["ESTABLISHED"]
    t.ingest(rec(old=1, new=8) + rec(old=8, new=9) + rec(old=9, new=7))
    (closed,) = conn_events(t.flush())
    assert closed["states"] == ["CLOSE_WAIT", "LAST_ACK", "CLOSE"]
    assert t.snapshot() == []


def test_accept_gives_the_accepting_process(tmp_path):
    t = tracker(tmp_path)
    # inherited from the listener (pid 100), then accept() in a worker (pid 200)
    t.ingest(
        rec(old=10, new=3, tgid=100)
        + rec(old=3, new=1, tgid=100)
        + rec(ev.EV_TCP_ACCEPT, new=1, tgid=200, comm=b"worker", flags=ev.EVF_OWNER_CURRENT)
    )
    (e,) = conn_events(t.flush())
    assert (e["pid"], e["comm"], e["direction"]) == (200, "worker", "inbound")


def test_unknown_owner_of_a_passive_socket_comes_from_its_listener(tmp_path):
    t = tracker(tmp_path)
    t.ingest(rec(ev.EV_TCP_LISTEN, cookie=9, new=10, tgid=55, comm=b"nginx", daddr="0.0.0.0", dport=0))
    t.ingest(rec(cookie=10, old=10, new=3, tgid=0, comm=b"") + rec(cookie=10, old=3, new=1, tgid=0, comm=b""))
    out = t.flush()
    assert [e["type"] for e in out] == ["port.listening", "connection.event"]
    assert (out[1]["pid"], out[1]["comm"]) == (55, "nginx")


def test_listener_close_is_announced(tmp_path):
    t = tracker(tmp_path)
    t.ingest(rec(ev.EV_TCP_LISTEN, cookie=9, new=10, tgid=55, comm=b"nginx", dport=0))
    (opened,) = t.flush()
    assert (opened["type"], opened["port"], opened["pid"], opened["protocol"]) == ("port.listening", 80, 55, "TCP")
    t.ingest(rec(cookie=9, old=10, new=7, tgid=55, dport=0))
    (closed,) = t.flush()
    assert (closed["type"], closed["port"], closed["sockCookie"]) == ("port.closed", 80, 9)
    assert t.listeners == {}


def test_udp_flows_are_keyed_by_peer_and_closed_with_their_socket(tmp_path):
    t = tracker(tmp_path)
    send = rec(ev.EV_UDP_SEND, cookie=3, tgid=7, sport=5353, daddr="10.0.0.53", dport=53)
    t.ingest(send + send + rec(ev.EV_UDP_RECV, cookie=3, tgid=7, sport=5353, daddr="10.0.0.54", dport=53))
    flows = conn_events(t.flush())
    assert sorted((e["remoteIP"], e["direction"], e["state"]) for e in flows) == [
        ("10.0.0.53", "outbound", "ACTIVE"),
        ("10.0.0.54", "inbound", "ACTIVE"),
    ]
    t.ingest(rec(ev.EV_UDP_CLOSE, cookie=3, tgid=7, sport=0, daddr="0.0.0.0", dport=0))
    closed = conn_events(t.flush())
    assert sorted((e["remoteIP"], e["state"]) for e in closed) == [("10.0.0.53", "CLOSE"), ("10.0.0.54", "CLOSE")]
    assert t.udp == {}


def test_v4_mapped_ipv6_socket_is_reported_as_ipv4(tmp_path):
    t = tracker(tmp_path)
    mapped = ev.pack_record(
        ts_ns=1,
        cookie=4,
        tgid=7,
        netns=NETNS,
        saddr=bytes(10) + b"\xff\xff" + socket.inet_aton("10.0.0.1"),
        daddr=bytes(10) + b"\xff\xff" + socket.inet_aton("10.0.0.2"),
        sport=80,
        dport=5000,
        kind=ev.EV_TCP_STATE,
        family=6,
        oldstate=3,
        newstate=1,
        flags=ev.EVF_OWNER_STORED,
        comm=b"srv",
    )
    t.ingest(mapped)
    (e,) = conn_events(t.flush())
    assert (e["family"], e["localIP"], e["remoteIP"]) == ("IPv4", "10.0.0.1", "10.0.0.2")


def diag(cookie, state, sport, dport, inode, proto=6, saddr="10.0.0.1", daddr="10.0.0.2"):
    return DiagSocket(proto, 4, state, v4(saddr), sport, v4(daddr), dport, inode, cookie, 0, NETNS)


def test_seed_adds_existing_sockets_with_owner_and_direction(tmp_path):
    t = tracker(tmp_path)
    t.begin_seed()
    out = t.events_for(
        t.seed(
            [diag(1, 10, 80, 0, 11, daddr="0.0.0.0"), diag(2, 1, 80, 5000, 12), diag(3, 1, 41000, 443, 13)],
            {11: 50, 12: 50, 13: 60},
            include_loopback=False,
        )
    )
    by_cookie = {e["sockCookie"]: e for e in out}
    assert by_cookie[1]["type"] == "port.listening"
    assert (by_cookie[2]["pid"], by_cookie[2]["direction"], by_cookie[2]["state"]) == (50, "inbound", "ESTABLISHED")
    assert (by_cookie[3]["pid"], by_cookie[3]["direction"]) == (60, "outbound")


def test_seed_skips_sockets_closed_while_scanning_and_loopback(tmp_path):
    t = tracker(tmp_path)
    t.begin_seed()
    t.ingest(rec(cookie=2, old=1, new=7))
    t.flush()
    out = t.seed(
        [diag(2, 1, 80, 5000, 12), diag(4, 1, 80, 5000, 14, saddr="127.0.0.1", daddr="127.0.0.1")],
        {},
        include_loopback=False,
    )
    assert out == [] and t.tcp == {}


def test_record_counts_feed_the_metrics(tmp_path):
    from netstatd.metrics import render

    t = tracker(tmp_path)
    t.ingest(rec(old=7, new=2) + rec(old=2, new=1) + rec(ev.EV_UDP_SEND, cookie=5))
    text = render(t.tracker.folder.metrics())
    assert 'netstatd_events_total{protocol="TCP",family="IPv4"} 2' in text
    assert 'netstatd_events_by_state{protocol="TCP",family="IPv4",state="SYN_SENT"} 1' in text
    assert 'netstatd_events_by_state{protocol="UDP",family="IPv4",state="SEND"} 1' in text


def test_reconcile_closes_what_the_kernel_no_longer_has(tmp_path):
    import time

    t = tracker(tmp_path)
    t.ingest(
        rec(cookie=1, old=7, new=2)
        + rec(cookie=1, old=2, new=1)
        + rec(cookie=2, old=7, new=2)
        + rec(cookie=2, old=2, new=1)
        + rec(cookie=3, old=1, new=4)
    )  # 3: its later states were skipped
    t.ingest(rec(ev.EV_TCP_LISTEN, cookie=9, new=10, dport=0))
    t.flush()
    before = time.monotonic_ns()
    # cookie 2 is still established, cookie 3 lingers in TIME_WAIT (not a connection), 1 and 9 are gone
    out = t.reconcile({2}, set(), before)
    gone = sorted((e["type"], e["sockCookie"], e["closeReason"]) for e in out)
    assert gone == [("connection.event", 1, "gone"), ("connection.event", 3, "gone"), ("port.closed", 9, "gone")]
    assert list(t.tcp) == [2] and t.reconciled == 3
    # a late kernel CLOSE for a reconciled socket is not a new connection
    t.ingest(rec(cookie=1, old=1, new=7))
    assert conn_events(t.flush()) == []


def test_tables_are_capped_oldest_first(tmp_path):
    t = Node(tmp_path, max_connections=2, max_udp_flows=2)
    for cookie in (1, 2, 3):
        t.ingest(rec(cookie=cookie, old=10, new=3) + rec(ev.EV_UDP_SEND, cookie=100 + cookie, dport=cookie))
    t.flush()
    assert list(t.tcp) == [2, 3] and sorted(k[0] for k in t.udp) == [102, 103]
    assert set(t.tables._udp_by_cookie) == {102, 103}  # the index follows the table
    assert t.evicted == 2


def test_netns_scan_adds_unknown_listeners_only(tmp_path):
    """A container started: its netns scan adds listeners the kernel did not report, nothing twice."""
    t = tracker(tmp_path)
    t.ingest(rec(ev.EV_TCP_LISTEN, cookie=9, new=10, sport=8080, dport=0))  # known from the kernel
    assert [e["sockCookie"] for e in decoded(t.flush())] == [9]
    t.begin_seed()
    t.ingest(rec(ev.EV_TCP_LISTEN, cookie=7, new=10, sport=7070, dport=0))  # listen() record not flushed yet
    t.ingest(rec(ev.EV_TCP_LISTEN, cookie=6, new=10, sport=6060, dport=0) + rec(cookie=6, old=10, new=7))
    t.flush()  # 6 opened and closed while the scan ran
    t.ingest(rec(ev.EV_TCP_LISTEN, cookie=5, new=10, sport=5050, dport=0))  # pending at the scan
    scanned = [
        diag(9, 10, 8080, 0, 0, daddr="0.0.0.0"),  # known: left alone
        diag(5, 10, 5050, 0, 0, daddr="0.0.0.0"),  # its kernel record is pending
        diag(6, 10, 6060, 0, 0, daddr="0.0.0.0"),  # closed meanwhile
        diag(1, 10, 9090, 0, 0, daddr="0.0.0.0"),  # unknown TCP listener: added
        diag(2, 7, 5353, 0, 0, proto=17, daddr="0.0.0.0"),  # bound UDP: added
        diag(3, 1, 40000, 80, 0),  # a connection: not a listener
        diag(4, 10, 9091, 0, 0, saddr="127.0.0.1", daddr="0.0.0.0"),  # loopback, not captured
    ]
    out = t.add_listeners(scanned, include_loopback=False)
    assert sorted((e["type"], e["sockCookie"], e["pid"]) for e in out) == [
        ("port.listening", 1, 0),
        ("port.listening", 2, 0),
    ]
    assert t.listeners[9].pid == 100  # the kernel's owner is kept
    assert [e["sockCookie"] for e in decoded(t.flush()) if e["type"] == "port.listening"] == [5]
    t.begin_seed()
    still_open = [s for s in scanned if s.cookie != 6]
    assert t.add_listeners(still_open, include_loopback=False) == []  # a second scan of the same netns adds nothing
    assert t.tables.closed_while_seeding is None  # no scan left open


def test_overlapping_scans_share_the_closed_set(tmp_path):
    """A netns scan running while the start-up seed begins keeps the closes it saw."""
    t = tracker(tmp_path)
    t.begin_seed()  # a netns scan
    t.ingest(rec(ev.EV_TCP_LISTEN, cookie=6, new=10, sport=6060, dport=0) + rec(cookie=6, old=10, new=7))
    t.flush()
    t.begin_seed()  # the seed starts meanwhile
    assert t.add_listeners([diag(6, 10, 6060, 0, 0, daddr="0.0.0.0")], include_loopback=False) == []
    assert t.seed([], {}, include_loopback=False) == [] and t.tables.closed_while_seeding is None


def test_connections_carry_the_names_learned_from_dnstap_and_keep_them(tmp_path, monkeypatch):
    from netstatd.sources.dnstap.decode import Resolution
    from netstatd.state import hostnames as hn

    t = tracker(tmp_path)
    names = t.hostnames = hn.Hostnames("node-1", t.clock)
    clock = [1000.0]
    monkeypatch.setattr(hn.time, "monotonic", lambda: clock[0])
    names.learn([Resolution("10.0.0.2", "api.example.test", ("edge.example.test",), 5, "10.0.0.1")])
    (resolved,) = names.flush()
    assert (resolved["type"], resolved["ip"], resolved["hostname"], resolved["aliases"], resolved["ttl"]) == (
        "dns.resolved",
        "10.0.0.2",
        "api.example.test",
        ["edge.example.test"],
        5,
    )
    assert resolved["clientIP"] == "10.0.0.1"
    names.learn([Resolution("10.0.0.2", "api.example.test", ("edge.example.test",), 5, "10.0.0.1")])
    assert names.flush() == []  # a repeated answer only extends the entry

    t.ingest(rec(old=7, new=2, sport=0) + rec(old=2, new=1, sport=40000))
    (opened,) = conn_events(t.flush())
    assert opened["remoteHostname"] == "api.example.test" and "localHostname" not in opened

    clock[0] += 10  # past the TTL: the name expires, the live connection keeps it
    (expired,) = names.flush()
    assert (expired["type"], expired["ip"]) == ("dns.expired", "10.0.0.2")
    assert names.lookup("10.0.0.2") is None
    t.ingest(rec(old=1, new=4, sport=40000) + rec(old=4, new=7, sport=40000))
    (closed,) = conn_events(t.flush())
    assert (closed["state"], closed["remoteHostname"]) == ("CLOSE", "api.example.test")


@pytest.mark.parametrize("accepted", [False, True])
@pytest.mark.parametrize("enriched", [False, True])
def test_a_connection_within_one_flush_gives_the_same_event_as_one_across_flushes(tmp_path, accepted, enriched):
    """Short connections take the native path when it is built: same fields, same values."""
    from netstatd.enrich.attribution import Attribution
    from netstatd.enrich.cgroups import PidContainers
    from netstatd.state.containers import ContainerIndex

    t = tracker(tmp_path)
    if enriched:
        t.attribution = Attribution(ContainerIndex("node-1", t.clock.now), t.processes, PidContainers(str(tmp_path)))

    def steps(cookie: int) -> list[bytes]:
        out = [rec(cookie=cookie, old=3, new=1, folded=(3,), ts=1)]
        if accepted:
            out.append(rec(ev.EV_TCP_ACCEPT, cookie=cookie, tgid=200, comm=b"worker", new=1, ts=2))
        return [*out, rec(cookie=cookie, old=9, new=7, folded=(8, 9), ts=3)]

    long_steps = steps(4)
    t.ingest(long_steps[0])  # cookie 4 opens in one flush and closes in the next: the Conn path
    t.flush()
    for r in steps(3) + long_steps[1:]:  # cookie 3 opens and closes within one flush
        t.ingest(r)
    by_cookie = {e["sockCookie"]: e for e in conn_events(t.flush())}
    short, long = by_cookie.pop(3), by_cookie.pop(4)
    assert short["states"] == ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"]
    assert long["states"] == ["CLOSE_WAIT", "LAST_ACK", "CLOSE"]
    assert {**short, "states": None, "sockCookie": None} == {**long, "states": None, "sockCookie": None}
    assert (short["pid"], short["direction"]) == ((200, "inbound") if accepted else (100, "inbound"))


def test_short_connections_of_one_owner_share_a_template_but_count_and_encode_each(tmp_path):
    """Within a flush, short connections of one owner share one template (the native path): each still
    gets its own ports, cookie and timestamp, and counts in the attribution metrics."""
    from netstatd.enrich.attribution import Attribution
    from netstatd.enrich.cgroups import PidContainers
    from netstatd.state.containers import ContainerIndex

    t = tracker(tmp_path)
    t.attribution = Attribution(ContainerIndex("node-1", t.clock.now), t.processes, PidContainers(str(tmp_path)))

    def client(cookie: int, port: int, tgid: int, ts: int) -> list[bytes]:
        common = {"cookie": cookie, "tgid": tgid, "comm": b"50%cpu", "sport": port, "dport": 80}
        return [
            rec(old=TCP_CLOSE, new=2, ts=ts, **common),
            rec(old=2, new=1, ts=ts + 1, **common),
            rec(old=5, new=TCP_CLOSE, folded=(4, 5), ts=ts + 2_000, **common),
        ]

    for r in (
        client(11, 40001, 100, 1_000)
        + client(12, 40002, 100, 5_000)
        + client(13, 40003, 0, 9_000)
        + client(14, 40004, 0, 13_000)
    ):
        t.ingest(r)
    events = {e["sockCookie"]: e for e in conn_events(t.flush())}
    assert [(events[c]["localPort"], events[c]["pid"], events[c]["comm"]) for c in (11, 12, 13, 14)] == [
        (40001, 100, "50%cpu"),
        (40002, 100, "50%cpu"),
        (40003, 0, ""),
        (40004, 0, ""),
    ]
    assert len({events[c]["timestamp"] for c in (11, 12, 13, 14)}) == 4
    assert t.unattributed == 2
    assert t.builder.attributed == {"container": 0, "host": 4}  # each event counts, on either path
