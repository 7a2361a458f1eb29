"""mux/discovery.py without a DNS server: what it says when there is nothing to look up."""

from __future__ import annotations

import asyncio

from netstatd.mux.discovery import Discovery


def test_unset_service_gives_a_message():
    async def main() -> Discovery:
        d = Discovery("", lambda peers: None)
        await d.resolve_once()
        return d

    d = asyncio.run(main())
    assert d.peers == set() and "FANOUT_SERVICE is not set" in (d.message or "")
