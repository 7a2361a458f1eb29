"""Minimal netlink plumbing: dump requests over AF_NETLINK, rtattr parsing, and
opening a netlink socket inside another network namespace.

Only what rtnetlink and sock_diag dumps need; no multicast, no ACK handling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

log = logging.getLogger("netstatd.netlink")

NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

CLONE_NEWNET = 0x40000000
SELF_NETNS = "/proc/thread-self/ns/net"

# The kernel sizes each dump skb from our recv size (capped near 32 KiB), so
# a large buffer never truncates a batch and keeps syscalls per dump low.
RECV_BUFSIZE = 256 * 1024

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
RTATTR = struct.Struct("=HH")  # len, type
_ERRNO = struct.Struct("=i")
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER

_seq = itertools.count(1)
T = TypeVar("T")


class NetlinkError(OSError):
    """The kernel answered a netlink request with an error (errno is set)."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


def dump(
    sock: socket.socket, msg_type: int, payload: bytes, flags: int = NLM_F_REQUEST | NLM_F_DUMP
) -> Iterator[tuple[int, memoryview]]:
    """Send one request and yield (nlmsg_type, payload) for each reply message until NLMSG_DONE.

    Payloads are zero-copy views into the received buffer; struct.unpack_from and
    parse_attrs take them as they are. Raises NetlinkError on NLMSG_ERROR.
    """
    seq = next(_seq) & 0xFFFFFFFF
    sock.sendto(NLMSGHDR.pack(NLMSGHDR.size + len(payload), msg_type, flags, seq, 0) + payload, (0, 0))
    hdr_size = NLMSGHDR.size
    unpack_hdr = NLMSGHDR.unpack_from
    while True:
        data = sock.recv(RECV_BUFSIZE)
        if not data:
            raise NetlinkError(errno.EIO, f"netlink socket closed during request type {msg_type}")
        view = memoryview(data)
        off, end = 0, len(data)
        while off + hdr_size <= end:
            length, mtype, mflags, mseq, _ = unpack_hdr(data, off)
            if length < hdr_size or off + length > end:
                raise NetlinkError(errno.EBADMSG, f"malformed netlink message (length {length}) for request {msg_type}")
            body = view[off + hdr_size : off + length]
            off += _align4(length)
            if mseq != seq:
                continue  # left over from an earlier request abandoned half-read
            if mtype == NLMSG_DONE:
                # Since Linux 4.x a dump may report a late error in DONE's payload.
                if len(body) >= 4 and (err := _ERRNO.unpack_from(body)[0]) < 0:
                    raise NetlinkError(-err, f"netlink dump (request type {msg_type}) failed: {os.strerror(-err)}")
                return
            if mtype == NLMSG_ERROR:
                err = _ERRNO.unpack_from(body)[0] if len(body) >= 4 else -errno.EBADMSG
                if err == 0:
                    continue  # an ACK; nothing to report
                raise NetlinkError(-err, f"netlink request type {msg_type} failed: {os.strerror(-err)}")
            if mtype in (NLMSG_NOOP, NLMSG_OVERRUN):
                continue
            if mflags & NLM_F_DUMP_INTR:
                log.debug("netlink dump type %d changed while being read; entries may be missing", msg_type)
            yield mtype, body
            if not mflags & NLM_F_MULTI:
                return  # a single-message answer has no DONE


def parse_attrs(data: bytes | memoryview, offset: int = 0) -> dict[int, bytes]:
    """rtattr/nlattr TLVs from offset to the end of data: {type: value}. The last one of a type wins."""
    attrs: dict[int, bytes] = {}
    end = len(data)
    while offset + RTATTR.size <= end:
        length, atype = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > end:
            break  # malformed tail: keep what parsed
        attrs[atype & NLA_TYPE_MASK] = bytes(data[offset + RTATTR.size : offset + length])
        offset += _align4(length)
    return attrs


# -- network namespaces ------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _setns(fd: int, nstype: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, nstype)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc.setns.restype = ctypes.c_int
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_inode(path: str = SELF_NETNS) -> int:
    """Inode of the netns a path opens; the default is the calling thread's own."""
    return os.stat(path).st_ino


def run_in_netns(netns_path: str, fn: Callable[[], T], expect_inode: int | None = None) -> T:
    """Run fn in a short-lived thread that has entered the netns at netns_path; return its result.

    setns(CLONE_NEWNET) changes only the calling thread, so a dedicated thread
    keeps the caller (and the asyncio loop) where it is. The thread switches back
    before it ends; it is never reused, so even a failed switch-back cannot leak.
    A socket created by fn stays bound to the netns it was created in.
    If expect_inode is given and the path now opens another netns (e.g. the pid
    behind /proc/PID/ns/net was reused), raises FileNotFoundError.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def worker() -> None:
        try:
            own = os.open(SELF_NETNS, os.O_RDONLY | os.O_CLOEXEC)
            try:
                target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if expect_inode is not None and os.fstat(target).st_ino != expect_inode:
                        raise FileNotFoundError(errno.ENOENT, f"no longer opens netns {expect_inode}", netns_path)
                    _setns(target, CLONE_NEWNET)
                finally:
                    os.close(target)
                try:
                    result.append(fn())
                finally:
                    try:
                        _setns(own, CLONE_NEWNET)
                    except OSError:
                        log.exception("cannot switch helper thread back from netns %s (thread is ending)", netns_path)
            finally:
                os.close(own)
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    t = threading.Thread(target=worker, name="netns-enter", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def open_netlink(protocol: int, netns_path: str | None = None, expect_inode: int | None = None) -> socket.socket:
    """A netlink socket of the given protocol, in the caller's netns or (netns_path) another one."""

    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)  # Python sets close-on-exec

    return call_in_netns(netns_path, make, expect_inode)


def call_in_netns(netns_path: str | None, fn: Callable[[], T], expect_inode: int | None = None) -> T:
    """fn() in the caller's netns (netns_path None: no thread, no setns), else run_in_netns()."""
    return fn() if netns_path is None else run_in_netns(netns_path, fn, expect_inode)


def each_netns(netns: dict[int, str]) -> Iterator[tuple[int, str | None]]:
    """(inode, path) per netns; the caller's own netns with path None: it needs no thread and no setns."""
    own = netns_inode()
    for inode, path in netns.items():
        yield inode, None if inode == own else path
