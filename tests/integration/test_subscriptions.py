"""Subscriptions on /netstat against a real agent, on its node port and its multiplexer port: query
parameters narrow the snapshot and the live events, a subscribe frame swaps the rows, a bad one gets a
subscribe.error and changes nothing, and two clients' filters stay their own."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from netstatd.testing.stream import StreamClient
from tests.conftest import own_agent, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    yield from own_agent(tmp_path_factory, "--loopback")


class Listener:
    """A TCP server on loopback that accepts and closes; connect() makes one short connection to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def connect(self) -> None:
        client = socket.create_connection(("127.0.0.1", self.port))
        self.sock.accept()[0].close()
        client.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listeners():
    pair = Listener(), Listener()
    yield pair
    for listener in pair:
        listener.close()


def ports_seen(client: StreamClient) -> set[int]:
    out = set()
    for e in client.events:
        if e["type"] == "connection.event":
            out |= {e["localPort"], e["remotePort"]}
        elif e["type"].startswith("port."):
            out.add(e["port"])
    return out


def closed_on(client: StreamClient, port: int) -> dict:
    """Waits for the server side's CLOSE of a connection to `port`."""
    return client.wait_for(
        lambda e: e["type"] == "connection.event" and e["localPort"] == port and e["state"] == "CLOSE"
    )


@pytest.mark.parametrize("mux", [False, True], ids=["node-port", "mux-port"])
def test_a_port_in_the_query_narrows_snapshot_and_events(agent, listeners, mux):
    a, b = listeners
    base = agent.mux_ws_url if mux else agent.ws_url
    with StreamClient(f"{base}?port={a.port}") as narrow, StreamClient(base) as everything:
        narrow.wait_snapshot()
        everything.wait_snapshot()
        if mux:  # the merged state fills once the upstream is in
            everything.wait_for(lambda e: e["type"] == "port.listening" and e["port"] == b.port)
            narrow.wait_for(lambda e: e["type"] == "port.listening" and e["port"] == a.port)
        a.connect()
        b.connect()
        closed_on(everything, a.port)
        closed_on(everything, b.port)
        closed_on(narrow, a.port)
    assert a.port in ports_seen(narrow) and b.port not in ports_seen(narrow)
    assert {a.port, b.port} <= ports_seen(everything)


def test_a_subscribe_frame_swaps_the_rows(agent, listeners):
    a, b = listeners
    with StreamClient(f"{agent.ws_url}?port={a.port}") as client:
        client.wait_snapshot()
        client.wait_for(lambda e: e["type"] == "port.listening" and e["port"] == a.port)
        client.send({"type": "subscribe", "filter": {"port": [b.port]}})
        reset = client.wait_for(lambda e: e["type"] == "stream.reset")
        assert reset["reason"] == "subscribe" and reset["filter"] == {"port": [b.port]}
        after = next(i for i, e in enumerate(client.events) if e is reset)
        client.wait_for(lambda e: e["type"] == "snapshot.complete" and any(x is e for x in client.events[after:]))
        a.connect()
        b.connect()
        closed_on(client, b.port)
        since = client.events[after:]
    listening = {e["port"] for e in since if e["type"] == "port.listening"}
    assert b.port in listening and a.port not in listening
    assert not [e for e in since if e["type"] == "connection.event" and a.port in (e["localPort"], e["remotePort"])]


def test_a_bad_subscribe_gets_an_error_and_the_stream_goes_on(agent, listeners):
    a, _ = listeners
    with StreamClient(f"{agent.ws_url}?port={a.port}") as client:
        client.wait_snapshot()
        before = agent.metric("netstatd_subscribe_errors_total")
        client.send("not json")
        client.send({"type": "subscribe", "filter": {"namespaces": "shop"}})
        client.send({"type": "unsubscribe"})
        errors = [client.wait_for(lambda e, n=n: e["type"] == "subscribe.error" and n in e["error"]) for n in (
            "not JSON", "unknown key 'namespaces'", 'expected {"type": "subscribe"',
        )]  # fmt: skip
        assert all(e["nodeName"] == socket.gethostname() for e in errors)
        a.connect()
        closed_on(client, a.port)  # still subscribed to a's port
        assert not [e for e in client.events if e["type"] == "stream.reset"]
    assert agent.metric("netstatd_subscribe_errors_total") == before + 3


def test_a_bad_query_is_refused_with_its_reason(agent):
    async def connect() -> None:
        async with aiohttp.ClientSession() as s, s.ws_connect(f"{agent.ws_url}?port=http"):
            pass

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        asyncio.run(connect())
    assert refused.value.status == 400


def test_two_clients_filters_stay_their_own(agent, listeners):
    a, b = listeners
    with StreamClient(f"{agent.ws_url}?port={a.port}") as on_a, StreamClient(f"{agent.ws_url}?port={b.port}") as on_b:
        on_a.wait_snapshot()
        on_b.wait_snapshot()
        on_b.send({"type": "subscribe", "filter": {"port": [b.port], "protocol": ["TCP"]}})
        on_b.wait_for(lambda e: e["type"] == "stream.reset")
        a.connect()
        b.connect()
        closed_on(on_a, a.port)
        closed_on(on_b, b.port)
    assert b.port not in ports_seen(on_a) and a.port not in ports_seen(on_b)


def test_push_down_the_nodes_send_the_mux_only_what_its_clients_want(agent, listeners):
    """On the mux port, the upstream subscribes to the union of the clients' filters. With one client on
    a's port, fifty connections to b's port do not leave the node; a second client that wants everything
    widens the upstream (the node adds b's rows, and its traffic flows) without a reset or a second
    snapshot for the first client."""
    a, b = listeners
    bytes_in = lambda: agent.metric("netstatd_mux_peer_bytes_total")  # noqa: E731
    with StreamClient(f"{agent.mux_ws_url}?port={a.port}") as narrow:
        narrow.wait_snapshot()  # held until the node answered the narrower subscription
        narrow.wait_for(lambda e: e["type"] == "port.listening" and e["port"] == a.port)
        before = bytes_in()
        for _ in range(50):
            b.connect()
        a.connect()
        closed_on(narrow, a.port)
        narrow_bytes = bytes_in() - before
        with StreamClient(agent.mux_ws_url) as wide:
            complete = wide.wait_snapshot()  # only once the node sent the rows the widening adds
            before_complete = wide.events[: wide.events.index(complete)]
            assert b.port in {e["port"] for e in before_complete if e["type"] == "port.listening"}
            before = bytes_in()
            for _ in range(50):
                b.connect()
            a.connect()
            closed_on(wide, a.port)
            closed_on(narrow, a.port)
            wide_bytes = bytes_in() - before
    print(f"node -> mux bytes: {narrow_bytes} with the narrow client alone, {wide_bytes} with a wide one")
    assert narrow_bytes * 5 < wide_bytes, (narrow_bytes, wide_bytes)
    assert b.port not in ports_seen(narrow)
    assert [e["type"] for e in narrow.events].count("snapshot.complete") == 1
    assert not [e for e in narrow.events if e["type"] == "stream.reset"]


def test_a_filter_narrowed_then_widened_on_the_mux_port_keeps_its_rows_and_the_nodes_sending(agent, listeners):
    """As the page does with a port typed and cleared: a mux client narrows to a's port, then widens back
    partially. It gets no reset for the widening, b's rows come from the merged state (the upstream's
    narrowing waits NARROW_AFTER_S, so the node was not re-subscribed), and a narrowing that lasts is
    pushed down to the node once that time has passed."""
    a, b = listeners
    changes = lambda: agent.metric("netstatd_mux_subscription_changes_total")  # noqa: E731
    is_partial = lambda kind: lambda e: e["type"] == kind and e.get("partial") is True  # noqa: E731
    with StreamClient(f"{agent.mux_ws_url}?port={a.port},{b.port}") as client:
        client.wait_snapshot()
        client.wait_for(lambda e: e["type"] == "port.listening" and e["port"] == b.port)
        wait_until(lambda: agent.metric("netstatd_mux_clients_connected") == 1)  # an earlier test's has left
        before = changes()
        client.send({"type": "subscribe", "filter": {"port": [a.port]}})
        client.send({"type": "subscribe", "filter": {"port": [a.port, b.port]}, "partial": True, "version": 1})
        done = client.wait_for(is_partial("snapshot.complete"))
        start = next(i for i, e in enumerate(client.events) if is_partial("stream.reset")(e))
        added = client.events[start : next(i for i, e in enumerate(client.events) if e is done)]
        assert {e["port"] for e in added if e["type"] == "port.listening"} == {b.port}
        assert done["subscription"] == 1 and changes() == before
        client.send({"type": "subscribe", "filter": {"port": [a.port]}})
        wait_until(lambda: changes() == before + 1)
