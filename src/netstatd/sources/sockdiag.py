"""Existing TCP and UDP sockets from the kernel (NETLINK_SOCK_DIAG), per network namespace.

Used at start-up to seed state with sockets that predate the eBPF probes, to
reconcile the state after a kernel gap, and to sweep folded TCP states.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..protocol import TCP_CLOSE, TCP_NEW_SYN_RECV, TCP_TIME_WAIT
from .netlink import NETLINK_SOCK_DIAG, dump, each_netns, open_netlink

log = logging.getLogger("netstatd.sockdiag")

SOCK_DIAG_BY_FAMILY = 20
IPPROTO_TCP = 6
IPPROTO_UDP = 17

ALL_STATES = 0xFFFFFFFF

# struct inet_diag_req_v2 without its inet_diag_sockid (48 zero bytes: no filter).
_REQ = struct.Struct("=BBBxI")
_REQ_ID = bytes(48)
# struct inet_diag_msg: family, state, timer, retrans, id.sport, id.dport (big-endian,
# read separately), id.src, id.dst, id.if, id.cookie[2], expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBxx4x16s16sIIIIIIII")
_PORTS = struct.Struct(">HH")
_COOKIE = struct.Struct("=II")  # id.cookie[2] of struct inet_diag_msg
_COOKIE_OFFSET = 44
_V4_PAD = bytes(12)
_FAMILIES = ((socket.AF_INET, 4), (socket.AF_INET6, 6))


@dataclass(frozen=True, slots=True)
class DiagSocket:
    protocol: int  # 6 (TCP) or 17 (UDP)
    family: int  # 4 or 6; an IPv4-mapped IPv6 socket stays 6 with its ::ffff:a.b.c.d address
    state: int  # kernel state number (TCP_ESTABLISHED=1 ... TCP_LISTEN=10; UDP: 1 connected, 7 unconnected)
    saddr: bytes  # 16 bytes: IPv4 in the first 4 (network order), rest zero; IPv6 raw
    sport: int
    daddr: bytes
    dport: int
    inode: int  # 0 for TIME_WAIT and request sockets, which have no file
    cookie: int  # the value bpf_get_socket_cookie returns for this socket
    uid: int
    netns: int  # inode of the network namespace the socket was found in


def state_mask(states: Iterable[int]) -> int:
    """idiag_states for the given kernel state numbers: the kernel filters, so fewer sockets cross netlink."""
    mask = 0
    for state in states:
        mask |= 1 << state
    return mask


def _dump_one(sock: socket.socket, family: int, fam: int, protocol: int, netns: int, out: list[DiagSocket]) -> None:
    req = _REQ.pack(family, protocol, 0, ALL_STATES) + _REQ_ID
    unpack, unpack_ports = _MSG.unpack_from, _PORTS.unpack_from
    append, shared = out.append, {}.setdefault
    for _, body in dump(sock, SOCK_DIAG_BY_FAMILY, req):
        # Trailing INET_DIAG_* attributes (shutdown, cgroup id, ...) are not needed.
        _, state, src, dst, _if, c0, c1, _exp, _rq, _wq, uid, inode = unpack(body)
        sport, dport = unpack_ports(body, 4)
        if fam == 4:
            # The kernel fills only src[0]/dst[0] for IPv4; normalise the rest to zero.
            src, dst = src[:4] + _V4_PAD, dst[:4] + _V4_PAD
        # one bytes object per distinct address: a dump of 100k connections holds a few of them
        src, dst = shared(src, src), shared(dst, dst)
        append(DiagSocket(protocol, fam, state, src, sport, dst, dport, inode, c0 | c1 << 32, uid, netns))


def dump_sockets(netns_inode: int, netns_path: str | None = None) -> list[DiagSocket]:
    """All TCP+UDP v4+v6 sockets of one netns, every state. netns_path None = the caller's netns.

    netns_inode labels the results; with a netns_path it is also checked against
    what the path opens (FileNotFoundError if the netns behind it changed).
    """
    out: list[DiagSocket] = []
    with open_netlink(NETLINK_SOCK_DIAG, netns_path, expect_inode=netns_inode if netns_path else None) as sock:
        for protocol in (IPPROTO_TCP, IPPROTO_UDP):
            for family, fam in _FAMILIES:
                _dump_one(sock, family, fam, protocol, netns_inode, out)
    return out


def dump_all_netns(netns: dict[int, str]) -> list[DiagSocket]:
    """netns maps inode -> a path that opens it; dumps each one.

    A netns that vanished meanwhile is skipped with a debug log; any other
    failure for one netns (e.g. EPERM) is logged as a warning and skipped, so one
    odd namespace cannot stop the start-up snapshot of the rest.
    """
    out: list[DiagSocket] = []
    for inode, path in each_netns(netns):
        try:
            out.extend(dump_sockets(inode, path))
        except (FileNotFoundError, ProcessLookupError) as e:
            log.debug("netns %d vanished before its sockets were read: %s", inode, e)
        except OSError as e:
            log.warning("cannot read sockets of netns %d (%s): %s", inode, path, e)
    return out


# TCP states that are not connections (reconcile ignores them): CLOSE, TIME_WAIT, NEW_SYN_RECV
TCP_LIVE_STATES = ALL_STATES & ~state_mask((TCP_CLOSE, TCP_TIME_WAIT, TCP_NEW_SYN_RECV))


def live_cookies(netns: dict[int, str]) -> tuple[set[int], set[int]]:
    """Cookies of the TCP sockets that are connections or listeners, and of every UDP socket, in every netns.

    Only the cookies: a check of 100k connections holds sets of ints, not 100k DiagSockets. A
    netns that vanished meanwhile simply has no sockets; one that cannot be read raises OSError, so
    the caller does not take its sockets for closed.
    """
    tcp: set[int] = set()
    udp: set[int] = set()
    for sock in _diag_sockets(netns):
        for family, _ in _FAMILIES:
            tcp.update(cookie for cookie, _ in _cookie_states(sock, family, IPPROTO_TCP, TCP_LIVE_STATES))
            udp.update(cookie for cookie, _ in _cookie_states(sock, family, IPPROTO_UDP, ALL_STATES))
    return tcp, udp


def tcp_states(netns: dict[int, str], states: int) -> dict[int, int]:
    """cookie -> state of the TCP sockets in the given states (an idiag_states mask), in every netns.

    As lean as live_cookies(), and like it, a netns that cannot be read raises OSError.
    """
    out: dict[int, int] = {}
    for sock in _diag_sockets(netns):
        for family, _ in _FAMILIES:
            out.update(_cookie_states(sock, family, IPPROTO_TCP, states))
    return out


def _cookie_states(sock: socket.socket, family: int, protocol: int, states: int) -> Iterator[tuple[int, int]]:
    unpack = _COOKIE.unpack_from
    for _, body in dump(sock, SOCK_DIAG_BY_FAMILY, _REQ.pack(family, protocol, 0, states) + _REQ_ID):
        c0, c1 = unpack(body, _COOKIE_OFFSET)
        yield c0 | c1 << 32, body[1]


def _diag_sockets(netns: dict[int, str]) -> Iterator[socket.socket]:
    """An open sock_diag socket in each netns in turn; a netns that vanished meanwhile is skipped."""
    for inode, path in each_netns(netns):
        try:
            sock = open_netlink(NETLINK_SOCK_DIAG, path, expect_inode=inode if path else None)
        except (FileNotFoundError, ProcessLookupError):
            continue
        with sock:
            yield sock
