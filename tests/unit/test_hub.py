"""Bounded per-client queues: overflow is counted and answered with a reset and a fresh snapshot."""

import orjson

from netstatd.hub import Hub


def make_hub(max_events=10) -> Hub:
    return Hub("n1", lambda: [{"type": "connection.event", "sockCookie": 1}], lambda: "T", client_max_events=max_events)


def decode(frames: list[bytes]) -> list[dict]:
    out = []
    for f in frames:
        d = orjson.loads(f)
        out.extend(d if isinstance(d, list) else [d])
    return out


def test_new_subscriber_gets_host_info_then_snapshot_then_live_events():
    hub = make_hub()
    sub = hub.subscribe("c", {"type": "host.info"})
    hub.publish([{"type": "connection.event", "sockCookie": 2}])
    types = [(e["type"], e.get("sockCookie")) for e in decode(sub.take())]
    assert types == [("host.info", None), ("connection.event", 1), ("snapshot.complete", None), ("connection.event", 2)]


def test_overflow_drops_only_the_slow_client_and_resets_it():
    hub = make_hub(max_events=10)
    slow = hub.subscribe("slow", {"type": "host.info"})
    fast = hub.subscribe("fast", {"type": "host.info"})
    slow.take()
    fast.take()
    for i in range(4):
        hub.publish([{"type": "connection.event", "sockCookie": 100 + i}] * 4)
        got = decode(fast.take())
        assert len(got) == 4  # the fast client keeps everything
    assert hub.dropped_events > 0 and hub.overflows == 1
    events = decode(slow.take())
    assert events[0]["type"] == "stream.reset" and events[0]["missedEvents"] == hub.dropped_events
    assert [e["type"] for e in events[1:]] == ["connection.event", "snapshot.complete"]
    # afterwards it streams normally again
    hub.publish([{"type": "connection.event", "sockCookie": 7}])
    assert [e["sockCookie"] for e in decode(slow.take())] == [7]


def test_one_batch_larger_than_the_bound_still_reaches_an_idle_client():
    hub = make_hub(max_events=10)
    sub = hub.subscribe("c", {"type": "host.info"})
    sub.take()
    hub.publish([{"type": "connection.event"}] * 50)
    assert len(decode(sub.take())) == 50 and hub.dropped_events == 0


def test_client_cap():
    hub = Hub("n1", list, lambda: "T", max_clients=1)
    assert hub.subscribe("a", {}) is not None
    assert hub.subscribe("b", {}) is None
