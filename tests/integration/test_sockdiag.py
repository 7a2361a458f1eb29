"""sock_diag, rtnetlink and /proc readers against the real kernel, in a throwaway netns (root)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from netstatd import protocol
from netstatd.sources import sockdiag
from netstatd.sources.addresses import InterfaceAddress, interface_addresses
from netstatd.sources.netlink import (
    NETLINK_SOCK_DIAG,
    NetlinkError,
    dump,
    netns_inode,
    open_netlink,
    parse_attrs,
    run_in_netns,
)
from netstatd.sources.procfs import list_netns, socket_owners
from netstatd.sources.sockdiag import DiagSocket, dump_all_netns, dump_sockets
from tests.conftest import require
from tests.integration import peers

V4_PAD = bytes(12)
LO4 = socket.inet_aton("127.0.0.1") + V4_PAD
LO6 = socket.inet_pton(socket.AF_INET6, "::1")
MAPPED_LO = socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")

# Runs inside the test netns: one socket of each kind, reports ports and inodes, then
# holds them until its stdin closes.
CHILD = r"""
import json, os, socket, sys
ino = lambda s: os.fstat(s.fileno()).st_ino
l4 = socket.socket(); l4.bind(("127.0.0.1", 0)); l4.listen()
l6 = socket.socket(socket.AF_INET6); l6.bind(("::1", 0)); l6.listen()
cli = socket.create_connection(l4.getsockname()); srv, _ = l4.accept()
uc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); uc.bind(("127.0.0.1", 0)); uc.connect(("127.0.0.1", 9))
uu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); uu.bind(("127.0.0.1", 0))
um = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); um.connect(("::ffff:127.0.0.1", 9))
out = {"pid": os.getpid()}
for name, s in dict(l4=l4, l6=l6, cli=cli, srv=srv, uc=uc, uu=uu, um=um).items():
    out[name] = {"port": s.getsockname()[1], "inode": ino(s)}
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


def _require_root() -> None:
    require(os.geteuid() == 0, "needs root (ip netns add, setns)")
    require(shutil.which("ip") and shutil.which("ss"), "needs iproute2 (ip, ss)")


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A fresh named netns with lo up; deleted afterwards whatever happens."""
    _require_root()
    name = f"nstest-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


@pytest.fixture(scope="module")
def child(netns: str) -> Iterator[dict]:
    """The CHILD process running in the netns, and what it reported."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-I", "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line, f"child in {netns} exited early (rc {proc.poll()})"
        yield json.loads(line)
    finally:
        peers.stop(proc, timeout=5)


def _one(socks: list[DiagSocket], **want: object) -> DiagSocket:
    hits = [s for s in socks if all(getattr(s, k) == v for k, v in want.items())]
    assert len(hits) == 1, f"expected one socket with {want}, found {hits}"
    return hits[0]


# -- no root needed ----------------------------------------------------------


def test_parse_attrs() -> None:
    def attr(t: int, v: bytes) -> bytes:
        return (struct.pack("=HH", 4 + len(v), t) + v).ljust((4 + len(v) + 3) & ~3, b"\0")

    data = b"HEAD" + attr(3, b"lo\0") + attr(1 | 0x8000, b"\x01\x02\x03\x04\x05") + attr(7, b"")
    assert parse_attrs(data, 4) == {3: b"lo\0", 1: b"\x01\x02\x03\x04\x05", 7: b""}
    # A truncated tail keeps what parsed before it.
    assert parse_attrs(data + struct.pack("=HH", 40, 9), 4) == {3: b"lo\0", 1: b"\x01\x02\x03\x04\x05", 7: b""}


def test_netlink_error_is_oserror() -> None:
    # sock_diag for a family it does not handle: the kernel answers NLMSG_ERROR.
    req = struct.pack("=BBBxI", 255, 6, 0, 0xFFFFFFFF) + bytes(48)
    with open_netlink(NETLINK_SOCK_DIAG) as sock, pytest.raises(NetlinkError) as exc:
        list(dump(sock, sockdiag.SOCK_DIAG_BY_FAMILY, req))
    assert isinstance(exc.value, OSError) and exc.value.errno
    assert "request type 20" in str(exc.value)


def test_vanished_netns_is_skipped() -> None:
    assert dump_all_netns({12345: "/nonexistent/ns/net"}) == []


def test_stale_netns_file_is_not_listed(tmp_path: Path) -> None:
    # A plain file left in a netns dir (its mount gone) is not a namespace.
    (tmp_path / "stale").write_text("")
    assert os.stat(tmp_path / "stale").st_ino not in list_netns(netns_dirs=(str(tmp_path),))


# -- real kernel, root -------------------------------------------------------


def test_dump_finds_sockets_in_netns(netns: str, child: dict) -> None:
    ns_ino = os.stat(f"/run/netns/{netns}").st_ino
    found = list_netns()
    assert found[ns_ino] == f"/run/netns/{netns}"
    assert netns_inode() in found

    socks = [s for s in dump_all_netns(found) if s.netns == ns_ino]
    c = child
    l4 = _one(socks, protocol=6, sport=c["l4"]["port"], state=protocol.TCP_LISTEN)
    assert (l4.family, l4.saddr, l4.daddr, l4.dport) == (4, LO4, bytes(16), 0)
    l6 = _one(socks, protocol=6, sport=c["l6"]["port"], state=protocol.TCP_LISTEN)
    assert (l6.family, l6.saddr) == (6, LO6)
    cli = _one(socks, protocol=6, sport=c["cli"]["port"], dport=c["l4"]["port"])
    assert (cli.family, cli.state, cli.saddr, cli.daddr) == (4, protocol.TCP_ESTABLISHED, LO4, LO4)
    srv = _one(socks, protocol=6, sport=c["l4"]["port"], dport=c["cli"]["port"])
    assert srv.state == protocol.TCP_ESTABLISHED
    uc = _one(socks, protocol=17, sport=c["uc"]["port"])
    assert (uc.family, uc.state, uc.daddr, uc.dport) == (4, 1, LO4, 9)
    uu = _one(socks, protocol=17, sport=c["uu"]["port"])
    assert (uu.state, uu.saddr, uu.dport) == (protocol.TCP_CLOSE, LO4, 0)
    um = _one(socks, protocol=17, sport=c["um"]["port"])
    assert (um.family, um.state, um.saddr, um.daddr) == (6, 1, MAPPED_LO, MAPPED_LO)

    owners = socket_owners()
    for name, s in dict(l4=l4, l6=l6, cli=cli, srv=srv, uc=uc, uu=uu, um=um).items():
        assert s.inode == c[name]["inode"], name
        assert owners.get(s.inode) == c["pid"], name
        assert s.uid == 0 and s.cookie > 0
    assert len({s.cookie for s in socks}) == len(socks)


def test_tcp_states_asks_the_kernel_for_some_states(netns: str, child: dict) -> None:
    path = f"/run/netns/{netns}"
    inode = os.stat(path).st_ino
    by_inode = {s.inode: s.cookie for s in dump_sockets(inode, path)}
    states = sockdiag.tcp_states({inode: path}, sockdiag.state_mask([protocol.TCP_LISTEN]))
    assert states == {by_inode[child[n]["inode"]]: protocol.TCP_LISTEN for n in ("l4", "l6")}


def test_cookie_matches_ss() -> None:
    _require_root()
    with socket.create_server(("127.0.0.1", 0)) as lsn, socket.create_connection(lsn.getsockname()) as cli:
        srv, _ = lsn.accept()
        with srv:
            port = lsn.getsockname()[1]
            out = subprocess.run(
                ["ss", "-tnei", "state", "established", "sport", "=", f":{port}"],
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            ).stdout
            m = re.search(r"ino:(\d+) sk:([0-9a-f]+)", out)
            assert m, out
            assert int(m[1]) == os.fstat(srv.fileno()).st_ino
            mine = _one(dump_sockets(netns_inode()), protocol=6, sport=port, dport=cli.getsockname()[1])
            assert mine.inode == int(m[1])
            assert mine.cookie == int(m[2], 16)


def test_netns_switch_leaves_caller_alone(netns: str) -> None:
    path = f"/run/netns/{netns}"
    before = os.readlink("/proc/thread-self/ns/net")
    inside = run_in_netns(path, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert inside == os.stat(path).st_ino != netns_inode()
    assert os.readlink("/proc/thread-self/ns/net") == before
    # Errors raised inside come back to the caller, and the caller still stays put.
    with pytest.raises(ZeroDivisionError):
        run_in_netns(path, lambda: 1 // 0)
    with pytest.raises(FileNotFoundError):
        dump_sockets(12345, path)  # the path opens another netns than the inode claims
    assert os.readlink("/proc/thread-self/ns/net") == before
    assert all(t.name != "netns-enter" for t in threading.enumerate())  # helper threads end


def test_interface_addresses(netns: str) -> None:
    addrs = interface_addresses(f"/run/netns/{netns}")
    assert InterfaceAddress("127.0.0.1", 4, 8, "lo", "host") in addrs
    assert all(a.ifname == "lo" for a in addrs)  # a fresh netns has nothing else
    host = interface_addresses()
    assert host
    assert all(a.family in (4, 6) and a.ip and a.ifname and a.scope for a in host)


def test_live_cookies_list_connections_listeners_and_udp_sockets_only(netns: str, child: dict) -> None:
    path = f"/run/netns/{netns}"
    inode = os.stat(path).st_ino
    socks = dump_sockets(inode, path)
    by_inode = {s.inode: s.cookie for s in socks}
    tcp, udp = sockdiag.live_cookies({inode: path})
    for name in ("l4", "l6", "cli", "srv"):
        assert by_inode[child[name]["inode"]] in tcp, name
    for name in ("uc", "uu", "um"):
        assert by_inode[child[name]["inode"]] in udp, name
    assert tcp.isdisjoint(udp)
    # a netns that is gone has no sockets, and does not stop the others
    assert sockdiag.live_cookies({1: "/proc/999999999/ns/net", inode: path}) == (tcp, udp)
