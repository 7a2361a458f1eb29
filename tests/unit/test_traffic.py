"""enrich/traffic.py: bytes per namespace, bounded in label values."""

from netstatd.enrich.traffic import NamespaceTraffic


def test_bytes_add_up_per_namespace_and_past_the_cap_go_to_other():
    t = NamespaceTraffic(max_namespaces=2)
    t.add("payments", 100, 10)
    t.add(None, 5, 0)  # a host process
    t.add("payments", 1, 1)
    t.add("billing", 7, 7)  # a third namespace: the two labels are taken
    t.add("billing", 0, 0)  # nothing new: not counted at all
    assert t.bytes == {"payments": [101, 11], "_host": [5, 0], "_other": [7, 7]}
    assert t.overflow == 1
    (total, overflow) = t.metrics()
    assert ({"namespace": "_other", "direction": "received"}, 7) in total.samples
    assert overflow.samples[0][1] == 1
