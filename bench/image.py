#!/usr/bin/env python3
"""The image and the DaemonSet's pod (issue 15): build times, image size, pod start to first /metrics.

- cold build: `scripts/build-image.sh --new-base --no-cache` (the base made anew with mmdebstrap,
  every layer rebuilt; packages still come from the machine's apt and pip sources);
- cached-base build: `--no-cache` with the base image present;
- no-change build: every layer from the cache (what `make test` pays when nothing changed);
- the image's size;
- the DaemonSet's pod run as the kubelet would (testing.agent_pod, as tests/integration/test_image.py):
  seconds from CreateContainer to the first authenticated /metrics answer, and to the agent's
  "serving node" log line (programs attached, existing sockets seeded), RUNS times.

    sudo .venv/bin/python bench/image.py [--runs 5] [--skip-builds] [--json bench/out/image.json]
    make bench-image
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import OUT, git, interrupted, prepare

from netstatd.testing import image
from netstatd.testing.agent_pod import REPO, AgentPod
from netstatd.testing.containerd import PrivateContainerd


def build(*flags: str) -> dict[str, float]:
    start = time.monotonic()
    out = subprocess.run(
        [str(REPO / "scripts/build-image.sh"), *flags], capture_output=True, text=True, check=True
    ).stdout
    seconds = time.monotonic() - start
    size = re.search(r"built in \d+ s, (\d+) MiB", out)
    return {"seconds": round(seconds, 1), "size_mib": int(size[1]) if size else -1}


def pod_starts(runs: int) -> tuple[list[float], list[float]]:
    """Seconds from CreateContainer to the first /metrics answer, and to "serving node", per run."""
    with PrivateContainerd() as ctd, AgentPod(ctd) as pod:
        pod.import_image()
        metrics, serving = [], []
        for _ in range(runs):
            pod.start()
            metrics.append(round(pod.ready_after, 3))
            serving.append(round(pod.serving_after, 3))
            pod.stop_pod()
        return metrics, serving


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="pod starts (default 5)")
    p.add_argument("--skip-builds", action="store_true", help="only the pod starts, with the image as built")
    p.add_argument("--json", type=Path, default=OUT / "image.json")
    args = p.parse_args()
    prepare(p)
    report: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "builder": image.builder(),
    }
    try:
        if not args.skip_builds:
            report["build_cold"] = build("--new-base", "--no-cache")
            report["build_cached_base"] = build("--no-cache")
            report["build_no_change"] = build()
            report["image_size_mib"] = report["build_no_change"]["size_mib"]
        metrics, serving = pod_starts(args.runs)
    except KeyboardInterrupt:
        return interrupted()
    report["create_to_first_metrics_s"] = {"runs": metrics, "median": statistics.median(metrics)}
    report["create_to_serving_s"] = {"runs": serving, "median": statistics.median(serving)}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
