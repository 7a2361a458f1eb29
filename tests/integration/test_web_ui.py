"""The web UI as a user meets it: Debian's Chromium (headless) against a real agent, real traffic
between two network namespaces, assertions on what the page shows."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netstatd.testing.agent import AgentProcess
from netstatd.testing.stream import StreamClient
from tests.conftest import IN_CI, require_root
from tests.integration import peers
from tests.integration.test_kernel_events import finish, start_peer

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
    if not os.path.exists(CHROMIUM):
        msg = f"needs {CHROMIUM} (Debian package chromium; make test-packages installs it)"
        if IN_CI:
            pytest.fail(msg)
        print(f"SKIP: {msg}")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def browser():
    require_root()
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def ui_agent(tmp_path_factory):
    """This module's own agent, so the restart test disturbs no other module."""
    require_root()
    log = tmp_path_factory.mktemp("ui-agent") / "netstatd.log"
    with AgentProcess(log_path=log) as agent:
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
        shown, total = shown_counts(page)
        assert shown == 2 and total > 2, "the filter did not narrow the rows"

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
    assert out["afterReset"] == [["n1", 3, 0], ["n2", 0, 0]]
    assert out["lingering"] == 2  # the closed TCP connection and the expired UDP flow
    assert out["afterLinger"] == ["2", "3"]
    assert out["afterSession"] == [["n1", ["4"]]]  # the old rows were replaced, the absent node dropped
