"""Real DNS servers that send DNSTap, for tests and benchmarks (no internet needed).

`Zone` is served by a backend unbound. `Resolver` is a second unbound that
forwards everything to it and sends DNSTap: a static local zone does not
follow its own CNAMEs, a resolver in front of it does, so answers carry
whole chains as they do in a cluster. It can also fail: NXDOMAIN for its own
`nxdomain` zones, SERVFAIL for `dead` zones, forwarded to a loopback port
where nothing ever answers. `Dnsdist` sits in front of the
resolver with a packet cache and one self-answered name, and logs all
three kinds of response over a Frame Streams TCP logger. `client_response`
builds one DNSTap message by hand, for senders written in a test.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import dns.message
import dns.query
import dns.rdatatype
import dns.rrset

from ..sources.dnstap.protos import dnstap_pb2 as pb
from .agent import free_port, stop_process


def _wait_answering(address: str, port: int, name: str, proc: subprocess.Popen, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            dns.query.udp(dns.message.make_query(name, "A"), address, port=port, timeout=0.5)
            return
        except (dns.exception.Timeout, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer on {address}:{port} within {timeout}s")


class _Daemon:
    """A server process in the foreground, its config in a temporary directory."""

    binary = ""

    def __init__(self, address: str = "127.0.0.1", port: int = 0) -> None:
        self.address = address
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"netstatd-{self.binary}-"))
        self.proc: subprocess.Popen | None = None
        self._log: BinaryIO | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> _Daemon:
        if shutil.which(self.binary) is None:
            raise RuntimeError(f"{self.binary} is not installed (make test installs it)")
        # appended to, so a restart keeps the earlier log; closed in stop()
        self._log = open(self.dir / "log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir)
        _wait_answering(self.address, self.port, "check.netstatd.test.", self.proc, self.binary)
        return self

    def stop(self) -> None:
        stop_process(self.proc, 5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        path = self.dir / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def query(self, name: str, rdtype: str = "A", source: str | None = None) -> dns.message.Message:
        """source: the client's address (another loopback address, e.g. 127.0.0.2, is another client)."""
        query = dns.message.make_query(name, rdtype)
        return dns.query.udp(query, self.address, port=self.port, timeout=3, source=source)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop it and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_UNBOUND_COMMON = """server:
    interface: {address}@{port}
    port: {port}
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    access-control: 10.0.0.0/8 allow
    module-config: "iterator"
    num-threads: 1
"""


class Zone(_Daemon):
    """unbound answering `records` (lines like 'a.netstatd.test. 300 IN A 10.0.0.1') for netstatd.test
    and the other `zones`, on address:port (127.0.0.1 and a free port unless given)."""

    binary = "unbound"

    def __init__(self, records: list[str], zones: tuple[str, ...] = (), address: str = "127.0.0.1", port: int = 0):
        super().__init__(address, port)
        self.records = ["check.netstatd.test. 60 IN A 10.231.250.250", *records]
        self.zones = ("netstatd.test.", *zones)

    def command(self) -> list[str]:
        conf = _UNBOUND_COMMON.format(address=self.address, port=self.port, dir=self.dir)
        conf += "".join(f'    local-zone: "{zone}" static\n' for zone in self.zones)
        conf += "".join(f'    local-data: "{r}"\n' for r in self.records)
        (self.dir / "unbound.conf").write_text(conf)
        return ["unbound", "-d", "-c", str(self.dir / "unbound.conf")]


class Resolver(_Daemon):
    """unbound resolving through `zone`, sending DNSTap CLIENT_RESPONSE to 127.0.0.1:dnstap_port.

    log_queries: CLIENT_QUERY too (unbound's responses carry no query time: the collector takes it from
    them). nxdomain: zones it answers NXDOMAIN itself. dead: zones forwarded to a UDP socket of this
    object's that never answers (so nothing else can take its port), with unbound's upstream timeouts
    shortened: SERVFAIL after about 0.1 s."""

    binary = "unbound"

    def __init__(
        self,
        zone: Zone,
        dnstap_port: int,
        *,
        log_queries: bool = False,
        nxdomain: tuple[str, ...] = (),
        dead: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.zone = zone
        self.dnstap_port = dnstap_port
        self.log_queries = log_queries
        self.nxdomain = nxdomain
        self.dead = dead
        self._black_hole: socket.socket | None = None
        if dead:
            self._black_hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._black_hole.bind(("127.0.0.1", 0))

    def command(self) -> list[str]:
        conf = _UNBOUND_COMMON.format(address=self.address, port=self.port, dir=self.dir)
        conf += '    do-not-query-localhost: no\n    local-zone: "test." nodefault\n'
        conf += "".join(f'    local-zone: "{z}" always_nxdomain\n' for z in self.nxdomain)
        if self._black_hole is not None:
            # one try, 50 ms for a server with no RTT known yet (default: 5 tries, 376 ms)
            conf += "    outbound-msg-retry: 1\n    unknown-server-time-limit: 50\n"
            dead_port = self._black_hole.getsockname()[1]
            conf += "".join(
                f'forward-zone:\n    name: "{z}"\n    forward-addr: 127.0.0.1@{dead_port}\n' for z in self.dead
            )
        conf += f"""forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{self.zone.port}
dnstap:
    dnstap-enable: yes
    dnstap-ip: "127.0.0.1@{self.dnstap_port}"
    dnstap-tls: no
    dnstap-bidirectional: yes
    dnstap-send-identity: yes
    dnstap-log-client-response-messages: yes
"""
        if self.log_queries:
            conf += "    dnstap-log-client-query-messages: yes\n"
        (self.dir / "unbound.conf").write_text(conf)
        return ["unbound", "-d", "-c", str(self.dir / "unbound.conf")]

    def close(self) -> None:
        super().close()
        if self._black_hole is not None:
            self._black_hole.close()


class Dnsdist(_Daemon):
    """dnsdist in front of `backend` with a packet cache; `self_answered` names are spoofed to an address."""

    binary = "dnsdist"

    def __init__(self, backend: _Daemon, dnstap_port: int, self_answered: dict[str, str]) -> None:
        super().__init__()
        self.backend = backend
        self.dnstap_port = dnstap_port
        self.self_answered = self_answered

    def command(self) -> list[str]:
        spoofs = "".join(f'addAction(QNameRule("{n}"), SpoofAction("{ip}"))\n' for n, ip in self.self_answered.items())
        conf = f"""setSecurityPollSuffix("")
setLocal("127.0.0.1:{self.port}")
newServer({{address="127.0.0.1:{self.backend.port}", checkName="check.netstatd.test."}})
getPool(""):setCache(newPacketCache(1000))
tap = newFrameStreamTcpLogger("127.0.0.1:{self.dnstap_port}")
addResponseAction(AllRule(), DnstapLogResponseAction("dnsdist", tap))
addCacheHitResponseAction(AllRule(), DnstapLogResponseAction("dnsdist", tap))
addSelfAnsweredResponseAction(AllRule(), DnstapLogResponseAction("dnsdist", tap))
{spoofs}"""
        (self.dir / "dnsdist.conf").write_text(conf)
        return ["dnsdist", "--supervised", "--disable-syslog", "-C", str(self.dir / "dnsdist.conf")]


def answer_addresses(msg: dns.message.Message) -> list[str]:
    """The A/AAAA addresses in a response (what the test expects the collector to learn)."""
    return [rd.address for rrset in msg.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rd in rrset]


def client_response(qname: str, address: str, client_ip: str = "10.0.0.9", ttl: int = 60) -> bytes:
    """A serialized dnstap CLIENT_RESPONSE: `qname` answered with one A or AAAA record `address`."""
    rdtype = "AAAA" if ":" in address else "A"
    answer = dns.message.make_response(dns.message.make_query(qname, rdtype))
    answer.answer.append(dns.rrset.from_text(qname, ttl, "IN", rdtype, address))
    message = pb.Message(
        type=pb.Message.CLIENT_RESPONSE,
        query_address=ipaddress.ip_address(client_ip).packed,
        response_message=answer.to_wire(),
    )
    return pb.Dnstap(type=pb.Dnstap.MESSAGE, message=message).SerializeToString()
