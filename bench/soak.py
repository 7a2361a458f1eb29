#!/usr/bin/env python3
"""Memory over a churn soak (issue 7): the agent's RSS every 30 s under 10k conn/s for 10 minutes.

The churn generator of bench/churn.py, the real agent, and one WebSocket client (its own process)
that receives every event and keeps only counts. Reports the RSS samples, their least-squares slope,
and the losses, so a leak and a loss-driven plateau can be told apart.

    sudo .venv/bin/python bench/soak.py [--seconds 600] [--rate 10000] [--interval 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from churn import Generator, counters, tune, wait_caught_up
from harness import OUT, git, interrupted, prepare

from netstatd.testing.agent import AgentProcess
from netstatd.testing.hosts import HostPair

HERE = Path(__file__).resolve().parent
# "Flat": the fitted growth over the whole soak stays within this many MiB.
FLAT_MIB = 10.0


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    den = sum((t - mx) ** 2 for t, _ in samples)
    return 60 * sum((t - mx) * (v - my) for t, v in samples) / den if den else 0.0


def counting_client(ws_url: str, conn: Connection) -> None:
    """Child process: receives every event, keeps counts only; reports them when asked."""
    import aiohttp
    import orjson

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    counts = {"frames": 0, "events": 0, "resets": 0}

    async def answer() -> None:
        while True:
            await asyncio.sleep(0.2)
            if conn.poll():
                conn.recv()
                conn.send(dict(counts))

    async def run() -> None:
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url, max_msg_size=0) as ws:
            conn.send("connected")
            answering = asyncio.create_task(answer())
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = orjson.loads(msg.data)
                batch = data if isinstance(data, list) else [data]
                counts["frames"] += 1
                counts["events"] += len(batch)
                counts["resets"] += sum(1 for e in batch if e.get("type") == "stream.reset")
            answering.cancel()

    asyncio.run(run())


def run(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        pair = HostPair()
        stack.callback(pair.close)
        pair.open()
        tune(pair)
        agent = AgentProcess(log_path=OUT / "agent-soak.log")
        stack.callback(agent.stop)
        agent.start()
        assert agent.proc is not None
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        ws = ctx.Process(target=counting_client, args=(agent.ws_url, child), daemon=True, name="soak-ws")
        ws.start()
        stack.callback(lambda: (ws.kill(), ws.join(5)))
        if not parent.poll(30):
            raise RuntimeError("the WebSocket client did not connect")
        parent.recv()
        gen = Generator(pair, False, args.rate, args.seconds, args.clients, args.servers)
        stack.callback(gen.close)
        gen.start()
        before = counters(agent)
        samples: list[tuple[float, float]] = [(0.0, round(_rss_mib(agent.proc.pid), 1))]
        print(f"  {args.seconds:g} s at {args.rate:g} conn/s; RSS every {args.interval:g} s", flush=True)
        gen.go()
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            time.sleep(min(args.interval, max(0.0, args.seconds - (time.monotonic() - t0))))
            t = time.monotonic() - t0
            samples.append((round(t, 1), round(_rss_mib(agent.proc.pid), 1)))
            print(f"  {t:6.0f} s  RSS {samples[-1][1]:.1f} MiB", flush=True)
        clients = gen.wait_clients()
        cpu_at_stop = agent.cpu_seconds()
        gen.stop_servers()
        wait_caught_up(agent)
        time.sleep(3)
        after = counters(agent)
        parent.send("report")
        ws_counts = parent.recv() if parent.poll(30) else {}
        slope = slope_per_min(samples)
        growth = slope * args.seconds / 60
        return {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git("rev-parse", "HEAD"),
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "seconds": args.seconds,
            "rate": args.rate,
            "connections_opened": clients["connections"],
            "conn_per_s": round(clients["conn_per_s"], 1),
            "rss_samples_mib": samples,
            "rss_first_mib": samples[0][1],
            "rss_last_mib": samples[-1][1],
            "rss_max_mib": max(v for _, v in samples),
            "rss_slope_mib_per_min": round(slope, 3),
            "rss_fitted_growth_mib": round(growth, 1),
            "rss_flat": abs(growth) <= FLAT_MIB,
            "agent_cpu_cores": round((cpu_at_stop - before["cpu"]) / clients["elapsed"], 3),
            "kernel_events_lost": int(after["lost"] - before["lost"] + after["skipped"] - before["skipped"]),
            "client_events_dropped": int(after["client_dropped"] - before["client_dropped"]),
            "ws": ws_counts,
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--rate", type=float, default=10_000.0)
    p.add_argument("--interval", type=float, default=30.0, help="RSS sampling interval, s (default 30)")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--json", type=Path, default=OUT / "soak.json")
    args = p.parse_args()
    prepare(p)
    try:
        report = run(args)
    except KeyboardInterrupt:
        return interrupted()
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples_mib"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
