"""sources/bpf/ringbuf.py on fake rings: memfds laid out as the kernel maps a BPF ring buffer (consumer
page, producer page, then the data area twice in a row), written the way the kernel writes it. No root.
Then RingSet: every CPU's ring merged by time (ringmerge.c)."""

from __future__ import annotations

import mmap
import os
import random
import struct
from collections.abc import Iterator

import pytest

from netstatd.sources.bpf import ringbuf
from netstatd.sources.bpf.events import COOKIE, EVENT_SIZE, RECORD, RECORD_SIZE, TS, pack_record
from netstatd.sources.bpf.loader import MIN_RING_BYTES, ring_bytes_per_cpu
from netstatd.sources.bpf.ringbuf import BUSY_BIT, DISCARD_BIT, NATIVE_MERGE, RingReader, RingSet, merge, merge_py

PAGE = mmap.PAGESIZE
U64 = struct.Struct("<Q")


class FakeRing:
    """The producer side: records written at the producer position into both copies of the data area (the
    kernel maps the same pages twice, so a record that wraps reads as one piece), then the position
    published. The position counts up forever; the data offset is it modulo the size."""

    def __init__(self, size: int = PAGE) -> None:
        self.size = size
        self.fd = os.memfd_create("fake-ring")
        os.ftruncate(self.fd, 2 * PAGE + 2 * size)
        self.map = mmap.mmap(self.fd, 2 * PAGE + 2 * size)
        self.prod = 0

    def add(self, record: bytes, header: int | None = None) -> int:
        """Reserve and write one record (header: its u32 length word, e.g. with BUSY set; default the
        record's own); returns where it starts. Not visible to the reader until publish()."""
        if header is not None:
            record = struct.pack("<I", header) + record[4:]
        at = self.prod
        self._write(at, record)
        self.prod += (len(record) + 7) & ~7
        return at

    def set_header(self, at: int, header: int) -> None:
        """Rewrite the length word of the record at position `at` (the kernel's commit clears BUSY)."""
        self._write(at, struct.pack("<I", header))

    def publish(self) -> None:
        U64.pack_into(self.map, PAGE, self.prod)

    @property
    def consumer(self) -> int:
        return U64.unpack_from(self.map, 0)[0]

    def _write(self, pos: int, data: bytes) -> None:
        start = pos % self.size
        first = min(len(data), self.size - start)
        for offset, piece in ((start, data[:first]), (0, data[first:])):
            for copy in (0, self.size):
                at = 2 * PAGE + copy + offset
                self.map[at : at + len(piece)] = piece

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def ring() -> Iterator[FakeRing]:
    r = FakeRing()
    yield r
    r.close()


@pytest.fixture
def reader(ring: FakeRing) -> Iterator[RingReader]:
    r = RingReader(ring.fd, ring.size)
    yield r
    r.close()


def rec(cookie: int) -> bytes:
    return pack_record(cookie=cookie, tgid=cookie + 1000)


def test_records_are_read_in_order_and_released(ring, reader):
    records = [rec(i) for i in range(1, 4)]
    for r in records:
        ring.add(r)
    assert reader.read() == b""  # nothing published yet
    ring.publish()
    assert reader.read() == b"".join(records)
    assert ring.consumer == 3 * RECORD_SIZE  # released: the kernel may write there again
    assert reader.read() == b""
    assert reader.malformed == 0


def test_a_record_across_the_end_of_the_ring_reads_as_one_piece(ring, reader):
    fit = ring.size // RECORD_SIZE  # 26 records of 152 bytes in a 4 KiB ring: the 27th wraps
    first = [rec(i) for i in range(fit - 2)]
    for r in first:
        ring.add(r)
    ring.publish()
    assert reader.read() == b"".join(first)
    second = [rec(i) for i in range(100, 110)]  # from 2 records before the end, across it
    starts = [ring.add(r) for r in second]
    assert any(s % ring.size + RECORD_SIZE > ring.size for s in starts)  # one does wrap
    ring.publish()
    assert reader.read() == b"".join(second)
    assert ring.consumer == (fit - 2 + 10) * RECORD_SIZE  # positions count on, unmasked
    assert reader.malformed == 0


def test_a_busy_record_stops_the_read_until_it_is_committed(ring, reader):
    a, b, c = rec(1), rec(2), rec(3)
    ring.add(a)
    at = ring.add(b, header=EVENT_SIZE | BUSY_BIT)  # reserved, still being written
    ring.add(c)
    ring.publish()
    assert reader.read() == a
    assert ring.consumer == RECORD_SIZE  # nothing after the busy record is released
    assert reader.read() == b""
    ring.set_header(at, EVENT_SIZE)
    assert reader.read() == b + c
    assert ring.consumer == 3 * RECORD_SIZE


def test_a_discarded_record_is_skipped_and_not_counted(ring, reader):
    a, b, c = rec(1), rec(2), rec(3)
    ring.add(a)
    ring.add(b, header=EVENT_SIZE | DISCARD_BIT)
    ring.add(c)
    ring.publish()
    assert reader.read() == a + c
    assert ring.consumer == 3 * RECORD_SIZE
    assert reader.malformed == 0


def test_a_record_of_the_wrong_size_is_skipped_and_counted_as_malformed(ring, reader):
    a, c = rec(1), rec(3)
    odd = struct.pack("<II", 50, 0) + bytes(50)  # 58 bytes, 64 with the padding to 8
    ring.add(a)
    ring.add(odd)
    ring.add(c)
    ring.publish()
    assert reader.read() == a + c
    assert ring.consumer == 2 * RECORD_SIZE + 64
    assert reader.malformed == 1


def test_high_water_keeps_the_most_ever_waiting(ring, reader):
    assert reader.high_water == 0
    for i in range(5):
        ring.add(rec(i))
    ring.publish()
    assert len(reader.read()) == 5 * RECORD_SIZE
    assert reader.high_water == 5 * RECORD_SIZE
    for i in range(2):
        ring.add(rec(i))
    ring.publish()
    reader.read()
    assert reader.high_water == 5 * RECORD_SIZE


def test_max_bytes_takes_whole_records_and_leaves_the_rest(ring, reader):
    records = [rec(i) for i in range(4)]
    for r in records:
        ring.add(r)
    ring.publish()
    assert reader.read(max_bytes=2 * RECORD_SIZE + 5) == records[0] + records[1]
    assert reader.read() == records[2] + records[3]


def test_a_size_that_is_not_a_power_of_two_pages_is_refused(ring):
    with pytest.raises(ValueError, match="power-of-2"):
        RingReader(ring.fd, 3 * PAGE)


# -- RingSet: one ring per CPU ------------------------------------------------------------------------

NOW = 1_000_000  # the watermark: monotonic_ns() when a read begins


@pytest.fixture
def two_rings(monkeypatch) -> Iterator[tuple[FakeRing, FakeRing, RingSet]]:
    monkeypatch.setattr(ringbuf.time, "monotonic_ns", lambda: NOW)
    cpu0, cpu1 = FakeRing(), FakeRing()
    rings = RingSet([(cpu0.fd, cpu0.size), (cpu1.fd, cpu1.size)])
    yield cpu0, cpu1, rings
    rings.close()
    cpu0.close()
    cpu1.close()


def at(ts: int, cookie: int) -> bytes:
    return pack_record(ts_ns=ts, cookie=cookie)


def stamps(chunk: bytes) -> list[tuple[int, int]]:
    """(time, cookie) of each record."""
    return [(r[TS], r[COOKIE]) for r in RECORD.iter_unpack(chunk)]


def test_a_socket_s_records_on_two_cpus_come_out_in_the_order_they_were_made(two_rings):
    cpu0, cpu1, rings = two_rings
    # connect() on CPU 0, the handshake's softirq on CPU 1, the close back on CPU 0
    for ring, ts, cookie in ((cpu0, 10, 7), (cpu1, 20, 7), (cpu0, 30, 7), (cpu1, 15, 8), (cpu0, 25, 8)):
        ring.add(at(ts, cookie))
    cpu0.publish()
    cpu1.publish()
    assert stamps(rings.read()) == [(10, 7), (15, 8), (20, 7), (25, 8), (30, 7)]
    assert rings.read() == b""


def test_records_made_after_the_read_began_wait_for_the_next_read(two_rings, monkeypatch):
    cpu0, cpu1, rings = two_rings
    cpu0.add(at(NOW - 5, 1))
    cpu1.add(at(NOW + 5, 1))  # committed after the read began: an earlier one may still come on CPU 0
    cpu0.publish()
    cpu1.publish()
    assert stamps(rings.read()) == [(NOW - 5, 1)]
    cpu0.add(at(NOW + 2, 1))  # was still being written when the rings were read
    cpu0.publish()
    monkeypatch.setattr(ringbuf.time, "monotonic_ns", lambda: NOW + 10)
    assert stamps(rings.read()) == [(NOW + 2, 1), (NOW + 5, 1)]
    assert cpu1.consumer == RECORD_SIZE  # what waits is held in user space, the ring is released


def test_a_record_written_inside_another_s_program_is_put_in_its_place(two_rings):
    cpu0, cpu1, rings = two_rings
    # a process's record reserved first, committed after a softirq's records on the same CPU
    for ts, cookie in ((50, 1), (20, 2), (30, 3), (60, 4)):
        cpu0.add(at(ts, cookie))
    cpu1.add(at(40, 5))
    cpu0.publish()
    cpu1.publish()
    assert stamps(rings.read()) == [(20, 2), (30, 3), (40, 5), (50, 1), (60, 4)]


def test_kernel_times_far_ahead_of_our_clock_are_not_held_for_ever(two_rings, caplog):
    cpu0, cpu1, rings = two_rings
    ahead = NOW + 60 * 10**9  # as from inside a time namespace whose monotonic clock starts late
    cpu0.add(at(ahead + 2, 1))
    cpu1.add(at(ahead + 1, 2))
    cpu0.publish()
    cpu1.publish()
    assert rings.read() == b""  # held this once: they look made after the read began
    assert "time namespace" in caplog.text
    assert stamps(rings.read()) == [(ahead + 1, 2), (ahead + 2, 1)]  # then merged read by read


MERGES = [merge, merge_py] if NATIVE_MERGE else [merge_py]


@pytest.mark.parametrize("merge_fn", MERGES, ids=lambda f: f.__name__)
def test_equal_times_keep_ring_order_first_ring_first(merge_fn):
    records, held = merge_fn([at(5, 1) + at(5, 2), at(5, 3), at(5, 4) + at(9, 5) + at(3, 6)], 5)
    assert stamps(records) == [(5, 1), (5, 2), (5, 3), (5, 4)]
    assert [stamps(h) for h in held] == [[], [], [(9, 5), (3, 6)]]  # from the first one after the watermark


@pytest.mark.parametrize("merge_fn", MERGES, ids=lambda f: f.__name__)
def test_merge_refuses_parts_that_are_not_whole_records(merge_fn):
    with pytest.raises(ValueError, match="whole records"):
        merge_fn([at(1, 1)[:-1]], 10)


def test_the_native_merge_and_the_python_one_agree():
    rng = random.Random(7)
    parts = [b"".join(at(rng.randrange(100), c + 100 * p) for c in range(rng.randrange(30))) for p in range(4)]
    assert merge(parts, 60) == merge_py(parts, 60)


def test_one_cpu_reads_its_ring_as_it_is():
    ring = FakeRing()
    rings = RingSet([(ring.fd, ring.size)])
    try:
        ring.add(at(2, 1))
        ring.add(at(1, 2))
        ring.publish()
        assert stamps(rings.read()) == [(2, 1), (1, 2)]
    finally:
        rings.close()
        ring.close()


def test_each_cpu_gets_a_power_of_two_share_of_the_ring_bytes_and_at_least_the_minimum():
    mib = 1 << 20
    assert [ring_bytes_per_cpu(8 * mib, n) // mib for n in (1, 2, 3, 4, 8, 16, 64)] == [8, 4, 2, 2, 1, 1, 1]
    assert ring_bytes_per_cpu(8 * mib, 64) == MIN_RING_BYTES
