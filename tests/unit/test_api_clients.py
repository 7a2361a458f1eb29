"""WebSocket client limits and endings, against a real aiohttp server on loopback: per address and in
all, a client that takes nothing, and a sender that dies (the client must see the stream end)."""

import asyncio
import socket

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from netstatd.api import app as app_mod
from netstatd.api.app import POLICY, build_app
from netstatd.hub import Hub, Subscriber


def make_hub(**kw) -> Hub:
    return Hub("node-1", lambda: [], lambda: "2026-01-01T00:00:00.000000Z", **kw)


async def serve(hub: Hub, **kw) -> TestClient:
    app = build_app(hub, lambda: {"type": "host.info", "nodeName": "node-1"}, lambda: [], lambda pid: None, **kw)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_clients_per_address_are_capped_with_429():
    client = await serve(make_hub(), max_clients_per_address=2)
    try:
        first = [await client.ws_connect("/netstat") for _ in range(2)]
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await client.ws_connect("/netstat")
        assert e.value.status == 429
        resp = await client.get("/netstat", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
        body = await resp.json()
        assert body["reason"] == "clients_per_address" and "--max-clients-per-address" in body["error"]
        await first[0].close()
        for _ in range(50):  # the server sees the close
            if sum(client.app[app_mod.CLIENTS].values()) < 2:
                break
            await asyncio.sleep(0.02)
        again = await client.ws_connect("/netstat")
        await again.close()
        await first[1].close()
        assert client.app[POLICY].refused["clients_per_address"] == 2
    finally:
        await client.close()


async def test_clients_in_all_are_capped_with_503():
    client = await serve(make_hub(max_clients=1))
    try:
        held = await client.ws_connect("/netstat")
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await client.ws_connect("/netstat")
        assert e.value.status == 503
        await held.close()
    finally:
        await client.close()


async def test_a_client_that_takes_nothing_is_closed_as_too_slow(monkeypatch):
    monkeypatch.setattr(app_mod, "STALL_S", 0.5)
    monkeypatch.setattr(app_mod, "CLOSE_WAIT_S", 0.5)
    hub = make_hub()
    client = await serve(hub)
    try:
        # A raw socket that upgrades and then never reads: the kernel's buffers fill, then the send stalls.
        sock = socket.create_connection(("127.0.0.1", client.server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(
            b"GET /netstat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        events = [{"type": "connection.event", "nodeName": "node-1", "pad": "x" * 400} for _ in range(500)]
        for _ in range(400):
            if hub.stalled:
                break
            hub.publish(events)
            await asyncio.sleep(0.02)
        assert hub.stalled == 1
        for _ in range(100):
            if not hub.subscribers:
                break
            await asyncio.sleep(0.05)
        assert not hub.subscribers  # gone, its queue freed
        sock.close()
    finally:
        await client.close()


async def test_a_client_that_reads_is_told_why_it_is_closed(monkeypatch):
    """The reason is in the close frame, for a client that still reads it (here: a sender stall
    simulated by a send that never completes)."""
    monkeypatch.setattr(app_mod, "STALL_S", 0.3)
    hub = make_hub()
    client = await serve(hub)
    try:
        ws = await client.ws_connect("/netstat")
        assert (await ws.receive_json())["type"] == "host.info"

        async def never(*args, **kwargs):
            await asyncio.sleep(3600)

        sub = next(iter(hub.subscribers))
        await asyncio.sleep(0.1)  # the snapshot went out
        monkeypatch.setattr(aiohttp.web.WebSocketResponse, "send_frame", never)
        sub.offer([(b"[]", 0)])
        msg = await ws.receive(timeout=5)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.POLICY_VIOLATION and "too slow" in msg.extra
    finally:
        await client.close()


async def test_a_sender_that_dies_closes_the_client_with_1011(monkeypatch):
    reports: list[tuple[str, str]] = []
    hub = make_hub()
    client = await serve(hub, report=lambda task, exc, what: reports.append((task, str(exc))))
    try:
        ws = await client.ws_connect("/netstat")
        assert (await ws.receive_json())["type"] == "host.info"

        def broken(self):
            raise ValueError("a bug in take()")

        monkeypatch.setattr(Subscriber, "take", broken)
        next(iter(hub.subscribers)).offer([(b"[]", 0)])
        msg = await ws.receive(timeout=5)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.INTERNAL_ERROR
        assert reports == [("websocket", "a bug in take()")]
    finally:
        await client.close()
