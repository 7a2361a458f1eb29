"""deploy/ offline: kustomize renders it, the API schemas accept it, and it keeps its contracts.

Contracts: the names other parts rely on (NODE_NAME, FANOUT_SERVICE, netstatd-headless, the port
names), settings.py's defaults and flags, the Secrets the DaemonSet mounts and what makes them (the
cert-manager component, scripts/make-certs.sh), the capability table of docs/deploy.md, the UI's
Deployment view, the hashed locks, and the Dockerfile / skaffold.yaml pointing at files that exist.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import tomllib
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from netstatd import settings
from netstatd.api.deployment import deployment_info
from netstatd.settings import Settings
from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CERT_MANAGER = DEPLOY / "cert-manager"
MAKE_CERTS = REPO / "scripts/make-certs.sh"
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
MUX = obj("Deployment", "netstatd-mux")
MUX_POD = MUX["spec"]["template"]["spec"]
(MUX_CONTAINER,) = MUX_POD["containers"]
(CONTAINER,) = POD["containers"]
CERT_OBJECTS = load(CERT_MANAGER / "certificates.yaml")
CERT_MANAGER_API = "cert-manager.io/v1"

# The names of the agents' certificate (netstatd-tls), wherever it is made: the Services' names (the
# multiplexer checks netstatd-headless, the FANOUT_SERVICE) and loopback for port-forward.
CERT_DNS_NAMES = [
    "netstatd-headless",
    "netstatd-headless.kube-system.svc",
    "netstatd-headless.kube-system.svc.cluster.local",
    "netstatd",
    "netstatd.kube-system.svc",
    "netstatd.kube-system.svc.cluster.local",
    "localhost",
]
CERT_IPS = ["127.0.0.1", "::1"]
TOKENS_SECRET, TLS_SECRET = "netstatd-tokens", "netstatd-tls"
FLAGS = {"--" + o.field.replace("_", "-"): o.field for o in settings.OPTIONS if o.flag}


def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    require(kubectl, "kubectl is not installed (make test-packages installs kubernetes-client)")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return kustomize(DEPLOY)


@pytest.fixture(scope="module")
def rendered_with_cert_manager(tmp_path_factory) -> list[dict]:
    """deploy/ plus the cert-manager component, through an overlay as docs/deploy.md shows one
    (kustomize takes relative paths only)."""
    overlay = tmp_path_factory.mktemp("overlay")
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY, overlay)],
                "components": [os.path.relpath(CERT_MANAGER, overlay)],
            }
        )
    )
    return kustomize(overlay)


def key(o: dict) -> tuple[str, str, str]:
    return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]


def test_kustomize_renders_every_object(rendered):
    assert sorted(map(key, rendered)) == sorted(map(key, OBJECTS))
    kinds = {o["kind"] for o in rendered}
    assert kinds == {"ServiceAccount", "DaemonSet", "Deployment", "Service", "NetworkPolicy"}


def test_kustomization_lists_every_manifest():
    for folder, kind in ((DEPLOY, "Kustomization"), (CERT_MANAGER, "Component")):
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        assert kustomization["kind"] == kind
        manifests = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert set(kustomization["resources"]) == manifests
    assert "components" not in yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())  # opt-in


def validation_errors(objects: list[dict]) -> list[str]:
    version = kubernetes_validate.latest_version()
    assert tuple(map(int, version.split(".")[:2])) >= (1, 37)
    errors = []
    for o in objects:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except jsonschema.ValidationError as e:  # kubernetes_validate's own is a subclass
            errors.append(f"{key(o)} is not a valid {version} object: {e.message} at {'.'.join(map(str, e.path))}")
    return errors


def test_schemas_of_the_newest_kubernetes_accept_every_object(rendered):
    errors = validation_errors(rendered)
    assert not errors, "\n".join(errors)


def test_cert_manager_component_renders_with_deploy(rendered_with_cert_manager):
    """The overlay has every object of deploy/ plus the component's; the core kinds validate (the
    API schemas do not know cert-manager's kinds: test_cert_manager_certificates checks those)."""
    keys = sorted(map(key, rendered_with_cert_manager))
    assert keys == sorted(map(key, OBJECTS + CERT_OBJECTS))
    core = [o for o in rendered_with_cert_manager if not o["apiVersion"].startswith("cert-manager.io/")]
    assert sorted(map(key, core)) == sorted(map(key, OBJECTS))
    errors = validation_errors(core)
    assert not errors, "\n".join(errors)
    extra = [o for o in rendered_with_cert_manager if o["apiVersion"].startswith("cert-manager.io/")]
    assert {o["kind"] for o in extra} == {"Issuer", "Certificate"}


def cert_object(kind: str, name: str) -> dict:
    (found,) = [o for o in CERT_OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def issuer_of(certificate: dict) -> dict:
    ref = certificate["spec"]["issuerRef"]
    assert ref.get("group", "cert-manager.io") == "cert-manager.io"
    assert ref.get("kind", "Issuer") == "Issuer"  # namespaced, beside the Certificate
    return cert_object("Issuer", ref["name"])


def test_cert_manager_certificates():
    """What the DaemonSet relies on: the Secret it mounts, with server and client auth for every name
    and ca.crt, from a CA issuer that a self-signed issuer bootstraps; everything in kube-system."""
    namespace = DAEMONSET["metadata"]["namespace"]
    for o in CERT_OBJECTS:
        assert o["apiVersion"] == CERT_MANAGER_API
        assert o["metadata"]["namespace"] == namespace
        assert o["kind"] in ("Issuer", "Certificate")
    assert not any(o["kind"] == "Secret" for o in CERT_OBJECTS)

    tls = cert_object("Certificate", TLS_SECRET)["spec"]
    assert tls["secretName"] == TLS_SECRET == secret_volumes()["tls"]
    assert {"server auth", "client auth"} <= set(tls["usages"])
    assert "key encipherment" not in tls["usages"]  # an ECDSA key signs only
    assert tls["dnsNames"] == CERT_DNS_NAMES
    assert tls["ipAddresses"] == CERT_IPS
    assert Settings.fanout_service in tls["dnsNames"]  # the default --peer-server-name
    assert tls["privateKey"]["algorithm"] == "ECDSA"
    assert not tls.get("isCA", False)

    ca_issuer = issuer_of(cert_object("Certificate", TLS_SECRET))["spec"]
    (ca_certificate,) = [
        o
        for o in CERT_OBJECTS
        if o["kind"] == "Certificate" and o["spec"].get("secretName") == ca_issuer["ca"]["secretName"]
    ]
    assert ca_certificate["spec"]["isCA"] is True
    assert ca_certificate["spec"]["secretName"] != TLS_SECRET
    assert ca_certificate["spec"]["privateKey"]["rotationPolicy"] == "Never"  # old and new leaves chain to one key
    assert issuer_of(ca_certificate)["spec"] == {"selfSigned": {}}


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
    """The Service netstatd selects agents and multiplexers; each named port reaches only the pods
    that declare it: http-mux the Deployment's, the others the agents'."""
    agent_ports = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    mux_ports = {p["name"]: p["containerPort"] for p in MUX_CONTAINER["ports"]}
    assert not agent_ports.keys() & mux_ports.keys()
    assert agent_ports | mux_ports == {name: getattr(Settings, field) for name, field in PORTS.items()}
    assert mux_ports == {"http-mux": Settings.http_mux_port}
    service = obj("Service", "netstatd")["spec"]
    assert {p["name"]: p["port"] for p in service["ports"]} == agent_ports | mux_ports
    assert all(p["targetPort"] == p["name"] for p in service["ports"])
    agent_labels = DAEMONSET["spec"]["template"]["metadata"]["labels"]
    mux_labels = MUX["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= agent_labels.items() & mux_labels.items()
    headless = obj("Service", "netstatd-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in headless["ports"]] == [("http", Settings.http_port)]
    # the multiplexers' peers are the agents alone
    assert headless["selector"].items() <= agent_labels.items()
    assert not headless["selector"].items() <= mux_labels.items()
    # the controllers' selectors do not overlap
    assert not DAEMONSET["spec"]["selector"]["matchLabels"].items() <= mux_labels.items()
    assert not MUX["spec"]["selector"]["matchLabels"].items() <= agent_labels.items()


def test_the_mux_deployment_runs_unprivileged():
    assert MUX["spec"]["replicas"] == 2
    assert not MUX_POD.get("hostNetwork") and not MUX_POD.get("hostPID")
    pod_security, security = MUX_POD["securityContext"], MUX_CONTAINER["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert "memory" in MUX_CONTAINER["resources"]["limits"]
    assert MUX_CONTAINER["args"][0] == "mux"
    parsed = settings.parse(MUX_CONTAINER["args"][1:], environ={})
    assert parsed.authenticated and parsed.tls and parsed.peer_ca_file and parsed.peer_cert_file
    assert parsed.listen_address == ()  # authenticated: every address of its pod
    env = {e["name"]: e for e in MUX_CONTAINER["env"]}
    assert env["FANOUT_SERVICE"]["value"] == "netstatd-headless"
    for probe in ("readinessProbe", "livenessProbe"):
        assert MUX_CONTAINER[probe]["httpGet"] == {"path": "/healthz", "port": "http-mux", "scheme": "HTTPS"}
    # its Secrets are readable by its group (fsGroup), not by others
    assert pod_security["fsGroup"] == pod_security["runAsGroup"]
    for volume in MUX_POD["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o440


def args() -> list[tuple[str, str]]:
    """The DaemonSet's args as (flag, value); every one is --flag=value or a bare --flag."""
    pairs = []
    for arg in CONTAINER["args"]:
        assert arg.startswith("--"), arg
        flag, _, value = arg.partition("=")
        pairs.append((flag, value))
    return pairs


def test_args_are_the_settings_defaults():
    ports = {FLAGS[flag]: int(value) for flag, value in args() if FLAGS.get(flag) in PORTS.values()}
    assert ports == {field: getattr(Settings, field) for field in PORTS.values()}


def test_args_are_flags_of_settings_and_parse():
    unknown = [flag for flag, _ in args() if flag not in FLAGS]
    assert not unknown, f"the DaemonSet passes flags settings.OPTIONS does not have: {unknown}"
    parsed = settings.parse(CONTAINER["args"], environ={"NODE_NAME": "node-1"})
    assert parsed.authenticated and parsed.tls
    assert parsed.listen_address == ()  # authenticated: every address, which hostNetwork needs
    assert parsed.auth_token_file and parsed.peer_ca_file
    assert (parsed.peer_cert_file, parsed.peer_key_file) == (parsed.tls_cert_file, parsed.tls_key_file)
    assert not parsed.metrics_public
    assert parsed.peer_server_name in ("", Settings.fanout_service)
    for cidr in parsed.dnstap_allow:
        ipaddress.ip_network(cidr)  # strict: a host address with a prefix is refused
    assert parsed.dnstap_allow
    for service in ("netstatd", "netstatd-headless"):
        for suffix in ("", ".kube-system", ".kube-system.svc", ".kube-system.svc.cluster.local"):
            assert service + suffix in parsed.allowed_hosts


def secret_volumes() -> dict[str, str]:
    """Volume name -> Secret name."""
    return {v["name"]: v["secret"]["secretName"] for v in POD["volumes"] if "secret" in v}


def mount_of(path: str) -> dict:
    """The volumeMount of the container that holds path (a file the agent reads)."""
    found = [m for m in CONTAINER["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert found, f"{path} is named in args but no volumeMount holds it"
    return max(found, key=lambda m: len(m["mountPath"]))


def test_file_args_are_in_read_only_secret_mounts():
    """Every path an arg names is a key of a Secret mounted read-only as a whole folder (a subPath
    mount would never see the Secret change, and the agent re-reads these files)."""
    secrets = secret_volumes()
    assert set(secrets.values()) == {TOKENS_SECRET, TLS_SECRET}
    files = {flag: value for flag, value in args() if value.startswith("/")}
    assert set(files) == {
        "--auth-token-file",
        "--tls-cert-file",
        "--tls-key-file",
        "--peer-ca-file",
        "--peer-cert-file",
        "--peer-key-file",
    }
    keys = {}
    for flag, path in files.items():
        mount = mount_of(path)
        assert mount.get("readOnly") is True, mount
        assert "subPath" not in mount
        assert mount["name"] in secrets, f"{flag}={path} is not in a Secret volume"
        relative = PurePosixPath(path).relative_to(mount["mountPath"])
        keys[flag] = (secrets[mount["name"]], str(relative))
    assert keys["--auth-token-file"] == (TOKENS_SECRET, "tokens")
    assert keys["--tls-cert-file"] == keys["--peer-cert-file"] == (TLS_SECRET, "tls.crt")
    assert keys["--tls-key-file"] == keys["--peer-key-file"] == (TLS_SECRET, "tls.key")
    assert keys["--peer-ca-file"] == (TLS_SECRET, "ca.crt")
    for volume in POD["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o400
            assert not volume["secret"].get("optional", False)  # no agent without its credentials


def test_probes_ask_healthz_over_https():
    for probe in ("readinessProbe", "livenessProbe"):
        get = CONTAINER[probe]["httpGet"]
        assert get == {"path": "/healthz", "port": "http", "scheme": "HTTPS"}, probe


def test_secrets_are_made_by_the_listed_commands_not_shipped():
    """No Secret (no token, no key) is in deploy/; the Deployment view's commands make both before
    applying."""
    for path in DEPLOY.rglob("*.yaml"):
        assert not [o for o in load(path) if o["kind"] == "Secret"], path
        assert "BEGIN" not in path.read_text(), f"{path} holds PEM data"
    commands = deployment_info()["commands"]
    apply = commands.index("kubectl apply -f deploy/netstatd.yaml")
    before = commands[:apply]
    tokens = [c for c in before if f"create secret generic {TOKENS_SECRET} " in c]
    assert tokens and "--from-literal=tokens=" in tokens[0] and "openssl rand" in tokens[0]
    tls = [c for c in before if f"create secret generic {TLS_SECRET} " in c]
    assert tls and "--type=kubernetes.io/tls" in tls[0]
    for key_name in ("tls.crt", "tls.key", "ca.crt"):
        assert f"--from-file={key_name}=" in tls[0]
    assert any(c.startswith("scripts/make-certs.sh ") for c in before)


def test_network_policy_covers_every_port_and_the_agents():
    for name, workload, container in (("netstatd", DAEMONSET, CONTAINER), ("netstatd-mux", MUX, MUX_CONTAINER)):
        policy = obj("NetworkPolicy", name)["spec"]
        assert (
            policy["podSelector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        )
        allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
        assert allowed == {p["name"] for p in container["ports"]}  # named ports: they follow the container's


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
    assert "kubectl apply -f deploy/netstatd.yaml" in info["commands"]


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
    # The runtime lock, hash-checked; then the package alone (a local folder has no hash).
    pip_runs = [
        shlex.split(part.strip())
        for step in steps
        for part in step.split("&&")
        if "/opt/netstatd/bin/pip install" in part
    ]
    assert len(pip_runs) == 2
    assert "--require-hashes" in pip_runs[0] and pip_runs[0][-2:] == ["-r", "requirements.lock"]
    assert "--no-deps" in pip_runs[1] and pip_runs[1][-1] == "." and "-c" not in pip_runs[1]
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


# -- the hashed locks -------------------------------------------------------------------------------

LOCKS = ("requirements.lock", "requirements-dev.lock")


def pins(name: str) -> dict[str, tuple[str, int]]:
    """Package -> (version, hashes) of a pip-compile output; the -r lines are returned as pins too."""
    found: dict[str, tuple[str, int]] = {}
    current = None
    for line in (REPO / name).read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line):
            current = m[1].lower().replace("_", "-")
            found[current] = (m[2], 0)
        elif (m := re.match(r"^\s+--hash=sha256:[0-9a-f]{64}", line)) and current:
            version, hashes = found[current]
            found[current] = (version, hashes + 1)
        elif line.startswith("-r "):
            found[line] = ("", 0)
    return found


def canonical(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_locks_pin_every_package_with_hashes_and_no_index():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    assert [p for p in dev if p.startswith("-r ")] == ["-r requirements.lock"]
    assert not [p for p in runtime if p.startswith("-r ")]
    dev = {k: v for k, v in dev.items() if not k.startswith("-r ")}
    for lock in (runtime, dev):
        assert lock and all(hashes for _, hashes in lock.values()), "a pin without --hash"
    assert not set(runtime) & set(dev), "requirements-dev.lock repeats a pin of requirements.lock"
    assert {canonical(r) for r in pyproject["dependencies"]} <= set(runtime)
    assert {canonical(r) for r in pyproject["optional-dependencies"]["test"]} <= set(dev)
    for name in LOCKS:
        text = (REPO / name).read_text()
        options = re.findall(r"^\s*(-i|--index-url|--extra-index-url|-f|--find-links|--trusted-host)\b", text, re.M)
        assert not options, f"{name} names an index or host: {options}"
        assert "://" not in text, f"{name} holds a URL"


def test_makefile_installs_from_the_hashed_lock():
    rule = re.search(r"^\$\(VENV\)/\.installed:.*?(?=^\S|\Z)", (REPO / "Makefile").read_text(), re.M | re.S)
    assert rule, "no $(VENV)/.installed rule"
    text = rule[0]
    assert "requirements.lock" in text.splitlines()[0] and "requirements-dev.lock" in text.splitlines()[0]
    assert "--require-hashes -r requirements-dev.lock" in text
    assert "--no-deps -e ." in text


# -- scripts/make-certs.sh -------------------------------------------------------------------------


def openssl() -> str:
    path = shutil.which("openssl")
    require(path, "openssl is not installed (make test installs it)")
    return path


def make_certs(directory: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    openssl()
    return subprocess.run(
        [str(MAKE_CERTS), str(directory), *extra], capture_output=True, text=True, timeout=60, check=check
    )


def certificate_text(path: Path) -> str:
    return subprocess.run(
        [openssl(), "x509", "-in", str(path), "-noout", "-text"], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    directory = tmp_path_factory.mktemp("certs") / "out"  # made by the script
    return directory, make_certs(directory, "--san", "DNS:node-1.example", "--san=IP:192.0.2.7")


def test_make_certs_writes_the_four_files_and_prints_the_secret_command(certs):
    directory, run = certs
    for name, mode in (("ca.crt", 0o644), ("ca.key", 0o600), ("tls.crt", 0o644), ("tls.key", 0o600)):
        assert stat.S_IMODE((directory / name).stat().st_mode) == mode, name
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    command = shlex.split(run.stdout.strip())
    assert command[:7] == ["kubectl", "-n", "kube-system", "create", "secret", "generic", TLS_SECRET]
    assert "--type=kubernetes.io/tls" in command
    files = dict(a.removeprefix("--from-file=").split("=", 1) for a in command if a.startswith("--from-file="))
    assert files == {name: str(directory / name) for name in ("tls.crt", "tls.key", "ca.crt")}


def test_make_certs_names_and_usages_match_the_component(certs):
    directory, _ = certs
    text = certificate_text(directory / "tls.crt")
    (san,) = re.findall(r"X509v3 Subject Alternative Name:.*?\n\s*(.+)", text)
    names = [n.strip() for n in san.split(",")]
    dns = [n.removeprefix("DNS:") for n in names if n.startswith("DNS:")]
    ips = [str(ipaddress.ip_address(n.removeprefix("IP Address:"))) for n in names if n.startswith("IP Address:")]
    assert dns == [*CERT_DNS_NAMES, "node-1.example"]
    assert ips == [*CERT_IPS, "192.0.2.7"]
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "CA:FALSE" in text and "prime256v1" in text
    assert "CA:TRUE" in certificate_text(directory / "ca.crt")


def test_make_certs_gives_a_working_mutual_tls_pair(certs):
    """An agent's server side with the pair and ca.crt as client CA; a multiplexer's client side that
    checks the name netstatd-headless and presents the same pair (strict X.509 checks on both)."""
    directory, _ = certs
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "tls.crt", directory / "tls.key")
    server.load_verify_locations(directory / "ca.crt")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(directory / "ca.crt"))
    client.load_cert_chain(directory / "tls.crt", directory / "tls.key")
    for context in (server, client):
        context.verify_flags |= ssl.VERIFY_X509_STRICT
    peer: dict = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls:
                peer.update(tls.getpeercert())
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        with client.wrap_socket(raw, server_hostname=Settings.fanout_service) as tls:
            assert tls.recv(2) == b"ok"
        thread.join(10)
    assert dict(x[0] for x in peer["subject"])["commonName"] == "netstatd"


def test_make_certs_again_keeps_the_ca_and_new_ca_replaces_it(tmp_path):
    make_certs(tmp_path)
    ca, leaf = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "tls.crt").read_bytes()
    make_certs(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert (tmp_path / "tls.crt").read_bytes() != leaf
    subprocess.run(
        [openssl(), "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt")],
        check=True,
        capture_output=True,
    )
    make_certs(tmp_path, "--new-ca")
    assert (tmp_path / "ca.crt").read_bytes() != ca
    (tmp_path / "ca.key").unlink()
    refused = make_certs(tmp_path, check=False)
    assert refused.returncode != 0 and "ca.key" in refused.stderr


@pytest.mark.parametrize("bad", [["--san", "node-1"], ["--san", "URI:x"], ["--days", "0"], ["--bogus"], []])
def test_make_certs_refuses_bad_arguments(tmp_path, bad):
    run = subprocess.run(
        [str(MAKE_CERTS), *([str(tmp_path / "d")] if bad else []), *bad], capture_output=True, text=True
    )
    assert run.returncode != 0 and run.stderr
    assert not (tmp_path / "d" / "tls.key").exists()
