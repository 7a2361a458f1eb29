"""Reads a BPF ring buffer map through its own mmap, in batches.

libbpf's ring_buffer__poll calls back into Python once per record (~3 us);
at full connection churn that loses events. Here one read copies every
committed record since the last read in a single slice.

Layout (kernel/bpf/ringbuf.c): page 0 is the consumer position (RW); from
PAGE on, the producer position page (RO) and the data area mapped twice in a
row, so a record that wraps is still contiguous.

RingSet reads every CPU's ring (netstatd.bpf.c has one per CPU) as one stream, merged by time.
"""

from __future__ import annotations

import logging
import mmap
import struct
import time

from ...metrics import Metric, single
from .events import EVENT_SIZE, RECORD_SIZE

log = logging.getLogger("netstatd.bpf")

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
_U32 = struct.Struct("<I")
_TS = struct.Struct("<8xQ")  # a record's time, after the ring header
NO_WATERMARK = (1 << 64) - 1
# A record is committed before it is read: one more than this ahead of our clock means another clock.
CLOCK_APART_NS = 10**9


def merge_py(parts: list[bytes], watermark: int) -> tuple[bytes, list[bytes]]:
    """ringmerge.c's merge() in Python, for a build without the native helper: each part's records up
    to its first one after the watermark, all of them by time (ring order among equal times); the
    rest of each part, held."""
    out: list[tuple[int, int, bytes]] = []
    held = []
    for part in parts:
        if len(part) % RECORD_SIZE:
            raise ValueError("each part must be bytes of whole records")
        n = len(part) // RECORD_SIZE
        cut = next((i for i in range(n) if _TS.unpack_from(part, i * RECORD_SIZE)[0] > watermark), n)
        for at in range(0, cut * RECORD_SIZE, RECORD_SIZE):
            out.append((_TS.unpack_from(part, at)[0], len(out), part[at : at + RECORD_SIZE]))
        held.append(part[cut * RECORD_SIZE :])
    out.sort()
    return b"".join(rec for _, _, rec in out), held


try:
    from ._ringmerge import merge  # built by `make setup` (setup.py)

    NATIVE_MERGE = True
except ImportError:  # built without gcc: the agent warns
    merge, NATIVE_MERGE = merge_py, False


class RingReader:
    """Consumer side of one BPF_MAP_TYPE_RINGBUF map of fixed-size records."""

    def __init__(self, map_fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        if size & (size - 1) or size % page:
            raise ValueError(f"ring size {size} is not a power-of-2 multiple of the page size")
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_map = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = memoryview(self._prod_map)[page:]
        # Positions are read and written through native u64 views: one aligned
        # 8-byte load/store each. struct's '<Q' goes byte by byte, and the
        # kernel reading a half-written consumer position sees a full ring.
        self._cons_pos = memoryview(self._cons_map).cast("Q")
        self._prod_pos = memoryview(self._prod_map)[:8].cast("Q")
        self._mask = size - 1
        self._cons = self._cons_pos[0]
        self.size = size
        self.malformed = 0  # records skipped for a wrong size (discarded ones are skipped, not counted)
        self.high_water = 0  # most bytes ever found waiting: how close the ring came to full

    def read(self, max_bytes: int = 8 << 20) -> bytes:
        """Return every committed record (header included) and release them."""
        prod = self._prod_pos[0]
        waiting = prod - self._cons
        if waiting > self.high_water:
            self.high_water = waiting
        avail = min(waiting, max_bytes - max_bytes % RECORD_SIZE)
        if avail <= 0:
            return b""
        start = self._cons & self._mask
        n = avail // RECORD_SIZE
        # Headers are read from the live mapping before the data is copied:
        # the producer clears BUSY after writing the record, so a committed
        # header guarantees the data behind it (x86 and arm64 both order this
        # through the kernel's release store).
        if avail % RECORD_SIZE == 0:
            headers = self._data[start : start + avail].cast("I")[:: RECORD_SIZE // 4].tolist()
            if headers.count(EVENT_SIZE) == n:
                chunk = bytes(self._data[start : start + avail])
                self._release(avail)
                return chunk
        return self._read_slow(start, min(prod - self._cons, max_bytes))

    def _read_slow(self, start: int, avail: int) -> bytes:
        """Record by record: stops at a busy record, skips odd ones."""
        parts: list[bytes] = []
        off = 0
        while off + 8 <= avail:
            hdr = _U32.unpack_from(self._data, start + off)[0]
            if hdr & BUSY_BIT:
                break
            length = hdr & ~(BUSY_BIT | DISCARD_BIT)
            total = (length + 8 + 7) & ~7
            if hdr & DISCARD_BIT or length != EVENT_SIZE:
                self.malformed += 0 if hdr & DISCARD_BIT else 1
            else:
                parts.append(bytes(self._data[start + off : start + off + RECORD_SIZE]))
            off += total
        self._release(off)
        return b"".join(parts)

    def _release(self, nbytes: int) -> None:
        self._cons += nbytes
        self._cons_pos[0] = self._cons

    def close(self) -> None:
        self._cons_pos.release()
        self._prod_pos.release()
        self._data.release()
        self._prod_map.close()
        self._cons_map.close()


class RingSet:
    """Every CPU's ring (netstatd.bpf.c), read as one stream of records in the order they were made:
    merged by time, up to the time the read began (ringmerge.c says why that is the order)."""

    def __init__(self, rings: list[tuple[int, int]]) -> None:
        """rings: (map fd, size) of each CPU's ring."""
        self.readers = [RingReader(fd, size) for fd, size in rings]
        self._held = [b""] * len(self.readers)
        self._clock_apart = False  # our CLOCK_MONOTONIC is not the kernel's (a time namespace)

    def read(self) -> bytes:
        """Every record committed up to now, in order; the ones after this call began wait for the next."""
        if len(self.readers) == 1:  # one CPU: the ring's order is the order
            return self.readers[0].read()
        # CLOCK_MONOTONIC, as bpf_ktime_get_ns(), unless a time namespace moves ours: then records
        # would wait for ever, so they are merged with no watermark (each read's in order, not across)
        watermark = NO_WATERMARK if self._clock_apart else time.monotonic_ns()
        parts = [held + r.read() for held, r in zip(self._held, self.readers, strict=True)]
        records, self._held = merge(parts, watermark)
        if not self._clock_apart and any(h and _TS.unpack_from(h)[0] > watermark + CLOCK_APART_NS for h in self._held):
            self._clock_apart = True
            log.warning(
                "kernel record times are over %d s ahead of this process's CLOCK_MONOTONIC (a time namespace?): "
                "the CPUs' rings are merged read by read",
                CLOCK_APART_NS // 10**9,
            )
        return records

    def metrics(self) -> list[Metric]:
        return [
            single(
                "netstatd_ring_records_malformed_total",
                "counter",
                "Ring records of an unexpected size.",
                sum(r.malformed for r in self.readers),
            ),
            single(
                "netstatd_ring_buffer_high_water_bytes",
                "gauge",
                "Most bytes ever waiting in one CPU's ring buffer when it was drained.",
                max((r.high_water for r in self.readers), default=0),
            ),
        ]

    def close(self) -> None:
        for r in self.readers:
            r.close()
