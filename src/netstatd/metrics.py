"""Prometheus text exposition (format 0.0.4), read from live state at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from . import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = dict[str, str]


@dataclass
class Metric:
    name: str
    kind: str  # counter, gauge, untyped, histogram
    help: str
    # (labels, value), or (labels, value, suffix) for a sample named name + suffix (a histogram's _bucket)
    samples: Iterable[tuple[Labels, float] | tuple[Labels, float, str]]


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
        for sample in m.samples:
            labels, value = sample[0], sample[1]
            name = m.name + sample[2] if len(sample) > 2 else m.name  # type: ignore[misc]
            if labels:
                lbl = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{lbl}}} {_number(value)}")
            else:
                lines.append(f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def single(name: str, kind: str, help_: str, value: Callable[[], float] | float) -> Metric:
    return Metric(name, kind, help_, [({}, value() if callable(value) else value)])


def histogram(name: str, help_: str, bounds: Sequence[float], counts: Sequence[int], total: float) -> Metric:
    """A histogram without labels. counts: observations per bucket, not cumulative: counts[i] those
    <= bounds[i] and above the bound before, then one more for those above the last bound."""
    samples: list[tuple[Labels, float, str]] = []
    seen = 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        seen += n
        samples.append(({"le": "+Inf" if bound == float("inf") else repr(float(bound))}, seen, "_bucket"))
    samples += [({}, total, "_sum"), ({}, seen, "_count")]
    return Metric(name, "histogram", help_, samples)


def build_info() -> Metric:
    """netstatd_build_info, which the agent and `netstatd mux` both serve."""
    return Metric("netstatd_build_info", "gauge", "Agent version.", [({"version": __version__}, 1)])
