# Two commands on a fresh clone: `make demo` and `make test`. Both bootstrap uv (from pip when it is
# absent) and the locked environment, so nothing but Python 3.11+ and make is needed.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
RUN := $(UV) run --frozen
# All state under one folder. The Dagster instance is resolved only by the settings model
# (DAGSTER_HOME when set, else $(REDOX_ETL_HOME)/dagster), so `make ui` serves what the CLI writes.
export REDOX_ETL_HOME ?= $(CURDIR)/.redox-etl

.PHONY: setup test test-slow test-all test-fast lint typecheck demo ui sandbox bench clean

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

# `make test` stays under 15 minutes on 2 cores: lint, types, layers and every test not marked slow.
# The slow ones (end to end, crash, multi-process, distributed, README-as-a-user) run in `make
# test-slow`; CI (.ci/run) runs both.
test: lint typecheck
	$(RUN) pytest -n 2 --dist loadgroup -m "not slow"

test-slow: setup
	$(RUN) pytest -n 2 --dist loadgroup -m slow

test-all: test test-slow

test-fast: setup
	$(RUN) pytest -n 2 --dist loadgroup -m "not slow"

demo: setup  # DEMO_ARGS="--days 3 --patients 200" makes a smaller demo
	$(RUN) redox-etl demo $(DEMO_ARGS)

ui: setup
	@home="$$($(RUN) python -m pipelines.instance)" && echo "Dagster instance: $$home" && \
		DAGSTER_HOME="$$home" $(RUN) python -m pipelines.ui -w workspace.yaml

sandbox: setup
	$(RUN) redox-etl sandbox serve

bench: setup
	$(RUN) python -m bench --help

clean:
	rm -rf .venv .dagster_home .redox-etl .pytest_cache .mypy_cache .ruff_cache
