"""testing/agent.py: free_port() never hands out a port twice or one something holds, and AgentProcess
retries with a fresh port when the agent exits because a port chosen for it was taken meanwhile.

The retry is checked with a stand-in for the binary (AgentProcess's `prefix` runs it in front of the
netstatd path): a few lines of Python that bind the ports it is given and exit with the agent's
own one-line error when one is taken. tests/integration/test_agent_lifecycle.py does the same with the
real agent (root)."""

from __future__ import annotations

import errno
import random
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from netstatd.listen import serve_http
from netstatd.sources.dnstap.collector import DnstapCollector
from netstatd.testing import agent as agent_mod
from netstatd.testing.agent import PORT_RETRIES, AgentProcess, free_port, port_in_use

pytestmark = pytest.mark.timeout(60)

EPHEMERAL_LOW = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])

STAND_IN = r"""
import os, socket, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[2:]  # after the netstatd path: "--flag value" pairs
flags = dict(zip(args[::2], args[1::2]))
with open(os.environ["STAND_IN_STARTS"], "a") as f:
    f.write(" ".join(args) + "\n")
held = []
for flag in ("--http-port", "--http-mux-port", "--dnstap-port", "--dnstap-mux-port"):
    port = int(flags[flag])
    s = socket.socket()
    try:
        if flag == os.environ.get("STAND_IN_BUSY"):
            raise OSError(98, "always busy")
        s.bind(("127.0.0.1", port))
        s.listen()
    except OSError:
        if "dnstap" in flag:
            line = f"cannot start the DNSTap collector: DNSTap port {port} is already in use (pass {flag})"
        else:
            line = f"port {port} is already in use (another netstatd?): stop it or pass {flag}"
        print(f"2026-01-01T00:00:00.000Z ERROR netstatd: {line}", flush=True)
        sys.exit(1)
    held.append(s)
held[0].close()  # served below


class Metrics(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"netstatd_build_info 1\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(flags["--http-port"])), Metrics).serve_forever()
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> dict:
    """AgentProcess keyword arguments that run the stand-in; `starts` lists the arguments of each start."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    starts = tmp_path / "starts"
    starts.touch()
    return {"prefix": [sys.executable, str(script)], "env": {"STAND_IN_STARTS": str(starts)}, "starts": starts}


def started(stand_in: dict) -> list[str]:
    return stand_in["starts"].read_text().splitlines()


def a_port_nobody_was_given(kind: int = socket.SOCK_STREAM) -> int:
    """A port below the ephemeral range that free_port() has not handed out (it remembers what it gave)."""
    for port in range(EPHEMERAL_LOW - 1, 1024, -1):
        if port not in agent_mod._given and agent_mod._port_is_free(port):
            return port
    raise RuntimeError("no port")


@pytest.fixture
def first_pick(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Ports appended here are what free_port() draws first, in order; then it draws at random again."""
    queue: list[int] = []
    real = random.randrange

    def randrange(*args: int) -> int:
        return queue.pop(0) if queue else real(*args)

    monkeypatch.setattr(agent_mod.random, "randrange", randrange)
    yield queue


# -- free_port() ----------------------------------------------------------------------------------


def test_free_port_never_hands_out_a_port_twice():
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < EPHEMERAL_LOW for p in ports)


def test_free_port_skips_a_port_it_gave_before_even_when_it_is_free_again(first_pick):
    given = free_port()  # nobody binds it: free by every check but the memory
    first_pick.extend([given] * 5)
    again = free_port()
    assert again != given
    assert not first_pick  # it drew `given` five times and passed it over each time


@pytest.mark.parametrize(
    ("family", "kind", "address"),
    [
        (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
        (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
        (socket.AF_INET6, socket.SOCK_STREAM, "::1"),
        (socket.AF_INET6, socket.SOCK_DGRAM, "::1"),
    ],
    ids=["tcp4", "udp4", "tcp6", "udp6"],
)
def test_free_port_skips_a_port_something_holds(first_pick, family, kind, address):
    port = a_port_nobody_was_given()
    with socket.socket(family, kind) as holder:
        if family == socket.AF_INET6:
            holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        holder.bind((address, port))
        first_pick.append(port)
        assert free_port() != port


# -- the agent's start-up error -------------------------------------------------------------------


async def test_the_agents_own_port_in_use_errors_name_the_port():
    """The messages AgentProcess recognises, from the code that writes them (listen.py, the collector)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError) as http:
            await serve_http(web.Application(), ["127.0.0.1"], port, None, "--http-mux-port")
        with pytest.raises(OSError) as dnstap:
            await DnstapCollector(print).start({"node": port}, hosts=["127.0.0.1"])
    for e in (http.value, dnstap.value):
        assert e.errno == errno.EADDRINUSE
        assert port_in_use(f"2026-01-01T00:00:00.000Z ERROR netstatd: {e.strerror}\n") == port
    assert port_in_use("ERROR netstatd: the ring buffer cannot be mapped") is None


# -- AgentProcess.start() retries -----------------------------------------------------------------


def test_start_retries_on_a_fresh_port_when_a_chosen_one_was_taken(stand_in):
    agent = AgentProcess(prefix=stand_in["prefix"], env=stand_in["env"])
    taken = agent.dnstap_port
    ports = (agent.port, agent.mux_port, agent.dnstap_mux_port)
    with socket.socket() as thief:  # another process took it between free_port() and the agent's bind
        thief.bind(("127.0.0.1", taken))
        thief.listen()
        with agent:
            assert agent.get("/metrics") == b"netstatd_build_info 1\n"
    assert len(started(stand_in)) == 2
    assert agent.dnstap_port != taken
    assert (agent.port, agent.mux_port, agent.dnstap_mux_port) == ports  # only the taken one changed
    assert agent.args[agent.args.index("--dnstap-port") + 1] == str(agent.dnstap_port)


def test_a_port_the_caller_gave_is_not_replaced(stand_in):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        given = holder.getsockname()[1]
        agent = AgentProcess("--dnstap-port", str(given), prefix=stand_in["prefix"], env=stand_in["env"])
        assert agent.dnstap_port == given
        with pytest.raises(RuntimeError, match=f"DNSTap port {given} is already in use"):
            agent.start()
    assert len(started(stand_in)) == 1


def test_retries_are_bounded(stand_in):
    env = {**stand_in["env"], "STAND_IN_BUSY": "--http-mux-port"}
    agent = AgentProcess(prefix=stand_in["prefix"], env=env)
    with pytest.raises(RuntimeError, match="is already in use"):
        agent.start()
    starts = started(stand_in)
    assert len(starts) == 1 + PORT_RETRIES
    mux_ports = [s.split()[s.split().index("--http-mux-port") + 1] for s in starts]
    assert len(set(mux_ports)) == len(mux_ports)  # a fresh one each time
