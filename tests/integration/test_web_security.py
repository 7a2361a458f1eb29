"""The browser protections, in Debian's Chromium against the real agent: another site's page cannot
use the agent, a DNS-rebinding name is refused, and with a token the login page leads to the UI."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator

import pytest

from netstatd.testing.agent import AgentProcess
from tests.conftest import require_root
from tests.integration.test_web_ui import CHROMIUM_ARGS, TIMEOUT_MS, chromium

TOKEN = "alice-0123456789abcdef0123456789"
# evil.example resolves to the agent, as a DNS-rebinding attacker's name would; nothing else resolves
ARGS = [a for a in CHROMIUM_ARGS if not a.startswith("--host-resolver-rules")]
ARGS.append("--host-resolver-rules=MAP evil.example 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")

ATTACKER_PAGE = """<!doctype html><meta charset="utf-8"><title>another site</title><script>
window.result = {};
const ws = new WebSocket("ws://127.0.0.1:AGENT/netstat");
ws.onopen = () => { window.result.ws = "open"; };
ws.onmessage = (m) => { window.result.data = String(m.data).slice(0, 80); };
ws.onerror = () => { window.result.ws = window.result.ws || "failed"; };
fetch("http://127.0.0.1:AGENT/api/containers").then(
  (r) => r.text().then((t) => { window.result.api = "read " + t; }),
  () => { window.result.api = "failed"; });
</script>"""


@pytest.fixture(scope="module")
def browser():
    with chromium(ARGS) as b:
        yield b


@pytest.fixture
def page(browser):
    context = browser.new_context(bypass_csp=True)  # Playwright's waits use eval(), which the CSP forbids
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


@pytest.fixture(scope="module")
def open_agent(tmp_path_factory):
    require_root()
    with AgentProcess(log_path=tmp_path_factory.mktemp("open") / "agent.log") as agent:
        yield agent


@pytest.fixture(scope="module")
def token_agent(tmp_path_factory):
    require_root()
    d = tmp_path_factory.mktemp("token")
    (d / "tokens").write_text(f"alice:{TOKEN}\n")
    with AgentProcess("--auth-token-file", str(d / "tokens"), token=TOKEN, log_path=d / "agent.log") as agent:
        yield agent


def serve_page(html: str) -> Iterator[str]:
    """A page of another origin: its own server on loopback, on a port the kernel picks."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def refused(agent: AgentProcess, reason: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in agent.metrics().splitlines()
        if line.startswith(f'netstatd_http_requests_refused_total{{reason="{reason}"}}')
    )


def test_a_page_of_another_origin_can_neither_open_the_stream_nor_read_the_api(page, open_agent):
    before = refused(open_agent, "origin")
    for url in serve_page(ATTACKER_PAGE.replace("AGENT", str(open_agent.port))):
        page.goto(url)
        page.wait_for_function("window.result.ws && window.result.api")
        result = page.evaluate("window.result")
    assert result == {"ws": "failed", "api": "failed"}, result
    assert refused(open_agent, "origin") >= before + 2  # the agent refused both, not only the browser


def test_a_dns_rebinding_name_is_refused(page, open_agent):
    before = refused(open_agent, "host")
    response = page.goto(f"http://evil.example:{open_agent.port}/")
    assert response is not None and response.status == 421
    assert "not a name of this agent" in page.inner_text("body")
    api = page.evaluate("fetch('/api/containers').then((r) => r.status)")
    assert api == 421
    assert refused(open_agent, "host") >= before + 2


def test_the_login_page_leads_to_working_views_and_a_wrong_token_does_not(page, token_agent):
    page.goto(f"{token_agent.url}/?view=ports")
    page.fill("#token", "not-the-token-0123456789")
    page.click("button[type=submit]")
    assert "not valid" in page.inner_text("form")
    assert page.locator("#grid-ports").count() == 0  # still the login page

    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{token_agent.url}/?view=ports")  # the filters in the URL survive the login
    page.wait_for_function("document.getElementById('status-link').textContent === 'connected'")
    assert page.get_attribute('#tabs [data-view="ports"]', "aria-selected") == "true"
    page.wait_for_selector("#grid-ports .tabulator-row")  # the host's listening ports, from the stream
    assert page.inner_text("#logout") == "Log out alice"
    cookies = page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
        (f"netstatd-session-{token_agent.port}", True, "Strict")
    ]

    page.click("#logout button")
    page.wait_for_selector("#token")  # logged out: the login page again
    assert page.context.cookies() == []


def test_a_page_of_its_own_passes_the_token_as_a_websocket_subprotocol(page, token_agent):
    page.goto(token_agent.url + "/")  # the login page: same origin, no cookie
    encoded = base64.urlsafe_b64encode(TOKEN.encode()).decode().rstrip("=")
    opened = page.evaluate(
        """(p) => new Promise((resolve) => {
            const ws = new WebSocket(p.url, ["netstatd", "base64url.bearer.authorization.k8s.io." + p.token]);
            ws.onmessage = (m) => resolve({protocol: ws.protocol, first: JSON.parse(m.data).type});
            ws.onerror = () => resolve("failed");
        })""",
        {"url": token_agent.ws_url, "token": encoded},
    )
    assert opened == {"protocol": "netstatd", "first": "host.info"}
    wrong = page.evaluate(
        """(url) => new Promise((resolve) => {
            const ws = new WebSocket(url, ["netstatd", "base64url.bearer.authorization.k8s.io.d3Jvbmc"]);
            ws.onopen = () => resolve("open");
            ws.onerror = () => resolve("failed");
        })""",
        token_agent.ws_url,
    )
    assert wrong == "failed"
