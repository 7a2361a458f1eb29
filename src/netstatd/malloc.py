"""Freed frames go back to the system, so what the pod's memory limit sees is what is in use.

glibc's malloc raises its mmap threshold (up to 32 MiB) each time a block it mmap'ed is freed. After
the first, the ~1 MB frames of snapshots and client queues come from the heap, whose pages it keeps
once they are freed. A fixed threshold keeps them mmap'ed and returned on free: measured on the mux
at 1M rows, 1,150 MiB of RSS before, 790 MiB after (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("netstatd.malloc")

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 128 << 10  # glibc's initial value, kept


def fix_mmap_threshold() -> bool:
    """True when set; a libc other than glibc has no such option (nothing to do)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: its libc's
    except (OSError, AttributeError):
        log.debug("no mallopt in this libc: the mmap threshold stays as it is")
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
