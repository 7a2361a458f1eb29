"""The DNSTap collector: both listeners, frames decoded into name facts.

`--dnstap-port` takes the DNS server of this node (or any sender that
targets this agent directly); `--dnstap-mux-port` is the one the regular
Service exposes, so a cluster DNS server can point at one stable address
and any agent behind it learns the names. Both feed the same cache; the
multiplexer shares the resulting `dns.resolved` events cluster-wide.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable

from .decode import DecodeError, Resolution, decode
from .framestream import CollectorStats, Limits, serve

log = logging.getLogger("netstatd.dnstap")

LISTENERS = ("node", "mux")
DECODE_ERRORS = ("protobuf", "no_message", "dns")


class DnstapCollector:
    def __init__(self, learn: Callable[[list[Resolution]], None], limits: Limits | None = None) -> None:
        self._learn = learn
        self.limits = limits or Limits()
        self.stats = CollectorStats()
        self.messages = dict.fromkeys(LISTENERS, 0)  # frames decoded, per listener
        self.skipped = dict.fromkeys(DECODE_ERRORS, 0)  # frames that could not be decoded, by reason
        self.resolutions = 0
        self._servers: list[asyncio.Server] = []

    async def start(self, ports: dict[str, int]) -> None:
        """ports: listener name ("node", "mux") -> TCP port."""
        for name, port in ports.items():
            try:
                server = await serve(
                    None, port, lambda frames, name=name: self._on_frames(name, frames), name=name,
                    limits=self.limits, stats=self.stats,
                )  # fmt: skip
            except OSError as e:
                await self.stop()
                if e.errno == errno.EADDRINUSE:
                    raise OSError(e.errno, f"DNSTap port {port} is already in use (pass --dnstap-port)") from None
                raise
            self._servers.append(server)  # framestream.serve logs each listener's addresses

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def _on_frames(self, listener: str, frames: list[bytes]) -> None:
        learned: list[Resolution] = []
        skipped = self.skipped
        for frame in frames:
            try:
                learned += decode(frame)
            except DecodeError as e:
                if skipped[e.reason] == 0:
                    log.warning("skipping a DNSTap frame that cannot be decoded (%s): %s", e.reason, e)
                skipped[e.reason] += 1
        self.messages[listener] += len(frames)
        self.resolutions += len(learned)
        if learned:
            self._learn(learned)
