"""The native helper for short TCP connections (src/netstatd/state/shortconn.c); the rest is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "netstatd.state._shortconn",
            ["src/netstatd/state/shortconn.c"],
            depends=["src/netstatd/sources/bpf/events.h"],
            extra_compile_args=["-O2", "-Wall", "-Werror"],
        )
    ]
)
