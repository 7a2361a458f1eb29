"""Who may ask what, checked before any handler runs: the Host, the Origin, then the credentials.

- Host (always on): a name the agent goes by, one of its addresses, localhost, or --allowed-hosts.
  Anything else is a DNS-rebinding page talking to us under its own name: 421.
- Origin (always on): a browser names the page behind every WebSocket upgrade and cross-origin or
  POST request. Only the page's own origin (as the browser saw it: same host and port as its Host
  header) and --allowed-origins may: otherwise 403. Clients that are not browsers send no Origin.
- Credentials (when --auth-token-file or --peer-ca-file is set): a bearer token, the token as a
  WebSocket subprotocol, a session cookie from the login page, or a client certificate issued by
  --peer-ca-file. /healthz is always open, /metrics with --metrics-public, and the login page.
Every refusal is counted by reason, and answered with a JSON body saying what to do.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from ..metrics import Metric, single
from .auth import FailureThrottle, Sessions, TokenFile, ws_protocol_token

log = logging.getLogger("netstatd.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REFUSALS = ("host", "origin", "unauthenticated", "clients", "clients_per_address")
AUTH_FAILURES = ("missing", "invalid_token", "invalid_session", "expired_session")
AUTH_MESSAGES = {
    "missing": "authentication required: send Authorization: Bearer TOKEN, or log in at /",
    "invalid_token": "the token is not valid",
    "invalid_session": "the session is not valid (the agent restarted, or its token was removed): log in again",
    "expired_session": "the session expired: log in again",
}
OPEN_PATHS = frozenset(("/healthz",))  # no Host check either: probes send the pod IP, and it says nothing
LOGIN_PATHS = frozenset(("/login", "/logout"))
IDENTITY = web.RequestKey("identity", str)  # who the request authenticated as ("" when auth is off)


def refusal(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"error": message, "reason": reason})
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def _host_name(host: str) -> str:
    """A Host header without its port, brackets, trailing dot or case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _netloc(scheme: str, netloc: str) -> str:
    """host[:port] without a default port, lower-case: the part of an origin that must match."""
    netloc = netloc.lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    return netloc[: -len(default)] if default and netloc.endswith(default) else netloc


class HostNames:
    """The names a request may address this agent by (its Host header)."""

    def __init__(self, names: Iterable[str], allowed: Iterable[str]) -> None:
        self.fixed = {n.lower().rstrip(".") for n in names if n} | {"localhost"}
        self.exact = {h.lower().rstrip(".") for h in allowed if not h.startswith("*.")}
        self.suffixes = tuple(h[1:].lower().rstrip(".") for h in allowed if h.startswith("*."))
        self.addresses: set[str] = set()

    def set_addresses(self, addresses: Iterable[str]) -> None:
        """This node's interface addresses (re-read with the host's addresses)."""
        self.addresses = {a.lower() for a in addresses}

    def allows(self, host: str) -> bool:
        name = _host_name(host)
        if name in self.fixed or name in self.exact or name in self.addresses or name.endswith(self.suffixes):
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False


@dataclass
class AccessPolicy:
    """What every HTTP listener of this process enforces (one instance: counters are shared)."""

    hosts: HostNames
    allowed_origins: frozenset[str]
    tokens: TokenFile | None = None
    sessions: Sessions | None = None
    peer_certificates: bool = False  # a verified client certificate (--peer-ca-file) is a credential
    metrics_public: bool = False
    tls: bool = False

    def __post_init__(self) -> None:
        self.refused = dict.fromkeys(REFUSALS, 0)
        self.revoked = 0  # open streams closed because their token was removed
        self.auth_failures = dict.fromkeys(AUTH_FAILURES, 0)
        self.throttle = FailureThrottle()
        self._origins = {self._origin_key(o) for o in self.allowed_origins}

    @property
    def required(self) -> bool:
        return self.tokens is not None or self.peer_certificates

    @staticmethod
    def _origin_key(origin: str) -> str:
        parts = urlsplit(origin.strip())
        return f"{parts.scheme.lower()}://{_netloc(parts.scheme.lower(), parts.netloc)}"

    def origin_allowed(self, origin: str, host: str) -> bool:
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and _netloc(parts.scheme, parts.netloc) == _netloc(parts.scheme, host):
            return True  # the page's own origin, as the browser saw it (also behind a TLS-terminating proxy)
        return self._origin_key(origin) in self._origins

    def session_cookie(self, port: int) -> str:
        """Per port: browsers send a host's cookies to all its ports, and the node and the
        multiplexer ports of one agent (or of two port-forwards) must not overwrite each other's."""
        return f"netstatd-session-{port}"

    def identify(self, request: web.Request, cookie: str) -> tuple[str | None, str]:
        """(who, "") for valid credentials, else (None, one of AUTH_FAILURES)."""
        auth = request.headers.get("Authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            name = self.tokens.check(token.strip()) if self.tokens and scheme.lower() == "bearer" else None
            return (name, "") if name else (None, "invalid_token")
        token = ws_protocol_token(request.headers.get("Sec-WebSocket-Protocol", ""))
        if token is not None:
            name = self.tokens.check(token) if self.tokens and token else None
            return (name, "") if name else (None, "invalid_token")
        if self.peer_certificates and request.transport is not None:
            cert = request.transport.get_extra_info("peercert")
            if cert:  # only a certificate the CA verified gets this far (CERT_OPTIONAL)
                return f"peer {_subject(cert)}", ""
        value = request.cookies.get(cookie)
        if value is not None and self.sessions is not None:
            return self.sessions.check(value)
        return None, "missing"

    def middleware(self, port: int, login_page: Callable[[str], web.Response]) -> Callable:
        cookie = self.session_cookie(port)

        @web.middleware
        async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
            path = request.path
            if path in OPEN_PATHS:
                return await handler(request)
            host = request.headers.get("Host", "")
            if not self.hosts.allows(host):
                self.refused["host"] += 1
                log.debug("refused %s %s from %s: Host %r", request.method, path, request.remote, host)
                return refusal(
                    421,
                    "host",
                    f"Host {host!r} is not a name of this agent (to reach it by that name: --allowed-hosts)",
                )
            origin = request.headers.get("Origin")
            if origin is not None and not self.origin_allowed(origin, host):
                self.refused["origin"] += 1
                log.debug("refused %s %s from %s: Origin %r", request.method, path, request.remote, origin)
                return refusal(
                    403,
                    "origin",
                    f"a page from {origin} may not use this agent; add the origin with --allowed-origins to let it",
                )
            if not self.required or path in LOGIN_PATHS or (path == "/metrics" and self.metrics_public):
                request[IDENTITY] = ""
                return await handler(request)
            who, reason = self.identify(request, cookie)
            if who is not None:
                request[IDENTITY] = who
                return await handler(request)
            await self.failed(request, reason)
            if self.tokens is not None and request.method == "GET" and path == "/" and not _is_upgrade(request):
                return login_page(request.path_qs)  # a browser opening the UI
            return refusal(401, reason, AUTH_MESSAGES[reason], {"WWW-Authenticate": 'Bearer realm="netstatd"'})

        return check

    async def failed(self, request: web.Request, reason: str) -> None:
        """Count a request without valid credentials; a wrong guess is slowed down per source address."""
        self.refused["unauthenticated"] += 1
        self.auth_failures[reason] += 1
        if reason != "missing":  # not a guess: a browser that has not logged in yet
            log.info("refused %s %s from %s: %s", request.method, request.path, request.remote, reason)
            await asyncio.sleep(self.throttle.failed(request.remote or "?"))

    def metrics(self) -> list[Metric]:
        out = [
            Metric(
                "netstatd_http_requests_refused_total",
                "counter",
                "HTTP requests and WebSocket upgrades refused, by reason (host: DNS rebinding; origin: another "
                "site's page; unauthenticated; clients, clients_per_address: WebSocket client limits).",
                [({"reason": r}, n) for r, n in self.refused.items()],
            )
        ]
        if self.required:
            out.append(
                Metric(
                    "netstatd_auth_failures_total",
                    "counter",
                    "Requests without valid credentials, by reason.",
                    [({"reason": r}, n) for r, n in self.auth_failures.items()],
                )
            )
        if self.tokens is not None:
            out.append(
                single(
                    "netstatd_clients_revoked_total",
                    "counter",
                    "WebSocket clients closed because the token they came in with was removed from the file.",
                    self.revoked,
                )
            )
            out.append(
                Metric(
                    "netstatd_auth_token_reloads_total",
                    "counter",
                    "Re-reads of --auth-token-file after it changed, by result (failed: the old tokens stay).",
                    [({"result": r}, n) for r, n in self.tokens.reloads.items()],
                )
            )
        return out


def _is_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def _subject(cert: dict) -> str:
    for field in cert.get("subject", ()):
        for key, value in field:
            if key == "commonName":
                return value
    return "certificate"
