"""dns.failed from failed answers: one per client and name per interval, the rest folded into a count;
the bounded table of recent failures a snapshot sends."""

from __future__ import annotations

from netstatd.protocol import WallClock
from netstatd.sources.dnstap.decode import Failure
from netstatd.state.dnsfailures import DnsFailures

POD = {"podName": "web-1", "namespace": "shop", "podUID": "uid-1"}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def failures(clock: Clock, **kw) -> DnsFailures:
    pods = {"10.244.0.7": POD}
    return DnsFailures("node-a", WallClock(), pods.get, now=clock, **kw)


def nx(name: str = "gone.test", client: str = "10.244.0.7", rcode: str = "NXDOMAIN", latency: float | None = 0.25):
    return Failure(name, "A", rcode, client, latency)


def test_a_failure_is_an_event_with_the_clients_pod() -> None:
    clock = Clock()
    f = failures(clock)
    f.record([nx(), nx("x.test", "10.0.0.9", "SERVFAIL", None)])
    first, second = f.flush()
    assert {k: v for k, v in first.items() if k != "timestamp"} == {
        "type": "dns.failed",
        "nodeName": "node-a",
        "name": "gone.test",
        "qtype": "A",
        "rcode": "NXDOMAIN",
        "clientIP": "10.244.0.7",
        "count": 1,
        "total": 1,
        "latencyMs": 0.25,
        **POD,
    }
    assert first["timestamp"].endswith("Z")
    # not a pod of this node: no pod fields; latency unknown: no latencyMs
    assert "podName" not in second and "latencyMs" not in second
    assert (second["clientIP"], second["rcode"]) == ("10.0.0.9", "SERVFAIL")
    assert f.flush() == []
    assert f.snapshot() == [first, second]


def test_one_event_per_client_and_name_per_interval_the_rest_counted_in_the_next() -> None:
    clock = Clock()
    f = failures(clock, interval_s=10)
    f.record([nx()])
    assert [e["count"] for e in f.flush()] == [1]
    clock.t += 1
    f.record([nx(), nx(rcode="SERVFAIL", latency=3.5)])  # within the interval: held
    f.record([nx(client="10.0.0.9")])  # another client: its own
    assert [(e["clientIP"], e["count"]) for e in f.flush()] == [("10.0.0.9", 1)]
    clock.t += 8.9
    assert f.flush() == []
    clock.t += 0.1  # the interval is over: the two held ones in one event, the latest's fields
    (e,) = f.flush()
    assert (e["count"], e["total"], e["rcode"], e["latencyMs"]) == (2, 3, "SERVFAIL", 3.5)
    assert f.suppressed == 1 and f.sent == 3
    clock.t += 5
    f.record([nx()])  # the trailing event started an interval of its own
    assert f.flush() == []
    clock.t += 5
    assert [(e["count"], e["total"]) for e in f.flush()] == [(1, 4)]
    clock.t += 100
    f.record([nx()])  # quiet for longer than the interval: at once
    assert [(e["count"], e["total"]) for e in f.flush()] == [(1, 5)]
    snapshot = [(e["clientIP"], e["total"]) for e in f.snapshot()]
    assert snapshot == [("10.0.0.9", 1), ("10.244.0.7", 5)]  # each pair's latest event, least recent first


def test_events_per_second_are_bounded_and_the_rest_wait() -> None:
    clock = Clock()
    f = failures(clock, max_per_s=2)
    f.record([nx(f"n{i}.test") for i in range(5)])
    assert [e["name"] for e in f.flush()] == ["n0.test", "n1.test"]
    assert f.flush() == []  # the same second
    clock.t += 1
    assert [e["name"] for e in f.flush()] == ["n2.test", "n3.test"]
    clock.t += 1
    assert [e["name"] for e in f.flush()] == ["n4.test"]
    assert f.suppressed == 0 and f.dropped == 0


def test_the_table_is_bounded_and_what_it_forgets_unsent_is_dropped() -> None:
    clock = Clock()
    f = failures(clock, max_entries=2)
    f.record([nx("a.test"), nx("b.test")])
    f.flush()
    clock.t += 1
    f.record([nx("a.test")])  # held (interval); a.test is now the most recently failed
    f.record([nx("b.test"), nx("b.test")])  # held too
    f.record([nx("c.test")])  # table full: a.test goes (least recently failed), its held failure with it
    assert (f.evicted, f.dropped) == (1, 1)
    assert [e["name"] for e in f.flush()] == ["c.test"]
    assert sorted(e["name"] for e in f.snapshot()) == ["b.test", "c.test"]
    clock.t += 10
    assert [(e["name"], e["count"]) for e in f.flush()] == [("b.test", 2)]


def test_pairs_quiet_for_the_keep_time_leave_the_snapshot() -> None:
    clock = Clock()
    f = failures(clock, keep_s=600)
    f.record([nx("old.test")])
    f.flush()
    clock.t += 300
    f.record([nx("new.test")])
    f.flush()
    clock.t += 300  # old.test: 600 s since its last failure
    f.flush()
    assert [e["name"] for e in f.snapshot()] == ["new.test"]
    text = "".join(f"{m.name} {list(m.samples)}\n" for m in f.metrics())
    assert "netstatd_dns_failed_entries [({}, 1)]" in text
