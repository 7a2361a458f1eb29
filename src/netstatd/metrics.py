"""Prometheus text exposition (format 0.0.4), read from live state at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .protocol import FAMILY_NAMES
from .sources.bpf import events as ev

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# kernel record kind -> (protocol, state label for records that carry no TCP state)
_KIND_LABELS = {
    ev.EV_TCP_STATE: ("TCP", None),
    ev.EV_TCP_ACCEPT: ("TCP", "ACCEPT"),
    ev.EV_TCP_LISTEN: ("TCP", "LISTEN"),
    ev.EV_UDP_SEND: ("UDP", "SEND"),
    ev.EV_UDP_RECV: ("UDP", "RECV"),
    ev.EV_UDP_BIND: ("UDP", "BIND"),
    ev.EV_UDP_CLOSE: ("UDP", "CLOSE"),
}

Labels = dict[str, str]


@dataclass
class Metric:
    name: str
    kind: str  # counter, gauge, untyped
    help: str
    samples: Iterable[tuple[Labels, float]]


def _escape(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    """Exact: counters pass 1e6 within seconds at full churn, and "%g" would round them to 6 digits."""
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return repr(value)


def render(metrics: Iterable[Metric]) -> str:
    lines = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {m.help}")
        lines.append(f"# TYPE {m.name} {m.kind}")
        for labels, value in m.samples:
            if labels:
                lbl = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{m.name}{{{lbl}}} {_number(value)}")
            else:
                lines.append(f"{m.name} {_number(value)}")
    return "\n".join(lines) + "\n"


def record_metrics(record_counts: dict[int, int]) -> list[Metric]:
    """netstatd_events_total and netstatd_events_by_state from the tracker's packed counters."""
    totals: dict[tuple[str, str], int] = {}
    by_state: dict[tuple[str, str, str], int] = {}
    for key, n in list(record_counts.items()):
        kind, family, newstate = key & 0xFF, (key >> 8) & 0xFF, key >> 24
        proto, state = _KIND_LABELS.get(kind, ("unknown", "unknown"))
        fam = FAMILY_NAMES.get(family, str(family))
        state = state or ev.TCP_STATES.get(newstate, str(newstate))
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


def single(name: str, kind: str, help_: str, value: Callable[[], float] | float) -> Metric:
    return Metric(name, kind, help_, [({}, value() if callable(value) else value)])
