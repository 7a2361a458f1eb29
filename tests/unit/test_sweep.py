"""The folded-state sweep: a sock_diag dump sets the states the kernel folded and a socket stays in."""

from netstatd.state import sweep
from tests.unit.test_tracker import conn_events, rec, tracker

CLOSE_WAIT, FIN_WAIT2, TIME_WAIT = 8, 5, 6


def established(tmp_path, *cookies: int):
    """A tracker with connections whose last record (ts 1000) said ESTABLISHED."""
    t = tracker(tmp_path)
    for c in cookies:
        t.ingest(rec(cookie=c, old=10, new=1, tgid=100, folded=(3,), ts=1000, sport=80, dport=5000 + c))
    assert len(conn_events(t.flush())) == len(cookies)
    return t


def test_a_socket_staying_in_a_folded_state_gets_that_state(tmp_path):
    t = established(tmp_path, 1, 2)
    out = sweep_folded(t, {1: CLOSE_WAIT, 2: 1}, before_ns=2000)
    (e,) = out
    assert (e["sockCookie"], e["state"], e["states"], e["pid"]) == (1, "CLOSE_WAIT", ["CLOSE_WAIT"], 100)
    assert (t.tcp[1].state, t.tcp[1].ts) == ("CLOSE_WAIT", 2000)
    assert t.tcp[2].state == "ESTABLISHED"
    # the same dump again changes nothing
    assert sweep_folded(t, {1: CLOSE_WAIT}, before_ns=3000) == []


def test_a_record_newer_than_the_dump_wins(tmp_path):
    t = established(tmp_path, 1)
    assert sweep_folded(t, {1: CLOSE_WAIT}, before_ns=1000) == []
    assert t.tcp[1].state == "ESTABLISHED"


def test_unknown_cookies_and_unfolded_states_are_ignored(tmp_path):
    t = established(tmp_path, 1)
    # 9 is not tracked (seed/reconcile own it); TIME_WAIT comes with the kernel's CLOSE record
    out = sweep_folded(t, {9: FIN_WAIT2, 1: TIME_WAIT}, before_ns=2000)
    assert out == [] and set(t.tcp) == {1} and t.tcp[1].state == "ESTABLISHED"


def test_the_close_after_a_sweep_still_lists_every_folded_state(tmp_path):
    t = established(tmp_path, 1)
    assert len(sweep_folded(t, {1: CLOSE_WAIT}, before_ns=2000)) == 1
    t.ingest(rec(cookie=1, old=9, new=7, tgid=100, folded=(8, 9), ts=3000, sport=80, dport=5001))
    (closed,) = conn_events(t.flush())
    assert closed["states"] == ["CLOSE_WAIT", "LAST_ACK", "CLOSE"]  # every state since the previous record
    assert t.tcp == {}


def test_a_record_drained_after_the_sweep_does_not_roll_back_its_state(tmp_path):
    t = tracker(tmp_path)
    t.ingest(rec(cookie=9, old=3, new=1, ts=10, folded=(3,)))  # SYN_RECV folded into ESTABLISHED
    t.flush()
    (swept,) = sweep_folded(t, {9: CLOSE_WAIT}, before_ns=100)  # CLOSE_WAIT, seen by sock_diag
    assert swept["state"] == "CLOSE_WAIT"
    t.ingest(rec(cookie=9, old=1, new=1, ts=50))  # an older record, drained late
    (late,) = conn_events(t.flush())
    assert late["state"] == "CLOSE_WAIT" and t.tcp[9].state == "CLOSE_WAIT"


def sweep_folded(t, states, before_ns):
    """The sweep's events, as the agent publishes them."""
    return t.pipeline.events(sweep.sweep_folded(t.tables, states, before_ns))
