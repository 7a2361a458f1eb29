"""mux/peer.py against small node servers on loopback: TLS upstreams, timeouts, refusals, byte and row bounds.

Each server is an aiohttp app whose /netstat speaks the node protocol (docs/protocol.md): host.info, the
snapshot, snapshot.complete, then live events. Certificates are made with the openssl CLI. No root needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import WSCloseCode, web

from netstatd.mux import peer as peer_mod
from netstatd.mux.peer import Peer, PeerStats, upstream_tls
from netstatd.mux.state import MergedState
from netstatd.settings import Settings
from netstatd.supervisor import Supervisor
from netstatd.tls import client_tls

pytestmark = pytest.mark.timeout(60)

SERVICE = "netstatd-headless"  # the name in the agents' certificate (the headless Service's)
TS = "2026-01-01T00:00:00.000000Z"
Script = Callable[[web.WebSocketResponse, int], Awaitable[None]]


# -- certificates (openssl CLI) ------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.crt", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, usage: str, dns: str | None = None) -> None:
    ext = d / f"{name}.ext"
    ext.write_text(
        (f"subjectAltName=DNS:{dns}\n" if dns else "")
        + f"extendedKeyUsage={usage}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr", "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/{ca}.crt", "-CAkey", f"{d}/{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{d}/{name}.crt", "-extfile", str(ext),
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "netstatd-test-ca")
    _ca(d, "other-ca")
    _leaf(d, "agent", "netstatd-test-ca", "serverAuth", SERVICE)
    _leaf(d, "agent-other-name", "netstatd-test-ca", "serverAuth", "somewhere-else")
    _leaf(d, "agent-other-ca", "other-ca", "serverAuth", SERVICE)
    _leaf(d, "netstatd-mux", "netstatd-test-ca", "clientAuth")
    return d


def server_context(certs: Path, cert: str = "agent", verify: ssl.VerifyMode = ssl.CERT_REQUIRED) -> ssl.SSLContext:
    """An agent's TLS: with CERT_REQUIRED, only a client certificate from the test CA gets in."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / f"{cert}.crt", certs / f"{cert}.key")
    ctx.load_verify_locations(certs / "netstatd-test-ca.crt")
    ctx.verify_mode = verify
    return ctx


def mux_context(certs: Path, client_cert: bool = True) -> ssl.SSLContext:
    ca = str(certs / "netstatd-test-ca.crt")
    if not client_cert:
        return client_tls(ca).context
    return client_tls(ca, str(certs / "netstatd-mux.crt"), str(certs / "netstatd-mux.key")).context


# -- node servers --------------------------------------------------------------


def ev(node: str, type_: str, **kw: object) -> dict:
    return {"type": type_, "timestamp": TS, "nodeName": node, **kw}


def port_row(node: str, cookie: int) -> dict:
    return ev(
        node, "port.listening", protocol="TCP", family="IPv4", ip="0.0.0.0", port=cookie, netns=1, pid=1,
        exe="/x", comm="x", sockCookie=cookie,
    )  # fmt: skip


def conn_row(node: str, cookie: int, state: str = "ESTABLISHED") -> dict:
    return ev(
        node, "connection.event", protocol="TCP", family="IPv4", state=state, states=[state],
        localIP="10.0.0.1", localPort=40000, remoteIP="10.0.0.2", remotePort=80, pid=1, exe="/x", comm="x",
        netns=1, sockCookie=cookie, direction="outbound",
    )  # fmt: skip


def one_of_each(node: str, n: int) -> list[dict]:
    """n rows of each table: containers, IP entries, names, ports, connections."""
    rows: list[dict] = []
    for i in range(n):
        rows += [
            ev(node, "container.added", containerId=f"c{i}", containerName=f"c{i}", podName="p", namespace="ns"),
            ev(node, "ip.added", ip=f"10.1.0.{i}", kind="pod", podUID=f"u{i}"),
            ev(node, "dns.resolved", ip=f"10.2.0.{i}", hostname=f"h{i}", aliases=[]),
            port_row(node, 100 + i),
            conn_row(node, 200 + i),
        ]
    return rows


async def hello(ws: web.WebSocketResponse, node: str, snapshot: list[dict] | None = None) -> None:
    """host.info, the snapshot (default: one listening port) and snapshot.complete."""
    await ws.send_json(ev(node, "host.info", hostIPs=[], version="test"))
    rows = [port_row(node, 1)] if snapshot is None else snapshot
    await ws.send_json([*rows, ev(node, "snapshot.complete", count=len(rows))])


class NodeServer:
    """A node's /netstat on host:<free port>: every upgrade runs script(ws, n), n = 1, 2, ... per connection."""

    def __init__(self, script: Script, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None):
        self.script, self.host, self.ssl_context = script, host, ssl_context
        self.upgrades = 0
        self.client_certs: list[str] = []  # the CN of each client certificate the server saw
        self.sockets: set[web.WebSocketResponse] = set()

    async def __aenter__(self) -> NodeServer:
        app = web.Application()
        app.router.add_get("/netstat", self._netstat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self.runner, sock, ssl_context=self.ssl_context).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in list(self.sockets):  # else cleanup waits for handlers until its shutdown timeout
            await ws.close()
        await self.runner.cleanup()

    async def _netstat(self, request: web.Request) -> web.StreamResponse:
        self.upgrades += 1
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        if cert:
            self.client_certs.append(dict(rdn[0] for rdn in cert["subject"])["commonName"])
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            with contextlib.suppress(ConnectionError):  # the peer may cut us off mid-script
                await self.script(ws, self.upgrades)
                async for _ in ws:
                    pass
        finally:
            self.sockets.discard(ws)
        return ws


class Refuser(NodeServer):
    """Answers every upgrade with an HTTP error, as an agent's access checks do (api/access.py)."""

    def __init__(self, status: int) -> None:
        super().__init__(lambda ws, n: asyncio.sleep(0))
        self.status = status

    async def _netstat(self, request: web.Request) -> web.StreamResponse:
        self.upgrades += 1
        return web.json_response({"error": "refused", "reason": "test"}, status=self.status)


# -- peers ---------------------------------------------------------------------


class Mux:
    """What the multiplexer gives its peers: one merged state, owners, stats, a published-events log."""

    def __init__(self) -> None:
        self.state = MergedState()
        self.owners: dict[str, Peer] = {}
        self.stats = PeerStats()
        self.published: list[dict] = []
        self.peers: list[Peer] = []

    def publish(self, events: list) -> None:
        self.published += orjson.loads(orjson.dumps(events))  # connections come pre-encoded (orjson.Fragment)

    def peer(self, session: aiohttp.ClientSession, port: int, ip: str = "127.0.0.1", **kw) -> Peer:
        limits = {"max_events_per_s": 500_000, "max_bytes_per_s": 256 << 20, "max_rows": 1_500_000}
        p = Peer(ip, port, self.state, self.owners, self.publish, lambda: TS, session, self.stats, **(limits | kw))
        self.peers.append(p)
        p.start(Supervisor())
        return p

    def statuses(self, p: Peer, status: str | None = None) -> list[dict]:
        return [
            e
            for e in self.published
            if e["type"] == "peer.status" and e["peer"] == p.ip and status in (None, e["status"])
        ]

    def of(self, node: str, type_: str) -> list[dict]:
        return [e for e in self.published if e.get("nodeName") == node and e["type"] == type_]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5)  # as the mux's (server.py)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        yield s


@pytest.fixture
async def mux(session: aiohttp.ClientSession) -> AsyncIterator[Mux]:
    """Its peers stop before the session closes."""
    m = Mux()
    try:
        yield m
    finally:
        for p in m.peers:
            await p.stop()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_mod, "BACKOFF_MIN_S", 0.05)  # the backoff still doubles; tests wait less


async def until(cond: Callable[[], object], timeout: float = 20, what: str = "condition") -> None:
    """Waits for an outcome (not for time to pass): the timeout only bounds a failing test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"{what}: not true within {timeout} s"
        await asyncio.sleep(0.02)


def error_of(mux: Mux, p: Peer) -> str:
    (first, *_) = mux.statuses(p, "reconnecting")
    return first["error"]


# -- TLS -----------------------------------------------------------------------


async def test_tls_peer_with_client_certificate_merges_the_node(certs, mux, session):
    async with NodeServer(lambda ws, n: hello(ws, "tls-node"), ssl_context=server_context(certs)) as server:
        p = mux.peer(session, server.port, ssl=mux_context(certs), server_hostname=SERVICE)
        assert p.url == f"wss://127.0.0.1:{server.port}/netstat"
        await until(lambda: mux.of("tls-node", "port.listening"), what="the node's snapshot merged")
        assert p.status is not None and p.status["status"] == "connected"
        assert server.client_certs == ["netstatd-mux"]  # the agent saw our client certificate
        # the certificate names the Service, not 127.0.0.1: checked against server_hostname
        assert set(mux.state.nodes["tls-node"].ports) == {1}


async def test_tls_peer_without_client_certificate_is_refused_and_says_so(certs, mux, session):
    async with NodeServer(lambda ws, n: hello(ws, "tls-node"), ssl_context=server_context(certs)) as server:
        p = mux.peer(session, server.port, ssl=mux_context(certs, client_cert=False), server_hostname=SERVICE)
        await until(lambda: mux.statuses(p, "reconnecting"), what="a refusal")
        error = error_of(mux, p)
        assert "did not accept this multiplexer's client certificate" in error
        assert "--peer-cert-file/--peer-key-file" in error and "--peer-ca-file" in error
        assert server.upgrades == 0 and not mux.state.nodes and not mux.statuses(p, "connected")


async def test_agent_certificate_for_another_name_is_refused(certs, mux, session):
    tls = server_context(certs, "agent-other-name", ssl.CERT_OPTIONAL)
    async with NodeServer(lambda ws, n: hello(ws, "node-a"), ssl_context=tls) as server:
        p = mux.peer(session, server.port, ssl=mux_context(certs), server_hostname=SERVICE)
        await until(lambda: mux.statuses(p, "reconnecting"), what="a refusal")
        error = error_of(mux, p)
        assert error.startswith(f"TLS: the agent's certificate is not issued for '{SERVICE}'")
        assert "--peer-server-name" in error
        assert server.upgrades == 0 and not mux.state.nodes
        # the name it was issued for, as --peer-server-name gives it, is accepted
        await p.stop()
        ok = mux.peer(session, server.port, ssl=mux_context(certs), server_hostname="somewhere-else")
        await until(lambda: mux.statuses(ok, "connected"), what="connected with the certificate's name")


async def test_agent_certificate_from_another_ca_is_refused(certs, mux, session):
    tls = server_context(certs, "agent-other-ca", ssl.CERT_OPTIONAL)
    async with NodeServer(lambda ws, n: hello(ws, "node-a"), ssl_context=tls) as server:
        p = mux.peer(session, server.port, ssl=mux_context(certs), server_hostname=SERVICE)
        await until(lambda: mux.statuses(p, "reconnecting"), what="a refusal")
        error = error_of(mux, p)
        assert error.startswith("TLS: the agent's certificate is not trusted (unable to get local issuer certificate)")
        assert "the CA 'netstatd-test-ca' (--peer-ca-file)" in error
        assert server.upgrades == 0 and not mux.state.nodes


async def test_tls_on_one_side_only_says_which(certs, mux, session):
    async with (
        NodeServer(lambda ws, n: hello(ws, "tls"), ssl_context=server_context(certs, verify=ssl.CERT_OPTIONAL)) as tls,
        NodeServer(lambda ws, n: hello(ws, "plain"), "127.0.0.2") as plain,
    ):
        to_tls = mux.peer(session, tls.port)  # ws:// to an agent serving TLS
        to_plain = mux.peer(session, plain.port, ip="127.0.0.2", ssl=mux_context(certs), server_hostname=SERVICE)
        await until(lambda: mux.statuses(to_tls, "reconnecting") and mux.statuses(to_plain, "reconnecting"))
        assert "before answering the WebSocket upgrade" in error_of(mux, to_tls)
        assert "--peer-ca-file" in error_of(mux, to_tls)
        assert error_of(mux, to_plain) == (
            "TLS handshake failed (WRONG_VERSION_NUMBER): does the agent serve TLS (--tls-cert-file)?"
        )


async def test_nothing_listening_reads_as_aiohttp_says_it(certs, mux, session):
    with socket.socket() as closed:  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        p = mux.peer(session, port, ssl=mux_context(certs), server_hostname=SERVICE)
        await until(lambda: mux.statuses(p, "reconnecting"), what="a refusal")
    assert error_of(mux, p) == f"Cannot connect to host 127.0.0.1:{port} [Connect call failed ('127.0.0.1', {port})]"


def test_upstream_tls_from_settings(certs):
    assert upstream_tls(Settings()) == (None, None)  # agents serve plain ws
    tls, name = upstream_tls(Settings(tls_cert_file="/agent.crt", fanout_service="netstatd-headless.ns.svc."))
    assert tls is not None and name == "netstatd-headless.ns.svc"  # system CAs; no trailing dot
    ca = str(certs / "netstatd-test-ca.crt")
    tls, name = upstream_tls(Settings(peer_ca_file=ca, peer_server_name="agents.example"))
    assert tls is not None
    assert [c["subject"] for c in tls.context.get_ca_certs()] == [((("commonName", "netstatd-test-ca"),),)]
    assert name == "agents.example"
    with pytest.raises(ValueError, match=r"--peer-cert-file '/missing\.crt'"):
        upstream_tls(Settings(peer_cert_file="/missing.crt", peer_key_file="/missing.key"))


# -- refusals and timeouts -------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (401, "the agent requires authentication: give this multiplexer --peer-cert-file/--peer-key-file with a "
         "certificate from the agent's --peer-ca-file"),
        (403, "forbidden"),
        (421, "--allowed-hosts"),
        (429, "--max-clients-per-address"),
        (503, "as many WebSocket clients as it takes"),
        (404, "the WebSocket upgrade was refused"),
    ],
)  # fmt: skip
async def test_refused_upgrade_names_the_status_and_what_to_do(mux, session, status, says):
    async with Refuser(status) as server:
        p = mux.peer(session, server.port)
        await until(lambda: mux.statuses(p, "reconnecting"), what="a refusal")
        error = error_of(mux, p)
        assert error.startswith(f"HTTP {status}: ") and says in error


async def test_a_repeated_error_is_logged_once(mux, session, caplog):
    caplog.set_level(logging.WARNING, "netstatd.mux")
    async with Refuser(401) as server:
        p = mux.peer(session, server.port)
        await until(lambda: len(mux.statuses(p, "reconnecting")) >= 3, what="three refused attempts")
    lines = [r.getMessage() for r in caplog.records if r.name == "netstatd.mux"]
    assert lines == [f"peer 127.0.0.1 (?) cannot connect: {error_of(mux, p)}"]


@pytest.mark.parametrize("tls", [False, True])
async def test_peer_that_never_answers_times_out_and_is_retried(certs, mux, session, monkeypatch, tls):
    """It accepts TCP and then says nothing: no TLS handshake, no upgrade answer."""
    monkeypatch.setattr(peer_mod, "CONNECT_TIMEOUT_S", 0.3)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # until the peer gives up

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        kw = {"ssl": mux_context(certs), "server_hostname": SERVICE} if tls else {}
        p = mux.peer(session, port, **kw)
        await until(lambda: len(mux.statuses(p, "reconnecting")) >= 2, what="two timed-out attempts")
        first, second = mux.statuses(p, "reconnecting")[:2]
        assert (
            first["error"]
            == second["error"]
            == ("timed out: no WebSocket upgrade within 0.3 s (TCP connect, TLS, HTTP upgrade)")
        )
        assert first["retryInS"] > 0 and len(accepted) >= 2  # retried, with the backoff
    finally:
        server.close()
        for w in accepted:
            w.close()


async def test_peer_that_upgrades_but_never_speaks_times_out(mux, session, monkeypatch):
    monkeypatch.setattr(peer_mod, "HELLO_TIMEOUT_S", 0.3)
    async with NodeServer(lambda ws, n: asyncio.sleep(0)) as server:  # no host.info
        p = mux.peer(session, server.port)
        await until(lambda: len(mux.statuses(p, "reconnecting")) >= 2, what="two timed-out attempts")
        assert error_of(mux, p) == "timed out: no host.info within 0.3 s of the upgrade"
        assert server.upgrades >= 2


# -- bounds ----------------------------------------------------------------------


async def test_peer_over_the_byte_budget_is_cut_and_another_keeps_streaming(mux, session, caplog):
    """20 KB/s allowed: one node sends ~200 KB/s of live events (a few events/s: no event flood), the
    other ~3 KB/s."""

    async def heavy(ws: web.WebSocketResponse, n: int) -> None:
        if n > 1:  # its retries get nothing: what the test sees after the cut stays as the cut left it
            return await ws.close()
        await hello(ws, "heavy")
        frame = orjson.dumps(ev("heavy", "dns.resolved", ip="10.0.0.1", hostname="x" * 4000, aliases=[])).decode()
        while not ws.closed:
            await ws.send_str(frame)
            await asyncio.sleep(0.02)

    async def light(ws: web.WebSocketResponse, n: int) -> None:
        await hello(ws, "light")
        i = 0
        while not ws.closed:
            i += 1
            await ws.send_json(ev("light", "dns.resolved", ip="10.0.0.1", hostname=f"name-{i}", aliases=[]))
            await asyncio.sleep(0.05)

    async with NodeServer(heavy, "127.0.0.2") as hs, NodeServer(light) as ls:
        good = mux.peer(session, ls.port, max_bytes_per_s=20_000)
        bad = mux.peer(session, hs.port, ip="127.0.0.2", max_bytes_per_s=20_000)
        await until(lambda: mux.stats.garbage, what="a peer cut")
        assert set(mux.stats.garbage) == {"bytes"}
        assert error_of(mux, bad) == "bytes: more than 20000 bytes/s for 3 s"
        assert mux.of("heavy", "node.removed") and "heavy" not in mux.state.nodes and mux.owners.keys() == {"light"}
        assert "peer 127.0.0.2 (heavy) disconnected: bytes: more than 20000 bytes/s for 3 s" in caplog.text
        # the other node is untouched and keeps streaming
        seen = len(mux.of("light", "dns.resolved"))
        await until(lambda: len(mux.of("light", "dns.resolved")) > seen + 3, what="the light node streaming on")
        assert good.status is not None and good.status["status"] == "connected"
        assert not mux.statuses(good, "reconnecting") and "light" in mux.state.nodes


@pytest.mark.parametrize(("rows", "merged"), [(2, True), (3, False)])
async def test_snapshot_over_max_rows_is_cut(mux, session, rows, merged):
    """max_rows 10: a snapshot of 2 of each table (10 rows) is merged; 3 of each (15) is cut while staged,
    and clients saw nothing of it."""
    snapshot = one_of_each("big", rows)
    async with NodeServer(lambda ws, n: hello(ws, "big", snapshot)) as server:
        p = mux.peer(session, server.port, max_rows=10)
        if merged:
            await until(lambda: "big" in mux.state.nodes, what="the snapshot merged")
            assert mux.state.nodes["big"].count() == 10 and not mux.stats.garbage
            return
        await until(lambda: mux.stats.garbage, what="a peer cut")
        assert set(mux.stats.garbage) == {"rows"}  # at every retry
        assert error_of(mux, p) == "rows: more than 10 rows in its snapshot (--peer-max-rows)"
        assert [e["type"] for e in mux.published if e["type"] != "peer.status"] == []
        assert "big" not in mux.state.nodes


async def test_live_rows_over_max_rows_are_cut(mux, session):
    """max_rows 10: a snapshot of 8 rows; live events take it to 10, a close and an open keep it at 10,
    the 11th row cuts the peer before any client sees it."""
    frames = [
        [conn_row("live", 1000), conn_row("live", 1001)],  # 10 rows
        [conn_row("live", 1000, "CLOSE"), conn_row("live", 1002)],  # still 10
        [conn_row("live", 1003)],  # 11
    ]

    async def script(ws: web.WebSocketResponse, n: int) -> None:
        if n > 1:  # its retries get nothing: what the test sees after the cut stays as the cut left it
            return await ws.close()
        await hello(ws, "live", one_of_each("live", 2)[:8])
        for frame in frames:
            await ws.send_json(frame)

    async with NodeServer(script) as server:
        p = mux.peer(session, server.port, max_rows=10)
        await until(lambda: mux.stats.garbage, what="a peer cut")
        assert set(mux.stats.garbage) == {"rows"}
        assert error_of(mux, p) == "rows: more than 10 rows after live events (--peer-max-rows)"
        cookies = [e["sockCookie"] for e in mux.of("live", "connection.event")]
        assert cookies == [200, 1000, 1001, 1000, 1002]  # the snapshot's, then live; never 1003
        assert mux.of("live", "node.removed") and "live" not in mux.state.nodes


async def test_second_peer_with_the_same_node_name_is_refused(mux, session):
    async with (
        NodeServer(lambda ws, n: hello(ws, "same-node")) as first,
        NodeServer(lambda ws, n: hello(ws, "same-node"), "127.0.0.2") as second,
    ):
        owner = mux.peer(session, first.port)
        await until(lambda: "same-node" in mux.state.nodes, what="the first peer's snapshot")
        other = mux.peer(session, second.port, ip="127.0.0.2")
        await until(lambda: mux.stats.garbage, what="the second peer refused")
        assert set(mux.stats.garbage) == {"duplicate"}
        assert error_of(mux, other) == "duplicate: node 'same-node' is already streamed by peer 127.0.0.1"
        assert mux.owners["same-node"] is owner and owner.status and owner.status["status"] == "connected"
        assert not mux.of("same-node", "node.removed") and "same-node" in mux.state.nodes


async def test_a_node_over_its_share_of_the_byte_budget_is_cut(mux, session):
    """--mux-max-bytes: each node may hold its share; a snapshot whose rows' JSON is over it is cut while
    staged, and clients saw nothing of it. The share is read at every frame (it shrinks as peers come)."""
    snapshot = one_of_each("wide", 3)
    size = sum(len(orjson.dumps(e)) for e in snapshot)
    share = {"bytes": size * 2}
    async with (
        NodeServer(lambda ws, n: hello(ws, "wide", snapshot)) as fits,
        NodeServer(lambda ws, n: hello(ws, "wider", one_of_each("wider", 3)), "127.0.0.2") as over,
    ):
        mux.peer(session, fits.port, max_state_bytes=lambda: share["bytes"])
        await until(lambda: "wide" in mux.state.nodes, what="the snapshot merged")
        held = mux.state.nodes["wide"].bytes
        assert size <= held <= size * 1.2  # each row's JSON as kept (connections with their "states")
        share["bytes"] = held // 2
        p = mux.peer(session, over.port, ip="127.0.0.2", max_state_bytes=lambda: share["bytes"])
        await until(lambda: mux.stats.garbage, what="a peer cut")
        assert set(mux.stats.garbage) == {"budget"}
        assert error_of(mux, p).startswith(f"budget: more than {share['bytes']} bytes of rows in its snapshot")
        assert "wider" not in mux.state.nodes


async def test_a_node_that_closes_the_upstream_is_retried_and_its_reason_shown(mux, session):
    """What the node said when it closed (e.g. "too slow") is in peer.status and the log, to act on."""

    async def close_after_hello(ws: web.WebSocketResponse, n: int) -> None:
        await hello(ws, "node-a")
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too slow: no frame taken for 30 s")

    async with NodeServer(close_after_hello) as server:
        p = mux.peer(session, server.port)
        await until(lambda: mux.statuses(p, "reconnecting"), what="the close")
        assert error_of(mux, p) == "connection closed (1008: too slow: no frame taken for 30 s)"
        await until(lambda: server.upgrades >= 2, what="a retry")
