"""Prometheus text rendering."""

from netstatd.metrics import Metric, render


def test_large_counters_render_exactly():
    # "%g" rendered 35,999,987 as 3.59999e+07: a scraper saw the counter stand still
    text = render([Metric("x_total", "counter", "h", [({}, 35_999_987), ({"a": "b"}, 0.25)])])
    assert "x_total 35999987\n" in text and 'x_total{a="b"} 0.25\n' in text
