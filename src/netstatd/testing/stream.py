"""A WebSocket client of /netstat that records every event, on its own thread."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

Event = dict[str, Any]


class StreamClient:
    """Connects to ws_url and appends every received event to .events (with arrival time in .arrivals)."""

    def __init__(
        self,
        ws_url: str,
        *,
        defer_live: bool = False,
        headers: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        protocols: tuple[str, ...] = (),
        server_hostname: str | None = None,
    ) -> None:
        """defer_live: after the first snapshot, keep frames as received and parse them only in
        parse_deferred(), so a benchmark's client costs the machine as little as it can.
        headers, ssl_context, protocols, server_hostname: for ws_connect (an agent with a token, TLS;
        the name its certificate must carry, when the URL has an address)."""
        self.ws_url = ws_url
        self.headers = headers or {}
        self.ssl = ssl_context
        self.protocols = protocols
        self.server_hostname = server_hostname
        self.events: list[Event] = []
        self.arrivals: list[float] = []
        self.frames = 0
        self.bytes = 0  # of the frames received
        self.defer_live = defer_live
        self._deferred: list[tuple[float, bytes | str]] = []
        self._snapshot_seen = False
        self.closed = threading.Event()
        self._connected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._task: asyncio.Future | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    def start(self, timeout: float = 10) -> StreamClient:
        """Connected; raises what the connection attempt raised (e.g. aiohttp.WSServerHandshakeError)."""
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.05):
            if self.closed.is_set():
                self.stop()
                assert self._task is not None
                self._task.result()  # raises the connect error
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not connect to {self.ws_url}")
        return self

    async def _run(self) -> None:
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.ws_connect(
                    self.ws_url,
                    max_msg_size=0,
                    headers=self.headers,
                    ssl=self.ssl if self.ssl is not None else True,
                    protocols=self.protocols,
                    server_hostname=self.server_hostname,
                ) as ws,
            ):
                self._ws = ws
                self._connected.set()
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    now = time.time()
                    self.frames += 1
                    self.bytes += len(msg.data)
                    if self._snapshot_seen and self.defer_live:
                        self._deferred.append((now, msg.data))
                        continue
                    self._add(now, msg.data)
        finally:
            self.closed.set()

    def _add(self, now: float, frame: bytes | str) -> None:
        data = orjson.loads(frame)
        batch = data if isinstance(data, list) else [data]
        self.events.extend(batch)
        self.arrivals.extend([now] * len(batch))
        if not self._snapshot_seen:
            self._snapshot_seen = any(e.get("type") == "snapshot.complete" for e in batch)

    def parse_deferred(self) -> None:
        """Parse the frames defer_live kept (after stop())."""
        for now, frame in self._deferred:
            self._add(now, frame)
        self._deferred.clear()

    def send(self, data: str | dict) -> None:
        """A frame to the server (a dict is sent as JSON), once it is written."""
        assert self._ws is not None, "not connected"
        text = data if isinstance(data, str) else orjson.dumps(data).decode()
        asyncio.run_coroutine_threadsafe(self._ws.send_str(text), self._loop).result(timeout=5)

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 10) -> Event:
        """The first recorded event matching pred, waiting up to timeout seconds."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            events = self.events
            for e in events[seen:]:
                if pred(e):
                    return e
            seen = len(events)
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching event within {timeout}s ({len(events)} events received)")
            time.sleep(0.05)

    def matching(self, pred: Callable[[Event], bool]) -> list[Event]:
        return [e for e in list(self.events) if pred(e)]

    def wait_snapshot(self, timeout: float = 20) -> Event:
        return self.wait_for(lambda e: e["type"] == "snapshot.complete", timeout)

    def stop(self) -> None:
        if self._task:
            self._loop.call_soon_threadsafe(self._task.cancel)
            self.closed.wait(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> StreamClient:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
