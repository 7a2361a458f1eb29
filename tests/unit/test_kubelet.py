"""The kubelet stand-in's pure parts (testing/kubelet.py, testing/image.py): what it computes from a
manifest before any CRI call. The pod itself runs in tests/integration/test_image.py."""

from __future__ import annotations

import os
import stat

import pytest

from netstatd.testing.image import normalized
from netstatd.testing.kubelet import Kubelet, expand, qos_class, quantity


def test_quantities():
    assert quantity("50m") == pytest.approx(0.05)
    assert quantity("128Mi") == 128 * 2**20
    assert quantity("1Gi") == 2**30
    assert quantity("2") == 2
    assert quantity(3) == 3
    with pytest.raises(ValueError):
        quantity("12 apples")


def test_qos_classes():
    assert qos_class([{"name": "a"}]) == "BestEffort"
    guaranteed = {"limits": {"cpu": "1", "memory": "1Gi"}}
    assert qos_class([{"resources": guaranteed}]) == "Guaranteed"  # limits alone are also the requests
    burstable = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}
    assert qos_class([{"resources": burstable}]) == "Burstable"


def test_env_references_expand_as_the_kubelet_does():
    env = {"NODE_NAME": "node-1"}
    assert expand("--name=$(NODE_NAME)", env) == "--name=node-1"
    assert expand("$(MISSING) and $$(NODE_NAME)", env) == "$(MISSING) and $(NODE_NAME)"


def test_image_references_normalize_as_containerd_resolves_them():
    assert normalized("netstatd:0.1.0") == "docker.io/library/netstatd:0.1.0"
    assert normalized("netstatd") == "docker.io/library/netstatd:latest"
    assert normalized("org/netstatd:1") == "docker.io/org/netstatd:1"
    assert normalized("registry.example:5000/netstatd:1") == "registry.example:5000/netstatd:1"


def test_secret_files_in_the_atomic_writer_layout(tmp_path):
    Kubelet._write_atomic(tmp_path, {"tls.crt": b"CERT", "tls.key": b"KEY"}, None, 0o400)
    data = tmp_path / "..data"
    assert data.is_symlink() and os.readlink(data).startswith("..20")
    for key, value in (("tls.crt", b"CERT"), ("tls.key", b"KEY")):
        assert os.readlink(tmp_path / key) == f"..data/{key}"
        assert (tmp_path / key).read_bytes() == value
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o400


def test_secret_items_pick_keys_paths_and_modes(tmp_path):
    items = [{"key": "tokens", "path": "auth/tokens", "mode": 0o440}]
    Kubelet._write_atomic(tmp_path, {"tokens": b"a:b", "other": b"x"}, items, 0o400)
    assert (tmp_path / "auth" / "tokens").read_bytes() == b"a:b"
    assert stat.S_IMODE((tmp_path / "auth" / "tokens").stat().st_mode) == 0o440
    assert not (tmp_path / "other").exists()
