# make setup  - Debian packages, .venv, BPF object (idempotent)
# make run    - the agent on this host: UI/API on http://localhost:5280
# make test   - every test (the kernel tests need root)

PYTHON  ?= python3
VENV    := .venv
BPF_DIR := src/netstatd/sources/bpf
BUILD   := build
SUDO    := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo -E)
ARGS    ?=

RUN_PACKAGES  := clang llvm libbpf-dev bpftool iproute2 python3-venv
TEST_PACKAGES := prometheus
BPF_OBJS := $(BPF_DIR)/netstatd.bpf.o $(BPF_DIR)/probe_fentry.bpf.o

.PHONY: setup run test lint bench clean packages test-packages
.DEFAULT_GOAL := setup

setup: packages $(VENV)/.installed $(BPF_OBJS)

packages:
	@scripts/ensure-packages.sh $(RUN_PACKAGES)

test-packages:
	@scripts/ensure-packages.sh $(TEST_PACKAGES)

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# CO-RE: types come from the running kernel's BTF; the object relocates at load.
$(BUILD)/vmlinux.h:
	mkdir -p $(BUILD)
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(BPF_DIR)/%.bpf.o: $(BPF_DIR)/%.bpf.c $(BPF_DIR)/events.h $(BUILD)/vmlinux.h
	clang -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_x86 -I$(BUILD) -c $< -o $@

run: setup
	$(SUDO) $(VENV)/bin/netstatd $(ARGS)

test: setup test-packages
	$(VENV)/bin/ruff check .
	$(SUDO) $(VENV)/bin/pytest -ra $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(SUDO) $(VENV)/bin/python bench/churn.py $(ARGS)

clean:
	rm -rf $(BUILD) $(BPF_OBJS)
