"""Who may ask what, against a real aiohttp server on loopback: Host, Origin, tokens, the login page,
sessions, and what each refusal looks like (no kernel, no browser: test_web_security.py has Chromium)."""

import base64

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from netstatd.api.access import AccessPolicy, HostNames
from netstatd.api.app import POLICY, build_app
from netstatd.api.auth import FailureThrottle, Sessions, TokenFile, parse_tokens, ws_protocol_token
from netstatd.hub import Hub

TOKEN = "tok-alice-0123456789abcdef"
OTHER = "tok-bob-0123456789abcdef00"


def policy_for(tmp_path, tokens: str | None = f"alice:{TOKEN}\n", **kw) -> AccessPolicy:
    token_file = None
    if tokens is not None:
        (tmp_path / "tokens").write_text(tokens)
        token_file = TokenFile(str(tmp_path / "tokens"))
    hosts = HostNames(["node-1"], kw.pop("allowed_hosts", ()))
    return AccessPolicy(
        hosts,
        frozenset(kw.pop("allowed_origins", ())),
        tokens=token_file,
        sessions=Sessions(token_file) if token_file else None,
        **kw,
    )


async def serve(policy: AccessPolicy) -> TestClient:
    hub = Hub("node-1", lambda: [], lambda: "2026-01-01T00:00:00.000000Z")
    app = build_app(
        hub, lambda: {"type": "host.info", "nodeName": "node-1"}, lambda: [], lambda pid: None, policy=policy
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def authed(tmp_path):
    client = await serve(policy_for(tmp_path))
    yield client
    await client.close()


@pytest.fixture
async def open_agent(tmp_path):
    client = await serve(policy_for(tmp_path, tokens=None, allowed_hosts=("netstatd.example", "*.svc.test")))
    yield client
    await client.close()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- Host: DNS rebinding -------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:5280", "127.0.0.1.evil.example", "svc.test"])
async def test_a_host_that_is_not_ours_gets_421(open_agent, host):
    resp = await open_agent.get("/api/whoami", headers={"Host": host})
    assert resp.status == 421
    body = await resp.json()
    assert body["reason"] == "host" and "--allowed-hosts" in body["error"]
    assert open_agent.app[POLICY].refused["host"] >= 1


@pytest.mark.parametrize(
    "host",
    ["localhost:5280", "LOCALHOST.", "127.0.0.1:9", "[::1]:5280", "node-1", "netstatd.example", "a.b.svc.test:1"],
)
async def test_our_names_and_allowed_hosts_pass(open_agent, host):
    resp = await open_agent.get("/api/whoami", headers={"Host": host})
    assert resp.status == 200, await resp.text()


async def test_the_node_addresses_pass_once_known(tmp_path):
    policy = policy_for(tmp_path, tokens=None)
    client = await serve(policy)
    try:
        assert (await client.get("/healthz", headers={"Host": "192.0.2.7"})).status == 200  # probes: always
        assert (await client.get("/api/whoami", headers={"Host": "192.0.2.7:5280"})).status == 421
        policy.hosts.set_addresses(["192.0.2.7", "2001:db8::7"])
        assert (await client.get("/api/whoami", headers={"Host": "192.0.2.7:5280"})).status == 200
        assert (await client.get("/api/whoami", headers={"Host": "[2001:db8::7]:5280"})).status == 200
    finally:
        await client.close()


# -- Origin: other sites' pages ------------------------------------------------------------------


async def test_an_upgrade_from_another_origin_gets_403(open_agent):
    port = open_agent.server.port
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await open_agent.ws_connect("/netstat", headers={"Origin": "http://127.0.0.1:1"})
    assert e.value.status == 403
    resp = await open_agent.get("/api/containers", headers={"Origin": "http://evil.example"})
    assert resp.status == 403 and (await resp.json())["reason"] == "origin"
    # the page's own origin, as the browser saw it
    ws = await open_agent.ws_connect("/netstat", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert (await ws.receive_json())["type"] == "host.info"
    await ws.close()


async def test_allowed_origins_and_a_tls_terminating_proxy_pass(tmp_path):
    client = await serve(
        policy_for(
            tmp_path, tokens=None, allowed_hosts=("netstatd.example",), allowed_origins=("https://grafana.example",)
        )
    )
    try:
        for origin, host in [
            ("https://grafana.example", "127.0.0.1"),
            ("https://netstatd.example", "netstatd.example"),  # https at the proxy, http to the agent
            ("https://netstatd.example:443", "netstatd.example"),
        ]:
            resp = await client.get("/api/whoami", headers={"Origin": origin, "Host": host})
            assert resp.status == 200, (origin, host)
        resp = await client.get(
            "/api/whoami", headers={"Origin": "https://netstatd.example:8443", "Host": "netstatd.example"}
        )
        assert resp.status == 403
    finally:
        await client.close()


# -- credentials ---------------------------------------------------------------------------------


async def test_without_credentials_every_route_but_healthz_gets_401_json(authed):
    for path in ("/api/containers", "/api/deployment", "/api/pid-exe?pid=1", "/metrics", "/web/app.js"):
        resp = await authed.get(path)
        assert resp.status == 401, path
        assert (await resp.json())["reason"] == "missing"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await authed.ws_connect("/netstat")
    assert e.value.status == 401
    assert (await authed.get("/healthz")).status == 200


async def test_a_bearer_token_opens_every_route(authed):
    resp = await authed.get("/api/whoami", headers=bearer())
    assert await resp.json() == {"name": "alice", "authRequired": True}
    assert (await authed.get("/metrics", headers=bearer())).status == 200
    ws = await authed.ws_connect("/netstat", headers=bearer())
    assert (await ws.receive_json())["type"] == "host.info"
    await ws.close()


async def test_a_wrong_token_gets_401_and_is_counted(authed):
    resp = await authed.get("/api/whoami", headers=bearer(OTHER))
    assert resp.status == 401 and (await resp.json())["reason"] == "invalid_token"
    resp = await authed.get("/api/whoami", headers={"Authorization": f"Basic {TOKEN}"})
    assert resp.status == 401
    policy = authed.app[POLICY]
    assert policy.auth_failures["invalid_token"] == 2 and policy.refused["unauthenticated"] == 2


def protocol_for(token: str) -> str:
    return "base64url.bearer.authorization.k8s.io." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


async def test_a_browser_passes_the_token_as_a_websocket_subprotocol(authed):
    ws = await authed.ws_connect("/netstat", protocols=("netstatd", protocol_for(TOKEN)))
    assert ws.protocol == "netstatd"  # the token is not echoed back
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await authed.ws_connect("/netstat", protocols=("netstatd", protocol_for(OTHER)))
    assert e.value.status == 401


async def test_metrics_public_opens_metrics_only(tmp_path):
    client = await serve(policy_for(tmp_path, metrics_public=True))
    try:
        assert (await client.get("/metrics")).status == 200
        assert (await client.get("/api/containers")).status == 401
    finally:
        await client.close()


# -- the login page and sessions -----------------------------------------------------------------


async def test_the_login_page_keeps_the_url_and_gives_a_strict_httponly_cookie(authed):
    resp = await authed.get("/?view=ports&port=53", headers={"Accept": "text/html"})
    assert resp.status == 401 and resp.content_type == "text/html"
    page = await resp.text()
    assert 'name="next" value="/?view=ports&amp;port=53"' in page
    assert "script" not in resp.headers["Content-Security-Policy"].replace("default-src 'none'", "")

    resp = await authed.post("/login", data={"token": TOKEN, "next": "/?view=ports&port=53"}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/?view=ports&port=53"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http here; under TLS it is Secure
    assert TOKEN not in cookie

    # the cookie jar now holds the session: the UI, the API and the stream work
    assert (await authed.get("/")).status == 200
    assert (await (await authed.get("/api/whoami")).json())["name"] == "alice"
    ws = await authed.ws_connect("/netstat")
    await ws.close()


async def test_a_wrong_token_on_the_login_page_gets_the_page_again(authed):
    resp = await authed.post("/login", data={"token": OTHER, "next": "/?view=ips"}, allow_redirects=False)
    assert resp.status == 401
    page = await resp.text()
    assert "not valid" in page and 'value="/?view=ips"' in page
    assert "Set-Cookie" not in resp.headers


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "/\\evil.example", "javascript:x"])
async def test_login_never_redirects_off_the_agent(authed, target):
    resp = await authed.post("/login", data={"token": TOKEN, "next": target}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/"


async def test_login_from_another_origin_is_refused(authed):
    resp = await authed.post("/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"})
    assert resp.status == 403


async def test_removing_a_token_ends_its_sessions_and_a_new_one_works_without_restart(tmp_path):
    policy = policy_for(tmp_path)
    client = await serve(policy)
    try:
        await client.post("/login", data={"token": TOKEN}, allow_redirects=False)
        assert (await client.get("/api/whoami")).status == 200
        (tmp_path / "tokens").write_text(f"bob:{OTHER}\n# alice left\n")
        assert policy.tokens is not None and policy.tokens.reload_if_changed()
        resp = await client.get("/api/whoami")
        assert resp.status == 401 and (await resp.json())["reason"] == "invalid_session"
        assert (await client.get("/api/whoami", headers=bearer(TOKEN))).status == 401
        assert (await (await client.get("/api/whoami", headers=bearer(OTHER))).json())["name"] == "bob"
    finally:
        await client.close()


async def test_logout_clears_the_cookie(authed):
    await authed.post("/login", data={"token": TOKEN}, allow_redirects=False)
    resp = await authed.post("/logout", allow_redirects=False)
    assert resp.status == 303
    assert (await authed.get("/api/whoami")).status == 401


# -- the pieces ------------------------------------------------------------------------------------


def test_token_file_format(tmp_path):
    tokens = parse_tokens("# comment\n\nalice: a-token-of-enough-length \nbare-token-of-enough-length\n", "f")
    assert [t.name for t in tokens] == ["alice", "line 4"]
    with pytest.raises(ValueError, match="line 1"):
        parse_tokens("name-only:\n", "f")


def test_a_token_file_that_becomes_unreadable_keeps_the_previous_tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"alice:{TOKEN}\n")
    tokens = TokenFile(str(path))
    path.write_text("broken:\n")
    assert not tokens.reload_if_changed()
    assert tokens.check(TOKEN) == "alice" and tokens.reloads == {"ok": 0, "failed": 1}


def test_sessions_expire_and_do_not_survive_a_new_process_key(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"alice:{TOKEN}\n")
    tokens = TokenFile(str(path))
    assert Sessions(tokens).check(Sessions(tokens).issue(TOKEN)) == (None, "invalid_session")
    expired = Sessions(tokens, lifetime_s=-1)
    assert expired.check(expired.issue(TOKEN)) == (None, "expired_session")
    live = Sessions(tokens)
    assert live.check(live.issue(TOKEN)) == ("alice", "")
    assert live.check("garbage")[1] == "invalid_session"
    assert live.check("\uff11\uff12.x")[1] == "invalid_session"  # non-ASCII digits


def test_ws_protocol_token():
    assert ws_protocol_token("netstatd, " + protocol_for("a?b>c")) == "a?b>c"
    assert ws_protocol_token("netstatd") is None
    assert ws_protocol_token("base64url.bearer.authorization.k8s.io.!!!") == ""


def test_failures_from_one_address_are_slowed_down_and_others_are_not():
    t = FailureThrottle(capacity=2)
    delays = [t.failed("10.0.0.1", now=0.0) for _ in range(9)]
    assert delays[:5] == [0.0] * 5 and delays[5:] == [0.1, 0.2, 0.4, 0.8]
    assert t.failed("10.0.0.2", now=1.0) == 0.0
    assert t.failed("10.0.0.1", now=100.0) == 0.0  # the window passed
    assert max(t.failed("x", now=2.0) for _ in range(40)) == FailureThrottle.MAX_DELAY_S


async def test_a_removed_token_closes_the_streams_it_opened_and_no_other(tmp_path):
    from netstatd.api.app import close_revoked

    (tmp_path / "tokens").write_text(f"alice:{TOKEN}\nbob:{OTHER}\n")
    token_file = TokenFile(str(tmp_path / "tokens"))
    policy = AccessPolicy(HostNames(["node-1"], ()), frozenset(), tokens=token_file, sessions=Sessions(token_file))
    client = await serve(policy)
    try:
        by_header = await client.ws_connect("/netstat", headers=bearer())
        await client.post("/login", data={"token": TOKEN}, allow_redirects=False)
        by_cookie = await client.ws_connect("/netstat")
        client.session.cookie_jar.clear()
        bob = await client.ws_connect("/netstat", headers=bearer(OTHER))
        for ws in (by_header, by_cookie, bob):
            assert (await ws.receive_json())["type"] == "host.info"
        (tmp_path / "tokens").write_text(f"bob:{OTHER}\n")
        assert token_file.reload_if_changed()
        assert await close_revoked(client.app) == 2
        for ws in (by_header, by_cookie):
            msg = await ws.receive(timeout=5)
            while msg.type == aiohttp.WSMsgType.TEXT:
                msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and "revoked" in msg.extra
        assert not bob.closed and policy.revoked == 2
        await bob.close()
    finally:
        await client.close()
