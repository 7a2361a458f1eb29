"""dns.failed and DNS latency from a real unbound into a real agent: NXDOMAIN from a zone unbound answers
itself, SERVFAIL from a forwarder that never answers; what a client sees on the stream (node and
multiplexer ports) and on /metrics.

Clients are told apart by their loopback source address (127.0.0.2, ...): the resolver sees each as
another client. Nothing leaves the machine.
"""

import subprocess

import pytest

from netstatd.testing.dns import Resolver, Zone, answer_addresses
from netstatd.testing.stream import StreamClient
from tests.conftest import own_agent

# --dns-failed-interval: short, so the folded failures' event comes soon, and still well over the 1-2 s
# unbound takes to send a message
INTERVAL_S = 5


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    yield from own_agent(tmp_path_factory, "--log-level", "debug", "--dns-failed-interval", str(INTERVAL_S))


@pytest.fixture(scope="module")
def zone():
    with Zone(["ok.netstatd.test. 60 IN A 10.231.251.1"]) as z:
        yield z


@pytest.fixture
def resolver(zone, agent):
    """A fresh one per test: unbound remembers a forwarder that timed out, and would not try it again."""
    with Resolver(zone, agent.dnstap_port, log_queries=True, nxdomain=("gone.test.",), dead=("dead.test.",)) as r:
        yield r


@pytest.fixture
def stream(agent):
    with StreamClient(agent.ws_url) as client:
        client.wait_snapshot()
        yield client


def failure(stream, name: str, client: str, timeout: float = 15, **more) -> dict:
    return stream.wait_for(
        lambda e: e["type"] == "dns.failed" and e["name"] == name and e["clientIP"] == client
        and all(e.get(k) == v for k, v in more.items()),
        timeout,
    )  # fmt: skip


def metrics(agent) -> dict[str, float]:
    out = {}
    for line in agent.metrics().splitlines():
        if line.startswith("netstatd_dns_"):
            sample, value = line.rsplit(" ", 1)
            out[sample] = float(value)
    return out


def test_nxdomain_and_servfail_are_dns_failed_with_client_and_latency(agent, resolver, stream):
    before = metrics(agent)
    assert resolver.query("missing.gone.test.", source="127.0.0.2").rcode() == 3  # NXDOMAIN
    assert resolver.query("x.dead.test.", "AAAA", source="127.0.0.3").rcode() == 2  # SERVFAIL
    assert answer_addresses(resolver.query("ok.netstatd.test.", source="127.0.0.2")) == ["10.231.251.1"]
    nodata = resolver.query("ok.netstatd.test.", "AAAA", source="127.0.0.2")
    assert nodata.rcode() == 0 and not nodata.answer  # NODATA: not a failure
    assert resolver.query("marker.gone.test.", source="127.0.0.2").rcode() == 3

    nx = failure(stream, "missing.gone.test", "127.0.0.2")
    assert (nx["rcode"], nx["qtype"], nx["count"], nx["total"]) == ("NXDOMAIN", "A", 1, 1)
    assert nx["nodeName"] == agent_node(stream)
    assert "podName" not in nx  # a loopback client is no pod
    servfail = failure(stream, "x.dead.test", "127.0.0.3")
    assert (servfail["rcode"], servfail["qtype"]) == ("SERVFAIL", "AAAA")
    # latency from the DNSTap messages: the forwarder's timeout shows, the local answer is quick
    assert 0 <= nx["latencyMs"] < servfail["latencyMs"] < 10_000
    assert servfail["latencyMs"] >= 20  # unbound waited 50 ms for the forwarder, with some slack
    resolved = stream.wait_for(lambda e: e["type"] == "dns.resolved" and e["ip"] == "10.231.251.1")
    assert resolved["clientIP"] == "127.0.0.2" and 0 <= resolved["latencyMs"] < 10_000

    # unbound sends its messages in order: once the marker's event is here, the NODATA answer was read
    failure(stream, "marker.gone.test", "127.0.0.2")
    assert not [e for e in stream.events if e["type"] == "dns.failed" and e["name"] == "ok.netstatd.test"]

    after = metrics(agent)
    grew = {k: after[k] - before.get(k, 0) for k in after}
    assert grew['netstatd_dns_responses_total{rcode="NXDOMAIN"}'] == 2
    assert grew['netstatd_dns_responses_total{rcode="SERVFAIL"}'] == 1
    assert grew['netstatd_dns_responses_total{rcode="NOERROR"}'] >= 2
    assert grew["netstatd_dns_failed_events_total"] == 3
    assert grew["netstatd_dns_latency_seconds_count"] >= 5
    assert grew["netstatd_dns_latency_seconds_sum"] >= servfail["latencyMs"] / 1000
    assert grew['netstatd_dns_latency_seconds_bucket{le="+Inf"}'] >= 5
    # the forwarder's SERVFAIL is over 20 ms: not in the 10 ms bucket
    assert (
        grew['netstatd_dns_latency_seconds_bucket{le="+Inf"}'] > grew['netstatd_dns_latency_seconds_bucket{le="0.01"}']
    )
    body = agent.metrics()
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_repeated_failures_are_folded_and_kept_for_later_clients(agent, resolver, stream):
    suppressed = metrics(agent)["netstatd_dns_failed_suppressed_total"]
    assert resolver.query("again.gone.test.", source="127.0.0.4").rcode() == 3
    first = failure(stream, "again.gone.test", "127.0.0.4")
    assert (first["count"], first["total"]) == (1, 1)
    # two more within the interval: held, then one event when it ends, whose count says how many
    for _ in range(2):
        assert resolver.query("again.gone.test.", source="127.0.0.4").rcode() == 3
    assert resolver.query("again.gone.test.", source="127.0.0.5").rcode() == 3  # another client: its own
    assert failure(stream, "again.gone.test", "127.0.0.5")["count"] == 1
    folded = failure(stream, "again.gone.test", "127.0.0.4", timeout=INTERVAL_S + 15, total=3)
    mine = [i for i, e in enumerate(stream.events) if e["type"] == "dns.failed" and e["clientIP"] == "127.0.0.4"]
    assert [stream.events[i]["count"] for i in mine] == [1, 2] and folded is stream.events[mine[-1]]
    assert stream.arrivals[mine[1]] - stream.arrivals[mine[0]] >= INTERVAL_S - 1  # held until the interval ended
    assert metrics(agent)["netstatd_dns_failed_suppressed_total"] == suppressed + 1

    # a client connecting later gets each pair's latest dns.failed in its snapshot, on the node port and
    # through the multiplexer; a subscription on the client's address narrows it
    for url in (agent.ws_url, agent.mux_ws_url, agent.ws_url + "?ip=127.0.0.4"):
        with StreamClient(url) as later:
            done = later.wait_snapshot(timeout=30)
            initial = later.events[: later.events.index(done)]
            held = {(e["clientIP"], e["name"]): e for e in initial if e["type"] == "dns.failed"}
            assert held[("127.0.0.4", "again.gone.test")]["total"] == 3, url
            assert (("127.0.0.5", "again.gone.test") in held) == ("?ip=" not in url), url
            assert held[("127.0.0.4", "again.gone.test")]["timestamp"] == folded["timestamp"]


def agent_node(stream) -> str:
    return next(e["nodeName"] for e in stream.events if e["type"] == "host.info")
