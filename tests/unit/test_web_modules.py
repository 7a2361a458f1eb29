"""The UI's pure modules (web/store.js, rows.js, filters.js) under Debian's Node.js, no browser and no root:
tests/unit/web_modules.mjs holds the cases (node:test), this runs it."""

import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import require

SCRIPT = Path(__file__).with_name("web_modules.mjs")


def test_store_rows_and_filters_under_node():
    node = shutil.which("node") or shutil.which("nodejs")
    require(node, "needs node (Debian package nodejs; make test-packages installs it)")
    argv = [node, "--test-reporter=tap", str(SCRIPT)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=SCRIPT.parent)
    report = r.stdout + r.stderr
    assert r.returncode == 0, report
    passed = re.search(r"^# pass (\d+)$", report, re.M)  # TAP's summary: every case ran
    failed = re.search(r"^# fail (\d+)$", report, re.M)
    assert passed and int(passed[1]) > 0 and failed and failed[1] == "0", report
