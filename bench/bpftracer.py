"""bpftrace beside netstatd (issue 7): an in-kernel event counter and a one-line-per-event printer.

Both attach to `tracepoint:sock:inet_sock_set_state` (kprobes are compiled out on the test machine)
and keep only TCP sockets of the two network namespaces given as positional parameters, so the
bench counts its own traffic only.

- COUNTER_SCRIPT: `count()` per namespace, printed when bpftrace exits. This is the independent
  "kernel events expected": a per-CPU map update, nothing leaves the kernel per event.
- PRINTER_SCRIPT: what a user would write instead of netstatd, one `printf` line per state change
  (pid and comm of the current task, the socket address, the states and ports) into a file.
  bpftrace ships these through a perf buffer (default size); what it could not read it reports
  as "Lost N events".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

# TCP states (include/net/tcp_states.h)
ESTABLISHED, SYN_SENT, SYN_RECV, CLOSE, LISTEN = 1, 2, 3, 7, 10
IPPROTO_TCP = 6

_NETNS = "((struct sock *)args->skaddr)->__sk_common.skc_net.net->ns.inum"

COUNTER_SCRIPT = f"""
tracepoint:sock:inet_sock_set_state
/args->protocol == {IPPROTO_TCP}/
{{
  $ns = {_NETNS};
  if ($ns == $1 || $ns == $2) {{ @events[$ns] = count(); }}
}}
"""

PRINTER_SCRIPT = f"""
tracepoint:sock:inet_sock_set_state
/args->protocol == {IPPROTO_TCP}/
{{
  $ns = {_NETNS};
  if ($ns == $1 || $ns == $2) {{
    printf("%llu %d %llx %u %d %d %d %d %s\\n", nsecs, pid, args->skaddr, $ns,
           args->oldstate, args->newstate, args->sport, args->dport, comm);
  }}
}}
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bpftool_json(*argv: str) -> Any:
    r = subprocess.run(["bpftool", "-j", *argv], capture_output=True, text=True, timeout=30)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None


class Bpftrace:
    """One bpftrace process running `script` with the two netns inodes; output and log in `workdir`."""

    def __init__(self, name: str, script: str, netns: tuple[int, int], workdir: Path) -> None:
        self.name = name
        self.script_path = workdir / f"{name}.bt"
        self.script_path.write_text(script)
        self.out_path = workdir / f"{name}.out"
        self.log_path = workdir / f"{name}.log"
        self.netns = netns
        self.proc: subprocess.Popen | None = None
        self.prog_ids: list[int] = []
        self._log: Any = None

    def start(self, timeout: float = 60) -> Bpftrace:
        """Starts bpftrace and waits until its program is attached to the tracepoint."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["bpftrace", "-q", "-o", str(self.out_path), str(self.script_path), *map(str, self.netns)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Ctrl-C on the bench must not end it before the bench has read what it needs.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bpftrace {self.name} exited with {self.proc.returncode}: {self.log_text()}")
            links = bpftool_json("perf", "show") or []
            self.prog_ids = [
                link["prog_id"]
                for link in links
                if link.get("pid") == self.proc.pid and link.get("tracepoint") == "inet_sock_set_state"
            ]
            if self.prog_ids:
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"bpftrace {self.name} did not attach within {timeout}s: {self.log_text()}")

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return _cpu_seconds(self.proc.pid)

    def prog_stats(self) -> dict[str, int]:
        """recursion_misses: runs the kernel skipped because another tracing program was active on that CPU."""
        out = Counter[str]()
        for pid in self.prog_ids:
            info = bpftool_json("prog", "show", "id", str(pid)) or {}
            out["recursion_misses"] += int(info.get("recursion_misses", 0))
            out["run_cnt"] += int(info.get("run_cnt", 0))
            out["run_time_ns"] += int(info.get("run_time_ns", 0))
        return dict(out)

    def wait_output_quiet(self, quiet_s: float = 1.0, timeout: float = 120) -> float:
        """Waits until the output file stopped growing for quiet_s (bpftrace has drained its buffers)."""
        t0 = time.monotonic()
        last, since = -1, t0
        while time.monotonic() - since < quiet_s and time.monotonic() - t0 < timeout:
            size = self.out_path.stat().st_size if self.out_path.exists() else 0
            if size != last:
                last, since = size, time.monotonic()
            time.sleep(0.1)
        return time.monotonic() - t0

    def stop(self, timeout: float = 60) -> int | None:
        """SIGINT (bpftrace then prints its maps and exits), SIGKILL if it does not."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode if self.proc else None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def lost_reported(self) -> int:
        """Events bpftrace says its perf buffer dropped ("Lost N events"), from its log and its output."""
        text = self.log_text() + (self.out_path.read_text(errors="replace")[-4000:] if self.out_path.exists() else "")
        return sum(int(n) for n in re.findall(r"Lost (\d+) events", text))


def read_counts(counter: Bpftrace) -> dict[int, int]:
    """The counter's `@events[netns]: N` lines (after it stopped)."""
    text = counter.out_path.read_text() if counter.out_path.exists() else ""
    return {int(ns): int(n) for ns, n in re.findall(r"@events\[(\d+)\]:\s*(\d+)", text)}


def analyse_printer(
    path: Path,
    client_ns: int,
    server_ns: int,
    client_owners: dict[int, set[int]],
    server_owners: dict[int, set[int]],
) -> dict[str, Any]:
    """Connections the printed lines fully show, and events printed with the owning pid.

    Owners are known by port: client sockets by their remote port (each client connects to one
    server port), server sockets by their local port. A connection is a socket address from its
    opening transition (CLOSE->SYN_SENT on the client, LISTEN->SYN_RECV on the server) to its
    ->CLOSE; addresses are reused, and a lost line may merge or split connections. "Fully seen":
    opening and closing lines present, and every line of it printed with an owning pid.
    """
    sides: dict[int, tuple[str, dict[int, set[int]]]] = {
        client_ns: ("client", client_owners),
        server_ns: ("server", server_owners),
    }
    stats = {name: Counter[str]() for name, _ in sides.values()}
    comms = Counter[str]()
    # socket address -> [all lines with owner pid so far]
    open_conns: dict[tuple[int, int], list[bool]] = {}
    lines = bad = 0
    # bpftrace reads one perf buffer per CPU and prints them a batch at a time: put the lines back
    # in kernel time order (first field) so each socket's transitions come in order.
    ordered = path.with_suffix(".sorted")
    subprocess.run(
        ["sort", "-s", "-n", "-k1,1", "-S", "20%", "-T", str(path.parent), "-o", str(ordered), str(path)],
        check=True,
        env={**os.environ, "LC_ALL": "C"},
    )
    with ordered.open(errors="replace") as f:
        for line in f:
            parts = line.split(" ", 8)
            if len(parts) < 9:
                if line.strip():
                    bad += 1
                continue
            try:
                pid, sk, ns = int(parts[1]), int(parts[2], 16), int(parts[3])
                old, new, sport, dport = int(parts[4]), int(parts[5]), int(parts[6]), int(parts[7])
            except ValueError:
                bad += 1
                continue
            side = sides.get(ns)
            if side is None:
                continue
            lines += 1
            name, owners = side
            st = stats[name]
            if name == "client":
                owner_port, opening = dport, old == CLOSE and new == SYN_SENT
            else:
                if new == LISTEN or (old == LISTEN and new == CLOSE):  # the listener itself
                    owner_port, opening = sport, False
                    st["listener_events"] += 1
                    ok = pid in owners.get(owner_port, ())
                    st["events"] += 1
                    st["events_owner_pid"] += ok
                    continue
                owner_port, opening = sport, old == LISTEN and new == SYN_RECV
            ok = pid in owners.get(owner_port, ())
            st["events"] += 1
            st["events_owner_pid"] += ok
            if not ok:
                comms[parts[8].strip()] += 1
            key = (ns, sk)
            if opening:
                if key in open_conns:
                    st["without_close"] += 1  # its ->CLOSE line was lost
                open_conns[key] = [ok]
            else:
                conn = open_conns.get(key)
                if conn is not None:
                    conn[0] = conn[0] and ok
            if new == CLOSE:
                conn = open_conns.pop(key, None)
                if conn is None:
                    st["without_open"] += 1
                else:
                    st["open_and_close"] += 1
                    st["fully_seen"] += conn[0]
    ordered.unlink()
    for ns, _ in open_conns:
        stats[sides[ns][0]]["without_close"] += 1
    out: dict[str, Any] = {"lines": lines, "unparsed_lines": bad}
    for name, st in stats.items():
        out[name] = {
            k: st[k]
            for k in (
                "events",
                "events_owner_pid",
                "listener_events",
                "open_and_close",
                "fully_seen",
                "without_open",
                "without_close",
            )
        }
    out["wrong_pid_comms"] = dict(comms.most_common(5))
    return out
