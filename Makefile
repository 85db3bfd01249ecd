# Ostiary: every command a developer or CI runs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv build demo test test-rust test-python lint fmt bench bench-e2e perf-gate perf-gate-full fuzz wheel clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q "maturin>=1.7,<2"
	touch $(STAMP)

venv: $(STAMP) ## create or update the virtualenv

build: $(STAMP) ## build the Rust extension (release) into the virtualenv
	$(VENV)/bin/maturin develop --release --extras dev -q

wheel: build ## the pip-installable wheel, stripped, into dist/
	$(VENV)/bin/maturin build --release --strip -q -o dist

demo: build ## run the gateway in front of a throwaway PostgreSQL; prints a psql command
	$(VENV)/bin/ostiary demo

test: build test-rust test-python lint ## build everything and run every test and linter

test-rust: ## cargo test of the Rust crates (no Python needed)
	cargo test --workspace --exclude ostiary-py -q

test-python: build ## pytest: unit and end-to-end against real PostgreSQL; bench/micro once, untimed
	$(VENV)/bin/pytest -q
	$(VENV)/bin/pytest -q bench/micro --benchmark-disable -p no:cacheprovider

lint: build ## ruff, mypy, cargo fmt --check, clippy -D warnings
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m mypy.stubtest ostiary._core
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -q -- -D warnings

fmt: build ## format Python and Rust
	$(VENV)/bin/ruff format python tests bench
	$(VENV)/bin/ruff check --fix python tests bench
	cargo fmt --all

bench: build ## micro benchmarks of the core (pytest-benchmark)
	$(VENV)/bin/pytest bench/micro -q --benchmark-only

bench-e2e: build ## end to end: direct vs pgbouncer vs ostiary with pgbench (see bench/README.md)
	$(PY) bench/e2e.py

perf-gate: build ## ratios vs pgbouncer against bench/baseline.json; fails on a regression (~4 min)
	$(PY) bench/perf_gate.py

perf-gate-full: build ## the release-check variant of the perf gate (bench/baseline-full.json)
	$(PY) bench/perf_gate.py --full

fuzz: ## a longer run of the wire fuzzers (FUZZ_ITERS=N)
	FUZZ_ITERS=$${FUZZ_ITERS:-2000000} cargo test -p ostiary-wire --release --test fuzz -- --nocapture

clean: ## remove build outputs and the virtualenv
	rm -rf target $(VENV) .ostiary
