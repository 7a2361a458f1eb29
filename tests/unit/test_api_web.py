"""The UI's files and the Deployment view's data, as the HTTP API serves them (no kernel, no browser)."""

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from netstatd.api.app import build_app
from netstatd.api.deployment import split_documents
from netstatd.hub import Hub

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def client():
    hub = Hub("node-1", lambda: [], lambda: "2026-01-01T00:00:00.000000Z")
    app = build_app(hub, lambda: {"type": "host.info"}, lambda: [], lambda pid: None)
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "content_type", "contains"),
    [
        ("/", "text/html", b'<script type="module" src="web/app.js">'),
        ("/web/app.js", "text/javascript", b"import"),
        ("/web/store.js", "text/javascript", b"export class Store"),
        ("/web/app.css", "text/css", b".tabulator"),
        ("/web/vendor/tabulator/tabulator_esm.min.js", "text/javascript", b"TabulatorFull"),
        ("/web/vendor/tabulator/tabulator.min.css", "text/css", b".tabulator"),
        ("/web/vendor/tabulator/LICENSE", "text/plain", b"MIT"),
    ],
)
async def test_ui_files_are_served_with_their_content_type(client, path, content_type, contains):
    resp = await client.get(path)
    assert resp.status == 200
    assert resp.content_type == content_type
    assert contains in await resp.read()
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/web/__init__.py",
        "/web/missing.js",
        "/web/../api/app.py",
        "/web/%2e%2e/api/app.py",
        "/web/vendor/",
        "/web/.hidden",
    ],
)
async def test_only_ui_files_are_served(client, path):
    assert (await client.get(path)).status == 404


def test_every_module_the_ui_imports_is_in_the_package():
    web = REPO / "src/netstatd/web"
    for js in web.glob("*.js"):
        for line in js.read_text().splitlines():
            if line.startswith("import ") and " from " in line:
                target = line.rsplit(" from ", 1)[1].strip(" ;\"'")
                assert (js.parent / target).resolve().is_file(), f"{js.name} imports missing {target}"


async def test_deployment_is_the_repository_manifest(client):
    resp = await client.get("/api/deployment")
    body = await resp.json()
    by_path = {f["path"]: f for f in body["files"]}
    assert set(by_path) == {"deploy/" + p.name for p in (REPO / "deploy").glob("*.yaml")}
    file = by_path["deploy/netstatd.yaml"]
    assert file["text"] == (REPO / "deploy/netstatd.yaml").read_text()
    assert (REPO / "deploy").resolve() == (REPO / "src/netstatd/deploy").resolve()  # one copy
    kinds = {(d["kind"], d["name"]) for d in file["documents"]}
    assert {("DaemonSet", "netstatd"), ("Service", "netstatd-headless"), ("Service", "netstatd")} <= kinds
    assert "kubectl apply -f deploy/netstatd.yaml" in body["commands"]
    assert any("port-forward" in c for c in body["commands"])


def test_manifest_ports_match_the_settings_defaults():
    from netstatd.settings import Settings

    docs = {(d["kind"], d["name"]): d for d in split_documents((REPO / "deploy/netstatd.yaml").read_text())}
    want = {
        "http": Settings.http_port,
        "http-mux": Settings.http_mux_port,
        "dnstap": Settings.dnstap_port,
        "dnstap-mux": Settings.dnstap_mux_port,
    }
    ports = {key: {p["name"]: p["port"] for p in docs[key]["ports"]} for key in docs}
    assert ports[("Service", "netstatd")] == want
    # the agents serve all but http-mux, which is the multiplexer Deployment's
    assert ports[("DaemonSet", "netstatd")] | ports[("Deployment", "netstatd-mux")] == want
    assert ports[("Deployment", "netstatd-mux")] == {"http-mux": Settings.http_mux_port}
    text = docs[("DaemonSet", "netstatd")]["text"]
    for needle in (
        "hostNetwork: true",
        "hostPID: true",
        "privileged: false",
        "fieldPath: spec.nodeName",
        "path: /healthz",
    ):
        assert needle in text


def test_package_data_ships_every_ui_and_deploy_file():
    """pip install . must carry the UI, the vendored grid and the manifests (the container has no repo)."""
    import tomllib

    pkg = REPO / "src/netstatd"
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["netstatd"]
    shipped = {f for g in globs for f in pkg.glob(g) if f.is_file()}
    wanted = {
        f
        for folder in ("web", "deploy")
        for f in (pkg / folder).rglob("*")
        if f.is_file() and f.suffix != ".py" and "__pycache__" not in f.parts
    }
    assert wanted - shipped == set()


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "abc",
        "-1",
        "1.5",
        " 1",
        "²",  # str.isdigit() says yes, int() says no
        "٣",  # ARABIC-INDIC DIGIT THREE: int() would take it, it is no pid
        "1" * 5000,  # more digits than int() converts
        str(2**32 + 1),
        str((1 << 22) + 1),  # above PID_MAX_LIMIT
    ],
)
async def test_pid_exe_refuses_what_is_no_pid_with_400(raw):
    asked: list[int] = []
    hub = Hub("node-1", lambda: [], lambda: "2026-01-01T00:00:00.000000Z")
    app = build_app(hub, lambda: {"type": "host.info"}, lambda: [], lambda pid: asked.append(pid))
    async with TestClient(TestServer(app)) as c:
        resp = await c.get("/api/pid-exe", params={"pid": raw})
        assert resp.status == 400
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert "pid must be an integer" in body["error"] and len(body["error"]) < 200
    assert asked == []


@pytest.mark.parametrize("raw", ["0", "1", "4194304"])
async def test_pid_exe_looks_up_any_pid_linux_can_have(client, raw):
    resp = await client.get("/api/pid-exe", params={"pid": raw})
    assert resp.status == 404  # the fixture's look-up knows no process
    assert await resp.json() == {"error": f"no process with pid {int(raw)}", "pid": int(raw)}
