"""Frame Streams server: handshake, framing, limits, bad input, senders refused, idle or evicted, internal
errors, over real TCP sockets."""

from __future__ import annotations

import asyncio
import logging
import shutil
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netstatd import supervisor
from netstatd.sources.dnstap.collector import SenderAllowList
from netstatd.sources.dnstap.framestream import (
    ACCEPT,
    CONTENT_TYPE,
    FINISH,
    READY,
    START,
    STOP,
    CollectorStats,
    FrameParser,
    Limits,
    ProtocolError,
    control_frame,
    data_frame,
    serve,
)
from tests.conftest import require

U32 = struct.Struct(">I")
OTHER = b"protobuf:other.Thing"
DEFAULT = Limits()


def u32(v: int) -> bytes:
    return U32.pack(v)


@dataclass
class Srv:
    port: int
    stats: CollectorStats
    got: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None


async def start_server(
    limits: Limits = DEFAULT,
    on_frames: Callable[[list[bytes]], None] | None = None,
    *,
    allow: SenderAllowList | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> Srv:
    srv = Srv(port=0, stats=CollectorStats())
    server = await serve(
        "127.0.0.1", 0, on_frames or srv.got.extend, name="node", limits=limits, stats=srv.stats,
        allow=allow, on_error=on_error,
    )  # fmt: skip
    srv.server = server
    srv.port = server.sockets[0].getsockname()[1]
    return srv


@pytest.fixture
async def srv() -> AsyncIterator[Srv]:
    s = await start_server()
    yield s
    assert s.server is not None
    s.server.close()
    await s.server.wait_closed()


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


async def read_eof(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """Read until the server closes; returns whatever it sent before."""
    async with asyncio.timeout(timeout):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


class GoodSender:
    """A bidirectional sender like CoreDNS / unbound: READY, ACCEPT, START, data..., STOP, FINISH."""

    def __init__(self, port: int, prefix: bytes = b"good") -> None:
        self.port = port
        self.prefix = prefix
        self.sent: list[bytes] = []

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(control_frame(READY, (OTHER, CONTENT_TYPE)))
        accept = await asyncio.wait_for(self.reader.readexactly(len(control_frame(ACCEPT, (CONTENT_TYPE,)))), 3)
        assert accept == control_frame(ACCEPT, (CONTENT_TYPE,))
        self.writer.write(control_frame(START, (CONTENT_TYPE,)))

    async def send(self, n: int) -> None:
        frames = [self.prefix + b"-%d" % (len(self.sent) + i) for i in range(n)]
        self.sent += frames
        self.writer.write(b"".join(map(data_frame, frames)))
        await self.writer.drain()

    async def stop(self) -> None:
        self.writer.write(control_frame(STOP))
        assert await read_eof(self.reader) == control_frame(FINISH)
        self.writer.close()


def of(got: list[bytes], prefix: bytes) -> list[bytes]:
    return [f for f in got if f.startswith(prefix + b"-")]


# --- happy paths ----------------------------------------------------------------------------------


async def test_bidirectional_round_trip(srv: Srv) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(control_frame(READY, (CONTENT_TYPE,)))
    hdr = await reader.readexactly(12)
    escape, clen, ctype = struct.unpack(">III", hdr)
    assert (escape, ctype) == (0, ACCEPT)
    fields = await reader.readexactly(clen - 4)
    assert struct.unpack_from(">II", fields) == (1, len(CONTENT_TYPE))
    assert fields[8:] == CONTENT_TYPE
    frames = [b"frame-%d" % i * (i % 7 + 1) for i in range(100)]
    writer.write(control_frame(START, (CONTENT_TYPE,)) + b"".join(map(data_frame, frames)))
    writer.write(control_frame(STOP))
    assert await read_eof(reader) == control_frame(FINISH)
    writer.close()
    await wait_for(lambda: srv.stats.active == 0)
    assert srv.got == frames
    st = srv.stats
    assert (st.connections, st.active, st.frames, st.bytes) == (1, 0, 100, sum(map(len, frames)))
    assert st.closed == {"finished": 1}


async def test_unidirectional_start_then_eof(srv: Srv) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(control_frame(START, (CONTENT_TYPE,)) + data_frame(b"a") + data_frame(b"bc"))
    await writer.drain()
    await wait_for(lambda: len(srv.got) == 2)
    writer.write_eof()  # dnsdist / CLI relay on SIGTERM: no STOP
    await read_eof(reader)
    await wait_for(lambda: srv.stats.closed == {"eof": 1})
    assert srv.got == [b"a", b"bc"]
    assert srv.stats.active == 0
    writer.close()


async def test_unidirectional_stop_gets_no_finish(srv: Srv) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(control_frame(START, (CONTENT_TYPE,)) + data_frame(b"x") + control_frame(STOP))
    assert await read_eof(reader) == b""  # unidirectional senders never read
    await wait_for(lambda: srv.stats.closed == {"finished": 1})
    assert srv.got == [b"x"]
    writer.close()


async def test_one_byte_writes(srv: Srv) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    frames = [bytes([i]) * (i + 1) for i in range(20)]
    stream = control_frame(START, (CONTENT_TYPE,)) + b"".join(map(data_frame, frames)) + control_frame(STOP)
    for i in range(len(stream)):
        writer.write(stream[i : i + 1])
        await writer.drain()
        if i % 16 == 0:
            await asyncio.sleep(0)  # let the server read tiny segments
    await read_eof(reader)
    await wait_for(lambda: srv.stats.closed == {"finished": 1})
    assert srv.got == frames
    writer.close()


async def test_many_frames_one_write_batched() -> None:
    batches: list[list[bytes]] = []
    s = await start_server(on_frames=batches.append)
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    frames = [b"%05d" % i for i in range(5000)]
    writer.write(control_frame(START, (CONTENT_TYPE,)) + b"".join(map(data_frame, frames)) + control_frame(STOP))
    await read_eof(reader)
    await wait_for(lambda: s.stats.closed == {"finished": 1})
    assert [f for b in batches for f in b] == frames
    assert len(batches) < len(frames) / 10  # delivered in batches, not frame by frame
    writer.close()
    assert s.server is not None
    s.server.close()


def test_parser_one_byte_at_a_time() -> None:
    p = FrameParser()
    frames = [b"abc", b"x" * 1000]
    # START may omit the content type once READY/ACCEPT agreed on it.
    stream = control_frame(READY, (CONTENT_TYPE,)) + control_frame(START) + b"".join(map(data_frame, frames))
    got = [f for i in range(len(stream)) for f in p.feed(stream[i : i + 1])]
    assert got == frames
    assert bytes(p.replies) == control_frame(ACCEPT, (CONTENT_TYPE,))
    assert p.started and not p.finished and p.pending == 0
    p.feed(control_frame(STOP) + b"trailing junk is ignored")
    assert p.finished and bytes(p.replies).endswith(control_frame(FINISH))


# --- bad input --------------------------------------------------------------------------------------

START_OK = control_frame(START, (CONTENT_TYPE,))
READY_OK = control_frame(READY, (CONTENT_TYPE,))

BAD_SERVER_CLOSES = [
    ("garbage", b"SSH-2.0-OpenSSH_9.2\r\n"),
    ("garbage", u32(0x00100000) + b"x" * 10),
    ("http", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("http", b"POST / HTTP/1.1\r\n\r\n"),
    ("tls", bytes.fromhex("160301020001000001fc0303") + b"\x00" * 40),
    ("frame_too_large", u32(0xFFFFFFFF)),
    ("frame_too_large", START_OK + u32(0xFFFFFFFF)),
    ("frame_too_large", START_OK + u32(262_145)),
    ("bad_control", u32(0) + u32(0)),
    ("bad_control", u32(0) + u32(2) + b"\0\0"),
    ("bad_control", u32(0) + u32(1_000_000)),
    ("bad_control", control_frame(0x42)),
    ("bad_control", u32(0) + u32(4 + 8 + 3) + u32(READY) + u32(1) + u32(50) + b"abc"),  # field overruns
    ("bad_control", u32(0) + u32(4 + 5) + u32(READY) + b"\0\0\0\1\0"),  # truncated field header
    ("content_type", control_frame(READY, (OTHER,))),
    ("content_type", control_frame(READY)),
    ("content_type", control_frame(START, (OTHER,))),
    ("content_type", control_frame(START)),  # unidirectional START must name the type
    ("data_before_start", data_frame(b"hello")),
    ("data_before_start", READY_OK + data_frame(b"hello")),
    ("unexpected_control", READY_OK + READY_OK),
    ("unexpected_control", START_OK + READY_OK),
    ("unexpected_control", START_OK + START_OK),
    ("unexpected_control", control_frame(ACCEPT, (CONTENT_TYPE,))),
    ("unexpected_control", START_OK + control_frame(FINISH)),
    ("unexpected_control", control_frame(STOP)),
]


@pytest.mark.parametrize(
    ("reason", "payload"), BAD_SERVER_CLOSES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD_SERVER_CLOSES)]
)
async def test_bad_input_closes_only_that_connection(
    srv: Srv, reason: str, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    good = GoodSender(srv.port)
    await good.open()
    await good.send(10)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(payload)
    await read_eof(reader)  # the server hangs up on the bad sender
    await wait_for(lambda: reason in srv.stats.closed)
    writer.close()
    await good.send(10)
    await good.stop()
    await wait_for(lambda: srv.stats.active == 0)
    assert of(srv.got, b"good") == good.sent
    assert srv.stats.closed == {reason: 1, "finished": 1}
    assert srv.stats.connections == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "node" in warnings[0] and "127.0.0.1:" in warnings[0] and reason in warnings[0]
    if reason == "tls":
        assert "dnstap-tls: no" in warnings[0]


@pytest.mark.parametrize(
    "payload",
    [START_OK + u32(10) + b"abc", START_OK + b"\0\0", b"\0\0\0\0\0\0", READY_OK + b"\0\0\0\0\0\0\0\x10\0\0\0\4"],
    ids=["mid-frame", "mid-length", "mid-control-length", "mid-control"],
)
async def test_truncated(srv: Srv, payload: bytes) -> None:
    good = GoodSender(srv.port)
    await good.open()
    _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(payload)
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    await wait_for(lambda: "truncated" in srv.stats.closed)
    await good.send(5)
    await good.stop()
    await wait_for(lambda: srv.stats.active == 0)
    assert srv.got == good.sent
    assert srv.stats.closed == {"truncated": 1, "finished": 1}


async def test_good_frames_before_garbage_are_delivered(srv: Srv) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(START_OK + data_frame(b"one") + data_frame(b"two") + u32(0xFFFFFFFF))
    await read_eof(reader)
    await wait_for(lambda: srv.stats.closed == {"frame_too_large": 1})
    assert srv.got == [b"one", b"two"]
    writer.close()


# --- timeouts and limits -------------------------------------------------------------------------------


async def test_slowloris_and_silent_peer_time_out_idle_sender_does_not() -> None:
    s = await start_server(Limits(handshake_timeout_s=0.4, frame_timeout_s=0.4))
    good = GoodSender(s.port)
    await good.open()
    await good.send(3)
    silent_r, silent_w = await asyncio.open_connection("127.0.0.1", s.port)
    slow_r, slow_w = await asyncio.open_connection("127.0.0.1", s.port)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    slow_w.write(START_OK + u32(100) + b"ab")  # length sent, body stalls
    # Keep dribbling bytes: progress within a frame must not reset the per-frame deadline.
    for _ in range(3):
        await asyncio.sleep(0.1)
        slow_w.write(b"c")
    await read_eof(slow_r)
    assert loop.time() - t0 < 0.65
    await read_eof(silent_r)
    await wait_for(lambda: s.stats.closed == {"frame_timeout": 1, "handshake_timeout": 1})
    await asyncio.sleep(0.5)  # the good sender idles between frames longer than both timeouts
    await good.send(3)
    await good.stop()
    await wait_for(lambda: s.stats.active == 0)
    assert s.got == good.sent
    assert s.stats.closed == {"frame_timeout": 1, "handshake_timeout": 1, "finished": 1}
    silent_w.close()
    slow_w.close()
    assert s.server is not None
    s.server.close()


async def test_full_listener_evicts_the_longest_idle_sender(caplog: pytest.LogCaptureFixture) -> None:
    s = await start_server(Limits(max_senders=3))
    a, b, c = (GoodSender(s.port, p) for p in (b"a", b"b", b"c"))
    for snd in (a, b, c):  # each one's bytes are received before the next one connects: a, b, c in time
        await snd.open()
        await snd.send(1)
        await wait_for(lambda snd=snd: of(s.got, snd.prefix) == snd.sent)
    await a.send(1)  # a just sent bytes: b is now the longest idle, then c
    await wait_for(lambda: of(s.got, b"a") == a.sent)

    d = GoodSender(s.port, b"d")
    await d.open()  # admitted (ACCEPT received) although every slot was taken
    assert await read_eof(b.reader) == b""
    assert s.stats.closed == {"evicted": 1} and s.stats.active == 3
    e = GoodSender(s.port, b"e")
    await e.open()
    assert await read_eof(c.reader) == b""
    assert s.stats.closed == {"evicted": 2} and s.stats.active == 3

    for snd in (a, d, e):  # the survivors still flow
        await snd.send(3)
        await snd.stop()
    await wait_for(lambda: s.stats.active == 0)
    for snd in (a, b, c, d, e):
        assert of(s.got, snd.prefix) == snd.sent
    assert s.stats.closed == {"evicted": 2, "finished": 3}
    assert s.stats.connections == sum(s.stats.closed.values()) == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # rate-limited per reason
    assert "(evicted): idle for" in warnings[0] and "3 senders" in warnings[0]
    for snd in (b, c):
        snd.writer.close()
    assert s.server is not None
    s.server.close()


async def test_idle_sender_is_closed_and_one_that_sends_is_not(caplog: pytest.LogCaptureFixture) -> None:
    idle_s = 0.5
    s = await start_server(Limits(idle_timeout_s=idle_s))
    loop = asyncio.get_running_loop()
    idle, busy = GoodSender(s.port, b"idle"), GoodSender(s.port, b"busy")
    await idle.open()
    await busy.open()
    sent_last = loop.time()  # before the server can have received it: the close comes >= idle_s later
    await idle.send(1)

    async def keep_sending() -> None:
        while "idle" not in s.stats.closed:
            await busy.send(1)
            await asyncio.sleep(idle_s / 5)

    sending = asyncio.create_task(keep_sending())
    assert await read_eof(idle.reader, timeout=idle_s + 5) == b""
    assert loop.time() - sent_last >= idle_s
    await sending
    await busy.stop()  # the busy one kept its connection: STOP -> FINISH
    await wait_for(lambda: s.stats.active == 0)
    assert (of(s.got, b"idle"), of(s.got, b"busy")) == (idle.sent, busy.sent)
    assert s.stats.closed == {"idle": 1, "finished": 1}
    assert s.stats.connections == sum(s.stats.closed.values())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "(idle): nothing received for 0.5 s since START" in warnings[0]
    idle.writer.close()
    assert s.server is not None
    s.server.close()


async def test_sender_not_allowed_is_closed_before_anything_is_read(caplog: pytest.LogCaptureFixture) -> None:
    allow = SenderAllowList(["10.0.0.0/8"], always=())  # loopback refused: only a test can do that
    s = await start_server(allow=allow)
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(READY_OK)
    assert await read_eof(reader) == b""  # no ACCEPT
    await wait_for(lambda: s.stats.closed == {"not_allowed": 1})
    writer.close()
    assert (s.stats.connections, s.stats.active, s.stats.frames, s.got) == (1, 0, 0, [])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "127.0.0.1 is not in --dnstap-allow (allowed: this node's addresses, 10.0.0.0/8)" in warnings[0]

    allow.set_own(["192.0.2.1", "127.0.0.1"])  # the node's addresses, re-read: takes effect for new senders
    good = GoodSender(s.port)
    await good.open()
    await good.send(2)
    await good.stop()
    await wait_for(lambda: s.stats.active == 0)
    assert s.got == good.sent
    assert s.stats.closed == {"not_allowed": 1, "finished": 1}
    assert s.server is not None
    s.server.close()


async def test_a_failing_sender_check_refuses_the_sender() -> None:
    class BrokenAllowList:
        def allows(self, ip: str) -> bool:
            raise RuntimeError("allow-list bug")

    errors: list[BaseException] = []
    s = await start_server(allow=BrokenAllowList(), on_error=errors.append)
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(READY_OK)
    assert await read_eof(reader) == b""  # fails closed: no ACCEPT
    await wait_for(lambda: s.stats.closed == {"internal_error": 1})
    assert [str(e) for e in errors] == ["allow-list bug"]
    assert (s.stats.connections, s.stats.active, s.got) == (1, 0, [])
    writer.close()
    assert s.server is not None
    s.server.close()


def test_max_senders_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_senders"):
        Limits(max_senders=0)


async def test_shared_stats_two_listeners() -> None:
    stats = CollectorStats()
    got: list[bytes] = []
    servers = [
        await serve("127.0.0.1", 0, got.extend, name=n, stats=stats, limits=Limits(max_senders=1))
        for n in ("node", "mux")
    ]
    senders = [GoodSender(srv.sockets[0].getsockname()[1], n) for srv, n in zip(servers, (b"n", b"m"), strict=True)]
    for snd in senders:  # max_senders is per listener: one each is fine
        await snd.open()
        await snd.send(4)
        await snd.stop()
    await wait_for(lambda: stats.active == 0)
    assert (stats.connections, stats.frames, stats.closed) == (2, 8, {"finished": 2})
    for srv in servers:
        srv.close()


async def test_warnings_are_rate_limited_counters_exact(srv: Srv, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        await read_eof(reader)
        writer.close()
    await wait_for(lambda: srv.stats.closed.get("http") == 5)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


async def test_consumer_exception_goes_to_on_error_and_closes_that_sender(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[list[bytes]] = []
    errors: list[BaseException] = []

    def boom(frames: list[bytes]) -> None:
        calls.append(frames)
        if any(f.startswith(b"bad-") for f in frames):
            raise ValueError("consumer bug")

    s = await start_server(on_frames=boom, on_error=errors.append)
    bad, good = GoodSender(s.port, b"bad"), GoodSender(s.port, b"good")
    await bad.open()
    await good.open()
    await bad.send(1)
    assert await read_eof(bad.reader) == b""  # closed at the first failure: no loop on every frame
    await good.send(3)
    await good.stop()
    await wait_for(lambda: s.stats.active == 0)
    assert s.stats.closed == {"internal_error": 1, "finished": 1}
    assert [type(e) for e in errors] == [ValueError]
    assert "closed as internal_error" in errors[0].__notes__[0]
    assert [f for c in calls for f in c] == [*bad.sent, *good.sent]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # on_error reported it
    bad.writer.close()
    assert s.server is not None
    s.server.close()


async def test_consumer_exception_without_on_error_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def boom(frames: list[bytes]) -> None:
        raise ValueError("consumer bug")

    s = await start_server(on_frames=boom)
    snd = GoodSender(s.port)
    await snd.open()
    await snd.send(2)
    assert await read_eof(snd.reader) == b""
    await wait_for(lambda: s.stats.closed == {"internal_error": 1})
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR and logged[0].exc_info is not None
    snd.writer.close()
    assert s.server is not None
    s.server.close()


@pytest.fixture
def armed_dnstap_failpoint() -> Iterator[None]:
    supervisor.arm("dnstap")
    yield
    supervisor._armed.discard("dnstap")  # not left armed for other tests if this one failed early


async def test_injected_fault_in_data_received(armed_dnstap_failpoint: None) -> None:
    errors: list[BaseException] = []
    s = await start_server(on_error=errors.append)
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(READY_OK)  # the first bytes: the failpoint raises before they are parsed
    assert await read_eof(reader) == b""
    await wait_for(lambda: s.stats.closed == {"internal_error": 1})
    assert [type(e) for e in errors] == [supervisor.InjectedFault]
    writer.close()
    good = GoodSender(s.port)  # the fault fires once: the next sender flows
    await good.open()
    await good.send(2)
    await good.stop()
    await wait_for(lambda: s.stats.active == 0)
    assert s.got == good.sent
    assert s.stats.closed == {"internal_error": 1, "finished": 1}
    assert s.stats.connections == sum(s.stats.closed.values())
    assert s.server is not None
    s.server.close()


def test_parser_errors_carry_reason() -> None:
    with pytest.raises(ProtocolError) as ei:
        FrameParser().feed(b"\x16\x03\x01\x00\x10")
    assert ei.value.reason == "tls"


# --- interoperability with libfstrm -------------------------------------------------------------------------


async def test_fstrm_replay_interop(srv: Srv, tmp_path: Path) -> None:
    exe = shutil.which("fstrm_replay")
    require(exe, "fstrm_replay is not installed (make test installs fstrm-bin)")
    frames = [b"dnstap-%d" % i * (i % 5 + 1) for i in range(200)]
    path = tmp_path / "in.fstrm"  # file format: START, data frames, STOP
    path.write_bytes(START_OK + b"".join(map(data_frame, frames)) + control_frame(STOP))
    proc = await asyncio.create_subprocess_exec(
        exe, "-t", CONTENT_TYPE.decode(), "-r", str(path), "-a", "127.0.0.1", "-p", str(srv.port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, out
    await wait_for(lambda: srv.stats.active == 0 and srv.stats.connections == 1)
    assert srv.got == frames
    assert srv.stats.closed == {"finished": 1}
