"""The C structs in events.h and their Python decoders, checked against the compiled object's BTF."""

import re
import struct
import subprocess
from pathlib import Path

import pytest

from netstatd.protocol import TCP_STATES
from netstatd.sources.bpf import events
from netstatd.sources.bpf.loader import OBJECT_PATH
from tests.conftest import object_btf

SIZES = {"Q": 8, "I": 4, "H": 2, "B": 1}


@pytest.fixture(scope="module")
def btf() -> dict[str, dict]:
    return object_btf()


def python_layout(fields: tuple[tuple[str, str], ...]) -> list[tuple[str, int, int]]:
    """(name, offset, size) per field of a little-endian struct format."""
    out, off = [], 0
    for name, code in fields:
        size = struct.calcsize("<" + code)
        out.append((name, off, size))
        off += size
    return out


def test_netstat_event_matches_btf(btf):
    s = btf["netstat_event"]
    assert s["size"] == events.EVENT_SIZE == 144
    c_offsets = {m["name"]: m["bits_offset"] // 8 for m in s["members"]}
    py = python_layout(events.EVENT_FIELDS)
    assert [n for n, _, _ in py] == [m["name"] for m in s["members"]]
    for name, off, _ in py:
        assert c_offsets[name] == off, name
    assert events.RECORD_SIZE == events.EVENT_SIZE + events.RING_HEADER
    assert events.RECORD_SIZE % 8 == 0  # ring records are 8-byte aligned


@pytest.mark.parametrize(
    ("name", "layout", "members"),
    [
        ("udp_flow_key", events.UDP_FLOW_KEY, [("cookie", 0), ("raddr", 8), ("rport", 24), ("_pad", 26)]),
        (
            "udp_flow",
            events.UDP_FLOW,
            [
                ("bytes_sent", 0),
                ("bytes_received", 8),
                ("packets_sent", 16),
                ("packets_received", 24),
                ("announced_ns", 32),
            ],
        ),
    ],
)
def test_udp_flow_map_structs_match_btf(btf, name, layout, members):
    """User space reads udp_flows entries (loader.take_udp_flow) with these."""
    s = btf[name]
    assert s["size"] == layout.size
    assert [(m["name"], m["bits_offset"] // 8) for m in s["members"]] == members


def test_events_h_constants_match_events_py():
    text = (Path(events.__file__).parent / "events.h").read_text()
    defines = dict(re.findall(r"^#define ((?:EV|EVF|CNT|FOLDED)_\w+) (0x[0-9a-fA-F]+|\d+)", text, re.M))
    assert {"EVF_UDP_COUNTS", "EVF_UDP_NEW", "EVF_UDP_MORE", "EV_UDP_CLOSE", "CNT_MAX"} <= defines.keys()
    for name, value in defines.items():
        assert getattr(events, name) == int(value, 0), name


def test_agent_settings_matches_btf_and_sits_at_rodata_offset_zero(btf):
    s = btf["agent_settings"]
    assert s["size"] == events.SETTINGS.size
    assert [(m["name"], m["bits_offset"] // 8) for m in s["members"]] == [
        ("capture_tcp", 0),
        ("capture_udp", 1),
        ("include_loopback", 2),
        ("accept_from_io", 3),
        ("_pad", 4),
        ("udp_refresh_ns", 8),
    ]
    syms = subprocess.run(["llvm-nm", str(OBJECT_PATH)], check=True, capture_output=True, text=True).stdout
    rodata = [line.split() for line in syms.splitlines() if line.split()[1:2] == ["R"]]
    assert rodata == [["0000000000000000", "R", "settings"]], "the loader writes settings at .rodata offset 0"


def test_decoder_reads_a_record_the_kernel_way():
    body = struct.pack(
        events.EVENT_FORMAT,
        123,
        77,
        5,
        4242,
        4026531840,
        bytes([10, 0, 0, 1]) + bytes(12),
        bytes([10, 0, 0, 2]) + bytes(12),
        40000,
        80,
        events.EV_TCP_STATE,
        4,
        2,
        1,
        2,
        b"curl\0" + bytes(11),
        0,
        1_000_000,
        12_345,
        700,
        300,
        125,
        3,
        111,
    )
    rec = struct.pack("<II", events.EVENT_SIZE, 0) + body
    (r,) = list(events.RECORD.iter_unpack(rec))
    counters = (events.BYTES_ACKED, events.BYTES_RECEIVED, events.SEGS_OUT, events.SEGS_IN, events.SRTT_US)
    assert [r[i] for i in counters] == [1_000_000, 12_345, 700, 300, 125]
    assert (r[events.TOTAL_RETRANS], r[events.ERROR]) == (3, 111)
    assert (r[events.TS], r[events.COOKIE], r[events.TGID], r[events.SPORT], r[events.DPORT]) == (
        123,
        77,
        4242,
        40000,
        80,
    )
    assert events.comm_str(r[events.COMM]) == "curl"
    assert TCP_STATES[r[events.NEWSTATE]] == "ESTABLISHED"


def test_brief_decoder_reads_the_same_fields():
    body = struct.pack(
        events.EVENT_FORMAT,
        123,
        77,
        5,
        4242,
        9,
        bytes(16),
        bytes(16),
        1,
        2,
        events.EV_UDP_SEND,
        6,
        3,
        4,
        1,
        b"x" * 16,
        98,
        *range(1, 8),
    )
    rec = struct.pack("<II", events.EVENT_SIZE, 0) + body
    full = events.RECORD.unpack(rec)
    assert events.RECORD_BRIEF.unpack(rec) == tuple(
        full[i]
        for i in (
            events.COOKIE,
            events.TGID,
            events.KIND,
            events.FAMILY,
            events.OLDSTATE,
            events.NEWSTATE,
            events.FOLDED,
        )
    )


def test_folded_states_read_oldest_first():
    # CLOSE_WAIT (8) then LAST_ACK (9): the kernel shifts each new one FOLDED_BITS higher
    assert events.folded_states(8 | 9 << events.FOLDED_BITS) == (8, 9)
    assert events.folded_states(0) == ()


def test_the_stats_record_reads_the_cookie_and_the_counters():
    values = {n: i + 1 for i, (n, c) in enumerate(events.EVENT_FIELDS) if c in ("Q", "I", "H", "B")}
    body = events.pack_record(**values)[events.RING_HEADER :]  # the iterator writes no ring header
    names = ("cookie", "bytes_acked", "bytes_received", "segs_out", "segs_in", "srtt_us", "total_retrans")
    assert events.STATS_RECORD.unpack(body) == tuple(values[n] for n in names)
