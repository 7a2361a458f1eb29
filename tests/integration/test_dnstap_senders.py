"""Who may send DNSTap, and that idle senders cannot lock a real one out: an in-process DnstapCollector
with real senders (a Python sender in another network namespace, unbound)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ipaddress
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from netstatd.sources.dnstap.collector import DnstapCollector, SenderAllowList
from netstatd.sources.dnstap.decode import Resolution
from netstatd.sources.dnstap.framestream import (
    ACCEPT,
    CONTENT_TYPE,
    FINISH,
    READY,
    START,
    STOP,
    Limits,
    control_frame,
    data_frame,
)
from netstatd.testing.agent import free_port
from netstatd.testing.dns import Resolver, Zone, answer_addresses, client_response
from netstatd.testing.hosts import Host, HostPair
from tests.conftest import require_root

T = TypeVar("T")
D = TypeVar("D", bound=Zone | Resolver)
CLONE_NEWNET = 0x40000000
PORT = 5253  # inside the test's own network namespace: nothing else listens there

# A bidirectional sender run with `ip netns exec`: READY, then (if ACCEPT comes) START, data, STOP.
SENDER = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
ready, accept, rest, finish = (bytes.fromhex(x) for x in sys.argv[3:7])
def read(s, n):
    got = b""
    while len(got) < n and (more := s.recv(n - len(got))):
        got += more
    return got
with socket.create_connection((host, port), timeout=10) as s:
    try:
        s.sendall(ready)
        if read(s, len(accept)) != accept:
            sys.exit(print("closed before ACCEPT"))
        s.sendall(rest)
        print("FINISH" if read(s, len(finish)) == finish else "no FINISH")
    except (ConnectionResetError, BrokenPipeError):
        print("closed before ACCEPT")
"""


def _enter_netns(path: str) -> None:
    """Move the calling thread (only it) into the network namespace at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class CollectorInNetns:
    """A DnstapCollector on an event loop of its own, in a thread inside `host`'s network namespace:
    it binds that host's addresses and sees senders from the other host by their own addresses."""

    def __init__(self, host: Host, collector: DnstapCollector, hosts: Sequence[str]) -> None:
        self.collector = collector
        self._netns = host.netns_path
        self._hosts = hosts
        self._loop = asyncio.new_event_loop()
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="dnstap-in-netns")

    def _run(self) -> None:
        try:
            _enter_netns(self._netns)
            self._loop.run_until_complete(self.collector.start({"node": PORT}, self._hosts))
        except BaseException as e:
            self._started.set_exception(e)
            return
        self._started.set_result(None)
        self._loop.run_forever()
        self._loop.run_until_complete(self.collector.stop())
        self._loop.close()

    def call(self, fn: Callable[[], T]) -> T:
        """fn() on the collector's thread, so the test reads its state between two callbacks."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def __enter__(self) -> CollectorInNetns:
        self._thread.start()
        self._started.result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def send_from(host: Host, address: str, name: str, ip: str) -> str:
    """Run SENDER in `host` against the collector at `address`; what it saw."""
    ready = control_frame(READY, (CONTENT_TYPE,))
    accept = control_frame(ACCEPT, (CONTENT_TYPE,))
    rest = control_frame(START) + data_frame(client_response(name, ip)) + control_frame(STOP)
    argv = [address, str(PORT), *(x.hex() for x in (ready, accept, rest, control_frame(FINISH)))]
    return host.run(sys.executable, "-c", SENDER, *argv, timeout=30).stdout.strip()


def test_a_sender_outside_the_allow_list_is_refused_and_an_allowed_cidr_lets_it_in() -> None:
    require_root()
    with HostPair() as pair:
        node, dns_server = pair.a, pair.b  # the collector's node and a DNS server on another host
        node_addresses = [node.ipv4, node.ipv6]
        senders = [(node.ipv4, "v4.netstatd.test.", "10.231.250.31"), (node.ipv6, "v6.netstatd.test.", "fd42::31")]

        learned: list[Resolution] = []
        default = SenderAllowList([])  # loopback and this node's addresses
        default.set_own(node_addresses)
        with CollectorInNetns(node, DnstapCollector(learned.extend, allow=default), node_addresses) as c:
            for address, name, ip in senders:
                assert send_from(dns_server, address, name, ip) == "closed before ACCEPT"
            stats = c.call(lambda: (dict(c.collector.stats.closed), c.collector.stats.frames, list(learned)))
            assert stats == ({"not_allowed": 2}, 0, [])

        # The same sender once its networks are listed (what --dnstap-allow adds).
        cidrs = [str(ipaddress.ip_interface(f"{dns_server.ipv4}/24").network), f"{dns_server.ipv6}/64"]
        allow = SenderAllowList(cidrs)
        allow.set_own(node_addresses)
        with CollectorInNetns(node, DnstapCollector(learned.extend, allow=allow), node_addresses) as c:
            for address, name, ip in senders:
                assert send_from(dns_server, address, name, ip) == "FINISH"
            closed = c.call(lambda: dict(c.collector.stats.closed))
            assert closed == {"finished": 2}
            names = c.call(lambda: {r.ip: (r.hostname, r.client_ip) for r in learned})
            assert names == {
                "10.231.250.31": ("v4.netstatd.test", "10.0.0.9"),
                "fd42::31": ("v6.netstatd.test", "10.0.0.9"),
            }


@contextlib.asynccontextmanager
async def running(daemon: D) -> AsyncIterator[D]:
    """A DNS server started and stopped off the event loop, which keeps serving the collector meanwhile."""
    await asyncio.to_thread(daemon.start)
    try:
        yield daemon
    finally:
        await asyncio.to_thread(daemon.__exit__, None, None, None)


async def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_sixty_four_idle_senders_do_not_lock_unbound_out() -> None:
    limits = Limits()
    assert limits.max_senders == 64
    learned: list[Resolution] = []
    collector = DnstapCollector(learned.extend, limits=limits, allow=SenderAllowList([]))
    port = free_port()
    await collector.start({"node": port}, hosts=["127.0.0.1"])
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    records = ["www.netstatd.test. 300 IN CNAME web.netstatd.test.", "web.netstatd.test. 300 IN A 10.231.250.41"]
    try:
        accept = control_frame(ACCEPT, (CONTENT_TYPE,))
        for _ in range(limits.max_senders):  # READY, ACCEPT, START, and then nothing
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(control_frame(READY, (CONTENT_TYPE,)))
            assert await asyncio.wait_for(reader.readexactly(len(accept)), 5) == accept
            writer.write(control_frame(START))
            idle.append((reader, writer))
        assert collector.stats.active == limits.max_senders

        async with running(Zone(records)) as zone, running(Resolver(zone, port)) as resolver:
            answer = await asyncio.to_thread(resolver.query, "www.netstatd.test.")
            assert answer_addresses(answer) == ["10.231.250.41"]
            # unbound sends DNSTap 1-2 s after the answer, and only if the collector took it in
            await wait_until(lambda: any(r.ip == "10.231.250.41" for r in learned), 20, "unbound's answer")
            r = next(r for r in learned if r.ip == "10.231.250.41")
            assert (r.hostname, r.aliases) == ("www.netstatd.test", ("web.netstatd.test",))

            closed = collector.stats.closed
            assert closed.get("evicted", 0) >= 1 and set(closed) == {"evicted"}, closed  # nothing else closed
            assert collector.stats.active == limits.max_senders
            # The evicted ones are idle senders (each one got end of stream), not unbound.
            await wait_until(lambda: sum(r.at_eof() for r, _ in idle) == closed["evicted"], 10, "evicted EOF")
    finally:
        for _, writer in idle:
            writer.close()
    await wait_until(lambda: collector.stats.active == 0, 10, "every sender gone")
    st = collector.stats
    assert st.connections == sum(st.closed.values())  # every connection ended with one reason
    await collector.stop()


async def test_unbound_reconnects_after_an_idle_close() -> None:
    limits = Limits(idle_timeout_s=5.0)  # unbound's messages come 1-2 s after the answer: well within
    learned: list[Resolution] = []
    collector = DnstapCollector(learned.extend, limits=limits, allow=SenderAllowList([]))
    port = free_port()
    await collector.start({"node": port}, hosts=["127.0.0.1"])
    st = collector.stats
    records = [f"{n}.netstatd.test. 300 IN A 10.231.250.{50 + i}" for i, n in enumerate(("before", "after"))]
    async with running(Zone(records)) as zone, running(Resolver(zone, port)) as resolver:
        for name, ip in (("before", "10.231.250.50"), ("after", "10.231.250.51")):
            answer = await asyncio.to_thread(resolver.query, f"{name}.netstatd.test.")
            assert answer_addresses(answer) == [ip]
            await wait_until(lambda ip=ip: any(r.ip == ip for r in learned), 15, f"{name}.netstatd.test")
            if name == "before":  # then nothing for idle_timeout_s: closed, and unbound connects again
                await wait_until(lambda: st.closed.get("idle", 0) == 1 and st.active == 1, 15, "idle close")
    assert st.closed.get("idle", 0) >= 1 and st.connections >= 2
    await collector.stop()
