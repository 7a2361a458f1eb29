"""Where every listener binds (HTTP and DNSTap), and the one warning when that exposes the node.

Without authentication the default is loopback only: `make run` still opens http://localhost:5280,
and nothing else on the network can read this node. With authentication (--auth-token-file or
--peer-ca-file) the default is every address. --listen-address always wins; a non-loopback address
without authentication is allowed, since the user asked for it, and said once at WARNING.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence

from aiohttp import web

from .settings import Settings

log = logging.getLogger("netstatd")

LOOPBACK = ("127.0.0.1", "::1")
EVERY = ("0.0.0.0", "::")


def _bindable(address: str) -> bool:
    """Whether this host has the address family (an IPv6-less host has no ::1)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def listen_addresses(settings: Settings) -> list[str]:
    """The addresses to bind: --listen-address as given, or the default (the families this host has)."""
    if settings.listen_address:
        for a in settings.listen_address:
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise ValueError(f"--listen-address {a!r} is not an IP address") from None
        return list(dict.fromkeys(settings.listen_address))
    defaults = EVERY if settings.authenticated else LOOPBACK
    return [a for a in defaults if _bindable(a)] or list(defaults[:1])


def exposure(settings: Settings, addresses: Sequence[str], mux_only: bool = False) -> str | None:
    """The warning for listening beyond loopback with nobody's credentials checked, or None.
    mux_only: for `netstatd mux`, which serves the cluster view alone."""
    if settings.authenticated:
        return None
    exposed = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
    if not exposed:
        return None
    them = "them" if len(exposed) > 1 else "it"
    reach = f"listening on {', '.join(exposed)} without authentication: anyone who can reach {them}"
    advice = "Give --auth-token-file (docs/security.md), or listen on loopback only"
    if mux_only:
        port = settings.http_mux_port
        return f"{reach} reads every connection, process, pod and DNS name of the cluster on port {port}. {advice}"
    mux = f", and the whole cluster's on port {settings.http_mux_port}" if settings.http_mux_port else ""
    return (
        f"{reach} reads every connection, process, pod and DNS name of this node on port {settings.http_port}{mux}, "
        f"and can send it DNS names on ports {settings.dnstap_port} and {settings.dnstap_mux_port} "
        f"(within --dnstap-allow). {advice}"
    )


async def serve_http(
    app: web.Application, addresses: Sequence[str], port: int, ssl_context: ssl.SSLContext | None, flag: str
) -> web.AppRunner:
    """The app on every address; a clear OSError (naming `flag`) when a port cannot be bound."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        for address in addresses:
            await web.TCPSite(runner, address, port, ssl_context=ssl_context, reuse_address=True).start()
    except OSError as e:
        await runner.cleanup()
        if e.errno == errno.EADDRINUSE:
            raise OSError(
                e.errno, f"port {port} is already in use (another netstatd?): stop it or pass {flag}"
            ) from None
        raise OSError(e.errno, f"cannot listen on {address} port {port}: {e.strerror}") from None
    return runner


def urls(scheme: str, addresses: Sequence[str], port: int) -> str:
    return ", ".join(f"{scheme}://{f'[{a}]' if ':' in a else a}:{port}" for a in addresses)
