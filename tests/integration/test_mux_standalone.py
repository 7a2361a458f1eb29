"""`netstatd mux`: the cluster-wide view as its own process, run as `nobody` with no capability, and an
agent with `--http-mux-port 0`, which serves no multiplexer."""

from __future__ import annotations

import socket

import pytest

from netstatd.testing.agent import MuxProcess, process_status
from netstatd.testing.stream import StreamClient
from tests.conftest import own_agent

pytestmark = pytest.mark.timeout(90)

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--bounding-set=-all")


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    yield from own_agent(tmp_path_factory, "--loopback", "--http-mux-port", "0")


def test_the_agent_serves_no_multiplexer_with_port_zero(agent):
    assert "netstatd_mux_" not in agent.metrics()
    assert "multiplexer" not in agent.log_text()


def test_the_standalone_mux_streams_the_agents_as_nobody(agent, tmp_path):
    mux = MuxProcess(agents_port=agent.port, prefix=NOBODY, log_path=tmp_path / "mux.log")
    with mux, StreamClient(mux.ws_url) as client:
        fields = process_status(mux.proc.pid)
        assert fields["Uid"].split()[:2] == ["65534", "65534"]
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0

        client.wait_snapshot()
        node = socket.gethostname()
        connected = client.wait_for(lambda e: e["type"] == "peer.status" and e["status"] == "connected", timeout=20)
        assert connected["nodeName"] == node
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            socket.create_connection(("127.0.0.1", port)).close()
            event = client.wait_for(lambda e: e["type"] == "connection.event" and e.get("localPort") == port)
        assert event["nodeName"] == node
        assert 'netstatd_mux_peers{status="connected"}' in mux.metrics()


def test_the_standalone_mux_refuses_port_zero(agent, tmp_path):
    mux = MuxProcess("--http-mux-port", "0", agents_port=agent.port, prefix=NOBODY)
    with pytest.raises(RuntimeError, match="netstatd mux serves --http-mux-port"):
        mux.start(timeout=10)
