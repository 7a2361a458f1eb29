"""Test hosts: network namespaces joined by veth, for tests and benchmarks.

Traffic stays between namespaces this module creates (private addresses
inside them only). Everything is removed by close(), also after a failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from dataclasses import dataclass, field

# `python -c HOLD_CONNECTIONS server ADDR N BYTES` / `... client ADDR N BYTES PORT`: N TCP connections
# held open, each client having sent BYTES; prints "ready PORT" (the client: "ready 0") once all are up,
# then holds them until its stdin closes.
HOLD_CONNECTIONS = """
import socket, sys
role, addr, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
held = []
if role == "server":
    s = socket.socket()
    s.bind((addr, 0))
    s.listen(4096)
    print("ready", s.getsockname()[1], flush=True)
    while len(held) < n:
        c, _ = s.accept()
        need = size
        while need:
            need -= len(c.recv(need))
        held.append(c)
else:
    for _ in range(n):
        c = socket.create_connection((addr, int(sys.argv[5])))
        c.sendall(b"x" * size)
        held.append(c)
    print("ready 0", flush=True)
sys.stdin.read()
"""


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@dataclass
class Host:
    name: str  # `ip netns` name
    ipv4: str
    ipv6: str

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def netns_inode(self) -> int:
        return os.stat(self.netns_path).st_ino

    def cmd(self, *argv: str) -> list[str]:
        """argv run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*argv), **kw)

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("check", True)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(*argv), **kw)


@dataclass
class HostPair:
    """Two namespaces, a and b, joined by one veth pair (IPv4 and IPv6)."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: int = 0  # third octet, so parallel pairs do not collide

    def __post_init__(self) -> None:
        n = self.subnet or (int(self.tag, 16) % 200 + 20)
        self.a = Host(f"nsd-a-{self.tag}", f"10.231.{n}.1", f"fd42:231:{n:x}::1")
        self.b = Host(f"nsd-b-{self.tag}", f"10.231.{n}.2", f"fd42:231:{n:x}::2")
        self._created: list[str] = []

    def open(self) -> HostPair:
        try:
            for h in (self.a, self.b):
                sh("ip", "netns", "add", h.name)
                self._created.append(h.name)
                sh("ip", "-n", h.name, "link", "set", "lo", "up")
            va, vb = f"va{self.tag}", f"vb{self.tag}"
            sh("ip", "link", "add", va, "netns", self.a.name, "type", "veth", "peer", "name", vb, "netns", self.b.name)
            for h, dev in ((self.a, va), (self.b, vb)):
                sh("ip", "-n", h.name, "addr", "add", f"{h.ipv4}/24", "dev", dev)
                sh("ip", "-n", h.name, "addr", "add", f"{h.ipv6}/64", "dev", dev, "nodad")
                sh("ip", "-n", h.name, "link", "set", dev, "up")
            # Ephemeral ports and TIME_WAIT reuse for high connection churn.
            for h in (self.a, self.b):
                h.run("sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65000")
                h.run("sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")
        except Exception:
            self.close()
            raise
        return self

    def close(self) -> None:
        for name in self._created:
            # kill anything left inside, then the namespace (the veth goes with it)
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._created.clear()

    def __enter__(self) -> HostPair:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()
