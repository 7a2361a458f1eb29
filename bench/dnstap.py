#!/usr/bin/env python3
"""DNSTap collector throughput (issue "DNSTap collector"): messages/s one core sustains with no loss.

A sender process speaks Frame Streams (bidirectional handshake) to a real
agent's --dnstap-port and paces CLIENT_RESPONSE frames at increasing rates.
Each response is a question, a CNAME and an A record. At each rate the
agent must decode every frame (netstatd_dnstap_frames_total == sent, none
skipped, every answer learned) and keep pace: the last frame is processed
within 0.5 s of being sent. The agent's CPU is reported per step; its event
loop is one thread, so "one core" is what it can use.

    sudo .venv/bin/python bench/dnstap.py [--seconds 5] [--names distinct|repeated] [--json PATH]

distinct: every message a new name and address (worst case: a new cache entry
and a dns.resolved event each). repeated: 1000 names asked again and again
(what a cluster DNS server mostly sends).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import struct
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from netstatd.sources.dnstap.framestream import CONTENT_TYPE, READY, START, STOP, control_frame, data_frame
from netstatd.sources.dnstap.protos import dnstap_pb2 as pb
from netstatd.testing.agent import AgentProcess
from netstatd.testing.stream import StreamClient

OUT = Path(__file__).resolve().parent / "out"
RATES = (5_000, 10_000, 20_000, 30_000, 40_000, 60_000, 80_000, 120_000)
TICK_S = 0.005
KEEP_UP_S = 0.5  # the last frame of a step must be processed within this much of being sent
TARGET = 20_000


def _name(labels: list[bytes]) -> bytes:
    return b"".join(bytes([len(x)]) + x for x in labels) + b"\0"


def response_wire(i: int, qid: int) -> bytes:
    """h<i>.bench.test CNAME edge<i>.bench.test, edge<i> A 10.(i>>16).(i>>8).i, uncompressed."""
    q = _name([b"h%d" % i, b"bench", b"test"])
    target = _name([b"edge%d" % i, b"bench", b"test"])
    addr = bytes([10, (i >> 16) & 255, (i >> 8) & 255, i & 255])
    header = struct.pack(">HHHHHH", qid, 0x8180, 1, 2, 0, 0)
    cname = q + struct.pack(">HHIH", 5, 1, 300, len(target)) + target
    a = target + struct.pack(">HHIH", 1, 1, 300, 4) + addr
    return header + q + struct.pack(">HH", 1, 1) + cname + a


def dnstap_frames(first: int, count: int, distinct: bool) -> list[bytes]:
    out = []
    now = int(time.time())
    for n in range(first, first + count):
        i = n if distinct else n % 1000
        msg = pb.Message(
            type=pb.Message.CLIENT_RESPONSE,
            socket_family=pb.INET,
            socket_protocol=pb.UDP,
            query_address=bytes([10, 99, (n >> 8) & 255, n & 255]),
            query_port=40000,
            response_time_sec=now,
            response_message=response_wire(i, n & 0xFFFF),
        )
        out.append(data_frame(pb.Dnstap(type=pb.Dnstap.MESSAGE, message=msg).SerializeToString()))
    return out


def sender(port: int, conn: Connection) -> None:
    """Child process: one Frame Streams connection; paces each step's frames, reports when sent."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(control_frame(READY, (CONTENT_TYPE,)))
    s.recv(4096)  # ACCEPT
    s.sendall(control_frame(START, (CONTENT_TYPE,)))
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            break
        rate, frames = job
        per_tick = max(1, int(rate * TICK_S))
        t0 = time.monotonic()
        for k in range(0, len(frames), per_tick):
            due = t0 + (k / rate)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            s.sendall(b"".join(frames[k : k + per_tick]))
        conn.send(time.monotonic() - t0)
    s.sendall(control_frame(STOP))
    s.close()


def frames_done(agent: AgentProcess) -> tuple[float, float, float]:
    text = agent.metrics()

    def total(name: str) -> float:
        return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name))

    return (
        total("netstatd_dnstap_frames_total"),
        total("netstatd_dnstap_frames_skipped_total"),
        total("netstatd_dns_answers_total"),
    )


class ResolvedCounter:
    """Counts dns.resolved events a StreamClient received, scanning only what is new."""

    def __init__(self, client: StreamClient) -> None:
        self.client, self.seen, self.count = client, 0, 0

    def __call__(self) -> int:
        events = self.client.events
        end = len(events)
        self.count += sum(1 for e in events[self.seen : end] if e["type"] == "dns.resolved")
        self.seen = end
        return self.count


def run(seconds: float, distinct: bool) -> dict:
    steps = []
    with AgentProcess("--dns-max-names", "2000000") as agent, StreamClient(agent.ws_url) as client:
        client.wait_snapshot()
        resolved = ResolvedCounter(client)
        parent, child = multiprocessing.Pipe()
        proc = multiprocessing.get_context("spawn").Process(target=sender, args=(agent.dnstap_port, child))
        proc.start()
        assert parent.recv() == "ready"
        sent_total = 0
        for rate in RATES:
            count = int(rate * seconds)
            frames = dnstap_frames(sent_total, count, distinct)
            cpu0, t0 = agent.cpu_seconds(), time.monotonic()
            parent.send((rate, frames))
            send_s = parent.recv()
            sent_total += count
            sent_at = time.monotonic()
            while (done := frames_done(agent))[0] < sent_total and time.monotonic() - sent_at < 10:
                time.sleep(0.02)
            lag = time.monotonic() - sent_at
            # every new name reaches the WebSocket client as dns.resolved
            names_expected = sent_total if distinct else min(sent_total, 1000)
            while (names := resolved()) < names_expected and time.monotonic() - sent_at < 10:
                time.sleep(0.05)
            cpu = (agent.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            step = {
                "rate_target": rate,
                "rate_sent": round(count / send_s),
                "frames_sent": count,
                "frames_decoded_total": int(done[0]),
                "frames_sent_total": sent_total,
                "skipped_total": int(done[1]),
                "answers_total": int(done[2]),
                "dns_resolved_received": names,
                "processing_lag_s": round(lag, 3),
                "agent_cpu_cores": round(cpu, 3),
            }
            step["sustained"] = (
                done[0] == sent_total
                and done[1] == 0
                and done[2] == sent_total
                and names == names_expected
                and lag <= KEEP_UP_S
                and step["rate_sent"] >= 0.97 * rate
            )
            steps.append(step)
            print(json.dumps(step), flush=True)
            if not step["sustained"]:
                break
        parent.send(None)
        proc.join(10)
    best = max((s["rate_sent"] for s in steps if s["sustained"]), default=0)
    return {"names": "distinct" if distinct else "repeated", "seconds_per_step": seconds, "steps": steps,
            "sustained_msg_per_s": best, "target_msg_per_s": TARGET}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per rate step")
    ap.add_argument("--names", choices=("distinct", "repeated", "both"), default="both")
    ap.add_argument("--json", type=Path, default=OUT / "dnstap.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/dnstap.py runs the real agent: run it as root")
    modes = (True, False) if args.names == "both" else (args.names == "distinct",)
    results = [run(args.seconds, d) for d in modes]
    for r in results:
        print(f"{r['names']}: sustained {r['sustained_msg_per_s']} msg/s with no loss (target {TARGET})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
