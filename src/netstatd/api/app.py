"""HTTP and WebSocket API of one node: /netstat, /api/*, /metrics, / and the UI's files under /web/."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from ..hub import Hub, Subscriber
from ..metrics import CONTENT_TYPE, Metric, render
from .deployment import deployment_info

log = logging.getLogger("netstatd.api")

HUB = web.AppKey("hub", Hub)
HOST_INFO = web.AppKey("host_info", Callable[[], dict[str, Any]])
METRICS = web.AppKey("metrics", Callable[[], list[Metric]])
PID_EXE = web.AppKey("pid_exe", Callable[[int], "dict[str, Any] | None"])
SOCKETS = web.AppKey("sockets", weakref.WeakSet)
CONTAINERS = web.AppKey("containers", Callable[["str | None", "str | None"], "list[dict[str, Any]]"])


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


async def pid_exe(request: web.Request) -> web.Response:
    raw = request.query.get("pid", "")
    if not raw.isdigit():
        return json_response({"error": f"pid must be a non-negative integer, got {raw!r}"}, 400)
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


async def netstat_ws(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    peer = request.remote or "?"
    if len(hub.subscribers) >= hub.max_clients:
        log.warning("refused WebSocket client %s: %d clients already connected", peer, hub.max_clients)
        return json_response({"error": "too many clients"}, 503)
    # Outgoing frames are JSON we made; incoming messages are not expected, so keep them tiny.
    ws = web.WebSocketResponse(heartbeat=30, compress=False, max_msg_size=64 << 10)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    sub = hub.subscribe(peer, request.app[HOST_INFO]())
    assert sub is not None
    sender = asyncio.create_task(_send_loop(ws, sub), name=f"ws-send-{peer}")
    try:
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
    finally:
        hub.unsubscribe(sub)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    return ws


async def _send_loop(ws: web.WebSocketResponse, sub: Subscriber) -> None:
    try:
        while not ws.closed:
            await sub.wake.wait()
            for frame in sub.take():
                await ws.send_frame(frame, WSMsgType.TEXT)
    except (ConnectionError, RuntimeError) as e:
        # a dead peer: closing ends the handler's receive loop too
        log.info("WebSocket client %s: send failed (%s); closing", sub.peer, e)
        await ws.close()


async def close_sockets(app: web.Application) -> None:
    """On shutdown: tell clients we are going away instead of waiting for them to leave."""
    for ws in list(app[SOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"netstatd is stopping")


def build_app(
    hub: Hub,
    host_info: Callable[[], dict[str, Any]],
    metrics_fn: Callable[[], list[Metric]],
    pid_exe_fn: Callable[[int], dict[str, Any] | None],
    containers_fn: Callable[[str | None, str | None], list[dict[str, Any]]] = lambda namespace, pod_name: [],
) -> web.Application:
    app = web.Application()
    app[HUB] = hub
    app[HOST_INFO] = host_info
    app[METRICS] = metrics_fn
    app[PID_EXE] = pid_exe_fn
    app[CONTAINERS] = containers_fn
    app[SOCKETS] = weakref.WeakSet()
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/", index)
    app.router.add_get("/web/{path:.+}", web_file)
    app.router.add_get("/api/deployment", deployment)
    app.router.add_get("/netstat", netstat_ws)
    app.router.add_get("/api/pid-exe", pid_exe)
    app.router.add_get("/api/containers", containers)
    app.router.add_get("/metrics", metrics)
    return app
