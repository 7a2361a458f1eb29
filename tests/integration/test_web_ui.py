"""The web UI as a user meets it: Debian's Chromium (headless) against a real agent, real traffic
between two network namespaces, assertions on what the page shows."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dns.name
import pytest

from netstatd.testing.agent import AgentProcess
from netstatd.testing.dns import Resolver, Zone
from netstatd.testing.stream import StreamClient
from tests.conftest import require, require_root
from tests.integration import peers
from tests.integration.peers import finish, start_peer
from tests.integration.test_tcp_close import RECEIVED, SENT

# Root needs --no-sandbox. The browser must not reach beyond the agent: no background services, and
# every host name but the agent's address fails to resolve (it would otherwise query the machine's DNS).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_MS = 15_000

# A process whose executable's file name and comm are HTML: the page must show them as text.
HOSTILE_EXE = "<img src=x onerror=window.__xss=1>"
HOSTILE_COMM = "<i id=pwn>x</i>"  # 15 characters: the kernel keeps at most 15
HOSTILE_CLIENT = f"""
import socket, sys
open('/proc/self/comm', 'w').write({HOSTILE_COMM!r})
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print('ready', c.getsockname()[1], flush=True)
sys.stdin.read()
"""


def require_chromium() -> None:
    """Needs Debian's chromium (make test-packages); Playwright never downloads a browser here."""
    require(os.path.exists(CHROMIUM), f"needs {CHROMIUM} (Debian package chromium; make test-packages installs it)")


@contextlib.contextmanager
def chromium(args: list[str]):
    """Debian's Chromium, headless, launched by Playwright (root and chromium required)."""
    require_root()
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


@pytest.fixture(scope="module")
def browser():
    with chromium(CHROMIUM_ARGS) as b:
        yield b


@pytest.fixture(scope="module")
def ui_agent(tmp_path_factory):
    """This module's own agent, so the restart test disturbs no other module. With loopback traffic,
    so the loopback filter has real rows to act on."""
    require_root()
    log = tmp_path_factory.mktemp("ui-agent") / "netstatd.log"
    with AgentProcess("--loopback", log_path=log) as agent:
        yield agent


@pytest.fixture
def page(browser):
    # Playwright polls wait_for_function() predicates with eval(), which the page's CSP forbids; the
    # assertions on the DOM below hold with or without the CSP.
    context = browser.new_context(viewport={"width": 1600, "height": 900}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def held(hosts):
    """A TCP connection from a to b that stays open for the test: (client, server, server port)."""
    server, port = start_peer(hosts.b, peers.TCP_HOLD_SERVER, hosts.b.ipv4)
    client, _ = start_peer(hosts.a, peers.TCP_HOLD_CLIENT, hosts.b.ipv4, str(port))
    yield client, server, port
    finish(client, server)


def rows(page, view="conn"):
    return page.locator(f"#grid-{view} .tabulator-row")


def column(page, field, view="conn") -> list[str]:
    return page.locator(f'#grid-{view} .tabulator-row .tabulator-cell[tabulator-field="{field}"]').all_inner_texts()


def wait_rows(page, predicate, view="conn"):
    """Wait until the rows shown satisfy predicate(list of row texts)."""
    texts: list[str] = []
    deadline_ms = TIMEOUT_MS
    step = 100
    while deadline_ms > 0:
        texts = rows(page, view).all_inner_texts()
        # a row element whose cells are not filled in yet (mid-redraw) shows no text: look again
        if all(t.strip() for t in texts) and predicate(texts):
            return texts
        page.wait_for_timeout(step)
        deadline_ms -= step
    status = page.inner_text("#status").replace("\n", " | ")
    raise AssertionError(f"rows never matched; status: {status}; url: {page.url}; last rows: {texts[:20]}")


def wait_query(page, fragment: str) -> None:
    """Wait until the address bar's query string has fragment (history.replaceState is not a navigation)."""
    page.wait_for_function("f => decodeURIComponent(location.search).includes(f)", arg=fragment)


def shown_counts(page) -> tuple[int, int]:
    m = re.search(r"([\d,]+) of ([\d,]+) rows", page.inner_text("#status-rows"))
    assert m, page.inner_text("#status")
    return int(m[1].replace(",", "")), int(m[2].replace(",", ""))


def test_live_connection_row_with_pid_and_exe_and_a_port_filter_kept_in_the_url(ui_agent, hosts, held, page):
    # held: another connection, so the port filter has rows to hide
    page.goto(ui_agent.url + "/")
    page.wait_for_function("document.getElementById('status-link').textContent === 'connected'")
    # opened after the page: it arrives as a live event, not in the snapshot
    server, port = start_peer(hosts.b, peers.TCP_HOLD_SERVER, hosts.b.ipv4)
    client, _ = start_peer(hosts.a, peers.TCP_HOLD_CLIENT, hosts.b.ipv4, str(port))
    try:
        page.fill('input[name="conn.port"]', str(port))
        wait_query(page, f"conn.port={port}")
        exe = os.path.basename(os.path.realpath(sys.executable))
        pids = (str(client.pid), str(server.pid))
        # the client's socket and the server's
        texts = wait_rows(page, lambda ts: len(ts) == 2 and all(any(p in t for t in ts) for p in pids))
        for pid in (client.pid, server.pid):
            assert any(str(pid) in t and exe in t and hosts.b.ipv4 in t for t in texts), (pid, texts)
        assert all(str(port) in t for t in texts)
        # the port is part of the page's subscription: the held connection's rows leave the page itself
        held_port = held[2]
        page.wait_for_function(
            "p => ![...window.netstatd.store.nodes.values()].some((n) =>"
            " [...n.conns.values()].some((c) => c.localPort === p || c.remotePort === p))",
            arg=held_port,
        )
        assert shown_counts(page)[0] == 2

        page.reload()
        assert page.input_value('input[name="conn.port"]') == str(port)
        texts = wait_rows(page, lambda ts: len(ts) == 2)
        assert all(str(port) in t for t in texts)

        # narrowing further: only the side whose remote port is the server's
        page.select_option('select[name="conn.side"]', "remote")
        wait_query(page, "conn.side=remote")
        texts = wait_rows(page, lambda ts: len(ts) == 1)
        assert str(client.pid) in texts[0]
    finally:
        finish(client, server)


def test_sorting_by_a_column(ui_agent, held, page):
    page.goto(ui_agent.url + "/?view=conn&conn.state=ESTABLISHED")
    wait_rows(page, lambda ts: len(ts) >= 2)
    header = page.locator('#grid-conn .tabulator-col[tabulator-field="pid"]')
    header.click()
    wait_query(page, "conn.sort=pid:asc")
    pids = [int(p) for p in column(page, "pid")]
    assert pids == sorted(pids) and len(pids) >= 2
    header.click()
    wait_query(page, "conn.sort=pid:desc")
    pids = [int(p) for p in column(page, "pid")]
    assert pids == sorted(pids, reverse=True)
    page.reload()  # the sort is in the URL too
    wait_rows(page, lambda ts: len(ts) >= 2)
    pids = [int(p) for p in column(page, "pid")]
    assert pids == sorted(pids, reverse=True)


def test_ports_view_shows_the_listener(ui_agent, hosts, held, page):
    _, server, port = held
    page.goto(f"{ui_agent.url}/?view=ports&ports.port={port}")
    (text,) = wait_rows(page, lambda ts: len(ts) == 1, view="ports")
    assert hosts.b.ipv4 in text and str(server.pid) in text and "TCP" in text
    assert column(page, "netns", "ports") == [str(hosts.b.netns_inode)]
    page.fill('input[name="ports.exe"]', "no-such-executable")
    wait_rows(page, lambda ts: len(ts) == 0, view="ports")
    wait_query(page, "ports.exe=no-such-executable")


def test_ips_view_shows_the_host_ips(ui_agent, page):
    with StreamClient(ui_agent.ws_url) as stream:
        stream.wait_snapshot()
        host_ips = stream.events[0]["hostIPs"]
    assert host_ips
    page.goto(f"{ui_agent.url}/?view=ips&ips.type=host")
    # any: other work on this machine may add or remove an address between the two snapshots
    texts = wait_rows(page, lambda ts: any(ip in t for t in ts for ip in host_ips), view="ips")
    assert all("host" in t for t in texts)
    page.select_option('select[name="ips.type"]', "loopback")
    texts = wait_rows(page, lambda ts: any("127.0.0.1" in t for t in ts), view="ips")
    assert not any(ip in t for t in texts for ip in host_ips)


def test_deployment_view_renders_the_repository_manifest(ui_agent, page):
    page.goto(ui_agent.url + "/?view=deploy")
    page.wait_for_function("document.querySelector('#deploy-manifests pre') !== null")
    manifest = (REPO / "deploy/netstatd.yaml").read_text()
    # one section per file of deploy/ (there may be more than the DaemonSet's manifest)
    section = page.locator("#deploy-manifests section", has=page.locator("h3", has_text="deploy/netstatd.yaml"))
    assert section.locator("pre").text_content() == manifest
    assert "kubectl apply -f deploy/netstatd.yaml" in page.inner_text("#deploy-commands")
    assert "port-forward" in page.inner_text("#deploy-commands")
    texts = wait_rows(page, lambda ts: len(ts) >= 3, view="deploy")
    assert any("netstatd-headless" in t for t in texts)
    page.fill('input[name="deploy.q"]', "headless")
    wait_rows(page, lambda ts: len(ts) == 1, view="deploy")


def test_dns_view_lists_failing_names_per_client_as_text(ui_agent, page):
    # A name whose first label is HTML (it needs no escape in a DNS name's text): shown as text.
    hostile = dns.name.Name([b"<img/src=x/onerror=window.__xss=1>", b"<i/id=pwn>x</i>", b"gone", b"test", b""])
    with Zone([]) as zone, Resolver(zone, ui_agent.dnstap_port, log_queries=True, nxdomain=("gone.test.",)) as r:
        page.goto(f"{ui_agent.url}/?view=dns")
        assert r.query(hostile, source="127.0.0.2").rcode() == 3
        assert r.query("plain.gone.test.", "AAAA", source="127.0.0.3").rcode() == 3
        wait_rows(page, lambda ts: len(ts) == 2, view="dns")
    shown = hostile.to_text(omit_final_dot=True)
    assert column(page, "client", "dns") == ["127.0.0.2", "127.0.0.3"]  # a client's names together, by client
    assert column(page, "name", "dns") == [shown, "plain.gone.test"]
    assert column(page, "rcode", "dns") == ["NXDOMAIN", "NXDOMAIN"]
    assert column(page, "qtype", "dns") == ["A", "AAAA"]
    assert all(float(ms) >= 0 for ms in column(page, "latency", "dns"))
    assert page.evaluate("document.querySelectorAll('#grid-dns img, #pwn').length") == 0
    assert page.evaluate("window.__xss") is None
    page.fill('input[name="dns.q"]', "plain")
    wait_rows(page, lambda ts: len(ts) == 1 and "plain.gone.test" in ts[0], view="dns")
    wait_query(page, "dns.q=plain")


def test_hostile_exe_and_comm_are_shown_as_text(ui_agent, hosts, tmp_path, page):
    # A copy of the interpreter whose file name is HTML (so /proc/PID/exe is), and which sets its comm.
    exe = tmp_path / HOSTILE_EXE
    shutil.copy(os.path.realpath(sys.executable), exe)
    server, port = start_peer(hosts.b, peers.TCP_HOLD_SERVER, hosts.b.ipv4)
    client = hosts.a.popen(
        str(exe),
        "-c",
        HOSTILE_CLIENT,
        hosts.b.ipv4,
        str(port),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout.readline().startswith("ready")
        page.goto(f"{ui_agent.url}/?view=conn&conn.port={port}&conn.side=remote")
        (text,) = wait_rows(page, lambda ts: len(ts) == 1 and HOSTILE_EXE in ts[0])
        assert HOSTILE_COMM in text
        assert page.evaluate("document.querySelectorAll('#grid-conn img, #pwn').length") == 0
        assert page.evaluate("window.__xss") is None
    finally:
        finish(client, server)


def test_page_reconnects_after_the_agent_restarts(held, tmp_path, page):
    _, _, port = held
    agent = AgentProcess(log_path=tmp_path / "first.log").start()
    try:
        page.goto(f"{agent.url}/?view=conn&conn.port={port}")
        wait_rows(page, lambda ts: len(ts) == 2)
        agent.stop()
        page.wait_for_function("document.getElementById('status-link').textContent.startsWith('reconnecting')")
        events_before = page.inner_text("#status-events")
        # the old rows stay on screen while the agent is away
        assert len(rows(page).all_inner_texts()) == 2
        agent = AgentProcess(port=agent.port, log_path=tmp_path / "second.log").start()
        page.wait_for_function("document.getElementById('status-link').textContent === 'connected'", timeout=30_000)
        texts = wait_rows(page, lambda ts: len(ts) == 2)
        assert all(str(port) in t for t in texts)
        assert page.inner_text("#status-events") != events_before
    finally:
        agent.stop()


def test_closed_connections_fade_then_leave_after_the_linger_delay(ui_agent, hosts, page):
    server, port = start_peer(hosts.b, peers.TCP_SERVER, hosts.b.ipv4)
    page.goto(f"{ui_agent.url}/?view=conn&conn.port={port}&conn.linger=3")
    page.wait_for_function("document.getElementById('status-link').textContent === 'connected'")
    client, _ = start_peer(hosts.a, peers.TCP_CLIENT, hosts.b.ipv4, str(port))
    finish(client, server)
    texts = wait_rows(page, lambda ts: len(ts) == 2 and all("CLOSE" in t for t in ts))
    assert page.locator("#grid-conn .tabulator-row.closed").count() == 2, texts
    page.wait_for_function(
        "[...document.querySelectorAll('#grid-conn .tabulator-row.closed')].every(r => +r.style.opacity < 0.9)"
    )
    wait_rows(page, lambda ts: len(ts) == 0)  # gone after 3 s


# The store and row logic with events a single agent cannot produce here (pods, DNS, several nodes
# as the multiplexer sends them), run in the browser on the modules the page loads.
STORE_SCENARIO = (Path(__file__).parent / "web_store_scenario.js").read_text()


def test_store_classifies_endpoints_dedups_and_resets_per_node(ui_agent, page):
    page.goto(ui_agent.url + "/")
    out = page.evaluate(STORE_SCENARIO)
    assert out["kinds"] == {
        "n1/1": ["host", "pod", "shop/web"],  # a pod IP known from another node's inventory
        "n1/2": ["host", "external", "example.com"],  # the DNS cache names it
        "n1/3": ["host", "external", "one.one"],  # remoteHostname from the event
        "n2/9": ["pod", "host", "node n1"],
    }
    assert out["dedup"] == ["n1/1", "n1/2", "n1/3"]  # the outbound side of the n1<->pod link is kept
    assert out["noExternal"] == 2
    assert out["byNamespace"] == 2
    assert out["ipTypes"]["10.244.1.5"] == ["pod", ""]
    assert out["ipTypes"]["10.0.0.2"] == ["host", ""]
    assert out["ipTypes"]["93.184.216.34"] == ["external", "example.com"]
    assert out["afterExpiry"] == ["", "one.one"]
    assert out["duringReset"] == [["n1", 3, 0], ["n2", 1, 1]]
    assert out["afterReset"] == [["n1", 3, 0], ["n2", 0, 0]]
    assert out["lingering"] == 2  # the closed TCP connection and the expired UDP flow
    assert out["afterLinger"] == ["2", "3"]
    assert out["afterSession"] == [["n1", ["4"]]]  # the old rows were replaced, the absent node dropped
    assert out["muxNodes"] == [["n1", 1, ["10.0.0.1"]], ["n2", 1, ["10.0.0.2"]]]
    assert out["afterRemoved"] == [["n1"], []]


# -- every filter of every live view, against real rows --------------------------------------------

UDP_EXE_NAME = "nsd-udp-server"  # a copy of the interpreter, so the Ports view's exe filter has a target


@pytest.fixture(scope="module")
def scene(ui_agent, hosts, tmp_path_factory):
    """Real traffic between the test namespaces, held open for the module: TCP over IPv4 and IPv6
    (a -> b), a UDP flow (a -> b), and a TCP connection over loopback inside a. Row keys are
    (localIP, localPort, remoteIP, remotePort)."""
    a, b = hosts.a, hosts.b
    exe = tmp_path_factory.mktemp("exe") / UDP_EXE_NAME
    shutil.copy(os.path.realpath(sys.executable), exe)
    procs = []

    def peer(host, script, *args, binary=sys.executable):
        proc = host.popen(str(binary), "-c", script, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline().split()
        assert line and line[0] == "ready", f"peer failed to start: {line}"
        return proc, int(line[1])

    try:
        s4, p4 = peer(b, peers.TCP_HOLD_SERVER, b.ipv4)
        c4, c4port = peer(a, peers.TCP_HOLD_CLIENT, b.ipv4, str(p4))
        _s6, p6 = peer(b, peers.TCP_HOLD_SERVER, b.ipv6)
        _c6, c6port = peer(a, peers.TCP_HOLD_CLIENT, b.ipv6, str(p6))
        _su, pu = peer(b, peers.UDP_SERVER, b.ipv4, "3", binary=exe)
        _cu, cuport = peer(a, peers.UDP_CONNECTED_CLIENT, b.ipv4, str(pu))
        _sl, pl = peer(a, peers.TCP_HOLD_SERVER, "127.0.0.1")
        _cl, clport = peer(a, peers.TCP_HOLD_CLIENT, "127.0.0.1", str(pl))
        with StreamClient(ui_agent.ws_url) as stream:
            stream.wait_snapshot()
            node = stream.events[0]["nodeName"]
        yield {
            "node": node,
            "ports": {"tcp4": p4, "tcp6": p6, "udp": pu, "lo": pl},
            "pids": {"c4": c4.pid, "s4": s4.pid},
            "rows": {
                "c4": (a.ipv4, c4port, b.ipv4, p4),
                "s4": (b.ipv4, p4, a.ipv4, c4port),
                "c6": (a.ipv6, c6port, b.ipv6, p6),
                "s6": (b.ipv6, p6, a.ipv6, c6port),
                "cu": (a.ipv4, cuport, b.ipv4, pu),
                "su": (b.ipv4, pu, a.ipv4, cuport),
                "cl": ("127.0.0.1", clport, "127.0.0.1", pl),
                "sl": ("127.0.0.1", pl, "127.0.0.1", clport),
            },
        }
    finally:
        peers.stop(*procs)


# What each view's rows are made of, read from the grid's rows (all of them: the grid draws only those
# on screen); the status bar's "N of M rows" is checked against them.
ROW_FIELDS = {
    "conn": [
        "protocol",
        "family",
        "state",
        "localIP",
        "localPort",
        "remoteIP",
        "remotePort",
        "localKind",
        "remoteKind",
        "node",
        "namespace",
        "podName",
        "closedAt",
        "exe",
        "pid",
        "bytesSent",
        "bytesReceived",
        "rtt",
        "failed",
        "failure",
    ],
    "ports": ["protocol", "family", "ip", "port", "node", "exe", "comm", "pid"],
    "ips": ["ip", "type", "family", "node"],
}


def grid_rows(page, view: str) -> list[dict]:
    fields = json.dumps(ROW_FIELDS[view])
    return page.evaluate(
        f"(() => {{ const fs = {fields}; return (window.netstatd?.grids.{view}?.all || [])"
        ".map((r) => Object.fromEntries(fs.map((f) => [f, r[f] ?? null]))); })()"
    )


def conn_key(r: dict) -> tuple:
    return (r["localIP"], r["localPort"], r["remoteIP"], r["remotePort"])


def set_control(page, view: str, key: str, value) -> None:
    name = f"{view}.{key}"
    control = page.locator(f'[name="{name}"]')
    tag = control.evaluate("e => e.tagName + ':' + e.type")
    if tag == "SELECT:select-one":
        control.select_option(str(value))
    elif tag == "INPUT:checkbox":
        control.set_checked(bool(value))
    else:
        control.fill(str(value))


def control_value(page, view: str, key: str):
    control = page.locator(f'[name="{view}.{key}"]')
    return control.is_checked() if control.get_attribute("type") == "checkbox" else control.input_value()


def wait_grid(page, view: str, check, what: str) -> list[dict]:
    """Wait until check(rows) holds for the grid's rows and the status bar agrees with them."""
    last: list[dict] = []
    for _ in range(TIMEOUT_MS // 100):
        last = grid_rows(page, view)
        if check(last) and shown_counts(page)[0] == len(last):
            return last
        page.wait_for_timeout(100)
    raise AssertionError(f"{what}: rows never matched; url {page.url}; {len(last)} rows, first: {last[:5]}")


def check_filter(page, url: str, view: str, settings: dict, keep, present=(), absent=(), key=None, narrows=True):
    """Set the filters through the page's controls; then every row passes keep(row), the rows whose key
    is in present are shown and those in absent are not, fewer rows than the total (narrows), and
    the same after a reload from the URL (which must hold the filters)."""
    key = key or conn_key
    page.goto(url)

    def ok(rows):
        keys = {key(r) for r in rows}
        return all(keep(r) for r in rows) and set(present) <= keys and not keys & set(absent)

    # before: the rows to hide are there (the agent has sent them)
    wait_grid(page, view, lambda rows: set(present) | set(absent) <= {key(r) for r in rows}, f"{settings}: before")
    for k, v in settings.items():
        set_control(page, view, k, v)
    for k, v in settings.items():
        wait_query(page, f"{view}.{k}={int(v) if isinstance(v, bool) else v}")
    what = f"{view} {settings}"
    rows = wait_grid(page, view, ok, what)
    shown, total = shown_counts(page)
    if narrows:  # the rows to hide were shown before and are gone: at the server (a subscription), or
        # in the page, which then shows fewer rows than it holds
        assert absent or shown < total, f"{what}: did not narrow ({shown} of {total})"
    page.reload()
    for k, v in settings.items():
        assert control_value(page, view, k) == (v if isinstance(v, bool) else str(v)), (what, k)
    rows = wait_grid(page, view, ok, what + " after a reload")
    return rows


def conn_cases(scene):
    r = scene["rows"]
    p = scene["ports"]
    kinds = lambda row: (row["localKind"], row["remoteKind"])  # noqa: E731
    return [
        # (filters, every row passes, our rows shown, our rows hidden, narrows)
        ({"proto": "UDP"}, lambda x: x["protocol"] == "UDP", ["cu", "su"], ["c4", "c6", "cl"], True),
        ({"proto": "TCP"}, lambda x: x["protocol"] == "TCP", ["c4", "s6", "cl"], ["cu", "su"], True),
        ({"state": "ESTABLISHED"}, lambda x: x["state"] == "ESTABLISHED", ["c4", "s4", "c6"], ["cu"], True),
        ({"state": "ACTIVE"}, lambda x: x["state"] == "ACTIVE", ["cu", "su"], ["c4", "s4"], True),
        ({"state": "open"}, lambda x: not x["closedAt"], ["c4", "cu", "cl"], [], None),
        (
            {"port": p["tcp4"]},
            lambda x: p["tcp4"] in (x["localPort"], x["remotePort"]),
            ["c4", "s4"],
            ["c6", "cu"],
            True,
        ),
        ({"port": p["tcp4"], "side": "local"}, lambda x: x["localPort"] == p["tcp4"], ["s4"], ["c4"], True),
        ({"port": p["tcp4"], "side": "remote"}, lambda x: x["remotePort"] == p["tcp4"], ["c4"], ["s4"], True),
        ({"fam": "IPv6"}, lambda x: x["family"] == "IPv6", ["c6", "s6"], ["c4", "cu", "cl"], True),
        ({"fam": "IPv4"}, lambda x: x["family"] == "IPv4", ["c4", "cu", "cl"], ["c6", "s6"], True),
        ({"q": r["c6"][2]}, lambda x: r["c6"][2] in (x["localIP"], x["remoteIP"]), ["c6", "s6"], ["c4", "cu"], True),
        ({"node": scene["node"]}, lambda x: x["node"] == scene["node"], ["c4", "cu", "cl"], [], False),
        ({"node": "no-such-node"}, lambda x: False, [], ["c4", "cu", "cl"], True),
        # no containerd here: no pod rows, so these narrow to nothing
        ({"ns": "no-such-namespace"}, lambda x: False, [], ["c4", "cl"], True),
        ({"pod": "no-such-pod"}, lambda x: False, [], ["c4", "cl"], True),
        ({"lo": False}, lambda x: "loopback" not in kinds(x), ["c4", "cu"], ["cl", "sl"], True),
        ({"host": False}, lambda x: "host" not in kinds(x), ["cl"], ["c4", "s4", "cu"], True),
        ({"ext": False}, lambda x: "external" not in kinds(x), ["cl"], ["c4", "s6", "cu"], True),
        ({"pods": False}, lambda x: "pod" not in kinds(x), ["c4", "cu", "cl"], [], None),  # no pods to hide
        # both sockets of a link on this node: one row, the side that connected
        ({"dedup": True}, lambda x: True, ["c4", "c6", "cl"], ["s4", "s6", "sl"], True),
    ]


CONN_CASE_IDS = [
    "proto-udp",
    "proto-tcp",
    "state-established",
    "state-active",
    "state-open",
    "port-any",
    "port-local",
    "port-remote",
    "fam-ipv6",
    "fam-ipv4",
    "search-ip",
    "node",
    "node-none",
    "namespace-none",
    "pod-none",
    "no-loopback",
    "no-host",
    "no-external",
    "no-pods",
    "dedup",
]


@pytest.mark.parametrize("case", range(len(CONN_CASE_IDS)), ids=CONN_CASE_IDS)
def test_each_connections_filter_narrows_the_rows_and_round_trips_in_the_url(ui_agent, scene, page, case):
    settings, keep, present, absent, narrows = conn_cases(scene)[case]
    rows = scene["rows"]
    check_filter(
        page,
        ui_agent.url + "/?view=conn",
        "conn",
        settings,
        keep,
        [rows[k] for k in present],
        [rows[k] for k in absent],
        narrows=bool(narrows),
    )


def ports_cases(scene, hosts):
    p = scene["ports"]
    tcp4 = (hosts.b.ipv4, p["tcp4"])
    tcp6 = (hosts.b.ipv6, p["tcp6"])
    udp = (hosts.b.ipv4, p["udp"])
    return [
        ({"ip": hosts.b.ipv6}, lambda x: hosts.b.ipv6 in x["ip"], [tcp6], [tcp4, udp]),
        ({"proto": "UDP"}, lambda x: x["protocol"] == "UDP", [udp], [tcp4, tcp6]),
        ({"port": p["tcp4"]}, lambda x: x["port"] == p["tcp4"], [tcp4], [tcp6, udp]),
        ({"node": "no-such-node"}, lambda x: False, [], [tcp4, udp]),
        ({"exe": UDP_EXE_NAME}, lambda x: UDP_EXE_NAME in (x["exe"] or ""), [udp], [tcp4, tcp6]),
    ]


@pytest.mark.parametrize("case", range(5), ids=["ip", "proto", "port", "node-none", "exe"])
def test_each_ports_filter_narrows_the_rows_and_round_trips_in_the_url(ui_agent, hosts, scene, page, case):
    settings, keep, present, absent = ports_cases(scene, hosts)[case]
    check_filter(
        page,
        ui_agent.url + "/?view=ports",
        "ports",
        settings,
        keep,
        present,
        absent,
        key=lambda r: (r["ip"], r["port"]),
    )


def ips_cases(hosts):
    a, b = hosts.a, hosts.b
    return [
        ({"ip": b.ipv4}, lambda x: b.ipv4 in x["ip"], [b.ipv4], [b.ipv6, a.ipv4]),
        # a and b are namespaces of their own: their addresses are no host's, i.e. external peers
        ({"type": "external"}, lambda x: x["type"] == "external", [b.ipv4, a.ipv6], ["127.0.0.1"]),
        ({"type": "loopback"}, lambda x: x["type"] == "loopback", ["127.0.0.1"], [b.ipv4]),
        ({"fam": "IPv6"}, lambda x: x["family"] == "IPv6", [b.ipv6, a.ipv6], [b.ipv4, "127.0.0.1"]),
        ({"node": "no-such-node"}, lambda x: False, [], [b.ipv4, "127.0.0.1"]),
    ]


@pytest.mark.parametrize("case", range(5), ids=["ip", "type-external", "type-loopback", "fam-ipv6", "node-none"])
def test_each_ips_filter_narrows_the_rows_and_round_trips_in_the_url(ui_agent, hosts, scene, page, case):
    settings, keep, present, absent = ips_cases(hosts)[case]
    check_filter(page, ui_agent.url + "/?view=ips", "ips", settings, keep, present, absent, key=lambda r: r["ip"])


def test_ips_node_filter_keeps_this_nodes_rows(ui_agent, hosts, scene, page):
    node = scene["node"]
    check_filter(
        page,
        ui_agent.url + "/?view=ips",
        "ips",
        {"node": node},
        lambda x: node in x["node"],
        [hosts.b.ipv4],
        [],
        key=lambda r: r["ip"],
        narrows=False,
    )


# The endpoint colours of docs/ui.md, as the browser computes them from app.css.
COLOURS = {"host": "rgb(11, 87, 208)", "external": "rgb(197, 34, 31)", "loopback": "rgb(107, 114, 128)"}


def endpoint_look(page, row_index: int = 0) -> dict:
    return page.evaluate(
        """(i) => {
          const row = document.querySelectorAll('#grid-conn .tabulator-row')[i];
          const ep = (f) => row.querySelector(`.tabulator-cell[tabulator-field="${f}"] .ep`);
          const look = (e) => ({ cls: e.className, color: getComputedStyle(e).color, text: e.textContent });
          const cell = (f) => row.querySelector(`.tabulator-cell[tabulator-field="${f}"]`).textContent;
          return { local: look(ep('localIP')), remote: look(ep('remoteIP')), pid: cell('pid'), exe: cell('exe') };
        }""",
        row_index,
    )


def test_connections_view_shows_a_real_connection_with_pid_exe_and_colours(ui_agent, hosts, scene, page):
    exe = os.path.basename(os.path.realpath(sys.executable))
    port = scene["ports"]["tcp4"]
    page.goto(f"{ui_agent.url}/?view=conn&conn.port={port}&conn.side=remote")
    wait_rows(page, lambda ts: len(ts) == 1)
    look = endpoint_look(page)
    assert look["pid"] == str(scene["pids"]["c4"]) and look["exe"].startswith(exe), look
    # the client in netns a: a local socket of this node (host, blue) to an address no inventory has
    # (external, red)
    assert "kind-host" in look["local"]["cls"].split() and look["local"]["color"] == COLOURS["host"], look
    assert "kind-external" in look["remote"]["cls"].split() and look["remote"]["color"] == COLOURS["external"], look
    assert hosts.a.ipv4 in look["local"]["text"] and hosts.b.ipv4 in look["remote"]["text"]

    lo = scene["ports"]["lo"]
    page.goto(f"{ui_agent.url}/?view=conn&conn.port={lo}&conn.side=remote")
    wait_rows(page, lambda ts: len(ts) == 1)
    look = endpoint_look(page)
    for side in ("local", "remote"):
        assert "kind-loopback" in look[side]["cls"].split() and look[side]["color"] == COLOURS["loopback"], look


def artifacts_dir() -> Path:
    return Path(os.environ.get("NETSTATD_ARTIFACTS") or REPO / "test-artifacts")


def test_screenshot_of_each_view(ui_agent, scene, page):
    out = artifacts_dir()
    out.mkdir(parents=True, exist_ok=True)
    ready = {
        "conn": lambda: wait_rows(page, lambda ts: len(ts) >= 4),
        "ports": lambda: wait_rows(page, lambda ts: len(ts) >= 3, view="ports"),
        "ips": lambda: wait_rows(page, lambda ts: len(ts) >= 3, view="ips"),
        "deploy": lambda: page.wait_for_function("document.querySelector('#deploy-manifests pre') !== null"),
    }
    saved = []
    for view, wait in ready.items():
        page.goto(f"{ui_agent.url}/?view={view}")
        wait()
        path = out / f"ui-{view}.png"
        page.screenshot(path=str(path))
        assert path.stat().st_size > 10_000
        saved.append(path)
    print(f"screenshots of the four views: {', '.join(map(str, saved))}")


def test_windowed_grid_draws_only_the_rows_on_screen_and_scrolls_to_every_row(ui_agent, scene, page):
    # A short window, so this machine's connections are more than a screenful.
    page.set_viewport_size({"width": 1600, "height": 420})
    page.goto(ui_agent.url + "/?view=conn")
    wait_rows(page, lambda ts: len(ts) >= 4)

    def ends():
        return page.evaluate(
            """() => {
              const key = (r) => `${r.localIP}:${r.localPort}>${r.remoteIP}:${r.remotePort}`;
              const cell = (row, f) => row.querySelector(`.tabulator-cell[tabulator-field="${f}"]`).textContent;
              const fields = ['localIP', 'localPort', 'remoteIP', 'remotePort'];
              const dom = [...document.querySelectorAll('#grid-conn .tabulator-row')].map((row) =>
                key(Object.fromEntries(fields.map((f) => [f, cell(row, f)]))));
              const all = window.netstatd.grids.conn.all.map(key);
              return { dom, all };
            }"""
        )

    first = ends()
    total = len(first["all"])
    assert total > len(first["dom"]), f"fewer rows than a screenful ({total}): nothing to scroll"
    assert first["dom"][0] == first["all"][0]
    page.evaluate("document.querySelector('#grid-conn .vscroll').scrollTop = 1e9")
    page.wait_for_function(
        "() => { const g = window.netstatd.grids.conn; "
        "return g.start > 0 && g.start + g.slice.length === g.all.length; }"
    )
    last = ends()
    # the rows drawn are the last ones of the view, in its order (the ends may differ by a live row)
    assert last["dom"][-1] == last["all"][-1], (last["dom"][-3:], last["all"][-3:])
    assert last["dom"][0] != last["all"][0]


def test_mux_page_says_why_it_shows_no_node(tmp_path, page):
    require_root()
    with AgentProcess("--fanout-service", "", log_path=tmp_path / "agent.log") as agent:
        page.goto(agent.mux_url + "/")
        banner = page.locator("#mux-message")
        banner.wait_for(state="visible")
        assert "FANOUT_SERVICE is not set" in banner.inner_text()
        assert "no peers" in page.inner_text("#status-peers")


def test_mux_page_shows_the_nodes_it_found(hosts, tmp_path, page):
    require_root()
    # the peer list of this one-node cluster: the agent's own node port, by address (no DNS query)
    with AgentProcess(env={"NODE_NAME": "node-x", "FANOUT_SERVICE": "127.0.0.1"}, log_path=tmp_path / "a.log") as agent:
        page.goto(agent.mux_url + "/?view=conn")
        page.wait_for_function("document.getElementById('status-peers').textContent.includes('1 connected')")
        assert page.locator("#mux-message").is_hidden()
        server, port = start_peer(hosts.b, peers.TCP_HOLD_SERVER, hosts.b.ipv4)
        client, _ = start_peer(hosts.a, peers.TCP_HOLD_CLIENT, hosts.b.ipv4, str(port))
        try:
            page.fill('input[name="conn.port"]', str(port))
            texts = wait_rows(page, lambda ts: len(ts) == 2)
            assert all("node-x" in t for t in texts)
            assert page.inner_text("#status-nodes") == "node node-x"
        finally:
            finish(client, server)


def test_url_filters_become_the_subscription_and_clearing_one_restores_every_row(ui_agent, held, page):
    """The Connections filters that the server applies go to /netstat: in the URL the page opens, and as a
    subscribe frame when they change (checked on the wire); the page then holds only matching rows."""
    _, _, port = held
    sent: list[dict] = []
    opened: list[str] = []

    def on_socket(ws) -> None:
        opened.append(ws.url)
        ws.on("framesent", lambda payload: sent.append(json.loads(payload)))

    page.on("websocket", on_socket)
    page.goto(f"{ui_agent.url}/?view=conn&conn.ns=no-such-namespace")
    page.wait_for_function("() => window.netstatd.store.snapshotDone")
    assert "namespace=no-such-namespace" in opened[-1]
    assert page.evaluate("() => [...window.netstatd.store.nodes.values()].reduce((n, x) => n + x.conns.size, 0)") == 0
    set_control(page, "conn", "ns", "")
    wait_rows(page, lambda texts: any(str(port) in t for t in texts))
    # only widened: the server is asked for just the rows it adds, and nothing held is dropped
    assert {"type": "subscribe", "filter": {}, "partial": True, "version": 1} in sent
    set_control(page, "conn", "port", port)
    for _ in range(TIMEOUT_MS // 100):  # the frame goes out as soon as the control changes
        if {"type": "subscribe", "filter": {"port": [port]}} in sent:
            break
        page.wait_for_timeout(100)
    assert {"type": "subscribe", "filter": {"port": [port]}} in sent, sent
    wait_rows(page, lambda texts: texts and all(str(port) in t for t in texts))


def test_a_subscription_too_wide_for_the_page_gets_a_banner_that_narrows_it(ui_agent, held, page):
    """Past the page's Max rows it holds no more connections, and says so with what it left out per
    namespace and node; a node's button narrows the subscription (URL and wire), and raising Max rows
    asks for the snapshot again."""
    sent: list[dict] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(json.loads(payload))))
    page.goto(f"{ui_agent.url}/?view=conn&conn.max=1")
    page.wait_for_function("() => window.netstatd.store.snapshotDone")
    banner = page.locator("#too-wide")
    banner.wait_for(state="visible")
    assert "Too many connections for this page: it holds 1 (Max rows) and left out" in banner.inner_text()
    assert page.evaluate("() => window.netstatd.store.connCount()") == 1
    node_button = banner.locator('[data-key="node"] button').first
    node = node_button.inner_text().rsplit(" (", 1)[0]
    node_button.click()
    wait_query(page, f"conn.node={node}")
    assert control_value(page, "conn", "node") == node
    for _ in range(TIMEOUT_MS // 100):
        if {"type": "subscribe", "filter": {"nodeName": [node]}} in sent:
            break
        page.wait_for_timeout(100)
    assert {"type": "subscribe", "filter": {"nodeName": [node]}} in sent, sent
    set_control(page, "conn", "max", 100000)
    banner.wait_for(state="hidden")
    page.wait_for_function("() => window.netstatd.store.snapshotDone && window.netstatd.store.connCount() >= 2")
    assert sent.count({"type": "subscribe", "filter": {"nodeName": [node]}}) >= 2  # asked again


# -- the traffic columns, failed connections and the "failed only" toggle -----------------------------

# Holds a port that nobody listens on (bound, never listening): a connect to it is refused.
CLOSED_PORT = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
print('ready', s.getsockname()[1], flush=True)
sys.stdin.read()
"""

FAILED_RED = "rgb(253, 226, 225)"  # app.css: #grid-conn .tabulator-row.failed


def shown_by_ports(page) -> dict[tuple[int, int], dict]:
    """The rows on screen, by (local port, remote port): their classes, background and traffic cells."""
    shown = page.evaluate(
        """() => [...document.querySelectorAll('#grid-conn .tabulator-row')].map((row) => {
          const cell = (f) => row.querySelector(`.tabulator-cell[tabulator-field="${f}"]`).textContent;
          return { cls: row.className, background: getComputedStyle(row).backgroundColor, lport: cell('localPort'),
            rport: cell('remotePort'), sent: cell('bytesSent'), received: cell('bytesReceived'), rtt: cell('rtt'),
            error: cell('failure') };
        })"""
    )
    return {(int(r["lport"]), int(r["rport"])): r for r in shown if r["lport"] and r["rport"]}


def sorted_with_missing_last(values: list, reverse: bool) -> bool:
    present = [v for v in values if v is not None]
    return values == sorted(present, reverse=reverse) + [None] * (len(values) - len(present))


def test_traffic_columns_mark_failed_connections_sort_top_talkers_and_filter_failed_only(ui_agent, hosts, page):
    """A refused connect (its CLOSE has error ECONNREFUSED) is red with its error; a client's 1,000,000
    bytes come first sorted by Sent; "failed only" keeps only failed rows, in the URL and after a reload."""
    a, b = hosts.a, hosts.b
    procs = []

    def peer(host, script, *args):
        proc, number = start_peer(host, script, *args)
        procs.append(proc)
        return proc, number

    def refused_connect() -> int:
        proc, port = peer(a, peers.TCP_CONNECT, b.ipv4, str(closed_port))
        assert proc.stdout.readline().strip() == "ECONNREFUSED"
        finish(proc)
        return port

    try:
        _, closed_port = peer(b, CLOSED_PORT, b.ipv4)
        big_server, big_port = peer(b, peers.TCP_EXCHANGE_SERVER, b.ipv4, str(SENT), str(RECEIVED))
        small_server, small_port = peer(b, peers.TCP_EXCHANGE_SERVER, b.ipv4, "1000", "10")
        _, held_port = peer(b, peers.TCP_HOLD_SERVER, b.ipv4)
        _, held_client = peer(a, peers.TCP_HOLD_CLIENT, b.ipv4, str(held_port))
        # Closed rows linger for the test. The search narrows to this module's namespaces in the page
        # itself: a filter that is also the subscription would have the server send the live rows only.
        page.goto(f"{ui_agent.url}/?view=conn&conn.linger=600&conn.q={b.ipv4}")
        page.wait_for_function("() => window.netstatd?.store.snapshotDone")
        big, big_client = peer(a, peers.TCP_EXCHANGE_CLIENT, b.ipv4, str(big_port), str(SENT), str(RECEIVED))
        small, small_client = peer(a, peers.TCP_EXCHANGE_CLIENT, b.ipv4, str(small_port), "1000", "10")
        finish(big, small, big_server, small_server)
        refused = refused_connect()

        def by_ports(rows):
            return {(r["localPort"], r["remotePort"]): r for r in rows}

        def ended(rows):
            ours = by_ports(rows)
            want = [(big_client, big_port), (big_port, big_client), (small_client, small_port), (refused, closed_port)]
            return all(ours.get(k, {}).get("closedAt") for k in want) and ours[(big_client, big_port)]["bytesSent"]

        rows = by_ports(wait_grid(page, "conn", ended, "the transfers and the refused connect closed"))
        fail, client, server = rows[(refused, closed_port)], rows[(big_client, big_port)], rows[(big_port, big_client)]
        assert (fail["failed"], fail["failure"]) == (True, "ECONNREFUSED"), fail
        assert (client["bytesSent"], client["bytesReceived"], client["failed"]) == (SENT, RECEIVED, False), client
        assert (server["bytesSent"], server["bytesReceived"], server["failed"]) == (RECEIVED, SENT, False), server
        assert client["rtt"] > 0 and not client["failure"]

        # marked on screen: the refused connect red with its error, the transfer not
        shown = shown_by_ports(page)
        assert "failed" in shown[(refused, closed_port)]["cls"].split(), shown[(refused, closed_port)]
        assert shown[(refused, closed_port)]["background"] == FAILED_RED
        assert shown[(refused, closed_port)]["error"] == "ECONNREFUSED"
        big_row = shown[(big_client, big_port)]
        assert "failed" not in big_row["cls"].split() and big_row["background"] != FAILED_RED, big_row
        assert (big_row["sent"], big_row["received"]) == ("1.0 MB", "12.3 kB"), big_row
        assert re.fullmatch(r"\d+(\.\d)? (µs|ms)", big_row["rtt"]), big_row
        server_row = shown[(big_port, big_client)]
        assert (server_row["sent"], server_row["received"]) == ("12.3 kB", "1.0 MB"), server_row
        assert shown[(small_client, small_port)]["sent"] == "1.0 kB"

        # sorted by Sent: ascending, then descending (top talkers first); a row without counters last
        header = page.locator('#grid-conn .tabulator-col[tabulator-field="bytesSent"]')
        header.click()
        wait_query(page, "conn.sort=bytesSent:asc")
        ascending = wait_grid(
            page,
            "conn",
            lambda rs: len(rs) >= 5 and sorted_with_missing_last([r["bytesSent"] for r in rs], reverse=False),
            "sorted by Sent, ascending",
        )
        with_bytes = [r for r in ascending if r["bytesSent"] is not None]
        assert (with_bytes[-1]["localPort"], with_bytes[-1]["remotePort"]) == (big_client, big_port), with_bytes[-3:]
        header.click()
        wait_query(page, "conn.sort=bytesSent:desc")
        rows = wait_grid(page, "conn", lambda rs: rs and rs[0]["localPort"] == big_client, "the top talker first")
        assert sorted_with_missing_last([r["bytesSent"] for r in rows], reverse=True), rows
        assert column(page, "localPort")[0] == str(big_client) and column(page, "bytesSent")[0] == "1.0 MB"

        # failed only: in the page (no new subscription: the closed rows stay), and in the URL
        set_control(page, "conn", "failed", True)
        wait_query(page, "conn.failed=1")

        def only_failed(key):
            return lambda rs: rs and all(r["failed"] for r in rs) and key in by_ports(rs)

        rows = wait_grid(page, "conn", only_failed((refused, closed_port)), "failed only")
        assert (big_client, big_port) not in by_ports(rows) and (held_client, held_port) not in by_ports(rows)
        shown_count, total = shown_counts(page)
        assert shown_count < total
        assert all("failed" in r["cls"].split() for r in shown_by_ports(page).values())

        # after a reload: still on (and sorted); the page has only live rows again, none failed, until
        # another connect is refused
        page.reload()
        assert control_value(page, "conn", "failed") is True
        page.wait_for_function(
            "p => window.netstatd?.store.snapshotDone && [...window.netstatd.store.nodes.values()]"
            ".some((n) => [...n.conns.values()].some((c) => c.localPort === p))",
            arg=held_client,
        )
        again = refused_connect()
        rows = wait_grid(page, "conn", only_failed((again, closed_port)), "failed only, after a reload")
        assert (held_client, held_port) not in by_ports(rows)
        assert "conn.sort=bytesSent:desc" in decode(page)
        set_control(page, "conn", "failed", False)
        wait_grid(page, "conn", lambda rs: (held_client, held_port) in by_ports(rs), "failed only off")
        assert "conn.failed" not in decode(page)
    finally:
        peers.stop(*procs)


def decode(page) -> str:
    return page.evaluate("decodeURIComponent(location.search)")
