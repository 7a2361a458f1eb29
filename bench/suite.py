#!/usr/bin/env python3
"""The performance suite (issue 7): `make bench`.

Runs the churn scenario (bench/churn.py: no tracer, netstatd + WebSocket client, bpftrace printer)
at each rate and the pre-existing state scenario (bench/live.py: agent started beside 100k live
connections; start-up, snapshot, RSS), interleaved and repeated; writes every run's report, the
medians and ranges to bench/out/results.json, and the tables between the bench markers of
docs/benchmarks.md.

    sudo .venv/bin/python bench/suite.py [--seconds 10] [--repeat 3] [--rates 10000,max]
                                         [--connections 100000] [--no-docs]

The 10-minute RSS soak is not in the suite (it alone would take the suite's 10 minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import git

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
DOCS = ROOT / "docs" / "benchmarks.md"
DASH = "\u2013"  # en dash, for ranges in the markdown table
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TODO_SCENARIOS = {
    "memory_soak": "the 10-minute RSS soak at 10k conn/s (`make bench-soak`, bench/soak.py: it alone takes 10 min)",
}

# (key in churn.json, row label, format); the table shows median [min - max] over the runs.
ROWS: list[tuple[str, str, str]] = [
    ("conn_per_s_without", "generator conn/s, no tracer", "{:,.0f}"),
    ("conn_per_s_with", "generator conn/s, netstatd", "{:,.0f}"),
    ("rate_ratio", "ratio netstatd / no tracer (target ≥ 0.90)", "{:.2f}"),
    ("conn_per_s_with_bpftrace", "generator conn/s, bpftrace printer", "{:,.0f}"),
    ("kernel_events_expected", "kernel events expected (bpftrace count())", "{:,.0f}"),
    ("kernel_events_lost", "kernel events lost by netstatd (target 0)", "{:,.0f}"),
    ("connections_opened", "connections opened (generator)", "{:,.0f}"),
    ("connections_delivered", "connections delivered to the WebSocket client", "{:,.0f}"),
    ("connections_delivered_ratio", "share delivered (target 1)", "{:.4f}"),
    ("state_reconciled", "of those, closed by the periodic sock_diag check (no CLOSE from the kernel)", "{:,.0f}"),
    ("agent_cpu_cores", "netstatd CPU, cores (target ≤ 0.25 at 10k)", "{:.3f}"),
    ("latency_ms_p50", "latency kernel → WebSocket p50, ms", "{:,.1f}"),
    ("latency_ms_p99", "latency kernel → WebSocket p99, ms (target ≤ 100 at 10k)", "{:,.1f}"),
    ("attribution_netstatd", "netstatd: transitions with the owning pid (target 1)", "{:.4f}"),
    ("agent_rss_mib", "netstatd RSS after the run, MiB", "{:,.0f}"),
    ("bpftrace_events_captured_ratio", "bpftrace: share of kernel events captured", "{:.3f}"),
    ("bpftrace_connections_seen_ratio", "bpftrace: share of connections fully seen", "{:.4f}"),
    ("attribution_bpftrace", "bpftrace: events with the owning pid", "{:.3f}"),
    ("bpftrace_cpu_cores", "bpftrace CPU, cores", "{:.3f}"),
]
LIVE_ROWS: list[tuple[str, str, str]] = [
    ("live_connections", "live connections (client ends; as many server ends)", "{:,.0f}"),
    ("agent_ready_s", "agent start → /metrics served, existing sockets seeded, s", "{:.2f}"),
    ("agent_seed_s", "of which seeding (sock_diag + /proc owners), s", "{:.2f}"),
    ("snapshot_s", "agent start → first WebSocket client's snapshot complete, s", "{:.2f}"),
    ("snapshot_complete_ratio", "share of both ends in that snapshot (target 1)", "{:.4f}"),
    ("snapshot_owner_ratio", "share with the owning pid (target 1)", "{:.4f}"),
    ("agent_rss_mib", "netstatd RSS after the snapshot, MiB (target ≤ 200)", "{:,.0f}"),
    ("agent_rss_peak_mib", "netstatd peak RSS (VmHWM), MiB", "{:,.0f}"),
]


def rate_name(rate: str) -> str:
    return "max" if rate == "max" else f"{int(float(rate)) // 1000}k" if float(rate) % 1000 == 0 else rate


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of every numeric top-level key, and how often each target was met."""
    out: dict[str, Any] = {"runs": len(runs)}
    keys = [
        k for k in runs[0] if all(isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool) for r in runs)
    ]
    for k in keys:
        values = [r[k] for r in runs]
        out[k] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["targets"] = {t: [r["targets"][t] for r in runs] for t in runs[0].get("targets", {})}
    return out


def _fmt(fmt: str, v: float) -> str:
    return fmt.format(v)


def _cell(agg: dict[str, Any] | None, fmt: str) -> str:
    if agg is None:
        return DASH
    if agg["min"] == agg["max"]:
        return _fmt(fmt, agg["median"])
    return f"{_fmt(fmt, agg['median'])} [{_fmt(fmt, agg['min'])} {DASH} {_fmt(fmt, agg['max'])}]"


def render_table(results: dict[str, Any]) -> str:
    scenarios = results["churn"]
    cols = list(scenarios)
    lines = [
        f"Generated by `make bench` (bench/suite.py) on {results['date']}, commit `{results['commit_short']}`"
        f"{' (work tree with uncommitted changes)' if results['worktree_changes'] else ''}; "
        f"{results['seconds']:g} s per phase, {results['repeat']} runs per rate, interleaved; "
        f"median [min {DASH} max]. Suite time {results['suite_s']:.0f} s.",
        "",
        "| churn | " + " | ".join(f"rate {c}" for c in cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
    ]
    for key, label, fmt in ROWS:
        cells = [_cell(scenarios[c]["summary"].get(key), fmt) for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    targets = sorted({t for c in cols for t in scenarios[c]["summary"]["targets"]})
    lines += ["", "| target (runs met / runs) | " + " | ".join(f"rate {c}" for c in cols) + " |"]
    lines.append("| --- | " + " | ".join("---" for _ in cols) + " |")
    for t in targets:
        cells = []
        for c in cols:
            got = [v for v in scenarios[c]["summary"]["targets"].get(t, []) if v is not None]
            cells.append(f"{sum(got)} / {len(got)}" if got else "n/a")
        lines.append(f"| `{t}` | " + " | ".join(cells) + " |")
    live = results.get("live")
    if live:
        lines += ["", f"| pre-existing state ({live['summary']['runs']} runs) | agent started beside them |"]
        lines.append("| --- | --- |")
        lines += [f"| {label} | {_cell(live['summary'].get(key), fmt)} |" for key, label, fmt in LIVE_ROWS]
        for t, got in live["summary"].get("targets", {}).items():
            lines.append(f"| target `{t}` (runs met / runs) | {sum(bool(v) for v in got)} / {len(got)} |")
    lines += ["", "Not in the suite yet: " + "; ".join(TODO_SCENARIOS.values()) + "."]
    return "\n".join(lines)


def write_docs(table: str, path: Path = DOCS) -> bool:
    text = path.read_text()
    if START not in text or END not in text:
        print(f"no {START} ... {END} block in {path}: table not written", file=sys.stderr)
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="churn seconds per phase (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="runs per rate, interleaved (default 3)")
    p.add_argument("--rates", default="10000,max", help="comma-separated rates (default 10000,max)")
    p.add_argument("--connections", type=int, default=100_000, help="live connections (default 100000, 0: skip)")
    p.add_argument("--json", type=Path, default=OUT / "results.json")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/benchmarks.md")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("run as root (network namespaces, eBPF)")
    OUT.mkdir(parents=True, exist_ok=True)
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    t0 = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {rate_name(r): [] for r in rates}
    live_runs: list[dict[str, Any]] = []
    for i in range(1, args.repeat + 1):
        for rate in rates:
            name = rate_name(rate)
            path = OUT / f"churn-{name}-{i}.json"
            print(
                f"== churn rate {rate}, run {i}/{args.repeat} ({time.monotonic() - t0:.0f} s into the suite)",
                flush=True,
            )
            cmd = [sys.executable, str(HERE / "churn.py"), "--seconds", f"{args.seconds:g}", "--rate", rate]
            r = subprocess.run([*cmd, "--json", str(path)])
            if r.returncode != 0:
                print(f"churn run failed ({r.returncode}): {' '.join(cmd)}", file=sys.stderr)
                return r.returncode or 1
            runs[name].append(json.loads(path.read_text()))
        if args.connections:
            path = OUT / f"live-{i}.json"
            print(f"== pre-existing state, {args.connections:,} connections, run {i}/{args.repeat}", flush=True)
            cmd = [sys.executable, str(HERE / "live.py"), "--connections", str(args.connections)]
            r = subprocess.run([*cmd, "--json", str(path)])
            if r.returncode != 0:
                print(f"live run failed ({r.returncode}): {' '.join(cmd)}", file=sys.stderr)
                return r.returncode or 1
            live_runs.append(json.loads(path.read_text()))
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git("rev-parse", "HEAD"),
        "commit_short": git("rev-parse", "--short", "HEAD"),
        "worktree_changes": git("status", "--porcelain", "--untracked-files=no").splitlines(),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "seconds": args.seconds,
        "repeat": args.repeat,
        "suite_s": round(time.monotonic() - t0, 1),
        "churn": {
            name: {"rate": rate, "summary": aggregate(rs), "runs": rs}
            for (name, rs), rate in zip(runs.items(), rates, strict=True)
        },
        "live": {"connections": args.connections, "summary": aggregate(live_runs), "runs": live_runs}
        if live_runs
        else None,
        "not_run": TODO_SCENARIOS,
    }
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    table = render_table(results)
    print(table)
    print(f"results: {args.json}")
    if not args.no_docs and write_docs(table):
        print(f"table written to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
