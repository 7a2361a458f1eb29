"""Frame Streams (fstrm) server for DNSTap senders over TCP.

Wire format: every frame starts with a 32-bit big-endian length. Length 0 escapes a control frame:
control length, control type, then fields (type, length, bytes). Bidirectional senders (CoreDNS,
unbound, dnsdist, the dnstap CLI) do READY -> ACCEPT -> START, data..., STOP -> FINISH;
unidirectional ones start with START. End of stream between frames is a clean close.

`FrameParser` is sans-IO (fed bytes, returns payloads, raises `ProtocolError`) so it can be fuzzed;
`serve()` wraps it in a thin asyncio.Protocol that adds the sender check, timeouts, limits (the
longest-idle sender makes room for a new one), stats and logging.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ...supervisor import failpoint

log = logging.getLogger("netstatd.dnstap")

CONTENT_TYPE = b"protobuf:dnstap.Dnstap"

ACCEPT, START, STOP, READY, FINISH = 1, 2, 3, 4, 5
FIELD_CONTENT_TYPE = 1

_U32 = struct.Struct(">I")
_U32X2 = struct.Struct(">II")

# First 4 bytes of HTTP/1.x requests and the HTTP/2 preface ("PRI * HTTP/2.0").
_HTTP_PREFIXES = frozenset((b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC", b"PRI "))

REASONS = (
    "finished",
    "eof",
    "garbage",
    "http",
    "tls",
    "frame_too_large",
    "bad_control",
    "content_type",
    "data_before_start",
    "unexpected_control",
    "handshake_timeout",
    "frame_timeout",
    "truncated",
    "idle",
    "evicted",
    "not_allowed",
    "internal_error",
)
_CLEAN = frozenset(("finished", "eof"))
_WARN_INTERVAL_S = 10.0


def control_frame(ctype: int, content_types: tuple[bytes, ...] = ()) -> bytes:
    """Encode an escaped control frame (also used by tests and by the ACCEPT/FINISH replies)."""
    fields = b"".join(_U32X2.pack(FIELD_CONTENT_TYPE, len(ct)) + ct for ct in content_types)
    return _U32X2.pack(0, 4 + len(fields)) + _U32.pack(ctype) + fields


def data_frame(payload: bytes) -> bytes:
    return _U32.pack(len(payload)) + payload


_ACCEPT_FRAME = control_frame(ACCEPT, (CONTENT_TYPE,))
_FINISH_FRAME = control_frame(FINISH)


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 262_144  # data frame cap
    max_control_bytes: int = 512  # control frame cap
    handshake_timeout_s: float = 5.0  # connect -> START
    frame_timeout_s: float = 10.0  # first byte of a frame -> its last byte (slowloris)
    idle_timeout_s: float = 60.0  # after START, nothing received for this long: closed (senders reconnect)
    max_senders: int = 64  # concurrent connections per listener; a new one evicts the longest-idle one

    def __post_init__(self) -> None:
        if self.max_senders < 1:
            raise ValueError(f"max_senders must be at least 1, got {self.max_senders}")


_DEFAULT_LIMITS = Limits()


@dataclass
class CollectorStats:
    """Plain counters read at scrape time; may be shared by several listeners.

    Invariant once all connections ended: connections == sum(closed.values()).
    """

    connections: int = 0  # accepted TCP connections, including ones refused as not_allowed
    active: int = 0
    frames: int = 0  # data frames delivered
    bytes: int = 0  # data frame payload bytes delivered
    closed: dict[str, int] = field(default_factory=dict)  # reason -> count


class ProtocolError(Exception):
    """The stream cannot continue; `reason` is a close-reason label, `message` is for humans."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.frames: list[bytes] = []  # complete data frames parsed before the error (deliver them)


class FrameParser:
    """Incremental Frame Streams receiver state machine without I/O.

    feed() returns the data payloads completed by the new bytes; control replies (ACCEPT, FINISH)
    accumulate in `replies` for the caller to send. After STOP, `finished` is set and further
    bytes are ignored.
    """

    __slots__ = ("_buf", "_max_control", "_max_frame", "_seen", "finished", "frames", "ready", "replies", "started")

    def __init__(self, limits: Limits = _DEFAULT_LIMITS) -> None:
        self._buf = bytearray()
        self._max_frame = limits.max_frame_bytes
        self._max_control = limits.max_control_bytes
        self._seen = 0  # bytes consumed so far: 0 means we may sniff TLS/HTTP
        self.ready = False
        self.started = False
        self.finished = False
        self.frames = 0  # data + control frames completed, lets the caller time each frame
        self.replies = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame (or length) buffered; non-zero means mid-frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self.finished:
            return []
        buf = self._buf
        buf += data
        n = len(buf)
        off = 0
        out: list[bytes] = []
        unpack = _U32.unpack_from
        try:
            while n - off >= 4:
                (length,) = unpack(buf, off)
                if length:
                    if length > self._max_frame or not self.started:
                        self._bad_length(length, off)
                    end = off + 4 + length
                    if end > n:
                        break
                    out.append(bytes(buf[off + 4 : end]))
                    off = end
                    continue
                if n - off < 8:
                    break
                (clen,) = unpack(buf, off + 4)
                if clen < 4 or clen > self._max_control:
                    raise ProtocolError(
                        "bad_control", f"control frame length {clen} outside 4..{self._max_control} bytes"
                    )
                end = off + 8 + clen
                if end > n:
                    break
                self._control(bytes(buf[off + 8 : end]))
                self.frames += 1
                off = end
                if self.finished:
                    break
        except ProtocolError as e:
            e.frames = out
            raise
        finally:
            # Consume with an offset, compact once per feed: no quadratic re-buffering.
            self._seen += off
            if self.finished:
                buf.clear()
            else:
                del buf[:off]
        self.frames += len(out)
        return out

    def _bad_length(self, length: int, off: int) -> None:
        if self._seen == 0 and off == 0:
            head = bytes(self._buf[:4])
            if head[:2] == b"\x16\x03":
                raise ProtocolError(
                    "tls", "sender speaks TLS; this collector takes plain TCP (unbound: set `dnstap-tls: no`)"
                )
            if head in _HTTP_PREFIXES:
                raise ProtocolError("http", "sender made an HTTP request; this port speaks DNSTap Frame Streams")
        if length == 0xFFFFFFFF or (self.started and length > self._max_frame):
            raise ProtocolError(
                "frame_too_large", f"frame of {length} bytes announced, limit is {self._max_frame} bytes"
            )
        if length > self._max_frame:
            raise ProtocolError(
                "garbage",
                f"bytes are not Frame Streams (length 0x{length:08x}); is the sender configured for DNSTap over TCP?",
            )
        raise ProtocolError("data_before_start", f"data frame of {length} bytes before the START control frame")

    def _control(self, body: bytes) -> None:
        (ctype,) = _U32.unpack_from(body)
        if ctype not in (ACCEPT, START, STOP, READY, FINISH):
            raise ProtocolError("bad_control", f"unknown control type 0x{ctype:x}")
        types = _content_types(body)
        if ctype == READY:
            if self.ready or self.started:
                raise ProtocolError("unexpected_control", "READY after " + ("START" if self.started else "READY"))
            if CONTENT_TYPE not in types:
                raise ProtocolError(
                    "content_type", f"READY offers {_show(types)}, only {CONTENT_TYPE.decode()} is accepted"
                )
            self.ready = True
            self.replies += _ACCEPT_FRAME
        elif ctype == START:
            if self.started:
                raise ProtocolError("unexpected_control", "second START")
            # A bidirectional sender already agreed on the type in READY; a unidirectional one must name it.
            if CONTENT_TYPE not in types and (types or not self.ready):
                raise ProtocolError(
                    "content_type", f"START offers {_show(types)}, only {CONTENT_TYPE.decode()} is accepted"
                )
            self.started = True
        elif ctype == STOP:
            if not self.started:
                raise ProtocolError("unexpected_control", "STOP before START")
            self.finished = True
            if self.ready:  # unidirectional senders do not read
                self.replies += _FINISH_FRAME
        else:
            name = "ACCEPT" if ctype == ACCEPT else "FINISH"
            raise ProtocolError("unexpected_control", f"{name} sent by the sender (only a receiver sends it)")


def _content_types(body: bytes) -> list[bytes]:
    types: list[bytes] = []
    off, n = 4, len(body)
    while off < n:
        if n - off < 8:
            raise ProtocolError("bad_control", "control field header truncated")
        ftype, flen = _U32X2.unpack_from(body, off)
        off += 8
        if flen > n - off:
            raise ProtocolError("bad_control", f"control field of {flen} bytes overruns the control frame")
        if ftype == FIELD_CONTENT_TYPE:
            types.append(body[off : off + flen])
        off += flen  # unknown field types are skipped: harmless and future-proof
    return types


def _show(types: list[bytes]) -> str:
    return ", ".join(repr(t.decode("utf-8", "replace")) for t in types) or "no content type"


class _WarnLimiter:
    """At most one WARNING per key per interval; the next one says how many were suppressed."""

    def __init__(self, interval_s: float = _WARN_INTERVAL_S) -> None:
        self._interval = interval_s
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, key: str, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._next[key] = now + self._interval
        more = self._suppressed.pop(key, 0)
        if more:
            msg += " (%d more since the last such message)"
            args = (*args, more)
        log.warning(msg, *args, exc_info=exc_info)


class SenderFilter(Protocol):
    """Decides which peers may send (collector.SenderAllowList); str() names what is allowed, for the log."""

    def allows(self, ip: str) -> bool: ...


class _Listener:
    __slots__ = ("allow", "limits", "loop", "name", "on_error", "on_frames", "senders", "stats", "warn")

    def __init__(
        self,
        name: str,
        on_frames: Callable[[list[bytes]], None],
        limits: Limits,
        stats: CollectorStats,
        allow: SenderFilter | None,
        on_error: Callable[[BaseException], None] | None,
    ) -> None:
        self.name = name
        self.on_frames = on_frames
        self.limits = limits
        self.stats = stats
        self.allow = allow
        self.on_error = on_error
        self.loop = asyncio.get_running_loop()
        # Admitted connections, oldest first (a dict keeps the order): max_senders applies to each
        # listener (stats may be shared), and a tie in idle time evicts the one admitted first.
        self.senders: dict[_Connection, None] = {}
        self.warn = _WarnLimiter()


class _Connection(asyncio.Protocol):
    def __init__(self, listener: _Listener) -> None:
        self._l = listener
        self._parser = FrameParser(listener.limits)
        self._transport: asyncio.Transport | None = None
        self._loop = listener.loop
        self._peer = "?"
        self._reason: str | None = None  # set once, when the connection's fate is decided
        self._admitted = False  # holds one of the listener's max_senders slots
        self._last_rx = 0.0  # loop time of the last bytes received, or of connecting: idle time and eviction
        self._frame_since: float | None = None  # loop time the incomplete frame began
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._l.stats.connections += 1
        try:
            self._admit(transport.get_extra_info("peername"))
        except Exception as e:  # fail closed: a bug in the sender check must not let the sender in
            self._internal_error(e)

    def _admit(self, peername: object) -> None:
        self._peer = _fmt_peer(peername)
        loop = self._loop
        self._last_rx = loop.time()
        l = self._l  # noqa: E741
        if l.allow is not None:
            ip = _peer_ip(peername)
            if not l.allow.allows(ip):
                self._close(
                    "not_allowed",
                    f"{ip} is not in --dnstap-allow (allowed: {l.allow}); "
                    "if it is a DNS server of this cluster, add its address or network there",
                )
                return
        if len(l.senders) >= l.limits.max_senders:
            self._evict_longest_idle()
        self._admitted = True
        l.senders[self] = None
        l.stats.active += 1
        self._handshake_timer = loop.call_later(l.limits.handshake_timeout_s, self._handshake_expired)
        first_check = min(l.limits.frame_timeout_s, l.limits.idle_timeout_s)  # as _check_deadlines before START
        self._deadline_timer = loop.call_later(first_check, self._check_deadlines)

    def data_received(self, data: bytes) -> None:
        if self._reason is not None:
            return
        try:
            failpoint("dnstap")
            self._receive(data)
        except Exception as e:  # a bug, here or in the consumer: report it, drop this sender, it reconnects
            self._internal_error(e)

    def _receive(self, data: bytes) -> None:
        self._last_rx = now = self._loop.time()
        p = self._parser
        before = p.frames
        try:
            frames = p.feed(data)
        except ProtocolError as e:
            self._deliver(e.frames)
            self._close(e.reason, e.message)
            return
        if frames:
            self._deliver(frames)
        if p.replies:
            assert self._transport is not None
            self._transport.write(bytes(p.replies))
            p.replies.clear()
        if p.finished:
            self._close("finished", "")
            return
        if p.started and self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if not p.pending:
            self._frame_since = None
        elif self._frame_since is None or p.frames != before:
            self._frame_since = now

    def eof_received(self) -> bool:
        self._end_of_stream()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_of_stream()  # releases the slot, if the connection still held one
        self._cancel_timers()

    def _end_of_stream(self) -> None:
        if self._reason is not None:
            return
        if self._parser.pending:
            self._close("truncated", f"peer closed mid-frame ({self._parser.pending} bytes of a frame pending)")
        else:
            self._close("eof", "")

    def _deliver(self, frames: list[bytes]) -> None:
        if not frames:
            return
        st = self._l.stats
        st.frames += len(frames)
        st.bytes += sum(map(len, frames))
        self._l.on_frames(frames)  # an exception is an internal error (data_received)

    def _internal_error(self, exc: Exception) -> None:
        l = self._l  # noqa: E741
        if self._reason is None:  # closed first, so even a failing on_error cannot keep the sender
            self._close("internal_error", "")
        exc.add_note(f"dnstap {l.name} listener, sender {self._peer}: closed as internal_error")
        if l.on_error is not None:
            l.on_error(exc)
        else:
            log.error("internal error in the dnstap %s listener", l.name, exc_info=exc)

    def _evict_longest_idle(self) -> None:
        l = self._l  # noqa: E741
        victim = min(l.senders, key=_last_rx)  # O(senders), only when the listener is full
        idle = self._loop.time() - victim._last_rx
        victim._close(
            "evicted",
            f"idle for {idle:.1f} s, the longest of {l.limits.max_senders} senders (the limit); "
            f"its slot went to {self._peer}",
        )

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self._reason is None and not self._parser.started:
            self._close("handshake_timeout", f"no START within {self._l.limits.handshake_timeout_s:g} s of connecting")

    def _check_deadlines(self) -> None:
        # One self-rearming timer per connection instead of a timer per frame keeps the hot path free:
        # data_received only records times, this checks them and sleeps until the nearest deadline.
        self._deadline_timer = None
        if self._reason is not None:
            return
        limits = self._l.limits
        now = self._loop.time()
        since = self._frame_since
        if since is not None and now - since >= limits.frame_timeout_s:
            self._close(
                "frame_timeout", f"frame incomplete after {limits.frame_timeout_s:g} s (stalled or slowloris sender)"
            )
            return
        started = self._parser.started
        if started and now - self._last_rx >= limits.idle_timeout_s:
            self._close("idle", f"nothing received for {limits.idle_timeout_s:g} s since START or the last bytes")
            return
        # Sleep until the nearest deadline, but no longer than the shortest timeout that may begin
        # meanwhile (a frame at any time, the idle time at START), so every deadline is met exactly.
        wake = now + (limits.frame_timeout_s if started else min(limits.frame_timeout_s, limits.idle_timeout_s))
        if since is not None:
            wake = min(wake, since + limits.frame_timeout_s)
        if started:
            wake = min(wake, self._last_rx + limits.idle_timeout_s)
        self._deadline_timer = self._loop.call_at(wake, self._check_deadlines)

    def _close(self, reason: str, message: str) -> None:
        self._reason = reason
        l = self._l  # noqa: E741
        l.stats.closed[reason] = l.stats.closed.get(reason, 0) + 1
        if self._admitted:  # free the slot now: an eviction admits the newcomer at once
            self._admitted = False
            del l.senders[self]
            l.stats.active -= 1
        if reason in _CLEAN:
            log.debug("dnstap %s listener: sender %s closed (%s)", l.name, self._peer, reason)
        elif reason != "internal_error":  # that one was reported with its traceback
            l.warn.warn(reason, "dnstap %s listener: closing sender %s (%s): %s", l.name, self._peer, reason, message)
        self._cancel_timers()
        if self._transport is not None:
            self._transport.close()  # flushes a pending FINISH first

    def _cancel_timers(self) -> None:
        for t in (self._handshake_timer, self._deadline_timer):
            if t is not None:
                t.cancel()
        self._handshake_timer = self._deadline_timer = None


def _last_rx(conn: _Connection) -> float:
    return conn._last_rx


def _peer_ip(peer: object) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def _fmt_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


async def serve(
    host: str | Sequence[str] | None,
    port: int,
    on_frames: Callable[[list[bytes]], None],
    *,
    name: str,
    limits: Limits = _DEFAULT_LIMITS,
    stats: CollectorStats | None = None,
    allow: SenderFilter | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> asyncio.Server:
    """Listen for DNSTap Frame Streams senders; `on_frames` gets the data payloads of each read.

    host: an address, a list of them, or None for every address. allow: who may send (None: anyone).
    on_error: gets an unexpected exception raised while handling a sender's bytes (on_frames included),
    after which that sender is closed as internal_error; without it, the exception is logged.
    """
    listener = _Listener(name, on_frames, limits, stats if stats is not None else CollectorStats(), allow, on_error)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(listener), host, port, reuse_address=True)
    bound = ", ".join(_fmt_peer(s.getsockname()) for s in server.sockets)
    log.info("dnstap %s listener on %s", name, bound)
    return server
