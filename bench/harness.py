"""What every root benchmark's main() does around its run (churn.py, live.py, soak.py, mux.py), and git."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def git(*argv: str) -> str:
    """git's output in this repository (the reports' commit and work-tree changes)."""
    return subprocess.run(["git", "-C", str(OUT.parent.parent), *argv], capture_output=True, text=True).stdout.strip()


def prepare(p: argparse.ArgumentParser) -> None:
    """Root or a usage error; bench/out exists; SIGTERM unwinds like ^C, and so does SIGINT also when
    started in the background (where the shell leaves it ignored): a stopped run still removes its
    namespaces and processes."""
    if os.geteuid() != 0:
        p.error("run as root (network namespaces, eBPF)")
    OUT.mkdir(parents=True, exist_ok=True)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupted() -> int:
    print("interrupted; namespaces and processes removed", file=sys.stderr)
    return 130
