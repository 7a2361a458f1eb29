"""HTTP and WebSocket API of one node: /netstat, /api/*, /metrics, /healthz, / and the UI's files under /web/.

Every request passes the access policy first (access.py: Host, Origin, credentials).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

import aiohttp
import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from .. import subscription
from ..hub import Hub, Subscriber
from ..metrics import CONTENT_TYPE, Metric, render
from ..protocol import SUBSCRIBE, SUBSCRIBE_ERROR
from . import login
from .access import IDENTITY, AccessPolicy, HostNames, refusal
from .deployment import deployment_info

log = logging.getLogger("netstatd.api")

STREAM_PROTOCOL = "netstatd"  # the subprotocol chosen when a client offers it (browsers passing a token must)
STALL_S = 30.0  # a client that takes no frame for this long is closed as too slow
CLOSE_WAIT_S = 5.0  # for a close frame to go out before the connection is dropped
Report = Callable[[str, BaseException, str], None]  # the supervisor's report(task, exception, consequence)

HUB = web.AppKey("hub", Hub)
HOST_INFO = web.AppKey("host_info", Callable[[], dict[str, Any]])
METRICS = web.AppKey("metrics", Callable[[], list[Metric]])
PID_EXE = web.AppKey("pid_exe", Callable[[int], "dict[str, Any] | None"])
SOCKETS = web.AppKey("sockets", weakref.WeakKeyDictionary)  # open WebSocket -> its upgrade request
CONTAINERS = web.AppKey("containers", Callable[["str | None", "str | None"], "list[dict[str, Any]]"])
POLICY = web.AppKey("policy", AccessPolicy)
CLIENTS = web.AppKey("clients", Counter)  # source address -> WebSocket clients connected now
MAX_PER_ADDRESS = web.AppKey("max_per_address", int)
REPORT = web.AppKey("report", Report)
PORT = web.AppKey("port", int)


def open_policy() -> AccessPolicy:
    """No credentials, only the always-on browser protections (the tests' apps, `make run`)."""
    return AccessPolicy(HostNames((), ()), frozenset())


def _log_report(task: str, exc: BaseException, consequence: str) -> None:
    log.error("internal error in %s (%s): %s", task, consequence, exc, exc_info=exc)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


# What the UI may load, by suffix; anything else under web/ (e.g. __init__.py) is not served.
WEB_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".md": "text/plain", "": "text/plain"}
# Scripts only from our own files and no inline script: event data (exe names, hostnames, labels) is
# attacker-controlled, so even a rendering bug must not run it. Tabulator sets inline styles.
UI_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded agent serves its own UI
}


async def index(request: web.Request) -> web.Response:
    html = resources.files("netstatd.web").joinpath("index.html").read_bytes()
    return web.Response(body=html, content_type="text/html", charset="utf-8", headers=UI_HEADERS)


async def web_file(request: web.Request) -> web.Response:
    """A file of the UI under /web/ (the package folder netstatd/web); no listing, no dot-files."""
    parts = request.match_info["path"].split("/")
    if any(not p or p.startswith(".") for p in parts):
        raise web.HTTPNotFound()
    suffix = "." + parts[-1].rsplit(".", 1)[1] if "." in parts[-1] else ""
    content_type = WEB_TYPES.get(suffix)
    node = resources.files("netstatd.web").joinpath(*parts)
    if content_type is None or not node.is_file():
        raise web.HTTPNotFound()
    return web.Response(body=node.read_bytes(), content_type=content_type, charset="utf-8", headers=UI_HEADERS)


async def deployment(request: web.Request) -> web.Response:
    """deploy/*.yaml as shipped in the package, split into documents, and the commands they list."""
    return json_response(deployment_info())


PID_MAX = 1 << 22  # Linux's PID_MAX_LIMIT: no pid_max can be set above it


async def pid_exe(request: web.Request) -> web.Response:
    raw = request.query.get("pid", "")
    # ASCII digits only (str.isdigit() also takes "²" or "٣", which int() refuses), and few of them:
    # int() refuses more than 4300 digits, and nothing that long is a pid.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 8 and int(raw) <= PID_MAX):
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        return json_response({"error": f"pid must be an integer from 0 to {PID_MAX}, got {shown!r}"}, 400)
    pid = int(raw)
    found = request.app[PID_EXE](pid)
    if found is None:
        return json_response({"error": f"no process with pid {pid}", "pid": pid}, 404)
    return json_response(found)


async def containers(request: web.Request) -> web.Response:
    """The node's containers; ?namespace= and ?podName= are exact matches (no match: an empty list)."""
    q = request.query
    return json_response(request.app[CONTAINERS](q.get("namespace"), q.get("podName")))


async def metrics(request: web.Request) -> web.Response:
    text = render(request.app[METRICS]())
    return web.Response(text=text, headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    """For probes: open to all (no Host check, no credentials), and says nothing about the node."""
    return json_response({"status": "ok"})


async def whoami(request: web.Request) -> web.Response:
    """Who this request authenticated as; the UI offers to log out when authentication is on."""
    return json_response({"name": request.get(IDENTITY) or None, "authRequired": request.app[POLICY].required})


async def netstat_ws(request: web.Request) -> web.StreamResponse:
    app = request.app
    hub, clients, policy = app[HUB], app[CLIENTS], app[POLICY]
    peer = request.remote or "?"
    if clients[peer] >= app[MAX_PER_ADDRESS]:
        policy.refused["clients_per_address"] += 1
        log.warning("refused WebSocket client %s: %d clients from that address already", peer, clients[peer])
        return refusal(
            429,
            "clients_per_address",
            f"{clients[peer]} WebSocket clients from {peer} already (--max-clients-per-address); close one",
        )
    try:
        wanted = _query_subscription(request.query)
    except subscription.FilterError as e:
        hub.subscribe_errors += 1
        return refusal(400, "filter", f"bad subscription in the query: {e}")
    # Subscribing takes the slot before any await, so clients arriving together cannot overshoot.
    sub = hub.subscribe(peer, app[HOST_INFO](), wanted)
    if sub is None:
        policy.refused["clients"] += 1
        log.warning("refused WebSocket client %s: %d clients already connected", peer, hub.max_clients)
        return refusal(503, "clients", f"{hub.max_clients} WebSocket clients already connected; try again later")
    clients[peer] += 1
    sender: asyncio.Task | None = None
    try:
        # Outgoing frames are JSON we made; incoming ones are subscribe frames, small.
        ws = web.WebSocketResponse(heartbeat=30, compress=False, max_msg_size=64 << 10, protocols=(STREAM_PROTOCOL,))
        await ws.prepare(request)
        app[SOCKETS][ws] = request
        who = request.get(IDENTITY)
        log.debug("WebSocket client %s connected%s", peer, f" as {who}" if who else "")
        sender = asyncio.create_task(_send_loop(ws, sub, request, app[REPORT]), name=f"ws-send-{peer}")
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
            _received(sub, msg)
    finally:
        hub.unsubscribe(sub)
        clients[peer] -= 1
        if not clients[peer]:
            del clients[peer]
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    return ws


def _received(sub: Subscriber, msg: aiohttp.WSMessage) -> None:
    """A client's frame: a `subscribe` changes its filter; anything else gets a subscribe.error, and the
    stream goes on as it was."""
    try:
        if msg.type != WSMsgType.TEXT:
            raise subscription.FilterError(f"expected a text frame, got {msg.type.name}")
        try:
            frame = orjson.loads(msg.data)
        except orjson.JSONDecodeError as e:
            raise subscription.FilterError(f"not JSON: {e}") from None
        if not isinstance(frame, dict) or frame.get("type") != SUBSCRIBE:
            raise subscription.FilterError('expected {"type": "subscribe", "filter": {...}}')
        if "filters" in frame:  # a multiplexer's upstream: any of several filters
            wanted = subscription.parse_subscription(frame["filters"])
        elif isinstance(frame.get("filter", {}), dict):
            wanted = subscription.parse(frame.get("filter", {}))
        else:
            raise subscription.FilterError("filter: expected an object")
        partial, version = frame.get("partial") is True, frame.get("version", 0)
        if not isinstance(version, int):
            raise subscription.FilterError("version: expected an integer")
    except subscription.FilterError as e:
        sub.hub.subscribe_errors += 1
        log.info("WebSocket client %s: subscribe refused: %s", sub.peer, e)
        sub.notify(sub.hub.event(SUBSCRIBE_ERROR, error=str(e)))
        return
    sub.hub.resubscribe(sub, wanted, partial, version)


def _query_subscription(query: Mapping[str, str]) -> subscription.Subscription:
    """The filter keys, or `filters` (a JSON list of filter objects: a multiplexer's upstream) alone."""
    if "filters" not in query:
        return subscription.parse(query)
    if len(query) > 1:
        raise subscription.FilterError("filters: give it alone, or the filter keys")
    try:
        given = orjson.loads(query["filters"])
    except orjson.JSONDecodeError as e:
        raise subscription.FilterError(f"filters: not JSON: {e}") from None
    return subscription.parse_subscription(given)


async def _send_loop(ws: web.WebSocketResponse, sub: Subscriber, request: web.Request, report: Report) -> None:
    try:
        while not ws.closed:
            await sub.wake.wait()
            for frame in sub.take():
                try:
                    async with asyncio.timeout(STALL_S):
                        await ws.send_frame(frame, WSMsgType.TEXT)
                except TimeoutError:
                    sub.hub.stalled += 1
                    why = f"too slow: no frame taken for {STALL_S:g} s"
                    log.warning("WebSocket client %s: %s; closing it", sub.peer, why)
                    await _close(ws, request, WSCloseCode.POLICY_VIOLATION, why)
                    return
    except (ConnectionError, RuntimeError) as e:
        # a dead peer: closing ends the handler's receive loop too
        log.info("WebSocket client %s: send failed (%s); closing", sub.peer, e)
        await _close(ws, request, WSCloseCode.GOING_AWAY, "send failed")
    except Exception as e:  # a bug: the client must see the stream end, not an open stream that is silent
        report("websocket", e, f"closing client {sub.peer} with 1011")
        await _close(ws, request, WSCloseCode.INTERNAL_ERROR, "internal error")


async def _close(ws: web.WebSocketResponse, request: web.Request, code: int, message: str) -> None:
    """Close with a reason; a client that reads nothing never answers, so it is then dropped."""
    try:
        async with asyncio.timeout(CLOSE_WAIT_S):
            await ws.close(code=code, message=message.encode())
        return
    except asyncio.CancelledError:
        # aiohttp raises it when the write it waits for is dropped; only a real cancel goes on
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except (TimeoutError, ConnectionError, RuntimeError):
        pass
    if request.transport is not None:
        request.transport.abort()


async def close_revoked(app: web.Application) -> int:
    """After the tokens changed: close the streams whose credentials no longer hold (a removed token,
    a session made from one). The upgrade request is checked again as it was made."""
    policy = app[POLICY]
    cookie = policy.session_cookie(app[PORT])
    closed = 0
    for ws, request in list(app[SOCKETS].items()):
        if not ws.closed and policy.identify(request, cookie)[0] is None:
            log.info("closing WebSocket client %s: its credentials were revoked", request.remote)
            await _close(ws, request, WSCloseCode.POLICY_VIOLATION, "credentials revoked: log in again")
            closed += 1
    policy.revoked += closed
    return closed


async def close_sockets(app: web.Application) -> None:
    """On shutdown: tell clients we are going away instead of waiting for them to leave."""
    for ws in list(app[SOCKETS].keys()):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"netstatd is stopping")


def build_app(
    hub: Hub,
    host_info: Callable[[], dict[str, Any]],
    metrics_fn: Callable[[], list[Metric]],
    pid_exe_fn: Callable[[int], dict[str, Any] | None],
    containers_fn: Callable[[str | None, str | None], list[dict[str, Any]]] = lambda namespace, pod_name: [],
    *,
    policy: AccessPolicy | None = None,
    port: int = 0,
    max_clients_per_address: int = 16,
    report: Report = _log_report,
) -> web.Application:
    """port: the port this app listens on (the session cookie is per port)."""
    policy = policy or open_policy()
    app = web.Application(middlewares=[policy.middleware(port, login.login_page)])
    app[POLICY] = policy
    app[CLIENTS] = Counter()
    app[MAX_PER_ADDRESS] = max_clients_per_address
    app[REPORT] = report
    app[HUB] = hub
    app[HOST_INFO] = host_info
    app[METRICS] = metrics_fn
    app[PID_EXE] = pid_exe_fn
    app[CONTAINERS] = containers_fn
    app[SOCKETS] = weakref.WeakKeyDictionary()
    app[PORT] = port
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/", index)
    app.router.add_get("/web/{path:.+}", web_file)
    app.router.add_get("/api/deployment", deployment)
    app.router.add_get("/netstat", netstat_ws)
    app.router.add_get("/api/pid-exe", pid_exe)
    app.router.add_get("/api/containers", containers)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/whoami", whoami)
    login.add_routes(app, policy, port)
    return app
