#!/usr/bin/env python3
"""What netstatd's kernel programs cost the node's other processes (issue 17, "Make room first").

1. Every system call: a C loop of getppid() (the cheapest syscall), ns per call, without the agent
   and with the agent running idle. Syscall tracepoints, once attached, put every syscall of every
   process through the kernel's slower tracing path; this is where that shows.
2. Per program: the agent's BPF programs' own run time (kernel.bpf_stats_enabled, set for the run and
   restored), per run and per connection, while bench/churn.py's generator runs at --rate between two
   network namespaces.
3. Live connections' counters (--stats-connections N held open between two namespaces, each having
   sent a little): reading them all with the stats iterator (loader.read_tcp_stats: every socket
   changed, then none changed) against a sock_diag dump with INET_DIAG_INFO parsed for the same
   counters; CPU time of this process (kernel and user) and wall time.

    sudo .venv/bin/python bench/kernel.py [--seconds 10] [--rate max|N] [--stats-connections 10000]
                                          [--json bench/out/kernel.json]

NETSTATD_BPF_OBJECT and PYTHONPATH select another build (docs/benchmarks.md has the before/after
commands).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from churn import Generator, parse_rate, tune
from harness import OUT, git, interrupted, prepare

from netstatd.sources import netlink
from netstatd.sources.bpf import events as ev
from netstatd.sources.bpf.loader import KernelProbes, KernelSettings
from netstatd.testing.agent import AgentProcess
from netstatd.testing.hosts import HOLD_CONNECTIONS, HostPair

GETPPID_C = r"""
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int main(void) {
    const long n = 5000000;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""
SYSCALL_RUNS = 5

INET_DIAG_INFO = 2  # the tcp_info attribute, and its bit (1 << (2 - 1)) in idiag_ext
TCP_INFO = struct.Struct("<68xI28xI16xQQII")  # rtt, total_retrans, bytes_acked, bytes_received, segs_out, segs_in
STATS_SYSCTL = "kernel.bpf_stats_enabled"


def build_getppid(workdir: Path) -> Path:
    src, exe = workdir / "getppid.c", workdir / "getppid"
    src.write_text(GETPPID_C)
    subprocess.run(["cc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def syscall_ns(exe: Path) -> dict[str, float]:
    """ns per getppid(), the median of SYSCALL_RUNS loops of 5M calls."""
    runs = [
        float(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)
        for _ in range(SYSCALL_RUNS)
    ]
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}


def agent_programs() -> dict[str, dict[str, int]]:
    """netstatd's BPF programs (named on_*), by name: run count and run time (bpftool). This bpftool
    does not say which process holds a program, so another agent's would be counted too: refused."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    progs: dict[str, dict[str, int]] = {}
    for p in json.loads(out):
        name = p.get("name", "")
        if not name.startswith("on_"):
            continue
        if name in progs:
            raise RuntimeError(f"two BPF programs named {name}: another netstatd is running; stop it first")
        progs[name] = {
            "run_cnt": int(p.get("run_cnt", 0)),
            "run_time_ns": int(p.get("run_time_ns", 0)),
            "recursion_misses": int(p.get("recursion_misses", 0)),
        }
    return progs


def sysctl(name: str, value: str | None = None) -> str:
    argv = ["sysctl", "-n", name] if value is None else ["sysctl", "-q", "-w", f"{name}={value}"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def churn_costs(args: argparse.Namespace, agent: AgentProcess) -> dict[str, Any]:
    """Run time of each program over one churn run, per run and per connection; the agent's own CPU."""
    with contextlib.ExitStack() as stack:
        pair = HostPair()
        stack.callback(pair.close)
        pair.open()
        tune(pair)
        gen = Generator(pair, False, args.rate, args.seconds, 2, 2)
        stack.callback(gen.close)
        gen.start()
        before, cpu0 = agent_programs(), agent.cpu_seconds()
        gen.go()
        clients = gen.wait_clients()
        gen.stop_servers()
        after, cpu1 = agent_programs(), agent.cpu_seconds()
    conns = clients["connections"]
    programs = {}
    for name, a in sorted(after.items()):
        b = before.get(name, {"run_cnt": 0, "run_time_ns": 0, "recursion_misses": 0})
        runs, ns = a["run_cnt"] - b["run_cnt"], a["run_time_ns"] - b["run_time_ns"]
        programs[name] = {
            "runs": runs,
            "ns_per_run": round(ns / runs, 1) if runs else None,
            "runs_per_connection": round(runs / conns, 2) if conns else None,
            "ns_per_connection": round(ns / conns, 1) if conns else None,
            "recursion_misses": a["recursion_misses"] - b["recursion_misses"],
        }
    return {
        "generator": clients,
        "programs": programs,
        "bpf_ns_per_connection": round(sum(p["ns_per_connection"] or 0 for p in programs.values()), 1),
        "agent_cpu_us_per_connection": round((cpu1 - cpu0) * 1e6 / conns, 2) if conns else None,
    }


def diag_info(netns: dict[int, str]) -> int:
    """sock_diag with INET_DIAG_INFO in each namespace: every TCP socket's counters, parsed as the
    agent would need them (the other way to refresh live connections). Returns how many."""
    req = struct.pack("=BBBxI", 0, 6, 1 << (INET_DIAG_INFO - 1), 0xFFFFFFFF) + bytes(48)
    n = 0
    for inode, path in netlink.each_netns(netns):
        with netlink.open_netlink(netlink.NETLINK_SOCK_DIAG, path, inode) as sock:
            for family in (2, 10):
                payload = bytes([family]) + req[1:]
                for _, body in netlink.dump(sock, 20, payload):  # SOCK_DIAG_BY_FAMILY
                    info = netlink.parse_attrs(body, 72).get(INET_DIAG_INFO)
                    if info is not None and len(info) >= TCP_INFO.size:
                        TCP_INFO.unpack_from(info)
                        n += 1
    return n


def timed(fn, *args) -> tuple[Any, dict[str, float]]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn(*args)
    cpu_ms, wall_ms = (time.process_time() - cpu) * 1000, (time.perf_counter() - wall) * 1000
    return out, {"cpu_ms": round(cpu_ms, 1), "wall_ms": round(wall_ms, 1)}


def hold(host, *argv: str) -> tuple[subprocess.Popen, int]:
    proc = host.popen(
        sys.executable, "-c", HOLD_CONNECTIONS, *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline().split()
    if not line or line[0] != "ready":
        raise RuntimeError(f"connection holder {argv[0]} failed")
    return proc, int(line[1])


def stats_costs(n: int) -> dict[str, Any]:
    """The two ways to read n live connections' counters (both ends: 2n sockets)."""
    with contextlib.ExitStack() as stack:
        pair = HostPair()
        stack.callback(pair.close)
        pair.open()
        server, port = hold(pair.b, "server", pair.b.ipv4, str(n), "100")
        stack.callback(server.kill)
        client, _ = hold(pair.a, "client", pair.b.ipv4, str(n), "100", str(port))
        stack.callback(client.kill)
        kernel = KernelProbes(KernelSettings())
        kernel.open()
        stack.callback(kernel.close)
        netns = {h.netns_inode: h.netns_path for h in (pair.a, pair.b)}
        first, first_cost = timed(kernel.read_tcp_stats, netns)
        second, second_cost = timed(kernel.read_tcp_stats, netns)
        counted, diag_cost = timed(diag_info, netns)
    sockets = 2 * n
    return {
        "connections": n,
        "iterator_all_changed": {**first_cost, "records": len(first) // ev.EVENT_SIZE},
        "iterator_none_changed": {**second_cost, "records": len(second) // ev.EVENT_SIZE},
        "sock_diag_info": {**diag_cost, "sockets": counted},
        "us_per_socket": {
            "iterator_all_changed": round(first_cost["cpu_ms"] * 1000 / sockets, 2),
            "iterator_none_changed": round(second_cost["cpu_ms"] * 1000 / sockets, 2),
            "sock_diag_info": round(diag_cost["cpu_ms"] * 1000 / sockets, 2),
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "work_tree_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "seconds": args.seconds,
        "rate": args.rate or "max",
    }
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=OUT) as tmp:
        exe = build_getppid(Path(tmp))
        report["getppid_ns_without_agent"] = syscall_ns(exe)
        agent = AgentProcess(log_path=OUT / "agent-kernel.log")
        with contextlib.ExitStack() as stack:
            stack.callback(agent.stop)
            agent.start()
            time.sleep(1)  # started: its programs attached
            report["getppid_ns_with_agent_idle"] = syscall_ns(exe)
            report["programs_attached"] = sorted(agent_programs())
            was = sysctl(STATS_SYSCTL)
            sysctl(STATS_SYSCTL, "1")
            stack.callback(sysctl, STATS_SYSCTL, was)
            report["churn"] = churn_costs(args, agent)
    if args.stats_connections:
        report["stats_refresh"] = stats_costs(args.stats_connections)
    return report


def summary(r: dict[str, Any]) -> str:
    without, with_ = r["getppid_ns_without_agent"]["median"], r["getppid_ns_with_agent_idle"]["median"]
    c = r["churn"]
    lines = [
        f"getppid: {without} ns without the agent, {with_} ns with it idle ({with_ - without:+.1f} ns)",
        f"churn: {c['generator']['conn_per_s']:,.0f} conn/s for {r['seconds']} s; BPF programs "
        f"{c['bpf_ns_per_connection']:,.0f} ns per connection; the agent process "
        f"{c['agent_cpu_us_per_connection']} µs per connection",
    ]
    for name, p in c["programs"].items():
        if p["runs"]:
            lines.append(
                f"  {name:<16} {p['ns_per_run']:>7} ns/run  {p['runs_per_connection']:>6} runs/conn  "
                f"{p['ns_per_connection']:>8} ns/conn  misses {p['recursion_misses']}"
            )
    st = r.get("stats_refresh")
    if st:
        lines.append(f"live counters of {st['connections']:,} connections (both ends), CPU µs per socket:")
        lines += [f"  {k:<22} {v}" for k, v in st["us_per_socket"].items()]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="churn duration (default 10)")
    p.add_argument("--rate", type=parse_rate, default=0.0, help="'max' (default) or connections/s")
    p.add_argument("--stats-connections", type=int, default=10_000, help="live connections for part 3 (0: skip)")
    p.add_argument("--json", type=Path, default=OUT / "kernel.json", help="report path")
    args = p.parse_args()
    prepare(p)
    try:
        report = run(args)
    except KeyboardInterrupt:
        return interrupted()
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
