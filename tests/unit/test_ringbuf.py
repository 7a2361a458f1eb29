"""sources/bpf/ringbuf.py on a fake ring: a memfd laid out as the kernel maps a BPF ring buffer (consumer
page, producer page, then the data area twice in a row), written the way the kernel writes it. No root."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest

from netstatd.sources.bpf.events import EVENT_SIZE, RECORD_SIZE, pack_record
from netstatd.sources.bpf.ringbuf import BUSY_BIT, DISCARD_BIT, RingReader

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
