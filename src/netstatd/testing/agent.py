"""Runs the real `netstatd` binary as a subprocess for tests and benchmarks."""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range.

    A port the kernel hands out (bind to 0) is in the ephemeral range, where any outgoing connection
    made meanwhile (a browser, a churn test) may take it before the agent binds it.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below the ephemeral range (from {low})")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def isolated_args() -> list[str]:
    """For running the binary directly in a test: free ports for every listener but --http-port (no
    collision with another agent), and peers looked up as localhost (no DNS query leaves the machine)."""
    ports = [x for flag in ("--http-mux-port", "--dnstap-port", "--dnstap-mux-port") for x in (flag, str(free_port()))]
    return [*ports, "--fanout-service", "localhost"]


def netstatd_binary() -> str:
    beside = Path(sys.executable).with_name("netstatd")
    return str(beside) if beside.exists() else (shutil.which("netstatd") or "netstatd")


class AgentProcess:
    """`netstatd --http-port PORT ARGS...`; start() waits until it serves /metrics."""

    def __init__(
        self,
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        prefix: Sequence[str] = (),
        host: str = "127.0.0.1",
        token: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        """prefix: argv run before netstatd (e.g. entering a test host's netns); host: where it is reached;
        token: sent as a bearer token (the agent has --auth-token-file); ca_file: the agent serves TLS
        (--tls-cert-file) with a certificate from this CA."""
        self.port = port or free_port()
        self.host = host
        self.token = token
        self.ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        # Free ports for the other listeners too, so several agents can run side by side.
        self.dnstap_port = free_port()
        self.dnstap_mux_port = free_port()
        self.mux_port = int(args[args.index("--http-mux-port") + 1]) if "--http-mux-port" in args else free_port()
        defaults = {
            "--dnstap-port": self.dnstap_port,
            "--dnstap-mux-port": self.dnstap_mux_port,
            "--http-mux-port": self.mux_port,
        }
        extra = [x for flag, p in defaults.items() if flag not in args for x in (flag, str(p))]
        self.args = [*prefix, netstatd_binary(), "--http-port", str(self.port), *extra, *args]
        # The multiplexer looks its peers up every 5 s: "localhost" resolves from /etc/hosts, so a test
        # agent never queries the machine's DNS server (tests talk to no other address).
        self.env = {"FANOUT_SERVICE": "localhost", **os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def scheme(self) -> str:
        return "https" if self.ssl else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{self.scheme.replace('http', 'ws')}://{self.host}:{self.port}/netstat"

    @property
    def mux_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.mux_port}"

    @property
    def mux_ws_url(self) -> str:
        return f"{self.scheme.replace('http', 'ws')}://{self.host}:{self.mux_port}/netstat"

    @property
    def headers(self) -> dict[str, str]:
        """What a client of this agent sends: its token, if it has one."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str, timeout: float = 5) -> bytes:
        """GET path with this agent's credentials (urllib raises HTTPError for a refusal)."""
        request = urllib.request.Request(self.url + path, headers=self.headers)
        return urllib.request.urlopen(request, timeout=timeout, context=self.ssl).read()

    def start(self, timeout: float = 20) -> AgentProcess:
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"netstatd exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                body = self.get("/metrics", timeout=1).decode()
                if "netstatd_build_info" in body and self.seeded():
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"netstatd did not start within {timeout}s: {self.log_text()[-2000:]}")

    def seeded(self) -> bool:
        return "seeded" in self.log_text() if self.log_path else True

    def metrics(self) -> str:
        return self.get("/metrics").decode()

    def metric(self, name: str) -> float:
        """Sum of every sample of `name` (any labels)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self) -> int | None:
        stop_process(self.proc)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None
        return self.proc.returncode if self.proc else None

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
