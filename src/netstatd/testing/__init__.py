"""Helpers for netstatd's own tests and benchmarks: test hosts, a running agent, a stream client."""
