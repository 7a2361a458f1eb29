"""The real agent as it is deployed: loopback by default, TLS and tokens, files re-read while it runs,
and the multiplexer reaching its peers over mutual TLS. Real openssl certificates
(scripts/make-certs.sh); other hosts are network namespaces (testing/cluster.py)."""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import urllib.error
from pathlib import Path

import aiohttp
import pytest

from netstatd.testing.agent import AgentProcess
from netstatd.testing.cluster import Cluster, in_netns
from netstatd.testing.stream import StreamClient
from tests.conftest import require_root, wait_until

REPO = Path(__file__).resolve().parents[2]
TOKEN = "alice-0123456789abcdef0123456789"
CONNECT = "import socket,sys;socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=2).close()"

pytestmark = pytest.mark.timeout(180)


def make_certs(directory: Path, *sans: str) -> Path:
    args = [x for san in sans for x in ("--san", san)]
    subprocess.run([str(REPO / "scripts/make-certs.sh"), str(directory), *args], check=True, capture_output=True)
    return directory


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


def secured_args(certs: Path, tokens: Path) -> list[str]:
    return [
        "--auth-token-file", str(tokens),
        "--tls-cert-file", str(certs / "tls.crt"),
        "--tls-key-file", str(certs / "tls.key"),
    ]  # fmt: skip


def fingerprint(host: str, port: int, ca: Path) -> str:
    """SHA-256 of the certificate a new TLS connection is given (checked against the CA)."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, port), timeout=5) as raw, context.wrap_socket(raw, server_hostname=host) as s:
        return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()


def test_the_default_listens_on_loopback_only_and_an_exposed_address_is_warned_about(tmp_path):
    require_root()
    with Cluster(2) as c:
        node, other = c.nodes
        default = AgentProcess(prefix=c.agent_cmd_prefix(node), log_path=tmp_path / "default.log")
        with in_netns(node.netns_path):
            default.start()
        try:
            ports = [default.port, default.mux_port, default.dnstap_port, default.dnstap_mux_port]
            for port in ports:  # from the other host: nothing answers, on any port
                r = other.run("python3", "-c", CONNECT, node.ipv4, str(port), check=False)
                assert "ConnectionRefusedError" in r.stderr, (port, r.stderr)
            with in_netns(node.netns_path):  # on the node itself, it serves
                assert b"ok" in default.get("/healthz")
            assert "without authentication" not in default.log_text()
        finally:
            default.stop()

        exposed = c.agent(0)  # --listen-address NODE_IP, no authentication
        c.start_agents([exposed])
        warnings = [line for line in exposed.log_text().splitlines() if " WARNING " in line]
        said = [line for line in warnings if "without authentication" in line]
        assert len(said) == 1 and node.ipv4 in said[0] and "--auth-token-file" in said[0], warnings
        r = other.run("python3", "-c", CONNECT, node.ipv4, str(exposed.port), check=False)
        assert r.returncode == 0, r.stderr


def test_tls_and_a_token_protect_every_port_and_files_are_reread_while_clients_stay(tmp_path, certs):
    require_root()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{TOKEN}\n")
    live = tmp_path / "live"  # the agent's files: replaced below as a Secret update would
    live.mkdir()
    for name in ("tls.crt", "tls.key"):
        shutil.copy(certs / name, live / name)
    agent = AgentProcess(
        "--loopback",
        "--listen-address", "127.0.0.1",
        *secured_args(live, tokens),
        token=TOKEN,
        ca_file=str(certs / "ca.crt"),
        log_path=tmp_path / "agent.log",
    )  # fmt: skip
    with agent:
        # wss with the CA and the token
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        stream = StreamClient(agent.ws_url, headers=agent.headers, ssl_context=ctx).start()
        try:
            stream.wait_snapshot()
            # no token: refused on the node port and the mux port, upgrade or not
            for url in (agent.url, agent.mux_url):
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib_get(url + "/api/containers", ctx)
                assert e.value.code == 401
            with pytest.raises(aiohttp.WSServerHandshakeError) as e2:
                StreamClient(agent.ws_url, ssl_context=ctx).start()
            assert e2.value.status == 401
            # plain ws to the TLS port fails
            with pytest.raises((aiohttp.ClientError, ConnectionError, TimeoutError)):
                StreamClient(f"ws://127.0.0.1:{agent.port}/netstat", headers=agent.headers).start(timeout=5)

            # a new certificate from the same CA (cert-manager renewing it) while the client is connected
            before = fingerprint("127.0.0.1", agent.port, certs / "ca.crt")
            renewed = tmp_path / "renewed"
            renewed.mkdir()
            for name in ("ca.crt", "ca.key"):  # make-certs.sh issues from the CA already in the folder
                shutil.copy(certs / name, renewed / name)
            make_certs(renewed)
            for name in ("tls.key", "tls.crt"):
                (live / f".{name}").write_bytes((renewed / name).read_bytes())
                (live / f".{name}").replace(live / name)
            wait_until(
                lambda: fingerprint("127.0.0.1", agent.port, certs / "ca.crt") != before, what="the new certificate"
            )
            assert fingerprint("127.0.0.1", agent.mux_port, certs / "ca.crt") != before
            # the client connected before the renewal still gets live events
            with socket.create_server(("127.0.0.1", 0)) as server:
                port = server.getsockname()[1]
                socket.create_connection(("127.0.0.1", port)).close()
                stream.wait_for(lambda e: e.get("type") == "connection.event" and e.get("localPort") == port)
            assert not stream.closed.is_set()
            assert agent.metric("netstatd_tls_reloads_total") >= 1

            # a token added to the file works without a restart; a removed one stops working
            tokens.write_text(f"bob:{TOKEN}-bob\n")
            bob = AgentProcess(port=agent.port, token=f"{TOKEN}-bob", ca_file=str(certs / "ca.crt"))
            wait_until(lambda: _works(bob), what="the new token")
            assert not _works(agent)
            stream.closed.wait(10)  # the stream alice opened is closed: her token is gone
            assert stream.closed.is_set() and bob.metric("netstatd_clients_revoked_total") == 1
        finally:
            stream.stop()


def urllib_get(url: str, ctx: ssl.SSLContext) -> bytes:
    import urllib.request

    return urllib.request.urlopen(url, timeout=5, context=ctx).read()


def _works(agent: AgentProcess) -> bool:
    try:
        agent.get("/api/whoami")
        return True
    except urllib.error.HTTPError:
        return False


def test_the_mux_reaches_its_peers_with_its_client_certificate_and_one_without_is_refused(tmp_path, certs):
    require_root()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{TOKEN}\n")
    peer_flags = ["--peer-ca-file", str(certs / "ca.crt")]
    with Cluster(3) as c:
        c.set_records([n.ipv4 for n in c.nodes[:2]])
        full = [*secured_args(certs, tokens), *peer_flags, "--peer-cert-file", str(certs / "tls.crt")]
        full += ["--peer-key-file", str(certs / "tls.key")]
        agents = [c.agent(i, *full) for i in range(2)]
        # the third has the CA (it checks agents) but no client certificate to show them
        agents.append(c.agent(2, *secured_args(certs, tokens), *peer_flags))
        for a in agents:
            a.token, a.ssl = TOKEN, ssl.create_default_context(cafile=str(certs / "ca.crt"))
            a.ssl.check_hostname = False  # reached by node IP; the agents check each other by name
        c.start_agents(agents)
        with in_netns(c.switch.netns_path):
            merged = StreamClient(agents[0].mux_ws_url, headers=agents[0].headers, ssl_context=agents[0].ssl).start()
            refused = StreamClient(agents[2].mux_ws_url, headers=agents[2].headers, ssl_context=agents[2].ssl).start()
        try:
            for i in range(2):
                merged.wait_for(
                    lambda e, i=i: e["type"] == "peer.status" and e.get("nodeName") == f"node-{i}"
                    and e["status"] == "connected",
                    timeout=20,
                )  # fmt: skip
            status = refused.wait_for(
                lambda e: e["type"] == "peer.status" and e["status"] == "reconnecting" and "401" in e.get("error", ""),
                timeout=20,
            )
            assert "--peer-cert-file" in status["error"]
            assert not refused.matching(lambda e: e["type"] == "peer.status" and e["status"] == "connected")
        finally:
            merged.stop()
            refused.stop()
