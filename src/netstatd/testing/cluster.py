"""A test cluster on one machine: N "nodes" (network namespaces) on one bridge, a DNS server listing them.

Layout (addresses in 10.233.K.0/24, a subnet no other test helper uses: hosts.py has 10.231, the
containerd pods 10.232):

  switch netns  bridge br0 with .254, unbound on .254:53 answering HEADLESS with the listed node IPs
  node netns    one veth into br0 with .1, .2, ...; the agent runs here as NODE_NAME=node-I

Agents are started with `nsenter --net` (not `ip netns exec`, which remounts /sys and so hides the
cgroup2 and tracefs mounts the agent attaches to), in a private mount namespace where the node's
resolv.conf (nameserver .254, search netstatd.test) is bind-mounted over /etc/resolv.conf: the agent's
system resolver then finds `netstatd-headless` through the search domain, as in a pod.

The test process reaches the nodes from the switch netns: `in_netns` moves only the calling thread
there, and threads it starts (a StreamClient's loop) stay there. close() removes everything, also after
a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dns.message
import dns.query

from .agent import AgentProcess
from .hosts import Host, sh

DOMAIN = "netstatd.test"
HEADLESS = "netstatd-headless"
NODE_PORT, MUX_PORT = 5280, 6280
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(path: str) -> Iterator[None]:
    """Runs the calling thread (and threads it starts meanwhile) in the network namespace at path."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(own)
        os.close(own)
        os.close(target)


class Cluster:
    """Use as a context manager. nodes[i] hosts agent i; add_host() makes one more host on the bridge."""

    def __init__(self, nodes: int = 3, tag: str | None = None) -> None:
        self.tag = tag or secrets.token_hex(3)
        self.k = int(self.tag, 16) % 200 + 20
        self.dns_ip = f"10.233.{self.k}.254"
        self.switch = Host(f"nsd-sw-{self.tag}", self.dns_ip, "")
        self.size = nodes
        self.nodes: list[Host] = []
        self.agents: dict[int, AgentProcess] = {}
        self.records: list[str] = []  # IPs HEADLESS resolves to
        self.dir = Path(tempfile.mkdtemp(prefix=f"nsd-cluster-{self.tag}-"))
        self.unbound: subprocess.Popen | None = None
        self._netns: list[str] = []
        self._procs: list[subprocess.Popen] = []

    # ---- set-up and tear-down
    def __enter__(self) -> Cluster:
        try:
            self._netns_add(self.switch.name)
            self.switch.run("ip", "link", "add", "br0", "type", "bridge")
            self.switch.run("ip", "addr", "add", f"{self.dns_ip}/24", "dev", "br0")
            self.switch.run("ip", "link", "set", "br0", "up")
            for _ in range(self.size):
                self.add_host()
            self._start_unbound()
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_host(self) -> Host:
        i = len(self.nodes)
        host = Host(f"nsd-n{i}-{self.tag}", f"10.233.{self.k}.{i + 1}", "")
        self._netns_add(host.name)
        inner, outer = f"vn{i}{self.tag}", f"vs{i}{self.tag}"
        sh(
            "ip",
            "link",
            "add",
            inner,
            "netns",
            host.name,
            "type",
            "veth",
            "peer",
            "name",
            outer,
            "netns",
            self.switch.name,
        )
        self.switch.run("ip", "link", "set", outer, "master", "br0", "up")
        host.run("ip", "addr", "add", f"{host.ipv4}/24", "dev", inner)
        host.run("ip", "link", "set", inner, "up")
        (self.dir / f"{host.name}.resolv.conf").write_text(
            f"nameserver {self.dns_ip}\nsearch {DOMAIN}\noptions timeout:1 attempts:2\n"
        )
        self.nodes.append(host)
        return host

    def _netns_add(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self._netns.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for p in [*self._procs, self.unbound]:
            if p and p.poll() is None:
                p.kill()
                p.wait()
        for name in reversed(self._netns):
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._netns.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- DNS
    def _unbound_conf(self) -> Path:
        subnet = f"10.233.{self.k}.0/24"
        conf = f"""server:
    interface: {self.dns_ip}
    port: 53
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{self.dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    do-ip6: no
    access-control: {subnet} allow
    module-config: "iterator"
    num-threads: 1
    local-zone: "{DOMAIN}." static
    # no internet: every other name is NXDOMAIN at once, as an upstream DNS server would answer
    local-zone: "." static
    local-data: "check.{DOMAIN}. 60 IN A {self.dns_ip}"
remote-control:
    control-enable: yes
    control-interface: "{self.dir}/unbound.ctl"
    control-use-cert: no
"""
        path = self.dir / "unbound.conf"
        path.write_text(conf)
        return path

    def _start_unbound(self) -> None:
        conf = self._unbound_conf()
        log = open(self.dir / "unbound.log", "wb")  # noqa: SIM115 (the daemon's for its lifetime)
        self.unbound = self.switch.popen("unbound", "-d", "-c", str(conf), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while self.lookup(f"check.{DOMAIN}.") != [self.dns_ip]:
            if self.unbound.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"unbound did not start: {(self.dir / 'unbound.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def lookup(self, name: str) -> list[str]:
        with in_netns(self.switch.netns_path), contextlib.suppress(dns.exception.Timeout, OSError):
            # over TCP when the answer is truncated (hundreds of nodes), as the resolver in a pod does
            msg, _ = dns.query.udp_with_fallback(dns.message.make_query(name, "A"), self.dns_ip, timeout=0.5)
            return sorted(rd.address for rrset in msg.answer for rd in rrset)
        return []

    def set_records(self, ips: list[str]) -> None:
        """HEADLESS resolves to exactly these IPs from now on (no restart: unbound-control)."""
        name = f"{HEADLESS}.{DOMAIN}."
        ctl = ["unbound-control", "-c", str(self.dir / "unbound.conf")]
        subprocess.run([*ctl, "local_data_remove", name], check=True, capture_output=True)
        for ip in ips:
            subprocess.run([*ctl, "local_data", f"{name} 5 IN A {ip}"], check=True, capture_output=True)
        self.records = list(ips)
        if self.lookup(name) != sorted(ips):
            raise RuntimeError(f"unbound answers {self.lookup(name)} for {name}, not {sorted(ips)}")

    def add_record(self, rr: str) -> None:
        """One more record in the cluster's zone, e.g. 'web.netstatd.test. 300 IN A 10.233.1.3'."""
        subprocess.run(
            ["unbound-control", "-c", str(self.dir / "unbound.conf"), "local_data", rr], check=True, capture_output=True
        )

    def dnstap_resolver(self, host: Host, dnstap_port: int) -> None:
        """An unbound on host's 127.0.0.1:53 resolving through the cluster DNS, sending DNSTap to
        127.0.0.1:dnstap_port there (the node's agent): as a node-local DNS cache would."""
        d = self.dir / f"resolver-{host.name}"
        d.mkdir()
        conf = f"""server:
    interface: 127.0.0.1
    port: 53
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    do-ip6: no
    module-config: "iterator"
    num-threads: 1
    local-zone: "test." nodefault
forward-zone:
    name: "."
    forward-addr: {self.dns_ip}@53
dnstap:
    dnstap-enable: yes
    dnstap-ip: "127.0.0.1@{dnstap_port}"
    dnstap-tls: no
    dnstap-log-client-response-messages: yes
"""
        (d / "unbound.conf").write_text(conf)
        log = open(d / "log", "wb")  # noqa: SIM115 (the daemon's for its lifetime)
        proc = self.popen(host, "unbound", "-d", "-c", str(d / "unbound.conf"), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while not self.resolve(host, f"check.{DOMAIN}."):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node resolver did not start: {(d / 'log').read_text()[-2000:]}")
            time.sleep(0.1)

    def resolve(self, host: Host, name: str) -> list[str]:
        """Asks host's own resolver (127.0.0.1:53 in its netns) for name's A records."""
        with in_netns(host.netns_path), contextlib.suppress(dns.exception.Timeout, OSError):
            msg = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", timeout=0.5)
            return sorted(rd.address for rrset in msg.answer for rd in rrset)
        return []

    # ---- agents
    def agent_cmd_prefix(self, host: Host) -> list[str]:
        resolv = str(self.dir / f"{host.name}.resolv.conf")
        return [
            "nsenter",
            f"--net={host.netns_path}",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            resolv,
        ]

    def agent(self, i: int, *args: str, env: dict[str, str] | None = None) -> AgentProcess:
        host = self.nodes[i]
        # reached from the switch and the other nodes (its address, said explicitly), and by a DNS
        # server on the node (loopback)
        listen = () if "--listen-address" in args else ("--listen-address", f"{host.ipv4},127.0.0.1")
        agent = AgentProcess(
            "--http-mux-port",
            str(MUX_PORT),
            *listen,
            *args,
            port=NODE_PORT,
            env={"NODE_NAME": f"node-{i}", "FANOUT_SERVICE": HEADLESS, **(env or {})},
            log_path=self.dir / f"agent-{i}.log",
            prefix=self.agent_cmd_prefix(host),
            host=host.ipv4,
        )
        self.agents[i] = agent
        return agent

    def start_agents(self, agents: list[AgentProcess], timeout: float = 30) -> None:
        """Starts agents in parallel (each loads its own programs) and waits until all serve."""

        def start(agent: AgentProcess) -> None:
            with in_netns(self.switch.netns_path):  # start() polls the agent's /metrics over the bridge
                agent.start(timeout)

        with ThreadPoolExecutor(len(agents)) as pool:
            list(pool.map(start, agents))

    def metric(self, i: int, name: str) -> float:
        with in_netns(self.switch.netns_path):
            return self.agents[i].metric(name)

    def popen(self, host: Host, *argv: str, **kw) -> subprocess.Popen:
        """A helper process inside host (killed at close())."""
        p = host.popen(*argv, **kw)
        self._procs.append(p)
        return p


# A peer that speaks garbage after a valid start, one kind per connection from the same client:
# argv: host port mode[,mode...] (modes: json, oversized, type, mux, flood; and reset, which is not garbage).
# Prints "ready" when listening.
GARBAGE_PEER = r"""
import asyncio, sys, time
from aiohttp import web

host, port, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
seen = {}

def ev(t, **kw):
    return {"type": t, "timestamp": "2026-01-01T00:00:00.000000Z", "nodeName": "fake", **kw}

async def netstat(request):
    n = seen.get(request.remote, 0)
    seen[request.remote] = n + 1
    mode = modes[n % len(modes)]
    ws = web.WebSocketResponse(max_msg_size=1 << 20)
    await ws.prepare(request)
    info = ev("host.info", hostIPs=[], version="fake")
    if mode == "mux":
        info["mux"] = True
    await ws.send_json(info)
    port_ev = ev("port.listening", protocol="TCP", family="IPv4", ip="0.0.0.0", port=9, netns=1, pid=1,
                 exe="/fake", comm="fake", sockCookie=1)
    await ws.send_json([port_ev, ev("snapshot.complete", count=1)])
    await asyncio.sleep(0.5)
    if mode == "json":
        await ws.send_str("this is not JSON")
    elif mode == "oversized":
        await ws.send_str('"' + "x" * (17 << 20) + '"')
    elif mode == "type":
        await ws.send_json(ev("bogus.type"))
    elif mode == "reset":  # a well-behaved peer that dropped events for us: a fresh snapshot follows
        fresh = dict(port_ev, port=10, sockCookie=2)
        reset = ev("stream.reset", reason="overflow", missedEvents=5)
        await ws.send_json([reset, fresh, ev("snapshot.complete", count=1)])
    elif mode == "flood":
        import orjson
        frame = orjson.dumps([ev("dns.expired", ip="10.0.0.1", hostname="x")] * 2000).decode()
        end = time.monotonic() + 20
        while not ws.closed and time.monotonic() < end:
            await ws.send_str(frame)
    async for _ in ws:
        pass
    return ws

app = web.Application()
app.router.add_get("/netstat", netstat)

async def main():
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def garbage_peer_cmd(host: str, port: int, modes: str) -> list[str]:
    return [sys.executable, "-c", GARBAGE_PEER, host, str(port), modes]
