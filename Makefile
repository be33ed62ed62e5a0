# serrinj developer entry points. `make test` and `make demo` work on a fresh
# Debian machine with /dev/kvm: they install what is missing, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/serrinj

.PHONY: setup deps demo test test-debugfs lint lab-arm64 lab-shell bench soak docs clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || bash scripts/install-deps python
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# System packages the tests use (QEMU, the arm64 cross toolchain and headers).
deps:
	bash scripts/install-deps

demo: setup
	$(VENV)/bin/serrinj demo

test: deps setup
	$(PY) -m pytest
	$(MAKE) test-debugfs

# Host conditions are a test dimension: the real-KVM discovery, CLI and engine tests
# run again with debugfs mounted, as systemd mounts it on most hosts (the first pass
# runs with the machine as it is). It is mounted in a private mount namespace, so the
# machine's own mounts are untouched; the tests see KVM's /sys/kernel/debug/kvm.
DEBUGFS_TESTS ?= tests/test_discover_unit.py tests/test_target_unit.py tests/test_cli.py \
	tests/test_cli_events_run.py tests/test_engine_kvm.py tests/test_sandbox_and_fds.py \
	tests/test_privilege.py tests/test_qemu_x86.py
test-debugfs: deps setup
	unshare -m --propagation private sh -ec 'mountpoint -q /sys/kernel/debug \
	  || mount -t debugfs none /sys/kernel/debug; test -d /sys/kernel/debug/kvm \
	  || { echo "debugfs shows no kvm directory" >&2; exit 1; }; \
	  exec $(PY) -m pytest -m "not slow" $(DEBUGFS_TESTS)'

lint: setup
	$(VENV)/bin/ruff check serrinj tests lab bench scripts
	$(VENV)/bin/ruff format --check serrinj tests lab bench scripts
	$(VENV)/bin/mypy

lab-arm64: deps setup
	$(PY) -m lab.arm64 run

lab-shell: deps setup
	$(PY) -m lab.arm64 shell

bench: deps setup
	$(PY) -m bench

soak: setup
	$(PY) -m pytest tests/test_soak.py --soak-count=10000 -rP

docs: setup
	$(PY) scripts/gen_docs.py
	$(PY) scripts/gen_ffi.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
