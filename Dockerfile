# The agent's image: docs/deploy.md. From the repository root, on Linux with bpftool and kernel BTF:
#   make image                                                   (podman or buildah, no registry pull)
#   make build/vmlinux.h && docker build -t netstatd:0.1.0 .     (skaffold.yaml does both)
# x86_64 only: the Makefile compiles the BPF object with -D__TARGET_ARCH_x86.

# -- builder: a venv with the pinned dependencies, the BPF objects and the package --
FROM debian:bookworm-slim AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang llvm libbpf-dev make python3 python3-venv gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The runtime dependencies first, from requirements.lock with every file's hash checked (the test tools
# are in requirements-dev.lock, not copied): this layer is reused until the lock changes.
COPY requirements.lock ./
RUN python3 -m venv /opt/netstatd \
    && /opt/netstatd/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes -r requirements.lock
# CO-RE: vmlinux.h (made by the Makefile from a build host's /sys/kernel/btf/vmlinux) only declares
# kernel types; libbpf relocates every field access against the node's own BTF at load time, so the
# object runs on any x86_64 kernel with BTF and the hooks of docs/kernel.md, not just the build host's.
COPY build/vmlinux.h build/vmlinux.h
COPY Makefile pyproject.toml setup.py ./
COPY src src
# The BPF objects (the same Makefile rule as `make setup`), then the package alone, which carries the
# objects and manifests: a local folder has no hash to check, so it goes in by itself, with --no-deps.
RUN touch build/vmlinux.h \
    && make src/netstatd/sources/bpf/netstatd.bpf.o src/netstatd/sources/bpf/probe_fentry.bpf.o \
    && /opt/netstatd/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps . \
    && test -f /opt/netstatd/lib/python3.11/site-packages/netstatd/sources/bpf/netstatd.bpf.o \
    && /opt/netstatd/bin/python -c "import netstatd.state._shortconn, netstatd.sources.bpf._ringmerge"

# -- runtime: the same Debian and Python (the venv points at /usr/bin/python3), libbpf1 for ctypes --
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libbpf1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/netstatd /opt/netstatd
ENV PATH=/opt/netstatd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Root on purpose: the agent refuses another uid, and Kubernetes gives added capabilities (bpf(),
# setns, /proc of other users) to uid 0 only (no ambient capabilities). docs/deploy.md.
USER 0
EXPOSE 5280 6280 5253 6253
ENTRYPOINT ["/opt/netstatd/bin/netstatd"]
