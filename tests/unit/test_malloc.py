"""malloc.py: with the fixed mmap threshold, freed ~1 MB frames leave the process's RSS (as the mux's
snapshot frames and client queues do); without it, glibc keeps them. Each case in a fresh process."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import os, sys
from netstatd.malloc import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
big = bytes(2 << 20); del big  # an mmap'ed block freed: glibc raises its threshold past 1 MB
before = rss_mib()
frames, survivors = [], []
for _ in range(100):
    frames.append(os.urandom(1 << 20))
    survivors.append(os.urandom(1000))  # blocks kept between them (malloc's: pymalloc takes <= 512 B)
del frames
print(rss_mib() - before)
"""


def grown_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_freed_frames_leave_rss_with_the_fixed_threshold():
    assert grown_mib("default") >= 50  # the problem is real here: glibc keeps the freed 100 MiB
    assert grown_mib("fixed") < 10
