# Every target sets up what it needs: a fresh clone with only python3 is enough.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, else the copy pip installs into python3 on first use.
UV = $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN = $(UV) run --frozen

.PHONY: help setup test lint format demo sandbox bench clean

help:
	@echo "make demo     run the main job end to end against a local sandbox"
	@echo "make test     run the test suite"
	@echo "make lint     ruff check and format check"
	@echo "make sandbox  start the vendor sandbox in the foreground (Ctrl-C stops it)"

# Installed packages are compiled to bytecode once, as pip does: where PYTHONDONTWRITEBYTECODE is
# set, every Airflow process would otherwise compile Airflow's modules again on start (2-3 s each).
setup: .venv/.synced

.venv/.synced: pyproject.toml uv.lock Makefile
	@command -v uv >/dev/null 2>&1 || python3 -c "import uv" 2>/dev/null || python3 -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode
	@touch $@

test: setup
	$(RUN) pytest

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: setup
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

demo: setup
	$(RUN) python scripts/demo.py

sandbox: setup
	$(RUN) dicom-ingest-sandbox

# Benchmarks against the sandbox (about an hour on 2 cores); BENCH_ARGS=--quick for a smoke run.
bench: setup
	$(RUN) python -m bench $(BENCH_ARGS)

clean:
	rm -rf .venv .pytest_cache .ruff_cache build dist .demo
