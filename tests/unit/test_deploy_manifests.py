"""deploy/ offline: kustomize renders it, the API schemas accept it, and it keeps its contracts.

Contracts: the names other parts rely on (NODE_NAME, FANOUT_SERVICE, netstatd-headless, the port
names), settings.py's defaults, the capability table of docs/deploy.md, the UI's Deployment view,
and the Dockerfile / skaffold.yaml pointing at files that exist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from netstatd.api.deployment import deployment_info
from netstatd.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PORTS = {  # container/Service port name -> settings field
    "http": "http_port",
    "http-mux": "http_mux_port",
    "dnstap": "dnstap_port",
    "dnstap-mux": "dnstap_mux_port",
}


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


OBJECTS = load(DEPLOY / "netstatd.yaml")


def obj(kind: str, name: str) -> dict:
    (found,) = [o for o in OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


DAEMONSET = obj("DaemonSet", "netstatd")
POD = DAEMONSET["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        reason = "kubectl is not installed (make test-packages installs kubernetes-client)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize deploy/ failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def key(o: dict) -> tuple[str, str, str]:
    return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]


def test_kustomize_renders_every_object(rendered):
    assert sorted(map(key, rendered)) == sorted(map(key, OBJECTS))
    kinds = {o["kind"] for o in rendered}
    assert kinds == {"ServiceAccount", "DaemonSet", "Service", "NetworkPolicy"}


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    manifests = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_schemas_of_the_newest_kubernetes_accept_every_object(rendered):
    version = kubernetes_validate.latest_version()
    assert tuple(map(int, version.split(".")[:2])) >= (1, 37)
    errors = []
    for o in rendered:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except jsonschema.ValidationError as e:  # kubernetes_validate's own is a subclass
            errors.append(f"{key(o)} is not a valid {version} object: {e.message} at {'.'.join(map(str, e.path))}")
    assert not errors, "\n".join(errors)


def test_daemonset_environment_and_service_account():
    env = {e["name"]: e for e in CONTAINER["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["FANOUT_SERVICE"]["value"] == "netstatd-headless" == Settings.fanout_service
    assert env["CONTAINERD_SOCKET"]["value"] == Settings.containerd_socket
    mounts = {m["mountPath"] for m in CONTAINER["volumeMounts"]}
    assert Settings.containerd_socket in mounts
    account = obj("ServiceAccount", "netstatd")
    assert POD["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["namespace"] == DAEMONSET["metadata"]["namespace"]
    assert POD["hostPID"] is True  # /proc of every process (docs/deploy.md)


def test_services_expose_the_container_ports_by_name():
    container_ports = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    assert container_ports == {name: getattr(Settings, field) for name, field in PORTS.items()}
    service = obj("Service", "netstatd")["spec"]
    assert {p["name"]: p["port"] for p in service["ports"]} == container_ports
    assert all(p["targetPort"] == p["name"] for p in service["ports"])
    headless = obj("Service", "netstatd-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in headless["ports"]] == [("http", Settings.http_port)]
    labels = DAEMONSET["spec"]["template"]["metadata"]["labels"]
    for spec in (service, headless):
        assert spec["selector"].items() <= labels.items()


def test_args_are_the_settings_defaults():
    args = dict(a.removeprefix("--").split("=", 1) for a in CONTAINER["args"])
    assert {k.replace("-", "_"): int(v) for k, v in args.items()} == {
        field: getattr(Settings, field) for field in PORTS.values()
    }


def test_network_policy_covers_every_port_and_the_agents():
    policy = obj("NetworkPolicy", "netstatd")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= DAEMONSET["spec"]["template"]["metadata"]["labels"].items()
    allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed == set(PORTS)  # named ports: they follow the container's


def documented_capabilities() -> dict[str, bool]:
    """The capability table of docs/deploy.md: CAP_X -> added in the DaemonSet (yes/no column)."""
    rows = re.findall(r"^\| `CAP_([A-Z_]+)` \| (yes|no) \|", (REPO / "docs/deploy.md").read_text(), re.MULTILINE)
    assert rows, "docs/deploy.md has no capability table"
    return {cap: added == "yes" for cap, added in rows}


def test_capabilities_are_the_documented_ones():
    security = CONTAINER["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    added = security["capabilities"]["add"]
    assert added == [c for c, yes in documented_capabilities().items() if yes]


def test_deployment_view_shows_every_object():
    info = deployment_info()
    shown = {(d["kind"], d["name"]) for f in info["files"] for d in f["documents"]}
    for path in DEPLOY.glob("*.yaml"):
        assert "deploy/" + path.name in {f["path"] for f in info["files"]}
        for o in load(path):
            assert (o["kind"], o.get("metadata", {}).get("name")) in shown
    assert info["commands"][0] == "kubectl apply -f deploy/netstatd.yaml"


def dockerfile_stages() -> list[tuple[str, list[str]]]:
    """(FROM line, its instructions) per stage; continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            stages.append((line, []))
        elif line and not line.startswith("#"):
            stages[-1][1].append(line)
    return stages


def test_dockerfile_copies_files_that_exist():
    stages = dockerfile_stages()
    (builder, steps), (runtime, final) = stages
    assert builder.endswith(" AS builder") and "debian:bookworm-slim" in builder
    assert runtime == "FROM debian:bookworm-slim"  # the builder's Python: the copied venv points at it
    makefile = (REPO / "Makefile").read_text()
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for step in steps:
        if not step.startswith("COPY "):
            continue
        *sources, _dest = step.split()[1:]
        for src in sources:
            if src.startswith("build/"):  # made by the Makefile before the build (`make build/vmlinux.h`)
                assert f"$(BUILD)/{src.removeprefix('build/')}:" in makefile
            else:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
            assert f"!{src}" in ignored or f"!{src}/" in ignored, f".dockerignore leaves {src} out"
    assert any("make src/netstatd/sources/bpf/netstatd.bpf.o" in s for s in steps)
    assert any(s.startswith("COPY --from=builder ") for s in final)
    assert any("libbpf1" in s for s in final) and not any("clang" in s for s in final)
    entry = next(s for s in final if s.startswith("ENTRYPOINT"))
    assert "netstatd" in entry


def test_skaffold_builds_the_dockerfile_and_deploys_the_kustomization():
    skaffold = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    (artifact,) = skaffold["build"]["artifacts"]
    assert (REPO / artifact.get("context", ".") / artifact["docker"]["dockerfile"]).is_file()
    assert CONTAINER["image"].split(":")[0] == artifact["image"]
    for path in skaffold["manifests"]["kustomize"]["paths"]:
        assert (REPO / path / "kustomization.yaml").is_file()
