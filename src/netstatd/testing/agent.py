"""Runs the real `netstatd` binary as a subprocess for tests and benchmarks."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

_given: set[int] = set()  # every port free_port() handed out in this process
_given_lock = threading.Lock()  # cluster.start_agents() starts agents (and their retries) in threads


def free_port() -> int:
    """A port nothing holds (TCP or UDP, IPv4 or IPv6), below the kernel's ephemeral range, and never
    one handed out before in this process.

    A port the kernel hands out (bind to 0) is in the ephemeral range, where any outgoing connection
    made meanwhile (a browser, a churn test) may take it before the agent binds it. Remembering what
    was handed out keeps two listeners of one agent, or two servers of one test, from being given the
    same port between the check and the bind. Another process can still take it in between:
    AgentProcess.start() retries with a fresh port when the agent says its port is in use.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    with _given_lock:
        for _ in range(200):
            port = random.randrange(max(1024, low - 12000), low)
            if port in _given or not _port_is_free(port):
                continue
            _given.add(port)
            return port
    raise RuntimeError(f"no free port below the ephemeral range (from {low}) after 200 tries")


def _port_is_free(port: int) -> bool:
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            try:
                s = socket.socket(family, kind)
            except OSError:
                continue  # no IPv6 here: nothing can hold the port there
            with s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 is checked apart
                try:
                    s.bind((address, port))
                except OSError as e:
                    if e.errno != errno.EADDRNOTAVAIL:  # IPv6 disabled: not a holder
                        return False
    return True


# The agent's one-line start-up error for a listener port it cannot bind (listen.py, the DNSTap collector).
_PORT_IN_USE = re.compile(r"\bport (\d+) is already in use")
PORT_RETRIES = 3


def port_in_use(log: str) -> int | None:
    """The port an agent's start-up error names as already in use, if that is why it exited."""
    found = _PORT_IN_USE.findall(log)
    return int(found[-1]) if found else None


def process_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as field -> value (Uid, CapEff, CapBnd, Seccomp, NoNewPrivs, VmRSS, ...)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


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
        self.host = host
        self.token = token
        self.ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._prefix = list(prefix)
        self._extra_args = list(args)
        # Free ports for every listener the caller did not give, so several agents can run side by side.
        # Those chosen here are replaced when the agent finds one taken (start()).
        self._chosen: set[str] = set()
        self.port = port or self._choose("port")
        self.mux_port = self._given_or_chosen("--http-mux-port", "mux_port")
        self.dnstap_port = self._given_or_chosen("--dnstap-port", "dnstap_port")
        self.dnstap_mux_port = self._given_or_chosen("--dnstap-mux-port", "dnstap_mux_port")
        self.args: list[str] = []
        self._build_args()
        # The multiplexer looks its peers up every 5 s: "localhost" resolves from /etc/hosts, so a test
        # agent never queries the machine's DNS server (tests talk to no other address).
        self.env = {"FANOUT_SERVICE": "localhost", **os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def _choose(self, attr: str) -> int:
        self._chosen.add(attr)
        return free_port()

    def _given_or_chosen(self, flag: str, attr: str) -> int:
        args = self._extra_args
        return int(args[args.index(flag) + 1]) if flag in args else self._choose(attr)

    def _build_args(self) -> None:
        chosen = {
            "--dnstap-port": "dnstap_port",
            "--dnstap-mux-port": "dnstap_mux_port",
            "--http-mux-port": "mux_port",
        }
        extra = [x for flag, attr in chosen.items() if attr in self._chosen for x in (flag, str(getattr(self, attr)))]
        self.args = [*self._prefix, netstatd_binary(), "--http-port", str(self.port), *extra, *self._extra_args]

    def _replace_port(self, taken: int) -> bool:
        """A fresh port for the listener that found `taken` in use. False when the caller gave that port:
        retrying cannot help then."""
        for attr in ("port", "mux_port", "dnstap_port", "dnstap_mux_port"):
            if attr in self._chosen and getattr(self, attr) == taken:
                setattr(self, attr, free_port())
                self._build_args()
                return True
        return False

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
        """Start the agent and wait until it serves /metrics (and, with a log, has seeded). When it
        exits because one of the ports chosen here was taken meanwhile (by another process, between
        free_port()'s check and the agent's bind), start again on a fresh port, PORT_RETRIES times."""
        retries = 0
        while (taken := self._launch(timeout)) is not None:
            text = self.log_text()
            self._close_log()
            if retries == PORT_RETRIES or not self._replace_port(taken):
                raise RuntimeError(f"netstatd exited with {self.proc.returncode}: {text[-2000:]}")
            retries += 1
            print(f"netstatd: port {taken} was taken before the agent bound it; retrying on a fresh port")
        return self

    def _launch(self, timeout: float) -> int | None:
        """One start: None once it serves, the port it named when it exited for a port in use."""
        # The output is kept (in a temporary file without log_path) to tell a port in use from any
        # other start-up error. Truncated at each start: a retry's log is its own.
        self._log = open(self.log_path, "wb") if self.log_path else tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log_text()
                taken = port_in_use(text)
                if taken is not None:
                    return taken
                self._close_log()
                raise RuntimeError(f"netstatd exited with {self.proc.returncode}: {text[-2000:]}")
            try:
                body = self.get("/metrics", timeout=1).decode()
                if "netstatd_build_info" in body and self.seeded():
                    return None
            except OSError:
                pass
            time.sleep(0.1)
        text = self.log_text()
        self.stop()
        raise RuntimeError(f"netstatd did not start within {timeout}s: {text[-2000:]}")

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
        """The agent's output: the log file, else (until stop()) the temporary file it writes to."""
        if self.log_path:
            return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if self._log is None:
            return ""
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> int | None:
        stop_process(self.proc)
        self._close_log()
        return self.proc.returncode if self.proc else None

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MuxProcess(AgentProcess):
    """`netstatd mux --http-port AGENTS_PORT --http-mux-port PORT ARGS...`: the standalone multiplexer.
    start() waits until it serves /metrics on its own port; url, ws_url and get() are that port's."""

    def __init__(self, *args: str, agents_port: int, **kwargs: Any) -> None:
        super().__init__(*args, port=agents_port, **kwargs)  # --http-port: where its peers listen

    def _build_args(self) -> None:
        super()._build_args()
        self.args.insert(len(self._prefix) + 1, "mux")  # right after the binary

    @property
    def url(self) -> str:
        return self.mux_url

    @property
    def ws_url(self) -> str:
        return self.mux_ws_url

    def seeded(self) -> bool:
        return True  # nothing to seed
