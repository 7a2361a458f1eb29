"""UDP flow totals from kernel records to events: announcements, the kernel entry starting over, the
32-bit datagram counts wrapping, a socket's close (records per flow, the rest read from the kernel),
idle and gone closes, and a flow active and closed within one flush."""

import pytest

from netstatd.sources.bpf import events as ev
from netstatd.state.model import UdpCounts
from tests.unit.node import Node
from tests.unit.test_tracker import conn_events, rec, v4

COUNTS = ("bytesSent", "bytesReceived", "packetsSent", "packetsReceived")
OWNER = ev.EVF_OWNER_CURRENT


def udp(
    kind=ev.EV_UDP_SEND, *, cookie=3, daddr="10.0.0.53", dport=53, flags=ev.EVF_UDP_COUNTS, counts=(0, 0, 0, 0), ts=1
):
    sent, received, packets_sent, packets_received = counts
    return rec(
        kind,
        cookie=cookie,
        tgid=7,
        sport=5353,
        daddr=daddr,
        dport=dport,
        flags=OWNER | flags,
        ts=ts,
        bytes_acked=sent,
        bytes_received=received,
        segs_out=packets_sent,
        segs_in=packets_received,
    )


def close(*, cookie=3, daddr="0.0.0.0", dport=0, flags=0, counts=(0, 0, 0, 0), ts=9):
    return udp(ev.EV_UDP_CLOSE, cookie=cookie, daddr=daddr, dport=dport, flags=flags, counts=counts, ts=ts)


def totals(e: dict) -> tuple[int, ...] | None:
    return tuple(e[k] for k in COUNTS) if "bytesSent" in e else None


class Kernel:
    """Stands for the udp_flows map that user space takes entries out of (loader.take_udp_flow)."""

    def __init__(self, entries: dict) -> None:
        self.entries = entries
        self.taken: list = []

    def __call__(self, key):
        self.taken.append(key)
        return self.entries.pop(key, None)


@pytest.fixture
def node(tmp_path) -> Node:
    return Node(tmp_path)


def test_each_announcement_carries_the_flows_totals(node):
    node.ingest(udp(flags=ev.EVF_UDP_COUNTS | ev.EVF_UDP_NEW, counts=(100, 0, 1, 0)))
    (first,) = conn_events(node.flush())
    node.ingest(udp(kind=ev.EV_UDP_RECV, counts=(500, 185, 5, 5), ts=2))
    (later,) = conn_events(node.flush())
    assert (totals(first), first["direction"]) == ((100, 0, 1, 0), "outbound")
    assert (totals(later), later["state"]) == ((500, 185, 5, 5), "ACTIVE")


def test_a_record_without_counts_leaves_them_out(node):
    node.ingest(udp(flags=0))
    (e,) = conn_events(node.flush())
    assert totals(e) is None and not any(k in e for k in COUNTS)


def test_totals_go_on_when_the_kernel_entry_starts_over(node):
    node.ingest(udp(flags=ev.EVF_UDP_COUNTS | ev.EVF_UDP_NEW, counts=(100, 37, 1, 1)))
    node.ingest(udp(counts=(1000, 370, 10, 10), ts=2))
    node.flush()
    # evicted from the LRU; the next datagram made a new entry: its counts add to what was seen
    node.ingest(udp(flags=ev.EVF_UDP_COUNTS | ev.EVF_UDP_NEW, counts=(100, 0, 1, 0), ts=3))
    (e,) = conn_events(node.flush())
    assert totals(e) == (1100, 370, 11, 10)
    assert node.tables.udp_restarts == 1
    # ... and should the record that made the entry be lost, fewer bytes than before say it as well
    node.ingest(udp(counts=(50, 0, 1, 0), ts=4))
    (e,) = conn_events(node.flush())
    assert totals(e) == (1150, 370, 12, 10)
    assert node.tables.udp_restarts == 2


def test_datagram_counts_go_past_32_bits():
    c = UdpCounts()
    c.update((10, 0, 0xFFFF_FFFE, 0), True)
    c.update((20, 0, 3, 0), False)  # five more datagrams: the record's u32 wrapped
    assert c.totals() == (20, 0, 0x1_0000_0003, 0)


def test_a_socket_close_sends_its_flows_totals_and_user_space_reads_the_rest(node):
    kernel = Kernel({(3, v4("10.0.0.55"), 53): (70, 80, 7, 8)})
    node.tables.take_udp_flow = kernel
    for daddr in ("10.0.0.53", "10.0.0.54", "10.0.0.55"):
        node.ingest(udp(daddr=daddr, flags=ev.EVF_UDP_COUNTS | ev.EVF_UDP_NEW, counts=(10, 0, 1, 0)))
    node.flush()
    # the release: the two flows the socket kept, each with its totals, the first saying more follow
    node.ingest(close(daddr="10.0.0.53", dport=53, flags=ev.EVF_UDP_COUNTS | ev.EVF_UDP_MORE, counts=(40, 20, 4, 2)))
    first = conn_events(node.flush())
    assert [(e["remoteIP"], e["state"], totals(e)) for e in first] == [("10.0.0.53", "CLOSE", (40, 20, 4, 2))]
    assert kernel.taken == [] and len(node.tables.udp) == 2  # more follow: the rest stays open
    node.ingest(close(daddr="10.0.0.54", dport=53, flags=ev.EVF_UDP_COUNTS, counts=(50, 60, 5, 6)))
    rest = conn_events(node.flush())
    assert sorted((e["remoteIP"], e["state"], totals(e)) for e in rest) == [
        ("10.0.0.54", "CLOSE", (50, 60, 5, 6)),
        ("10.0.0.55", "CLOSE", (70, 80, 7, 8)),  # read from the kernel's entry, which went
    ]
    assert kernel.taken == [(3, v4("10.0.0.55"), 53)] and kernel.entries == {}
    assert node.tables.udp == {} and node.tables.closed["UDP"] == 3


def test_a_flows_close_record_without_counts_keeps_the_last_seen(node):
    node.tables.take_udp_flow = Kernel({})
    node.ingest(udp(flags=ev.EVF_UDP_COUNTS | ev.EVF_UDP_NEW, counts=(10, 0, 1, 0)))
    node.flush()
    node.ingest(close(daddr="10.0.0.53", dport=53))  # its entry was gone by the release
    (e,) = conn_events(node.flush())
    assert (e["state"], totals(e)) == ("CLOSE", (10, 0, 1, 0))


def test_a_flow_active_and_closed_within_one_flush_is_one_event(node):
    node.ingest(udp(flags=ev.EVF_UDP_COUNTS | ev.EVF_UDP_NEW, counts=(10, 0, 1, 0)))
    node.ingest(close(daddr="10.0.0.53", dport=53, flags=ev.EVF_UDP_COUNTS, counts=(30, 20, 3, 2)))
    (e,) = conn_events(node.flush())
    assert (e["state"], e["states"], totals(e)) == ("CLOSE", ["ACTIVE", "CLOSE"], (30, 20, 3, 2))


def test_an_idle_flow_closes_with_its_kernel_totals(node):
    kernel = Kernel({(3, v4("10.0.0.53"), 53): (300, 111, 3, 3)})
    node.tables.take_udp_flow = kernel
    node.ingest(udp(flags=ev.EVF_UDP_COUNTS | ev.EVF_UDP_NEW, counts=(100, 0, 1, 0)))
    node.flush()
    node.tables.udp_idle_s = 0
    node.tables._next_idle_check = 0
    (e,) = conn_events(node.flush())
    # the datagrams after its announcement count too; its entry goes: a new datagram is a new flow
    assert (e["state"], e["closeReason"], totals(e)) == ("CLOSE", "idle", (300, 111, 3, 3))
    assert kernel.entries == {}


def test_a_gone_flow_closes_with_its_kernel_totals(node):
    node.tables.take_udp_flow = Kernel({(3, v4("10.0.0.53"), 53): (300, 111, 3, 3)})
    node.ingest(udp(flags=ev.EVF_UDP_COUNTS | ev.EVF_UDP_NEW, counts=(100, 0, 1, 0), ts=5))
    node.flush()
    (e,) = node.reconcile(set(), set(), before_ns=10)
    assert (e["state"], e["closeReason"], totals(e)) == ("CLOSE", "gone", (300, 111, 3, 3))
