"""mux/state.py: the tables the multiplexer keeps per node and the names they share, with no I/O; and a
peer's stream, from a small fake node on loopback, applied to them (a reset rebuilds the node, a flood
cuts it off). No root needed."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import aiohttp
import orjson

from netstatd.mux import state as state_module
from netstatd.mux.peer import Peer, PeerStats, parse_frame
from netstatd.mux.state import MergedState, NodeTables, row_json
from netstatd.settings import Settings
from netstatd.subscription import parse
from netstatd.supervisor import Supervisor
from netstatd.testing.agent import free_port
from netstatd.testing.cluster import garbage_peer_cmd


def row(tables: NodeTables, key: tuple) -> dict:
    return orjson.loads(row_json(tables.connections[key]))


def test_merged_state_keeps_tables_per_node_and_shares_names():
    """No I/O: the tables a client keeps, per node; a name learned on one node names another's connection."""
    state = MergedState()
    a, b = NodeTables("a"), NodeTables("b")

    def conn(node: str, cookie: int, state_: str, proto: str = "TCP", remote: str = "10.0.0.9", rport: int = 80):
        return {
            "type": "connection.event",
            "nodeName": node,
            "protocol": proto,
            "sockCookie": cookie,
            "state": state_,
            "remoteIP": remote,
            "remotePort": rport,
            "localIP": "10.0.0.1",
        }

    state.replace(a)
    state.replace(b)
    state.apply(b, [{"type": "dns.resolved", "nodeName": "b", "ip": "10.0.0.9", "hostname": "web", "aliases": []}])
    live = [conn("a", 1, "ESTABLISHED"), conn("a", 2, "ACTIVE", "UDP", rport=53), conn("a", 2, "ACTIVE", "UDP")]
    state.apply(a, live)
    assert live[0]["remoteHostname"] == "web"  # learned on b
    assert len(a.connections) == 3 and not b.connections
    state.apply(a, [conn("a", 1, "CLOSE"), conn("a", 2, "CLOSE", "UDP", rport=53)])
    assert list(a.connections) == [(2, "10.0.0.9", 80)]
    snap = orjson.loads(orjson.dumps(list(state.snapshot())))  # connections are kept encoded
    assert [e["type"] for e in snap] == ["dns.resolved", "connection.event"]
    assert snap[-1]["states"] == ["ACTIVE"] and snap[-1]["remoteHostname"] == "web"
    state.remove("b")  # b's names go with it
    state.apply(a, [conn("a", 3, "SYN_SENT")])
    assert "remoteHostname" not in row(a, (3,)) and set(state.nodes) == {"a"}
    # a name, once given, stays with the connection: a later event without it gets it back
    state.apply(a, [conn("a", 2, "ACTIVE", "UDP")])
    assert row(a, (2, "10.0.0.9", 80))["remoteHostname"] == "web"


def test_a_kept_row_is_its_event_whatever_it_shares(monkeypatch):
    """A row is kept as a part shared with its container's rows and a part of its own: each reads back as
    its own event, a field absent stays absent (not null), a malformed value keeps a copy of its own,
    and the cache of shared parts starts again when full."""
    monkeypatch.setattr(state_module, "MAX_SHARED", 2)
    tables = NodeTables("a")
    base = {"type": "connection.event", "nodeName": "a", "protocol": "TCP", "state": "ESTABLISHED", "podName": "p"}
    events = [
        {**base, "sockCookie": 1, "timestamp": "t1", "remotePort": 80},
        {**base, "sockCookie": 2, "timestamp": "t2", "remotePort": 81},  # shares 1's part
        {**base, "sockCookie": 3, "podName": None},  # null, not absent
        {**{k: v for k, v in base.items() if k != "podName"}, "sockCookie": 4},
        {**base, "sockCookie": 5, "exe": ["not", "a", "path"]},  # unhashable
        {**base, "sockCookie": 6, "namespace": "n"},  # a third part: the cache starts again
    ]
    for e in events:
        tables.apply(dict(e))
    assert tables.connections[(1,)][0] is tables.connections[(2,)][0]
    for e in events:
        assert row(tables, (e["sockCookie"],)) == {**e, "states": ["ESTABLISHED"]}
    assert len(tables._shared) <= 2
    assert tables.bytes == sum(len(row_json(r)) for r in tables.connections.values())


def run_peer(port: int, stats: PeerStats, until: Callable[[list[dict]], bool], **kw) -> tuple[list[dict], MergedState]:
    """An in-process Peer against 127.0.0.1:port until `until(published)` (10 s at most); kw: its limits
    (default: the mux's)."""
    published: list[dict] = []
    state = MergedState()
    defaults = Settings()
    limits = {
        "max_events_per_s": 500_000,  # the mux's (server.py)
        "max_bytes_per_s": defaults.peer_max_bytes_per_second,
        "max_rows": defaults.peer_max_rows,
    }

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            peer = Peer("127.0.0.1", port, state, {}, published.extend, lambda: "t", session, stats, **(limits | kw))
            peer.start(Supervisor())
            deadline = time.monotonic() + 10
            while not until(published) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await peer.stop()

    asyncio.run(main())
    return published, state


@contextlib.contextmanager
def loopback_peer(mode: str) -> Iterator[int]:
    port = free_port()
    server = subprocess.Popen(garbage_peer_cmd("127.0.0.1", port, mode), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        yield port
    finally:
        server.kill()
        server.wait()


def test_stream_reset_rebuilds_the_node():
    """A peer's stream.reset: clients get node.removed, then the node's fresh snapshot; drops are counted."""
    stats = PeerStats()
    with loopback_peer("reset") as port:

        def rebuilt(published: list[dict]) -> bool:
            return any(e["type"] == "node.removed" for e in published) and published[-1].get("port") == 10

        published, _ = run_peer(port, stats, rebuilt)
    types = [(e["type"], e.get("port")) for e in published]
    i = types.index(("node.removed", None))
    assert types[i - 1] == ("port.listening", 9) and types[i + 1] == ("port.listening", 10)
    assert stats.missed_events == 5 and stats.garbage == {}


def test_flooding_peer_is_dropped():
    """A peer over the event rate for 3 s is cut off (limit lowered here; over loopback, no agent)."""
    stats = PeerStats()
    with loopback_peer("flood") as port:
        published, _ = run_peer(port, stats, lambda published: bool(stats.garbage), max_events_per_s=20_000)
    assert stats.garbage == {"flood": 1}
    assert [e for e in published if e["type"] == "node.removed"] == [
        {"type": "node.removed", "timestamp": "t", "nodeName": "fake"}
    ]


def test_node_tables_count_the_bytes_of_their_rows_and_give_them_back():
    """--mux-max-bytes counts each row's JSON: an update replaces its size, a removal gives it back."""
    t = NodeTables("n1")
    conn = {"type": "connection.event", "nodeName": "n1", "protocol": "TCP", "sockCookie": 7, "state": "ESTABLISHED"}
    port = {"type": "port.listening", "nodeName": "n1", "sockCookie": 9, "port": 80}
    container = {"type": "container.added", "nodeName": "n1", "containerId": "c1", "name": "x"}
    for e in (conn, port, container):
        t.apply(dict(e))
    first = t.bytes
    assert first >= sum(len(orjson.dumps(e)) for e in (conn, port, container))
    t.apply({**container, "name": "a much longer name than before"})
    assert t.bytes == first + len("a much longer name than before") - len("x")
    t.apply({**conn, "state": "CLOSE"})
    t.apply({**port, "type": "port.closed"})
    t.apply({**container, "type": "container.deleted"})
    assert t.bytes == 0 and t.count() == 0


def failed(node: str, client: str, name: str, timestamp: str, **fields) -> dict:
    e = {"type": "dns.failed", "nodeName": node, "timestamp": timestamp, "clientIP": client, "name": name}
    return e | {"rcode": "NXDOMAIN", "count": 1, "total": 1} | fields


def test_node_tables_keep_the_latest_dns_failure_per_client_and_name_for_its_time(monkeypatch):
    """As the node does: one per (clientIP, name), at most DNS_FAILED_MAX, each until DNS_FAILED_KEEP_S after
    its timestamp; in the snapshot between the names and the ports."""
    monkeypatch.setattr(state_module, "DNS_FAILED_MAX", 3)
    now = time.time()
    stamp = lambda ago: datetime.fromtimestamp(now - ago, UTC).isoformat().replace("+00:00", "Z")  # noqa: E731
    t = NodeTables("n1")
    state = MergedState()
    state.replace(t)
    port = {"type": "port.listening", "nodeName": "n1", "sockCookie": 9, "port": 80}
    name = {"type": "dns.resolved", "nodeName": "n1", "ip": "10.0.0.9", "hostname": "web", "aliases": []}
    # a node's dns.failed is an event the mux takes from its peers
    first = parse_frame(orjson.dumps([failed("n1", "10.0.0.1", "a.test", stamp(5))]), "n1")
    state.apply(t, [port, *first, name])
    state.apply(t, [failed("n1", "10.0.0.1", "a.test", stamp(1), total=4, rcode="SERVFAIL")])  # replaces
    assert [(e["name"], e["total"], e["rcode"]) for e in t.failures.values()] == [("a.test", 4, "SERVFAIL")]
    assert [e["type"] for e in state.snapshot()] == ["dns.resolved", "dns.failed", "port.listening"]
    assert t.count() == 3
    old = failed("n1", "10.0.0.2", "old.test", stamp(state_module.DNS_FAILED_KEEP_S + 1))
    state.apply(t, [old, failed("n1", "10.0.0.3", "b.test", stamp(2))])
    state.apply(t, [failed("n1", "10.0.0.4", "c.test", stamp(1))])  # a fourth: the first one in goes
    assert [k[1] for k in t.failures] == ["old.test", "b.test", "c.test"]
    # old.test's time is over: a snapshot no longer has it
    assert [e["name"] for e in t.snapshot() if e["type"] == "dns.failed"] == ["b.test", "c.test"]
    before = t.bytes
    t.prune(parse({"ip": "10.0.0.4"}))
    assert list(t.failures) == [("10.0.0.4", "c.test")] and t.bytes < before
    t.apply({**port, "type": "port.closed"})
    t.apply({**name, "type": "dns.expired"})
    t.expire_failures(now + state_module.DNS_FAILED_KEEP_S)
    assert t.count() == 0 and t.bytes == 0
