# make setup  - Debian packages, .venv, BPF object (idempotent)
# make run    - the agent on this host: UI/API on http://localhost:5280
# make test   - every test (the kernel tests need root), the image's among them
# make image  - the agent's image (podman or buildah; no registry pull)

PYTHON  ?= python3
VENV    := .venv
BPF_DIR := src/netstatd/sources/bpf
BUILD   := build
SUDO    := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo -E)
ARGS    ?=

RUN_PACKAGES  := clang llvm libbpf-dev bpftool iproute2 python3-venv gcc python3-dev
TEST_PACKAGES := prometheus containerd runc busybox-static containernetworking-plugins \
	unbound dnsdist fstrm-bin golang-github-dnstap-golang-dnstap-cli bind9-dnsutils chromium nodejs bpftrace openssl $(if $(shell command -v kubectl),,kubernetes-client)
BPF_OBJS := $(BPF_DIR)/netstatd.bpf.o $(BPF_DIR)/probe_fentry.bpf.o
# the native helpers (setup.py), built in place: short TCP connections beside the tracker, the merge of
# every CPU's ring beside the ring reader
EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
NATIVE := src/netstatd/state/_shortconn$(EXT_SUFFIX) $(BPF_DIR)/_ringmerge$(EXT_SUFFIX)
PROTO_DIR := src/netstatd/sources/containerd/protos
DNSTAP_PROTO_DIR := src/netstatd/sources/dnstap/protos
GRPCIO_TOOLS := grpcio-tools==1.85.1

.PHONY: setup run test test-image image lint bench clean packages test-packages protos lock
.DEFAULT_GOAL := setup

setup: packages $(VENV)/.installed $(BPF_OBJS) $(NATIVE)

packages:
	@scripts/ensure-packages.sh $(RUN_PACKAGES)

test-packages:
	@scripts/ensure-packages.sh $(TEST_PACKAGES)

# Every dependency from the hashed locks (requirements-dev.lock includes requirements.lock), then the
# package itself: a local directory has no hash to check, so it goes in alone, with --no-deps.
$(VENV)/.installed: requirements.lock requirements-dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --require-hashes -r requirements-dev.lock
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# make lock: regenerate both hashed locks from pyproject.toml (docs/development.md). It keeps every pin
# it can and resolves only what changed; make lock UPGRADE=1 moves everything to the newest versions.
# pip-tools runs from a throwaway venv (it is in neither lock) and sees the indexes of pip's own
# configuration; no index, find-links or host is written into the locks. requirements-dev.lock holds
# the test extra's packages that requirements.lock does not, after a line `-r requirements.lock`.
PIP_TOOLS  := pip-tools==7.7.0
LOCK_VENV  := $(BUILD)/lock-venv
LOCK_FLAGS := --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
	--no-emit-trusted-host $(if $(UPGRADE),--upgrade)
LOCK_ENV   := CUSTOM_COMPILE_COMMAND="make lock"

lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --disable-pip-version-check $(PIP_TOOLS)
	$(LOCK_ENV) $(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) --output-file requirements.lock pyproject.toml
	$(LOCK_ENV) $(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) --extra test --constraint requirements.lock \
		--output-file requirements-dev.lock pyproject.toml
	awk 'FNR == NR { if (sub(/==.*/, "")) runtime[$$0]; next } \
		/^#/ { skip = 0 } \
		/^[^ #]/ { if (!started++) print "-r requirements.lock"; \
			name = $$0; sub(/==.*/, "", name); skip = name in runtime } \
		!skip' requirements.lock requirements-dev.lock > requirements-dev.lock.tmp
	mv requirements-dev.lock.tmp requirements-dev.lock
	! grep -nE '^ *(-i|--index-url|--extra-index-url|-f|--find-links|--trusted-host)' requirements.lock requirements-dev.lock
	rm -rf $(LOCK_VENV)

$(NATIVE) &: src/netstatd/state/shortconn.c $(BPF_DIR)/ringmerge.c $(BPF_DIR)/events.h setup.py $(VENV)/.installed
	$(VENV)/bin/python setup.py -q build_ext --inplace
	touch $@

# CO-RE: types come from the running kernel's BTF; the object relocates at load.
$(BUILD)/vmlinux.h:
	mkdir -p $(BUILD)
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(BPF_DIR)/%.bpf.o: $(BPF_DIR)/%.bpf.c $(BPF_DIR)/events.h $(BUILD)/vmlinux.h
	clang -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_x86 -I$(BUILD) -c $< -o $@

run: setup
	$(SUDO) $(VENV)/bin/netstatd $(ARGS)

test: setup test-packages image
	$(VENV)/bin/ruff check .
	$(SUDO) $(VENV)/bin/pytest -ra $(PYTEST_ARGS)

# The image from Dockerfile, with podman (or buildah), its base made locally with mmdebstrap when
# missing (scripts/build-image.sh, docs/deploy.md). Layers are cached: a rebuild after a source change
# redoes only the package's step. runc: podman's default runtime, crun, refuses hybrid cgroup hosts.
IMAGE_PACKAGES := podman mmdebstrap runc

image: packages
	@scripts/ensure-packages.sh $(IMAGE_PACKAGES)
	$(SUDO) scripts/build-image.sh

# The DaemonSet's pod from deploy/, run from that image as a kubelet would (tests/integration/test_image.py).
test-image: setup test-packages image
	$(SUDO) $(VENV)/bin/pytest -ra $(PYTEST_ARGS) tests/integration/test_image.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Performance harness (issue 7, docs/benchmarks.md). make bench: the whole suite (< 10 min), writes
# bench/out/results.json and the tables in docs/benchmarks.md (SECONDS= overrides its 10 s per phase).
# make bench-churn SECONDS=20 RATE=max|N: one churn run, writes bench/out/churn.json.
# make bench-live CONNECTIONS=100000: agent started beside live connections, writes bench/out/live.json.
# make bench-soak [SECONDS=600 RATE=10000]: RSS every 30 s under churn, writes bench/out/soak.json.
# make bench-mux [NODES=3 CONNECTIONS=100000]: the multiplexer with large nodes, writes bench/out/mux.json.
# make bench-cluster [NODES=200 CONNECTIONS=5000 RATE=50]: the standalone multiplexer over simulated nodes
# and 3 real agents, a one-namespace client against an unfiltered one, writes bench/out/cluster.json.
# make bench-image: build times (cold, cached base, no change), image size, pod start to first /metrics,
# writes bench/out/image.json.
BENCH_PACKAGES := bpftrace curl
SECONDS ?= 20
RATE ?= max
CONNECTIONS ?= 100000
NODES ?= 3
.PHONY: bench-churn bench-live bench-soak bench-mux bench-image bench-cluster bench-packages

bench-packages:
	@scripts/ensure-packages.sh $(BENCH_PACKAGES)

bench: setup bench-packages
	$(SUDO) $(VENV)/bin/python bench/suite.py $(if $(filter command line,$(origin SECONDS)),--seconds $(SECONDS)) $(ARGS)

bench-churn: setup bench-packages
	$(SUDO) $(VENV)/bin/python bench/churn.py --seconds $(SECONDS) --rate $(RATE) $(ARGS)

bench-live: setup
	$(SUDO) $(VENV)/bin/python bench/live.py --connections $(CONNECTIONS) $(ARGS)

bench-mux: setup
	@scripts/ensure-packages.sh unbound
	$(SUDO) $(VENV)/bin/python bench/mux.py --nodes $(NODES) --connections $(CONNECTIONS) $(ARGS)

bench-cluster: setup test-packages bench-packages
	$(SUDO) $(VENV)/bin/python bench/cluster.py --nodes $(if $(filter command line,$(origin NODES)),$(NODES),200) \
		--connections $(if $(filter command line,$(origin CONNECTIONS)),$(CONNECTIONS),5000) \
		--rate $(if $(filter command line,$(origin RATE)),$(RATE),50) $(ARGS)

bench-image: setup test-packages image
	$(SUDO) $(VENV)/bin/python bench/image.py $(ARGS)

bench-soak: setup
	$(SUDO) $(VENV)/bin/python bench/soak.py --seconds $(if $(filter command line,$(origin SECONDS)),$(SECONDS),600) --rate $(if $(filter command line,$(origin RATE)),$(RATE),10000) $(ARGS)

# containerd/CRI gRPC stubs: generated from the .proto subset and committed. grpcio-tools is a
# regeneration tool only (not in requirements.lock). Paths are given relative to src/ so the
# generated modules import each other as netstatd.sources.containerd.protos.*. The dnstap subset has
# messages only (no service), so it gets no _grpc module.
protos: $(VENV)/.installed
	$(VENV)/bin/pip install -q --disable-pip-version-check $(GRPCIO_TOOLS)
	rm -f $(PROTO_DIR)/*_pb2*.py $(PROTO_DIR)/*_pb2*.pyi
	cd src && ../$(VENV)/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
		$(patsubst src/%,%,$(wildcard $(PROTO_DIR)/*.proto))
	rm -f $(DNSTAP_PROTO_DIR)/*_pb2*.py $(DNSTAP_PROTO_DIR)/*_pb2*.pyi
	cd src && ../$(VENV)/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
		$(patsubst src/%,%,$(wildcard $(DNSTAP_PROTO_DIR)/*.proto))
	for f in $(PROTO_DIR)/*_pb2*.py $(PROTO_DIR)/*_pb2*.pyi $(DNSTAP_PROTO_DIR)/*_pb2*.py $(DNSTAP_PROTO_DIR)/*_pb2*.pyi; do \
		{ echo '# ruff: noqa'; echo '# Generated by make protos from the .proto beside it; do not edit.'; cat $$f; } > $$f.tmp && mv $$f.tmp $$f; \
	done
	$(VENV)/bin/ruff format -q $(PROTO_DIR) $(DNSTAP_PROTO_DIR)

clean:
	rm -rf $(BUILD) $(BPF_OBJS) $(NATIVE)
