"""Bounded per-client queues: overflow is counted and answered with a reset and a fresh snapshot."""

import asyncio
import tracemalloc

import orjson

from netstatd.hub import FRAME_EVENTS, Hub, encode_frames


def make_hub(max_events=10) -> Hub:
    return Hub("n1", lambda: [{"type": "connection.event", "sockCookie": 1}], lambda: "T", client_max_events=max_events)


def decode(frames: list[bytes]) -> list[dict]:
    out = []
    for f in frames:
        d = orjson.loads(f)
        out.extend(d if isinstance(d, list) else [d])
    return out


def take_all(sub) -> list[bytes]:
    """What the send loop sends before it waits again (the snapshot comes a frame per take)."""
    frames = sub.take()
    while sub.wake.is_set():
        frames += sub.take()
    return frames


def test_new_subscriber_gets_host_info_then_snapshot_then_live_events():
    hub = make_hub()
    sub = hub.subscribe("c", {"type": "host.info"})
    hub.publish([{"type": "connection.event", "sockCookie": 2}])
    types = [(e["type"], e.get("sockCookie")) for e in decode(take_all(sub))]
    assert types == [("host.info", None), ("connection.event", 1), ("snapshot.complete", None), ("connection.event", 2)]


def test_overflow_drops_only_the_slow_client_and_resets_it():
    hub = make_hub(max_events=10)
    slow = hub.subscribe("slow", {"type": "host.info"})
    fast = hub.subscribe("fast", {"type": "host.info"})
    take_all(slow)
    take_all(fast)
    for i in range(4):
        hub.publish([{"type": "connection.event", "sockCookie": 100 + i}] * 4)
        got = decode(take_all(fast))
        assert len(got) == 4  # the fast client keeps everything
    assert hub.dropped_events > 0 and hub.overflows == 1
    events = decode(take_all(slow))
    assert events[0]["type"] == "stream.reset" and events[0]["missedEvents"] == hub.dropped_events
    assert [e["type"] for e in events[1:]] == ["connection.event", "snapshot.complete"]
    # afterwards it streams normally again
    hub.publish([{"type": "connection.event", "sockCookie": 7}])
    assert [e["sockCookie"] for e in decode(take_all(slow))] == [7]


def test_one_batch_larger_than_the_bound_still_reaches_an_idle_client():
    hub = make_hub(max_events=10)
    sub = hub.subscribe("c", {"type": "host.info"})
    take_all(sub)
    hub.publish([{"type": "connection.event"}] * 50)
    assert len(decode(take_all(sub))) == 50 and hub.dropped_events == 0


def test_client_cap():
    hub = Hub("n1", list, lambda: "T", max_clients=1)
    assert hub.subscribe("a", {}) is not None
    assert hub.subscribe("b", {}) is None


def test_a_large_snapshot_is_encoded_a_frame_at_a_time():
    from netstatd.hub import FIRST_FRAME_EVENTS, FRAME_EVENTS

    made = 0

    def state():
        nonlocal made
        for i in range(3 * FRAME_EVENTS):
            made += 1
            yield {"type": "connection.event", "sockCookie": i}

    hub = Hub("n1", state, lambda: "T")
    sub = hub.subscribe("c", {"type": "host.info"})
    first = sub.take()
    # a small first frame (what a user waits for), and nothing made ahead but the event telling the last
    assert len(decode(first)) == 1 + FIRST_FRAME_EVENTS and made == FIRST_FRAME_EVENTS + 1
    assert len(decode(sub.take())) == FRAME_EVENTS and made == FIRST_FRAME_EVENTS + FRAME_EVENTS + 1
    hub.publish([{"type": "connection.event", "sockCookie": -1}])
    rest = decode(take_all(sub))
    assert [e["sockCookie"] for e in rest if e["type"] == "connection.event"][-1] == -1  # live after the snapshot
    complete = [e for e in rest if e["type"] == "snapshot.complete"]
    assert complete[0]["count"] == 3 * FRAME_EVENTS


def test_lazy_publish_makes_no_events_without_clients_and_all_with_one():
    made = []

    def events(n):
        for i in range(n):
            made.append(i)
            yield {"type": "connection.event", "sockCookie": i}

    hub = Hub("n1", list, lambda: "T")
    hub.publish_lazily(events(5000))
    assert made == []
    sub = hub.subscribe("c", {"type": "host.info"})
    take_all(sub)
    hub.publish_lazily(events(5000))
    assert [e["sockCookie"] for e in decode(take_all(sub))] == list(range(5000))


def test_small_frames_take_the_memory_their_size_says():
    """A queue's byte bound counts len(frame): a small frame must not hold orjson's output buffer
    (4 KiB requested for a 60-byte frame, 8 KiB of RSS)."""
    event = {"type": "connection.event", "sockCookie": 1, "state": "ESTABLISHED"}
    tracemalloc.start()
    try:
        frames = [encode_frames([event])[0][0] for _ in range(2000)]
        held_per_frame = tracemalloc.get_traced_memory()[0] / len(frames)
    finally:
        tracemalloc.stop()
    assert held_per_frame < 4 * len(frames[0]) + 200, f"{held_per_frame:.0f} bytes per {len(frames[0])}-byte frame"


def test_a_client_still_taking_its_snapshot_may_queue_more_before_it_overflows():
    """The live events behind a snapshot being sent are needed after it: until it is done the bounds
    are SNAPSHOT_SLACK times larger (an overflow would only start the snapshot again)."""
    from netstatd.hub import FRAME_EVENTS, SNAPSHOT_SLACK

    hub = Hub("n1", lambda: ({"type": "connection.event", "sockCookie": i} for i in range(2 * FRAME_EVENTS)),
              lambda: "T", client_max_events=10)  # fmt: skip
    sub = hub.subscribe("c", {"type": "host.info"})
    sub.take()  # host.info and the first snapshot frame: one frame still to come
    for i in range(SNAPSHOT_SLACK * 10 // 5):
        hub.publish([{"type": "connection.event", "sockCookie": 10_000 + i}] * 5)
    assert hub.overflows == 0 and sub.queued_events == SNAPSHOT_SLACK * 10
    hub.publish([{"type": "connection.event", "sockCookie": 1}])
    assert hub.overflows == 1


async def test_a_large_flush_is_published_with_the_loop_turning_between_frames():
    """A client's send loop takes the first frames of a large flush before the last are offered, so
    they never wait in its queue all at once."""
    hub = make_hub(max_events=10 * FRAME_EVENTS)
    sub = hub.subscribe("c", {"type": "host.info"})
    take_all(sub)
    taken: list[int] = []

    async def send_loop() -> None:
        while True:
            await sub.wake.wait()
            taken.append(sum(len(orjson.loads(f)) for f in sub.take()))

    sender = asyncio.create_task(send_loop())
    await asyncio.sleep(0)
    await hub.publish_in_turns([{"type": "connection.event", "sockCookie": i} for i in range(3 * FRAME_EVENTS)])
    await asyncio.sleep(0)
    sender.cancel()
    assert taken == [FRAME_EVENTS] * 3


async def test_a_publish_during_a_publish_in_turns_comes_after_what_it_holds():
    """Another task's newer events (a sweep's) never overtake the rest of a flush being published."""
    hub = make_hub(max_events=10 * FRAME_EVENTS)
    sub = hub.subscribe("c", {"type": "host.info"})
    take_all(sub)
    flush = asyncio.create_task(
        hub.publish_in_turns([{"type": "connection.event", "sockCookie": i} for i in range(3 * FRAME_EVENTS)])
    )
    await asyncio.sleep(0)  # the first frame's worth is offered, the flush task waits for its next turn
    hub.publish([{"type": "connection.event", "sockCookie": -1}])
    await flush
    cookies = [e["sockCookie"] for e in decode(take_all(sub))]
    assert cookies == [*range(3 * FRAME_EVENTS), -1]
