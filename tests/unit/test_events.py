"""The one event builder (enrich/events.py): a template filled in is the event it was cut from, and
every event is counted once by owner."""

import orjson

from netstatd.enrich.events import STATS_FIELDS, EventBuilder
from netstatd.protocol import WallClock
from netstatd.sources.dnstap.decode import Resolution
from netstatd.sources.procfs import ProcessCache
from netstatd.state.hostnames import Hostnames
from netstatd.state.model import OUTBOUND, Conn, TcpStats

TS = "2026-12-07T01:02:03.456789Z"


def connection() -> Conn:
    c = Conn("TCP")
    c.family, c.local_ip, c.local_port, c.remote_ip, c.remote_port = 4, "10.0.0.1", 40001, "10.0.0.2", 443
    c.pid, c.comm, c.netns, c.cookie, c.state, c.ts, c.direction = 0, "", 4026531840, 77, "CLOSE", 5, OUTBOUND
    c.stats, c.error = STATS, "ECONNREFUSED"
    return c


STATS = TcpStats(1_000_000, 12_345, 700, 300, 125, 3)


def fill(pieces: tuple[bytes, ...], timestamp: str, ports: tuple[int, int], cookie: int, stats: TcpStats) -> dict:
    """What the native helper does with a template."""
    fields = [timestamp.encode(), *(str(n).encode() for n in (*ports, cookie, *stats))]
    text = b"".join(p + f for p, f in zip(pieces, [*fields, b""], strict=True))
    return orjson.loads(text)


def test_a_template_filled_in_is_the_event(tmp_path):
    clock = WallClock()
    names = Hostnames("node-1", clock)
    # a name that holds the placeholders' bytes: it comes after the counters, so it cannot cut the template
    names.learn([Resolution("10.0.0.2", 'ts"\x00ts\x00ck\x00s5.example.test', (), 300, "10.0.0.1")])
    builder = EventBuilder("node-1", clock, ProcessCache(proc_root=str(tmp_path)), hostnames=names)
    builder.begin_period()
    event = builder.connection_event(connection(), ["SYN_SENT", "CLOSE"])
    pieces = builder.template(connection(), ["SYN_SENT", "CLOSE"], count=3)
    assert len(pieces) == 11
    assert fill(pieces, event["timestamp"], (40001, 443), 77, STATS) == event
    assert event["remoteHostname"] == 'ts"\x00ts\x00ck\x00s5.example.test'
    assert (event["bytesSent"], event["retransmits"], event["error"]) == (1_000_000, 3, "ECONNREFUSED")
    other = fill(pieces, TS, (1, 2), 3, TcpStats(4, 5, 6, 7, 8, 9))
    assert (other["timestamp"], other["localPort"], other["remotePort"], other["sockCookie"]) == (TS, 1, 2, 3)
    assert [other[f] for f in STATS_FIELDS] == [4, 5, 6, 7, 8, 9]


def test_every_event_is_counted_once_by_owner(tmp_path):
    from netstatd.enrich.attribution import Attribution
    from netstatd.enrich.cgroups import PidContainers
    from netstatd.state.containers import ContainerIndex

    clock = WallClock()
    processes = ProcessCache(proc_root=str(tmp_path))
    attribution = Attribution(ContainerIndex("node-1", clock.now), processes, PidContainers(str(tmp_path)))
    builder = EventBuilder("node-1", clock, processes, attribution)
    builder.begin_period()
    builder.connection_event(connection(), ["CLOSE"])
    builder.connection_event(connection(), ["CLOSE"])  # memoised owner: still one more
    builder.template(connection(), ["CLOSE"], count=5)  # a template standing for 5 connections
    assert builder.attributed == {"container": 0, "host": 7}
