"""Interface addresses of a network namespace, from rtnetlink (RTM_GETADDR)."""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass

from .netlink import NETLINK_ROUTE, dump, open_netlink, parse_attrs

log = logging.getLogger("netstatd")

RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22

IFLA_IFNAME = 3
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3

_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change

# rtnetlink scopes (RT_SCOPE_*), named as `ip addr` names them.
SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
_FAMILIES = {socket.AF_INET: 4, socket.AF_INET6: 6}


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    ip: str  # textual, e.g. "10.0.0.1" or "fd00::1"
    family: int  # 4 or 6
    prefixlen: int
    ifname: str
    scope: str  # "host" (loopback), "link", "global" (also "site", "nowhere", or the number)


def _link_names(sock: socket.socket) -> dict[int, str]:
    names: dict[int, str] = {}
    for mtype, body in dump(sock, RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        if mtype != RTM_NEWLINK:
            continue
        index = _IFINFOMSG.unpack_from(body)[2]
        name = parse_attrs(body, _IFINFOMSG.size).get(IFLA_IFNAME)
        if name is not None:
            names[index] = name.rstrip(b"\0").decode(errors="replace")
    return names


def interface_addresses(netns_path: str | None = None) -> list[InterfaceAddress]:
    """Addresses of every interface, in the caller's netns or the one netns_path opens.

    ifname is the IPv4 label (IFA_LABEL, e.g. "eth0:1") when there is one, else
    the interface name from RTM_GETLINK (IPv6 addresses never carry a label).
    """
    with open_netlink(NETLINK_ROUTE, netns_path) as sock:
        raw: list[tuple[int, int, int, int, dict[int, bytes]]] = []
        for mtype, body in dump(sock, RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            if mtype != RTM_NEWADDR:
                continue
            family, prefixlen, _flags, scope, index = _IFADDRMSG.unpack_from(body)
            if family in _FAMILIES:
                raw.append((family, prefixlen, scope, index, parse_attrs(body, _IFADDRMSG.size)))
        names = _link_names(sock) if any(IFA_LABEL not in a for *_, a in raw) else {}
    out: list[InterfaceAddress] = []
    for family, prefixlen, scope, index, attrs in raw:
        # On point-to-point (peer) setups IFA_ADDRESS is the peer and IFA_LOCAL is ours;
        # IPv4 always sends IFA_LOCAL, IPv6 only with a peer (else IFA_ADDRESS is ours).
        addr = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if addr is None:
            continue
        label = attrs.get(IFA_LABEL)
        ifname = label.rstrip(b"\0").decode(errors="replace") if label else names.get(index, str(index))
        out.append(
            InterfaceAddress(
                socket.inet_ntop(family, addr), _FAMILIES[family], prefixlen, ifname, SCOPES.get(scope, str(scope))
            )
        )
    return out


def host_ips() -> list[str]:
    """This netns's addresses, for the Host check and the DNSTap allow list; [] (logged) on failure."""
    try:
        return [a.ip for a in interface_addresses()]
    except OSError as e:
        log.warning("cannot list host addresses: %s", e)
        return []
