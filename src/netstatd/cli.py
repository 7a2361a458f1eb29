"""`netstatd` console script: flags -> settings -> the node agent, or `netstatd mux`: the standalone
multiplexer (the agent's modules, BPF and containerd among them, are not even imported then)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Protocol

from . import settings as settings_mod
from .errors import StartupError
from .malloc import fix_mmap_threshold

TRACE = 5
_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str) -> None:
    logging.addLevelName(TRACE, "TRACE")
    fmt = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    fmt.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # grpc.aio logs a line per call at DEBUG ("Loaded running loop"); only trace keeps that
    logging.getLogger("grpc").setLevel(max(_LEVELS[level], logging.INFO) if level != "trace" else TRACE)


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def serve(make: Callable[[], Service]) -> None:
    """Make the service (in the loop), start it, and stop it on SIGINT or SIGTERM, also after a failed start."""
    service = make()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
        await stop.wait()
        logging.getLogger("netstatd").info("stopping")
    finally:
        await service.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    standalone_mux = argv[:1] == ["mux"]
    if standalone_mux:
        argv = argv[1:]
    settings = settings_mod.parse(argv)
    configure_logging(settings.log_level)
    fix_mmap_threshold()
    if standalone_mux:
        from .mux.standalone import StandaloneMux as kind
    else:
        from .agent import Agent as kind
    try:
        asyncio.run(serve(lambda: kind(settings)))
    except StartupError as e:
        logging.getLogger("netstatd").error("%s", e)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
