#!/usr/bin/env python3
"""What the UDP send/receive hooks cost per datagram (issue 17, UDP flow counters).

Loads the BPF object (UDP only: no TCP programs, so the I/O hooks run the UDP path alone), turns on
the kernel's BPF run-time statistics with BPF_ENABLE_STATS (held by this process only, so other
agents on the host and kernel.bpf_stats_enabled are left alone), and sends datagrams between two
network namespaces: a connected socket pair (send/recv) and an unconnected one (sendto/recvfrom),
one flow each, IPv4. Prints each program's run_time_ns / run_cnt over the datagrams (fdinfo, as
`bpftool prog show` reports them), median of --repeat runs. Also: the release hook per socket that
sent one datagram and closed (a DNS client's pattern).

    sudo PYTHONPATH=src .venv/bin/python bench/udp_hook.py [--datagrams 200000] [--repeat 5]

NETSTATD_BPF_OBJECT selects another build of the object (before/after).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys

from netstatd.sources.bpf.libbpf import lib
from netstatd.sources.bpf.loader import OBJECT_PATH, KernelProbes, KernelSettings
from netstatd.testing.hosts import HostPair

BPF_STATS_RUN_TIME = 0

RECEIVER = """
import socket, sys
n, connected = int(sys.argv[2]), sys.argv[3] == "1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
peer = sys.stdin.readline().split()
if connected:
    s.connect((peer[0], int(peer[1])))
s.settimeout(2)
got = 0
try:
    while got < n:
        if connected:
            s.recv(2048)
        else:
            s.recvfrom(2048)
        got += 1
except TimeoutError:
    pass
print(got, flush=True)
"""

SENDER = """
import socket, sys
dst, n, connected = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3]), sys.argv[4] == "1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
b = b"x" * 100
if connected:
    s.connect(dst)
    send = s.send
    for _ in range(n):
        send(b)
else:
    sendto = s.sendto
    for _ in range(n):
        sendto(b, dst)
"""

# n sockets, each sends one datagram to the receiver and closes.
ONE_SHOTS = """
import socket, sys
dst, n = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3])
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"q" * 40, dst)
    s.close()
"""

PROGRAMS = ("on_sock_send_length", "on_sock_recv_length", "on_udp_sendmsg4", "on_udp_recvmsg4", "on_sock_release")


def prog_stats(probes: KernelProbes) -> dict[str, tuple[int, int]]:
    out = {}
    for name, prog in probes._programs():
        fd = lib.bpf_program__fd(prog)
        if fd < 0 or name not in PROGRAMS:
            continue
        vals = {}
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("run_time_ns", "run_cnt"):
                    vals[key] = int(value)
        out[name] = (vals.get("run_time_ns", 0), vals.get("run_cnt", 0))
    return out


def delta(before, after) -> dict[str, tuple[int, int]]:
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}


def exchange(pair: HostPair, n: int, connected: bool) -> int:
    a, b = pair.a, pair.b
    recv = b.popen(sys.executable, "-c", RECEIVER, b.ipv4, str(n), str(int(connected)), stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, text=True)  # fmt: skip
    port = recv.stdout.readline().strip()
    send = a.popen(sys.executable, "-c", SENDER, b.ipv4, port, str(n), str(int(connected)), stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, text=True)  # fmt: skip
    sport = send.stdout.readline().strip()
    recv.stdin.write(f"{a.ipv4} {sport}\n")
    recv.stdin.flush()
    send.stdin.write("go\n")
    send.stdin.flush()
    send.wait(120)
    got = int(recv.stdout.readline())
    recv.wait(10)
    return got


def one_shots(pair: HostPair, n: int) -> None:
    a, b = pair.a, pair.b
    recv = b.popen(sys.executable, "-c", RECEIVER, b.ipv4, str(n), "0", stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, text=True)  # fmt: skip
    port = recv.stdout.readline().strip()
    recv.stdin.write("x 0\n")
    recv.stdin.flush()
    a.run(sys.executable, "-c", ONE_SHOTS, b.ipv4, port, str(n))
    recv.stdout.readline()
    recv.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datagrams", type=int, default=200_000)
    ap.add_argument("--sockets", type=int, default=20_000, help="one-shot sockets for the release hook")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    lib.bpf_enable_stats.restype = ctypes.c_int
    lib.bpf_enable_stats.argtypes = [ctypes.c_int]
    stats_fd = lib.bpf_enable_stats(BPF_STATS_RUN_TIME)
    if stats_fd < 0:
        sys.exit(f"BPF_ENABLE_STATS failed: {stats_fd}")
    probes = KernelProbes(KernelSettings(capture_tcp=False), OBJECT_PATH)
    probes.open()
    results: dict[str, dict[str, list[float]]] = {}
    try:
        with HostPair() as pair:
            for scenario in ("connected", "unconnected", "one-shot sockets"):
                for _ in range(args.repeat):
                    before = prog_stats(probes)
                    if scenario == "one-shot sockets":
                        one_shots(pair, args.sockets)
                        got = args.sockets
                    else:
                        got = exchange(pair, args.datagrams, scenario == "connected")
                    d = delta(before, prog_stats(probes))
                    row = results.setdefault(scenario, {})
                    for name, (ns, cnt) in d.items():
                        if cnt:
                            row.setdefault(name, []).append(ns / cnt)
                    row.setdefault("received", []).append(got)
    finally:
        probes.close()
    print(f"object {OBJECT_PATH}")
    summary = {s: {k: round(statistics.median(v), 1) for k, v in row.items()} for s, row in results.items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
