# Raksha developer entry points. Run as root on Debian 12; `make setup` installs
# everything (Debian packages + .venv) and is a fast no-op when already done.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
# Extra pytest arguments, e.g.  make test ARGS='-k vault -x'
ARGS   ?=
LINT_DIRS := $(wildcard src tests bench scripts)

.PHONY: help setup demo demo-vault test test-fast lint bench clean

help:
	@echo "Raksha make targets (run as root on Debian 12):"
	@echo "  make demo       set up, then the main job: raksha serve protects two running VMs (full, incremental)"
	@echo "                  and restores them as new VMs that boot with the data, then undoes a mistake in place (~1 min)"
	@echo "  make demo-vault set up, then the vault alone on a 1 GiB image (full, 1% change, incremental, restore)"
	@echo "  make test       set up, then lint + the whole test suite, slow tests included (what CI runs)"
	@echo "  make test-fast  set up, then the tests not marked slow (inner loop)"
	@echo "  make lint       ruff, mypy, import-linter"
	@echo "  make bench      set up (plus restic, borg), then compare against restic, borg and qemu-img"
	@echo "  make setup      Debian packages + .venv only"
	@echo "  make clean      remove .venv and caches"
	@echo "Pass pytest arguments with ARGS='...', e.g. make test-fast ARGS='-k vault -x'"

setup:
	@scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

demo-vault: setup
	$(PY) scripts/demo-vault.py

test: setup
	scripts/run-tests.sh $(ARGS)

test-fast: setup
	$(PY) -m pytest -m 'not slow' -q $(ARGS)

lint: setup
	@rc=0; \
	echo "== ruff";          $(VENV)/bin/ruff check $(LINT_DIRS) || rc=1; \
	echo "== mypy";          $(VENV)/bin/mypy                    || rc=1; \
	echo "== import-linter"; $(VENV)/bin/lint-imports            || rc=1; \
	exit $$rc

bench:
	@scripts/setup.sh --bench
	$(PY) bench/run.py
	$(PY) bench/driver.py
	$(PY) bench/large_disk.py
	$(PY) bench/dense_disk.py
	$(PY) bench/layered_disk.py
	$(PY) bench/hot_blocks.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .hypothesis bench/work bench/work-driver bench/work-dense bench/work-large bench/work-layered bench/work-hot
	rm -rf src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
