"""Peer discovery: the headless Service's DNS name lists every agent pod (its A/AAAA records).

Resolved through the system resolver (loop.getaddrinfo), so resolv.conf's search domains turn
`netstatd-headless` into `netstatd-headless.<namespace>.svc.cluster.local` as in any pod.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from ..supervisor import failpoint

log = logging.getLogger("netstatd.mux")

RESOLVE_EVERY_S = 5.0
# "No such name" and "no address": the Service has no ready agent. Other errors are taken as temporary
# (a DNS server restarting) and keep the peers we have, so one failed lookup does not drop the cluster.
EMPTY_ERRORS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class Discovery:
    """Re-resolves `service` every `interval`; calls on_change(peer IPs) when the set or message changes."""

    def __init__(self, service: str, on_change: Callable[[set[str]], None], interval: float = RESOLVE_EVERY_S) -> None:
        self.service = service
        self.on_change = on_change
        self.interval = interval
        self.peers: set[str] = set()
        self.message: str | None = None  # why the mux has no (or stale) peers; None when all is well
        self.lookups = {"ok": 0, "empty": 0, "failed": 0}

    async def run(self) -> None:
        """Forever (a supervised task)."""
        while True:
            failpoint("discovery")
            await self.resolve_once()
            await asyncio.sleep(self.interval)

    async def resolve_once(self) -> None:
        peers, message = self.peers, None
        if not self.service:
            peers, message = set(), "FANOUT_SERVICE is not set: the multiplexer cannot find the other nodes"
            self.lookups["empty"] += 1
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(self.service, None, type=socket.SOCK_STREAM)
                peers = {info[4][0].split("%", 1)[0] for info in infos}
                self.lookups["ok"] += 1
            except socket.gaierror as e:
                if e.errno in EMPTY_ERRORS:
                    peers = set()
                    self.lookups["empty"] += 1
                else:
                    self.lookups["failed"] += 1
                    message = f"cannot resolve FANOUT_SERVICE {self.service!r} ({e.strerror})"
                    if peers:
                        message += f"; keeping the {len(peers)} peers known"
            if not peers and message is None:
                message = (
                    f"FANOUT_SERVICE {self.service!r} resolves to no address: no agents listed "
                    "(is the headless Service deployed, in this namespace?)"
                )
        if message != self.message:
            if message:
                log.warning("multiplexer: %s", message)
            elif self.message:
                log.info("multiplexer: %s resolves again (%d peers)", self.service, len(peers))
        changed = peers != self.peers or message != self.message
        self.peers, self.message = peers, message
        if changed:
            self.on_change(peers)
