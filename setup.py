"""The native helpers: short TCP connections (src/netstatd/state/shortconn.c) and the merge of every CPU's ring
(src/netstatd/sources/bpf/ringmerge.c); the rest is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "netstatd.state._shortconn",
            ["src/netstatd/state/shortconn.c"],
            depends=["src/netstatd/sources/bpf/events.h"],
            extra_compile_args=["-O2", "-Wall", "-Werror"],
        ),
        Extension(
            "netstatd.sources.bpf._ringmerge",
            ["src/netstatd/sources/bpf/ringmerge.c"],
            depends=["src/netstatd/sources/bpf/events.h"],
            extra_compile_args=["-O2", "-Wall", "-Werror"],
        ),
    ]
)
