"""The folded-state sweep: TCP states the kernel did not send on their own, read from sock_diag.

The kernel sends a record only for ESTABLISHED and CLOSE; the other states are
folded into the socket's next record (docs/kernel.md). A socket that
stays in a folded state (an application that never closes: CLOSE_WAIT; a peer
that never closes: FIN_WAIT2) would have no next record for a long time, so it
would show its last sent state. The agent dumps the sockets in those states
while the kernel's fold counter moves, and this applies the dump.
"""

from __future__ import annotations

from ..protocol import (
    TCP_CLOSE_WAIT,
    TCP_CLOSING,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    TCP_LAST_ACK,
    TCP_STATES,
    TCP_SYN_RECV,
)
from .tables import Change, Tables

# The states handle_state() folds (netstatd.bpf.c foldable()): the only ones that can be stale. Not
# SYN_SENT: the stats iterator reports a connect that lasts, with its owner (a sweep has none).
FOLDED_STATES = (TCP_SYN_RECV, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING)


def sweep_folded(tables: Tables, states: dict[int, int], before_ns: int) -> list[Change]:
    """Set the state of tracked TCP connections whose dumped state differs; one change each.

    states: cookie -> kernel state of TCP sockets (sockdiag.tcp_states), from a dump started at
    before_ns (CLOCK_MONOTONIC). A connection whose last record is newer than that is left alone:
    the record is newer than the dump. Unknown cookies are left to the seed and reconcile paths.
    Flush first, so records already read are applied before this.
    """
    out: list[Change] = []
    for cookie, number in states.items():
        # only folded states: the others (CLOSE, TIME_WAIT: the kernel's CLOSE record) always have a record
        if number not in FOLDED_STATES:
            continue
        conn = tables.tcp.get(cookie)
        state = TCP_STATES[number]
        if conn is None or conn.ts >= before_ns or conn.state == state:
            continue
        conn.state, conn.ts = state, before_ns
        out.append((conn, [state], None))
    return out
