import os

import pytest

IN_CI = bool(os.environ.get("CI"))


def require_root() -> None:
    """Kernel and namespace tests need root: skip with a reason locally, fail in CI."""
    if os.geteuid() != 0:
        msg = "needs root (loads eBPF programs / creates network namespaces); run 'make test' as root"
        if IN_CI:
            pytest.fail(msg)
        print(f"SKIP: {msg}")
        pytest.skip(msg)
