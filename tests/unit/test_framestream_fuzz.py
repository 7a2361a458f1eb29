"""Property tests for the sans-IO Frame Streams parser: exact delivery under any split, no crash on junk."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from netstatd.sources.dnstap.framestream import (
    ACCEPT,
    CONTENT_TYPE,
    FINISH,
    READY,
    REASONS,
    START,
    STOP,
    FrameParser,
    Limits,
    ProtocolError,
    control_frame,
    data_frame,
)

FAST = settings(max_examples=300, deadline=None)
DEFAULT = Limits()
SMALL = Limits(max_frame_bytes=512, max_control_bytes=64)

payloads = st.lists(st.binary(min_size=1, max_size=600), max_size=30)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def run(chunks: list[bytes], limits: Limits = DEFAULT) -> tuple[FrameParser, list[bytes], ProtocolError | None]:
    p = FrameParser(limits)
    got: list[bytes] = []
    for chunk in chunks:
        try:
            got += p.feed(chunk)
        except ProtocolError as e:
            return p, got + e.frames, e
    return p, got, None


@FAST
@given(frames=payloads, bidirectional=st.booleans(), stop=st.booleans(), cuts=st.lists(st.integers(0, 10**6)))
def test_valid_stream_any_split_delivers_exactly(
    frames: list[bytes], bidirectional: bool, stop: bool, cuts: list[int]
) -> None:
    stream = control_frame(READY, (b"x", CONTENT_TYPE)) if bidirectional else b""
    stream += control_frame(START, (CONTENT_TYPE,)) + b"".join(map(data_frame, frames))
    stream += control_frame(STOP) if stop else b""
    p, got, err = run(split(stream, cuts))
    assert err is None
    assert got == frames
    assert p.started and p.finished == stop and p.pending == 0
    expected = control_frame(ACCEPT, (CONTENT_TYPE,)) if bidirectional else b""
    expected += control_frame(FINISH) if bidirectional and stop else b""
    assert bytes(p.replies) == expected


@FAST
@given(
    junk=st.binary(max_size=2000),
    prefix=st.sampled_from([b"", control_frame(START, (CONTENT_TYPE,)), control_frame(READY, (CONTENT_TYPE,))]),
    cuts=st.lists(st.integers(0, 10**6), max_size=20),
    small=st.booleans(),
)
def test_arbitrary_bytes_never_crash_or_invent_data(junk: bytes, prefix: bytes, cuts: list[int], small: bool) -> None:
    data = prefix + junk
    limits = SMALL if small else DEFAULT
    p, got, err = run(split(data, cuts), limits)
    assert sum(map(len, got)) <= len(data)
    assert all(0 < len(f) <= limits.max_frame_bytes for f in got)
    assert p.pending < limits.max_frame_bytes + 8  # the buffer stays bounded by one frame
    if err is not None:
        assert err.reason in REASONS and err.message


@FAST
@given(
    frames=st.lists(st.binary(min_size=1, max_size=100), min_size=1, max_size=10),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 10**6), max_size=10),
)
def test_corrupted_valid_stream(frames: list[bytes], flips: list[tuple[int, int]], cuts: list[int]) -> None:
    stream = bytearray(control_frame(READY, (CONTENT_TYPE,)) + control_frame(START) + b"".join(map(data_frame, frames)))
    for pos, val in flips:
        stream[pos % len(stream)] = val
    _, got, err = run(split(bytes(stream), cuts), SMALL)
    assert sum(map(len, got)) <= len(stream)
    if err is not None:
        assert err.reason in REASONS
