"""`netstatd mux`: the cluster-wide view as its own process, unprivileged (docs/deploy.md, docs/multiplexer.md).

The same Mux as an agent's --http-mux-port: peers found through FANOUT_SERVICE, one upstream per agent
on --http-port, merged state served on --http-mux-port, with the same access rules (tokens, TLS, Host
and Origin checks) and the peer TLS flags. It needs no capability, no host namespace, no writable file
and no kernel feature: it runs as any user.
"""

from __future__ import annotations

import functools
import logging

from .. import __version__
from ..api.front import Front
from ..errors import StartupError
from ..listen import exposure
from ..metrics import Metric, build_info
from ..protocol import WallClock
from ..settings import Settings
from ..sources.addresses import host_ips
from ..supervisor import Supervisor
from .server import Mux

log = logging.getLogger("netstatd.mux")


class StandaloneMux:
    def __init__(self, settings: Settings) -> None:
        if not settings.http_mux_port:
            raise StartupError("netstatd mux serves --http-mux-port: give a port (0 turns the agent's off)")
        self.settings = settings
        self.supervisor = Supervisor()
        self.supervisor.declare("websocket")
        try:
            self.front = Front(settings, self.supervisor.report)
            self.mux = Mux(settings, WallClock().now, self.front, self.supervisor)
        except ValueError as e:
            raise StartupError(str(e)) from None

    async def start(self) -> None:
        warning = exposure(self.settings, self.front.addresses, mux_only=True)
        if warning:
            log.warning("%s", warning)
        self.front.set_own_addresses(host_ips())
        try:
            await self.mux.start(self.metrics)
        except OSError as e:
            raise StartupError(e.strerror or str(e)) from None
        self.supervisor.spawn("files", functools.partial(self.front.reload_forever, self.mux.reload))
        log.info("netstatd %s multiplexer: agents on port %d", __version__, self.settings.http_port)

    async def stop(self) -> None:
        await self.supervisor.stop()
        await self.mux.stop()

    def metrics(self) -> list[Metric]:
        return [*self.supervisor.metrics(), *self.front.metrics(), *self.mux.metrics(), build_info()]
