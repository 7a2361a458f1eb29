"""The performance harness itself (issue 7): each scenario for ~2 s, and its JSON has every key, sane.

No performance thresholds here: only that the harness measures and reports what it says it does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require, require_root

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

# The keys of issue 7's churn.json table.
CHURN_KEYS = (
    "conn_per_s_without",
    "conn_per_s_with",
    "kernel_events_expected",
    "kernel_events_lost",
    "connections_opened",
    "connections_delivered",
    "agent_cpu_cores",
    "latency_ms_p50",
    "latency_ms_p99",
    "bpftrace_connections_seen_ratio",
    "bpftrace_events_captured_ratio",
    "bpftrace_cpu_cores",
)
RATIOS = (
    "bpftrace_connections_seen_ratio",
    "bpftrace_events_captured_ratio",
    "bpftrace_connections_open_and_close_ratio",
    "connections_delivered_ratio",
    "attribution_netstatd",
    "attribution_bpftrace",
)
COUNTS = (
    "kernel_events_expected",
    "kernel_events_lost",
    "connections_opened",
    "connections_delivered",
    "server_connections_accepted",
    "server_connections_delivered",
    "bpftrace_events_expected",
    "bpftrace_events_captured",
    "bpftrace_connections_opened",
    "bpftrace_connections_seen",
)


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _need_bpftrace() -> None:
    require(shutil.which("bpftrace"), "bpftrace is not installed (make test installs it)")


def _load_suite():
    spec = importlib.util.spec_from_file_location("bench_suite", BENCH / "suite.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # it imports harness.py beside it, as when run as a script
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def churn_report(tmp_path_factory) -> dict:
    require_root()
    _need_bpftrace()
    out = tmp_path_factory.mktemp("bench") / "churn.json"
    cmd = [sys.executable, str(BENCH / "churn.py"), "--seconds", "2", "--rate", "1000", "--counter-phase"]
    cmd += ["--tls-phase", "--json", str(out)]  # the agent again with TLS and a token: ~10 s more
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=os.environ.copy())
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())


def test_churn_json_has_every_key_of_the_issue(churn_report):
    r = churn_report
    missing = [k for k in CHURN_KEYS if k not in r]
    assert not missing, missing
    for k in CHURN_KEYS:
        assert _number(r[k]), (k, r[k])
        assert r[k] >= 0, (k, r[k])


def test_churn_values_are_sane(churn_report):
    r = churn_report
    for k in RATIOS:
        assert _number(r[k]) and 0.0 <= r[k] <= 1.0, (k, r[k])
    for k in COUNTS:
        assert isinstance(r[k], int) and r[k] >= 0, (k, r[k])
    # The generator ran in every phase, at roughly the rate asked (1000/s for 2 s).
    for k in ("conn_per_s_without", "conn_per_s_with", "conn_per_s_with_bpftrace", "conn_per_s_counter_only"):
        assert 0 < r[k] <= 1100, (k, r[k])
    assert 0.5 <= r["rate_ratio_vs_counter_only"] <= 1.5
    assert 0 < r["connections_opened"] <= 2200
    assert r["connections_delivered"] <= r["connections_opened"]
    assert r["bpftrace_connections_seen"] <= r["bpftrace_connections_opened"]
    # The in-kernel count saw the traffic: a TCP connection makes about 10 state changes (5 per side).
    assert 5 * r["connections_opened"] <= r["kernel_events_expected"] <= 15 * r["connections_opened"]
    assert r["bpftrace_events_captured"] <= r["bpftrace_events_expected"] + 10
    cpus = os.cpu_count() or 1
    for k in ("agent_cpu_cores", "bpftrace_cpu_cores"):
        assert 0 <= r[k] <= cpus, (k, r[k])
    assert 0 < r["latency_ms_p50"] <= r["latency_ms_p99"]
    # Closes delivered by the agent's sock_diag check are part of the delivered ones, and the bench
    # waited for them no longer than its bound.
    assert isinstance(r["state_reconciled"], int) and 0 <= r["state_reconciled"] <= r["connections_delivered"]
    assert 0 <= r["agent_closes_wait_s"] <= 70
    assert r["date"] and len(r["commit"]) == 40
    assert set(r["targets"]) and all(v in (True, False, None) for v in r["targets"].values())


def test_churn_tls_phase_reports_the_same_figures(churn_report):
    """--tls-phase: the agent again with TLS and a token, its client on wss; under "tls", the figures of
    the plain phase (the same keys, the same code), and its targets."""
    r, t = churn_report, churn_report["tls"]
    figures = set(t) - {"targets", "ws", "agent_log_warnings"}
    assert figures <= set(r), figures - set(r)
    for k in ("kernel_events_lost", "connections_opened", "connections_delivered", "server_connections_accepted"):
        assert isinstance(t[k], int) and t[k] >= 0, (k, t[k])
    assert 0 < t["conn_per_s_with"] <= 1100
    assert 0 < t["connections_opened"] <= 2200
    # The wss client was let in with the token and got the churn's connections.
    assert t["ws"]["ws_events"] > 0 and 0 < t["connections_delivered"] <= t["connections_opened"]
    assert 0 < t["server_connections_delivered"] <= t["server_connections_accepted"]
    for k in ("connections_delivered_ratio", "attribution_netstatd"):
        assert _number(t[k]) and 0.0 <= t[k] <= 1.0, (k, t[k])
    assert 5 * t["connections_opened"] <= t["kernel_events_expected"] <= 15 * t["connections_opened"]
    assert 0 <= t["agent_cpu_cores"] <= (os.cpu_count() or 1)
    assert 0 < t["latency_ms_p50"] <= t["latency_ms_p99"]
    assert set(t["targets"]) <= set(r["targets"]) and all(v in (True, False, None) for v in t["targets"].values())
    assert r["phases"]["tls"]["foreign_cpu"]["cpu_s"] >= 0


LIVE_KEYS = (
    "live_connections",
    "agent_ready_s",
    "agent_seed_s",
    "snapshot_s",
    "snapshot_connections",
    "snapshot_connections_expected",
    "snapshot_complete_ratio",
    "snapshot_owner_ratio",
    "agent_rss_mib",
    "agent_rss_peak_mib",
)


@pytest.fixture(scope="module")
def live_report(tmp_path_factory) -> dict:
    require_root()
    out = tmp_path_factory.mktemp("bench") / "live.json"
    cmd = [sys.executable, str(BENCH / "live.py"), "--connections", "2000", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())


def test_live_json_has_every_key_with_sane_values(live_report):
    r = live_report
    for k in LIVE_KEYS:
        assert _number(r[k]) and r[k] >= 0, (k, r.get(k))
    assert r["live_connections"] == 2000 and r["snapshot_connections_expected"] == 4000
    assert r["snapshot_connections"] <= r["snapshot_connections_expected"]
    for k in ("snapshot_complete_ratio", "snapshot_owner_ratio"):
        assert 0.0 <= r[k] <= 1.0, (k, r[k])
    assert 0 < r["agent_seed_s"] <= r["agent_ready_s"] <= r["snapshot_s"]
    assert 0 < r["agent_rss_mib"] <= r["agent_rss_peak_mib"]


def test_soak_json_has_rss_samples_and_a_slope(tmp_path):
    require_root()
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(BENCH / "soak.py"), "--seconds", "3", "--rate", "500", "--interval", "1"]
    r = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(out.read_text())
    assert len(s["rss_samples_mib"]) >= 3
    assert all(t >= 0 and v > 0 for t, v in s["rss_samples_mib"])
    assert _number(s["rss_slope_mib_per_min"]) and isinstance(s["rss_flat"], bool)
    assert 0 < s["connections_opened"] <= 1600 and s["kernel_events_lost"] >= 0 and s["agent_cpu_cores"] >= 0
    assert s["ws"]["events"] > 0


def test_suite_aggregates_and_renders_a_churn_report(churn_report, live_report, tmp_path):
    suite = _load_suite()
    summary = suite.aggregate([churn_report, churn_report])
    assert summary["runs"] == 2
    for k in CHURN_KEYS:
        assert summary[k]["min"] == summary[k]["median"] == summary[k]["max"] == churn_report[k]
    results = {
        "date": churn_report["date"],
        "commit_short": churn_report["commit"][:7],
        "worktree_changes": [],
        "seconds": 2,
        "repeat": 2,
        "suite_s": 1.0,
        "churn": {"1k": {"summary": summary}},
        "live": {"summary": suite.aggregate([live_report])},
    }
    table = suite.render_table(results)
    assert "| generator conn/s, no tracer |" in table
    assert "| live connections (client ends; as many server ends) | 2,000 |" in table
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# x\n\n{suite.START}\nold\n{suite.END}\n\nafter\n")
    assert suite.write_docs(table, doc)
    text = doc.read_text()
    assert "old" not in text and table in text and text.endswith("after\n")


def test_mux_json_has_every_node_merged_and_the_memory_figures(tmp_path):
    require_root()
    out = tmp_path / "mux.json"
    cmd = [sys.executable, str(BENCH / "mux.py"), "--nodes", "2", "--connections", "300", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(out.read_text())
    # every node reports both ends of every live connection, and the mux's client got them all
    assert m["all_merged"] is True and m["rows_per_node_expected"] == 600
    assert set(m["rows_per_node"]) == {"node-0", "node-1"} and all(v >= 600 for v in m["rows_per_node"].values())
    assert m["rows_merged"] >= 1200
    assert len(m["rss_after_mib"]) == len(m["rss_peak_mib"]) == 2
    assert all(0 < a <= p for a, p in zip(m["rss_after_mib"], m["rss_peak_mib"], strict=True))
    assert m["agents_ready_s"] > 0 and m["merge_s"] >= 0 and _number(m["mux_extra_rss_mib"])
