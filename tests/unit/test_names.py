"""NameCache: announce rules, TTL expiry, cap eviction, bounded expiry heap."""

from __future__ import annotations

from netstatd.sources.dnstap.decode import Resolution
from netstatd.state.names import NameCache


def res(ip: str, host: str = "svc.test", ttl: int = 60, aliases: tuple[str, ...] = ()) -> Resolution:
    return Resolution(ip, host, aliases, ttl, "10.0.0.7")


def test_new_refresh_and_change():
    c = NameCache()
    e = c.learn(res("192.0.2.1"), now=100.0)
    assert e is not None and (e.hostname, e.expires, e.client_ip) == ("svc.test", 160.0, "10.0.0.7")
    assert c.learn(res("192.0.2.1", ttl=300), now=110.0) is None  # refresh: no new announcement
    assert c.lookup("192.0.2.1", now=400.0).expires == 410.0
    changed = c.learn(res("192.0.2.1", host="other.test"), now=120.0)
    assert changed is not None and changed.hostname == "other.test"
    assert c.learn(res("192.0.2.1", host="other.test", aliases=("cdn.test",)), now=121.0) is not None
    assert len(c) == 1


def test_ttl_expiry():
    c = NameCache(min_ttl_s=30)
    c.learn(res("192.0.2.1", ttl=10), now=0.0)  # min_ttl_s stretches short TTLs
    c.learn(res("192.0.2.2", ttl=100), now=0.0)
    c.learn(res("192.0.2.3", ttl=50), now=0.0)
    c.learn(res("192.0.2.3", ttl=50), now=40.0)  # refreshed: lives until 90
    assert c.lookup("192.0.2.1", now=29.0) is not None
    assert c.lookup("192.0.2.1", now=30.0) is None  # expired entries are not returned, even before expire()
    assert [e.ip for e in c.expire(now=60.0)] == ["192.0.2.1"]
    assert {e.ip for e in c.entries(now=60.0)} == {"192.0.2.2", "192.0.2.3"}
    assert c.expire(now=60.0) == []
    assert [e.ip for e in c.expire(now=95.0)] == ["192.0.2.3"]
    assert [e.ip for e in c.expire(now=1000.0)] == ["192.0.2.2"]
    assert len(c) == 0 and c.entries(now=0.0) == []


def test_cap_evicts_least_recently_learnt():
    c = NameCache(max_entries=3)
    for i in range(3):
        c.learn(res(f"192.0.2.{i}"), now=0.0)
    c.learn(res("192.0.2.0"), now=1.0)  # refresh moves .0 to the back
    c.learn(res("192.0.2.9"), now=2.0)
    assert c.evicted == 1 and len(c) == 3
    assert c.lookup("192.0.2.1", now=2.0) is None
    assert {e.ip for e in c.entries(now=2.0)} == {"192.0.2.0", "192.0.2.2", "192.0.2.9"}
    for i in range(100):
        c.learn(res(f"198.51.100.{i}"), now=3.0)
    assert c.evicted == 101 and len(c) == 3
    # Evicted IPs' heap items are stale: expiry returns only what is still cached.
    assert {e.ip for e in c.expire(now=1e9)} == {"198.51.100.97", "198.51.100.98", "198.51.100.99"}


def test_heap_stays_bounded_under_refreshes():
    c = NameCache()
    for n in range(1_000_000):
        c.learn(res(f"192.0.2.{n % 10}", ttl=60 + n % 7), now=n * 0.001)
        assert len(c._heap) <= 2 * len(c) + 1024
    assert len(c) == 10
    assert len(c.expire(now=2000.0)) == 10 and len(c) == 0
