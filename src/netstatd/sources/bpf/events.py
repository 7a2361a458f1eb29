"""Python side of events.h: record layout, constants and batch decoding.

Keep in step with events.h; tests/unit/test_bpf_abi.py checks both against
the compiled object's BTF.
"""

from __future__ import annotations

import struct

EV_TCP_STATE = 1
EV_TCP_ACCEPT = 2
EV_TCP_LISTEN = 3
EV_UDP_SEND = 4
EV_UDP_RECV = 5
EV_UDP_BIND = 6
EV_UDP_CLOSE = 7
EV_TCP_STATS = 8

EVF_OWNER_CURRENT = 0x1
EVF_OWNER_STORED = 0x2
EVF_OWNER_ACCEPT = 0x4
EVF_UDP_COUNTS = 0x8  # a UDP record carrying its flow's totals
EVF_UDP_NEW = 0x10  # ... of a kernel flow entry made by this datagram: its counters start here
EVF_UDP_MORE = 0x20  # EV_UDP_CLOSE: another record of the same socket's close follows
EVF_INFERRED = 0x40  # EV_TCP_STATE: a transition no probe saw, inferred at the socket's next one

CNT_EMITTED = 0
CNT_LOST = 1
CNT_UDP_DEDUPED = 2
CNT_NESTED = 3
CNT_FOLDED = 4
CNT_PASSED = 5
CNT_INFERRED = 6
CNT_FOLDED_NESTED = 7  # CNT_FOLDED's share of the second state program; counters() adds it in
CNT_MAX = 8

FOLDED_BITS = 4
FOLDED_MAX = 16

# struct netstat_event, field by field (name, struct code).
EVENT_FIELDS: tuple[tuple[str, str], ...] = (
    ("ts_ns", "Q"),
    ("cookie", "Q"),
    ("cgroup_id", "Q"),
    ("tgid", "I"),
    ("netns", "I"),
    ("saddr", "16s"),
    ("daddr", "16s"),
    ("sport", "H"),
    ("dport", "H"),
    ("kind", "B"),
    ("family", "B"),
    ("oldstate", "B"),
    ("newstate", "B"),
    ("flags", "B"),
    ("_pad", "7x"),
    ("comm", "16s"),
    ("folded", "Q"),
    # a TCP CLOSE's counters; on UDP records with EVF_UDP_COUNTS the flow's totals: bytes sent, bytes
    # received, datagrams sent, datagrams received (the low 32 bits of the two counts)
    ("bytes_acked", "Q"),
    ("bytes_received", "Q"),
    ("segs_out", "I"),
    ("segs_in", "I"),
    ("srtt_us", "I"),
    ("total_retrans", "I"),
    ("error", "I"),
    ("_pad2", "4x"),
)
EVENT_FORMAT = "<" + "".join(code for _, code in EVENT_FIELDS)
EVENT_SIZE = struct.calcsize(EVENT_FORMAT)  # 144

# Tuple positions of a decoded record (the ring header comes first, see RECORD).
_names = [n for n, c in EVENT_FIELDS if not c.endswith("x")]
(
    TS, COOKIE, CGROUP, TGID, NETNS, SADDR, DADDR, SPORT, DPORT, KIND, FAMILY, OLDSTATE, NEWSTATE, FLAGS, COMM, FOLDED,
    BYTES_ACKED, BYTES_RECEIVED, SEGS_OUT, SEGS_IN, SRTT_US, TOTAL_RETRANS, ERROR,
) = (i + 2 for i in range(len(_names)))  # fmt: skip

# A ring buffer record: u32 len (+ BUSY/DISCARD bits), u32 page offset, the event.
RING_HEADER = 8
RECORD = struct.Struct("<II" + EVENT_FORMAT[1:])
RECORD_SIZE = RECORD.size  # 152, already 8-byte aligned as the ring requires


def pack_record(**fields: int | bytes) -> bytes:
    """A ring record as the kernel writes it, from event fields by name (the others 0): for tests and
    benchmarks. `folded` takes the packed u64; addresses and comm are padded with zeros."""
    values: dict[str, int | bytes] = {n: b"" if c.endswith("s") else 0 for n, c in EVENT_FIELDS if not c.endswith("x")}
    unknown = fields.keys() - values.keys()
    if unknown:
        raise TypeError(f"no such event fields: {sorted(unknown)}")
    values.update(fields)
    return RECORD.pack(EVENT_SIZE, 0, *values.values())


# The same record, decoding only what every record needs (no bytes objects):
# cookie, tgid, kind, family, oldstate, newstate, folded. The tracker decodes
# the full record only for the ones it keeps (the latest per connection).
RECORD_BRIEF = struct.Struct("<16xQ8xI4x32x4xBBBB24xQ40x")
assert RECORD_BRIEF.size == RECORD_SIZE

# kind, family, oldstate, newstate read together as one little-endian u32 (kind in the low byte):
# memoryview(chunk).cast("I")[KIND_WORD::RECORD_WORDS] lists them for a whole chunk at C speed.
KIND_OFFSET = RING_HEADER + struct.calcsize("<" + "".join(c for n, c in EVENT_FIELDS[: _names.index("kind")]))
assert KIND_OFFSET % 4 == 0 and RECORD_SIZE % 4 == 0
KIND_WORD, RECORD_WORDS = KIND_OFFSET // 4, RECORD_SIZE // 4

# An EV_TCP_STATS record, as the stats iterator writes it (no ring header): the cookie and the six
# counters (BYTES_ACKED ... TOTAL_RETRANS).
STATS_RECORD = struct.Struct("<8xQ88xQQIIII8x")
assert STATS_RECORD.size == EVENT_SIZE

# struct agent_settings
SETTINGS = struct.Struct("<BBBB4xQ")

# The udp_flows map, which user space reads at the closes it decides (loader.py take_udp_flow):
# struct udp_flow_key (cookie, peer address as event.daddr, peer port) and struct udp_flow (bytes sent,
# bytes received, datagrams sent, datagrams received, last announcement ns).
UDP_FLOW_KEY = struct.Struct("<Q16sH6x")
UDP_FLOW = struct.Struct("<QQQQQ")


def folded_states(folded: int) -> tuple[int, ...]:
    """event.folded as state numbers, oldest first."""
    out = []
    while folded:
        out.append(folded & ((1 << FOLDED_BITS) - 1))
        folded >>= FOLDED_BITS
    return tuple(out)


def comm_str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")
