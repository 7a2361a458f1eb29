"""Kernel records folded into pending changes, until the flush applies them to the tables.

Per record this costs a tuple and a dict lookup: a socket's records of one flush period (50 ms)
become one pending entry holding its first state, its latest record and every state it passed
through, so a connection's open and close are never skipped, yet a sub-millisecond connection is
one change per side. Only the latest record of each socket is decoded in full, at the flush.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from ..metrics import Metric
from ..protocol import FAMILY_NAMES, TCP_CLOSE, TCP_LISTEN, TCP_STATE_NAMES
from ..sources.bpf import events as ev
from .native import ShortConnections

# kernel record kind -> (protocol, state label for records that carry no TCP state)
KIND_LABELS = {
    ev.EV_TCP_STATE: ("TCP", None),
    ev.EV_TCP_ACCEPT: ("TCP", "ACCEPT"),
    ev.EV_TCP_LISTEN: ("TCP", "LISTEN"),
    ev.EV_UDP_SEND: ("UDP", "SEND"),
    ev.EV_UDP_RECV: ("UDP", "RECV"),
    ev.EV_UDP_BIND: ("UDP", "BIND"),
    ev.EV_UDP_CLOSE: ("UDP", "CLOSE"),
}

# A pending entry, per TCP cookie or UDP (cookie, peer address, peer port):
#   [first: the first record's old state (TCP; 0 when it was an accept) or kind (UDP),
#    chunk, offset: where the latest state record is (decoded at the flush),
#    states: the state names it passed through, in order,
#    accept: the decoded accept record, or None]
Pending = list


@dataclass
class Period:
    """What a flush period gathered, in the order the tables apply it."""

    opens: list[tuple] = field(default_factory=list)  # listen/bind records: before the connections
    entries: dict[Any, Pending] = field(default_factory=dict)
    closes: list[tuple] = field(default_factory=list)  # listener and UDP socket closes: after them
    shorts: list[bytes] = field(default_factory=list)  # short connections the native helper packed


class Folder:
    """Takes chunks of ring records (ingest) and hands over what they add up to (take)."""

    def __init__(self, native: ShortConnections | None) -> None:
        self.native = native  # short TCP connections in C, when the helper is built
        self.period = Period()
        self.records_ingested = 0  # kernel records taken in, to compare with the kernel's CNT_EMITTED
        self.record_counts: Counter[int] = Counter()  # kind | family << 8 | oldstate << 16 | newstate << 24
        self._folded_names: dict[int, tuple[str, ...]] = {}

    def ingest(self, chunk: bytes, known: tuple[Container[int], ...], every_close: bool) -> list[tuple[int, bytes]]:
        """Fold a chunk of ring records. Returns (pid, raw comm) of the processes in it, for enrichment
        to look up while they live (consecutive repeats left out).

        known: cookies the tables hold or closed on their own; the native helper leaves those to the
        fold. every_close: fold everything here (a seed scan needs every closed cookie).
        """
        self.records_ingested += len(chunk) // ev.RECORD_SIZE
        processes: list[tuple[int, bytes]] = []
        if self.native is not None:
            self.native.count_kinds(chunk, self.record_counts)
            if every_close:
                chunk = self.native.take_carry() + chunk
            else:
                chunk, shorts, processes = self.native.split(chunk, (self.period.entries, *known))
                if shorts:
                    self.period.shorts.append(shorts)
        else:
            self.record_counts.update(memoryview(chunk).cast("I")[ev.KIND_WORD :: ev.RECORD_WORDS])
        self._fold(chunk, processes)
        return processes

    def take(self) -> Period:
        """Everything gathered since the last take: the flush applies it."""
        if self.native is not None:
            self._fold(self.native.take_carry(), [])
        period, self.period = self.period, Period()
        return period

    def metrics(self) -> list[Metric]:
        """netstatd_events_total and netstatd_events_by_state, from the packed counts of records."""
        totals: dict[tuple[str, str], int] = {}
        by_state: dict[tuple[str, str, str], int] = {}
        for key, n in list(self.record_counts.items()):
            kind, family, newstate = key & 0xFF, (key >> 8) & 0xFF, key >> 24
            proto, state = KIND_LABELS.get(kind, ("unknown", "unknown"))
            fam = FAMILY_NAMES.get(family, str(family))
            state = state or TCP_STATE_NAMES[newstate]
            totals[(proto, fam)] = totals.get((proto, fam), 0) + n
            by_state[(proto, fam, state)] = by_state.get((proto, fam, state), 0) + n
        return [
            Metric(
                "netstatd_events_total",
                "counter",
                "Kernel events received, by protocol and IP family.",
                [({"protocol": p, "family": f}, n) for (p, f), n in sorted(totals.items())],
            ),
            # Named without _total by contract (docs/metrics.md), so exposed as untyped.
            Metric(
                "netstatd_events_by_state",
                "untyped",
                "Kernel events received, by protocol, IP family and state (monotonic count).",
                [({"protocol": p, "family": f, "state": s}, n) for (p, f, s), n in sorted(by_state.items())],
            ),
        ]

    def _fold(self, chunk: bytes, processes: list[tuple[int, bytes]]) -> None:
        period = self.period
        pending, opens, closes = period.entries, period.opens, period.closes
        names = TCP_STATE_NAMES
        full = ev.RECORD.unpack_from
        size = ev.RECORD_SIZE
        last_pid = 0
        off = -size
        for cookie, pid, kind, _family, old, new, folded in ev.RECORD_BRIEF.iter_unpack(chunk):
            off += size
            if pid != last_pid:
                last_pid = pid
                processes.append((pid, full(chunk, off)[ev.COMM]))
            if kind == ev.EV_TCP_STATE:
                if old == TCP_LISTEN and new == TCP_CLOSE:
                    closes.append(full(chunk, off))  # a listener closed
                    continue
                key: Any = cookie
                first = old
            elif kind == ev.EV_UDP_SEND or kind == ev.EV_UDP_RECV:
                rec = full(chunk, off)
                key = (cookie, rec[ev.DADDR], rec[ev.DPORT])
                first = kind
            elif kind == ev.EV_TCP_ACCEPT:
                p = pending.get(cookie)
                if p is None:
                    pending[cookie] = [0, chunk, off, [], full(chunk, off)]
                else:
                    p[4] = full(chunk, off)
                continue
            elif kind == ev.EV_UDP_CLOSE:
                closes.append(full(chunk, off))
                continue
            else:
                opens.append(full(chunk, off))
                continue
            p = pending.get(key)
            if folded:
                # states the kernel folded into this record come before its own
                passed = self._folded_names.get(folded)
                if passed is None:
                    passed = self._folded(folded)
                if p is None:
                    pending[key] = [first, chunk, off, [*passed, names[new]], None]
                    continue
                p[3].extend(passed)
            elif p is None:
                pending[key] = [first, chunk, off, [names[new]], None]
                continue
            p[1] = chunk
            p[2] = off
            p[3].append(names[new])

    def _folded(self, folded: int) -> tuple[str, ...]:
        """event.folded as state names, cached (a few sequences recur: FIN_WAIT1+FIN_WAIT2, ...)."""
        if len(self._folded_names) >= 1024:
            self._folded_names.clear()
        passed = self._folded_names[folded] = tuple(TCP_STATE_NAMES[s] for s in ev.folded_states(folded))
        return passed
