"""Traffic between containers and the host for the container tests: a host-side TCP server, and the
events of a connection made to it from inside a container."""

from __future__ import annotations

import json
import socket
import threading

from netstatd.testing.agent import AgentProcess, free_port
from netstatd.testing.stream import StreamClient


class Server:
    """A TCP server on a host address (the pod bridge's, a veth's) that accepts and closes at once."""

    def __init__(self, ip: str) -> None:
        self.ip, self.port = ip, free_port()
        self.sock = socket.create_server((ip, self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        self.sock.close()

    def client_script(self) -> str:
        """Shell that connects to this server every half second.

        It waits 1 s first: a connection made in the first milliseconds of a container can beat
        containerd's TaskStart event to the agent and carry the pod and its container id (from the
        cgroup) but not yet the container's name (docs/protocol.md, "Owner"); these tests check
        steady-state attribution.
        """
        return f"sleep 1; while true; do echo hi | nc {self.ip} {self.port}; sleep 0.5; done"

    def client_loop(self) -> list[str]:
        """A container command running client_script()."""
        return ["sh", "-c", self.client_script()]


def connection_events(stream: StreamClient, server: Server) -> list[dict]:
    """Every event of the first container-side connection to server, once it has closed."""

    def client_side(e: dict) -> bool:
        return e["type"] == "connection.event" and e["remoteIP"] == server.ip and e["remotePort"] == server.port

    cookie = stream.wait_for(client_side, timeout=10)["sockCookie"]
    stream.wait_for(lambda e: client_side(e) and e["sockCookie"] == cookie and e["state"] == "CLOSE", timeout=5)
    return [e for e in stream.matching(client_side) if e["sockCookie"] == cookie]


def api(agent: AgentProcess, query: str = "") -> list[dict]:
    """GET /api/containers (with ?namespace=&podName= as query)."""
    return json.loads(agent.get(f"/api/containers{query}"))
