# serrinj developer entry points. `make test` and `make demo` work on a fresh
# Debian machine with /dev/kvm: they install what is missing, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/serrinj

.PHONY: setup deps demo test lint lab-arm64 lab-shell bench soak docs clean

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
