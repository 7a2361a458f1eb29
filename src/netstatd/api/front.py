"""What every HTTP listener of this process shares: addresses, TLS, the access policy, client limits.

Built once from the settings (a bad file or address is a start-up error naming the flag); the node
port and the multiplexer port serve their apps through it. reload() re-reads the token and
certificate files when they changed; the agent calls it every RELOAD_EVERY_S under its supervisor.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from ..hub import Hub
from ..listen import listen_addresses, serve_http, urls
from ..metrics import Metric
from ..settings import Settings
from ..supervisor import failpoint
from ..tls import TLSFiles, server_tls
from .access import AccessPolicy, HostNames
from .app import Report, build_app, close_revoked
from .auth import Sessions, TokenFile

RELOAD_EVERY_S = 2.0


class Front:
    def __init__(self, settings: Settings, report: Report) -> None:
        self.settings = settings
        self.report = report
        self.addresses = listen_addresses(settings)
        self.tokens: TokenFile | None = None
        if settings.auth_token_file:
            try:
                self.tokens = TokenFile(settings.auth_token_file)
            except (OSError, ValueError) as e:
                raise ValueError(f"--auth-token-file: cannot read {settings.auth_token_file}: {e}") from None
        self.tls: TLSFiles | None = None
        if settings.tls:
            try:
                self.tls = server_tls(settings.tls_cert_file, settings.tls_key_file, settings.peer_ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(
                    f"--tls-cert-file/--tls-key-file/--peer-ca-file: cannot load {settings.tls_cert_file}: {e}"
                ) from None
        self._apps: list[web.Application] = []
        listened = [a for a in self.addresses if not ipaddress.ip_address(a).is_unspecified]  # not 0.0.0.0, ::
        names = [settings.node_name, socket.gethostname(), *listened]
        self.policy = AccessPolicy(
            HostNames(names, settings.allowed_hosts),
            frozenset(settings.allowed_origins),
            tokens=self.tokens,
            sessions=Sessions(self.tokens) if self.tokens else None,
            peer_certificates=bool(settings.peer_ca_file),
            metrics_public=settings.metrics_public,
            tls=self.tls is not None,
        )

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def set_own_addresses(self, addresses: Iterable[str]) -> None:
        """This node's addresses, by which a request may name it (Host)."""
        self.policy.hosts.set_addresses(addresses)

    def app(
        self,
        hub: Hub,
        host_info: Callable[[], dict[str, Any]],
        metrics_fn: Callable[[], list[Metric]],
        pid_exe_fn: Callable[[int], dict[str, Any] | None],
        containers_fn: Callable[[str | None, str | None], list[dict[str, Any]]],
        port: int,
    ) -> web.Application:
        app = build_app(
            hub,
            host_info,
            metrics_fn,
            pid_exe_fn,
            containers_fn,
            policy=self.policy,
            port=port,
            max_clients_per_address=self.settings.max_clients_per_address,
            report=self.report,
        )
        self._apps.append(app)
        return app

    async def serve(self, app: web.Application, port: int, flag: str) -> web.AppRunner:
        """OSError with a message naming `flag` when the port cannot be bound."""
        return await serve_http(app, self.addresses, port, self.tls.context if self.tls else None, flag)

    def urls(self, port: int) -> str:
        return urls(self.scheme, self.addresses, port)

    async def reload(self) -> None:
        """The files again if they changed; streams whose token was removed are closed."""
        if self.tokens and self.tokens.reload_if_changed():
            for app in self._apps:
                await close_revoked(app)
        if self.tls:
            self.tls.reload_if_changed()

    async def reload_forever(self, also: Callable[[], None] = lambda: None) -> None:
        """reload() every RELOAD_EVERY_S, then `also` (the upstreams' certificate); under a supervisor."""
        while True:
            failpoint("files")
            await self.reload()
            also()
            await asyncio.sleep(RELOAD_EVERY_S)

    def metrics(self) -> list[Metric]:
        out = self.policy.metrics()
        if self.tls:
            out.append(
                Metric(
                    "netstatd_tls_reloads_total",
                    "counter",
                    "Re-reads of --tls-cert-file/--tls-key-file after they changed, by result "
                    "(failed: the previous certificate is still served).",
                    [({"result": r}, n) for r, n in self.tls.reloads.items()],
                )
            )
        return out
