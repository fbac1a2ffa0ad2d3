# Two commands on a fresh clone: `make demo` and `make test`. Both bootstrap uv (from pip when it is
# absent) and the locked environment, so nothing but Python 3.11+ and make is needed.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
RUN := $(UV) run --frozen
# All state under one folder. The Dagster instance is resolved only by the settings model
# (DAGSTER_HOME when set, else $(REDOX_ETL_HOME)/dagster), so `make ui` serves what the CLI writes.
export REDOX_ETL_HOME ?= $(CURDIR)/.redox-etl

.PHONY: setup test test-fast lint typecheck demo ui sandbox bench clean

setup: .venv/.synced

$(UV):
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --user --quiet uv || $(PYTHON) -m pip install --quiet uv

.venv/.synced: pyproject.toml uv.lock | $(UV)
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen
	@touch $@

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) lint-imports

typecheck: setup
	$(RUN) mypy

test: lint typecheck
	$(RUN) pytest -n 2 --dist loadgroup

test-fast: setup
	$(RUN) pytest -n 2 --dist loadgroup -m "not slow"

demo: setup  # DEMO_ARGS="--days 3 --patients 200" makes a smaller demo
	$(RUN) redox-etl demo $(DEMO_ARGS)

ui: setup
	@home="$$($(RUN) python -m pipelines.instance)" && echo "Dagster instance: $$home" && \
		DAGSTER_HOME="$$home" $(RUN) dagster dev -w workspace.yaml

sandbox: setup
	$(RUN) redox-etl sandbox serve

bench: setup
	$(RUN) python -m bench --help

clean:
	rm -rf .venv .dagster_home .redox-etl .pytest_cache .mypy_cache .ruff_cache
