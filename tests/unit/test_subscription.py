"""Subscriptions: the filter a /netstat client gives (subscription.py), and the hub applying it."""

from __future__ import annotations

import orjson
import pytest

from netstatd.hub import Hub
from netstatd.subscription import EVERYTHING, AnyOf, FilterError, covers, parse, parse_subscription, union


def conn(**fields) -> dict:
    base = {
        "type": "connection.event",
        "nodeName": "node-a",
        "protocol": "TCP",
        "state": "ESTABLISHED",
        "localIP": "10.1.0.5",
        "localPort": 40000,
        "remoteIP": "10.2.0.9",
        "remotePort": 443,
        "host": False,
        "podName": "web-1",
        "namespace": "shop",
        "remotePodName": None,
        "remoteNamespace": None,
    }
    return base | fields


def port_event(**fields) -> dict:
    base = {"type": "port.listening", "nodeName": "node-a", "protocol": "TCP", "ip": "0.0.0.0", "port": 8080}
    return base | {"host": False, "podName": "web-1", "namespace": "shop"} | fields


def test_every_key_narrows_connections():
    assert parse({"namespace": "shop"}).matches(conn())
    assert not parse({"namespace": "bank"}).matches(conn())
    assert parse({"namespace": "bank"}).matches(conn(remoteNamespace="bank"))  # either end
    assert parse({"podName": "web-1,db-0"}).matches(conn())
    assert not parse({"nodeName": "node-b"}).matches(conn())
    assert parse({"protocol": "udp"}).matches(conn(protocol="UDP"))
    assert parse({"port": "443"}).matches(conn()) and parse({"port": "40000"}).matches(conn())
    assert not parse({"port": "80"}).matches(conn())
    assert parse({"ip": "10.2.0.0/16"}).matches(conn()) and parse({"ip": "10.1.0.5"}).matches(conn())
    assert not parse({"ip": "192.168.0.0/16"}).matches(conn())
    assert not parse({"host": "false"}).matches(conn(host=True))
    assert not parse({"loopback": "false"}).matches(conn(localIP="127.0.0.1", remoteIP="127.0.0.1"))
    assert parse({"loopback": False}).matches(conn())


def test_keys_combine_with_and_and_values_with_or():
    f = parse({"namespace": ["shop", "bank"], "port": [443]})
    assert f.matches(conn()) and f.matches(conn(namespace="bank"))
    assert not f.matches(conn(remotePort=80))


def test_a_close_always_passes_a_state_filter():
    established = parse({"state": "ESTABLISHED"})
    assert established.matches(conn())
    assert not established.matches(conn(state="SYN_SENT"))
    assert established.matches(conn(state="CLOSE"))  # the row the client holds goes away
    assert parse({"state": "open"}).matches(conn(state="ACTIVE"))
    assert not parse({"state": "closed"}).matches(conn())


def test_keys_apply_only_to_events_that_carry_them():
    f = parse({"namespace": "shop", "port": "8080", "ip": "10.0.0.0/8"})
    assert f.matches({"type": "dns.resolved", "nodeName": "node-a", "ip": "10.9.9.9", "name": "x."})
    assert not f.matches({"type": "dns.resolved", "nodeName": "node-a", "ip": "192.0.2.1", "name": "x."})
    container = {"type": "container.added", "nodeName": "node-a", "namespace": "shop", "podName": "web-1"}
    assert f.matches(container) and not f.matches(container | {"namespace": "bank"})
    assert parse({"port": "8080"}).matches(port_event()) and not parse({"port": "80"}).matches(port_event())


def failed(**fields) -> dict:
    base = {"type": "dns.failed", "nodeName": "node-a", "name": "gone.test", "rcode": "NXDOMAIN"}
    return base | {"clientIP": "10.1.0.5", "podName": "web-1", "namespace": "shop", "podUID": "u1"} | fields


def test_a_dns_failure_matches_by_its_clients_pod_and_address():
    assert parse({"namespace": "shop", "podName": "web-1"}).matches(failed())
    assert not parse({"namespace": "bank"}).matches(failed())
    not_a_pod = failed(podName=None, namespace=None, podUID=None)
    assert not parse({"namespace": "shop"}).matches(not_a_pod)  # the client is no pod of the node
    assert parse({"ip": "10.1.0.0/16"}).matches(failed()) and not parse({"ip": "10.2.0.0/16"}).matches(failed())
    assert not parse({"loopback": False}).matches(failed(clientIP="127.0.0.1"))
    assert not parse({"nodeName": "node-b"}).matches(failed())
    # keys about sockets do not apply to it
    assert parse({"protocol": "TCP", "port": 443, "state": "ESTABLISHED", "host": False}).matches(failed())


def test_what_describes_the_stream_always_passes():
    f = parse({"nodeName": "node-b", "namespace": "nothing"})
    for kind in ("host.info", "snapshot.complete", "stream.reset", "mux.status", "peer.status", "node.removed"):
        assert f.matches({"type": kind, "nodeName": "node-a"}), kind


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"namespaces": "shop"}, "unknown key 'namespaces'"),
        ({"port": "http"}, "port: 'http' is not a port"),
        ({"port": "70000"}, "port: '70000'"),
        ({"ip": "10.0.0.300"}, "ip: '10.0.0.300' is not an address or a CIDR"),
        ({"protocol": "SCTP"}, "protocol: 'SCTP' is not TCP or UDP"),
        ({"state": "OPENISH"}, "state: 'OPENISH' is not a state"),
        ({"host": "maybe"}, "host: expected true or false"),
        ({"namespace": {"a": 1}}, "namespace: expected a comma-separated string or a list"),
        ({"namespace": ",".join(f"n{i}" for i in range(300))}, "namespace: at most 256 values"),
    ],
)
def test_bad_subscriptions_name_what_is_wrong(given, message):
    with pytest.raises(FilterError, match=message.replace("(", r"\(")):
        parse(given)


def test_filters_are_values_and_round_trip():
    a = parse({"namespace": "shop,bank", "port": "443", "host": "false"})
    b = parse({"namespace": ["bank", "shop"], "port": [443], "host": False})
    assert a == b and hash(a) == hash(b)
    assert parse(a.to_json()) == a
    assert parse({}) == EVERYTHING and EVERYTHING.empty


def frames(sub) -> list[dict]:
    """The events of the frames a subscriber has to send now (a head frame is one event)."""
    out = []
    for frame in sub.take():
        data = orjson.loads(frame)
        out += data if isinstance(data, list) else [data]
    return out


def test_the_hub_sends_each_subscriber_what_its_filter_lets_through():
    state = [conn(), conn(namespace="bank", localPort=40001)]
    hub = Hub("node-a", lambda: state, lambda: "t")
    shop = hub.subscribe("a", {"type": "host.info"}, parse({"namespace": "shop"}))
    everyone = hub.subscribe("b", {"type": "host.info"})
    snapshot = [e for e in frames(shop) if e["type"] == "connection.event"]
    assert [e["localPort"] for e in snapshot] == [40000]
    assert len([e for e in frames(everyone) if e["type"] == "connection.event"]) == 2
    hub.publish([conn(namespace="bank", localPort=40002), conn(localPort=40003)])
    assert [e["localPort"] for e in frames(shop)] == [40003]
    assert [e["localPort"] for e in frames(everyone)] == [40002, 40003]


def test_a_new_filter_resets_the_stream_and_sends_its_snapshot():
    state = [conn(), conn(namespace="bank", localPort=40001)]
    hub = Hub("node-a", lambda: state, lambda: "t")
    sub = hub.subscribe("a", {"type": "host.info"}, parse({"namespace": "shop"}))
    frames(sub)
    hub.publish([conn(localPort=40005)])  # queued under the old filter: superseded by the new snapshot
    sub.resubscribe(parse({"namespace": "bank"}))
    got = frames(sub) + frames(sub)
    assert got[0]["type"] == "stream.reset" and got[0]["reason"] == "subscribe"
    assert got[0]["filter"] == {"namespace": ["bank"]}
    assert [e["localPort"] for e in got if e["type"] == "connection.event"] == [40001]
    assert got[-1]["type"] == "snapshot.complete" and got[-1]["count"] == 1


def test_encoded_events_are_filtered_too():
    """Short connections come from the native helper, and the mux's rows, as encoded JSON."""
    f = parse({"port": "443"})
    assert f.matches(orjson.Fragment(orjson.dumps(conn())))
    assert not f.matches(orjson.Fragment(orjson.dumps(conn(remotePort=80))))


def test_a_namespace_filter_leaves_out_what_has_no_pod():
    """A host process's socket carries no pod fields at all: it is in no namespace."""
    host_socket = {k: v for k, v in conn(host=True).items() if k not in ("podName", "namespace")}
    assert not parse({"namespace": "shop"}).matches(host_socket)
    assert not parse({"podName": "web-1"}).matches(host_socket)
    assert parse({"port": "443"}).matches(host_socket)


def test_any_of_several_filters_and_their_union():
    shop, bank = parse({"namespace": "shop"}), parse({"namespace": "bank"})
    both = union([shop, bank, shop])
    assert isinstance(both, AnyOf) and both.matches(conn()) and both.matches(conn(namespace="bank"))
    assert not both.matches(conn(namespace="other"))
    assert union([shop]) == shop and union([shop, EVERYTHING]) == EVERYTHING and union([]) is None
    assert parse_subscription(both.to_json()) == both and parse_subscription([]) == EVERYTHING
    with pytest.raises(FilterError, match="filters: expected a list of filter objects"):
        parse_subscription(["shop"])


def test_a_widened_subscription_adds_rows_and_drops_nothing():
    """What a mux asks its upstream: the rows the new filter adds, between a partial stream.reset and a
    partial snapshot.complete carrying its version; what was queued stays."""
    state = [conn(), conn(namespace="bank", localPort=40001)]
    hub = Hub("node-a", lambda: state, lambda: "t")
    sub = hub.subscribe("mux", {"type": "host.info"}, parse({"namespace": "shop"}))
    frames(sub)
    hub.publish([conn(localPort=40005)])  # queued under the old filter: kept
    hub.resubscribe(sub, union([parse({"namespace": "shop"}), parse({"namespace": "bank"})]), True, 7)
    got = frames(sub) + frames(sub) + frames(sub)
    kinds = [e["type"] for e in got]
    assert kinds == ["stream.reset", "connection.event", "snapshot.complete", "connection.event"]
    assert got[0]["partial"] is True and got[0]["subscription"] == 7
    assert got[1]["localPort"] == 40001  # only the added row: shop's was sent already
    assert got[2]["partial"] is True and got[2]["subscription"] == 7 and got[2]["count"] == 1
    assert got[3]["localPort"] == 40005


def test_a_held_snapshot_complete_comes_after_the_rows_that_reach_the_client_live():
    """A mux client whose nodes are still sending the rows its new filter adds: its snapshot goes out at
    once, and its snapshot.complete only once released, after what was queued by then."""
    state = [conn()]
    hub = Hub("mux", lambda: state, lambda: "t")
    sub = hub.subscribe("a", {"type": "host.info"})
    frames(sub)
    sub.resubscribe(parse({"port": "443,5432"}))
    sub.hold_completion()
    got = frames(sub) + frames(sub)
    assert [e["type"] for e in got] == ["stream.reset", "connection.event"]
    hub.publish([conn(localPort=40001, remotePort=5432)])  # a row a node sends for the new filter
    assert [e["remotePort"] for e in frames(sub)] == [5432]
    hub.publish([conn(localPort=40002, remotePort=5432)])
    sub.release()
    got = frames(sub)
    assert [e["type"] for e in got] == ["connection.event", "snapshot.complete"]
    assert got[1]["count"] == 1  # the snapshot's own rows


def test_a_held_partial_completion_comes_after_the_rows_that_reach_the_client_live():
    """A mux client that widened its filter partially: nothing it holds is dropped, the merged state's
    added rows go out at once, and the partial snapshot.complete once its nodes have sent theirs."""
    state = [conn(), conn(localPort=40001, remotePort=5432)]
    hub = Hub("mux", lambda: state, lambda: "t")
    sub = hub.subscribe("a", {"type": "host.info"}, parse({"port": "443"}))
    frames(sub)
    hub.resubscribe(sub, parse({"port": "443,5432"}), True, 3)
    sub.hold_completion()
    got = frames(sub) + frames(sub)
    assert [e["type"] for e in got] == ["stream.reset", "connection.event"] and got[0]["partial"] is True
    hub.publish([conn(localPort=40002, remotePort=5432)])  # a row a node sends for the new filter
    sub.release()
    got = frames(sub)
    assert [e["type"] for e in got] == ["connection.event", "snapshot.complete"]
    assert got[1]["partial"] is True and got[1]["subscription"] == 3 and got[1]["count"] == 1


def test_covers_tells_whether_held_rows_already_hold_a_filters():
    shop, shop_tcp = parse({"namespace": "shop"}), parse({"namespace": "shop", "protocol": "TCP"})
    assert covers(EVERYTHING, shop) and covers(shop, shop_tcp) and covers(shop, shop)
    assert not covers(shop_tcp, shop) and not covers(shop, EVERYTHING)
    assert not covers(shop, parse({"namespace": "shop,bank"}))
    assert covers(parse({"ip": "10.0.0.0/8"}), parse({"ip": "10.1.0.0/16"}))
    assert not covers(parse({"ip": "10.1.0.0/16"}), parse({"ip": "10.0.0.0/8"}))
    assert not covers(parse({"ip": "10.0.0.0/8"}), parse({"ip": "fd00::/8"}))
    assert covers(EVERYTHING, parse({"loopback": False})) and not covers(parse({"host": False}), EVERYTHING)
    both = union([shop, parse({"namespace": "bank"})])
    assert covers(both, shop_tcp) and covers(both, both) and not covers(shop, both)


def test_a_held_completion_whose_live_rows_overflow_waits_for_the_whole_snapshot_instead():
    """A widening too large to come live: the client stops receiving, and once released gets a
    stream.reset and the snapshot of the state as it is then, with its snapshot.complete."""
    state = [conn()]
    hub = Hub("mux", lambda: state, lambda: "t", client_max_events=2)
    sub = hub.subscribe("a", {"type": "host.info"})
    frames(sub)
    sub.resubscribe(EVERYTHING)
    sub.hold_completion()
    frames(sub)
    for port in range(40001, 40010):  # over 4x its bound
        hub.publish([conn(localPort=port)])
    state += [conn(localPort=40001)]
    assert sub.held and frames(sub) == []
    sub.release()
    got = frames(sub) + frames(sub)
    assert got[0]["type"] == "stream.reset" and got[0]["reason"] == "overflow"
    assert [e["localPort"] for e in got if e["type"] == "connection.event"] == [40000, 40001]
    assert got[-1]["type"] == "snapshot.complete"
