# The README's two set-up commands, on a fresh machine with python3 and make:
#   make demo   - virtualenv, install, then `gpux demo` (SECONDS=60; `make demo SECONDS=30`)
#   make test   - virtualenv, install with the test extras, Debian's chromium when missing, pytest
#                 (PYTEST_ARGS passes through: `make test PYTEST_ARGS="tests/unit -q"`)
# .ci/run calls `make test`.

PYTHON ?= python3
VENV ?= .venv
SECONDS ?= 60
PYTEST_ARGS ?=
# Quiet installs, as CI had them; `make demo PIP_FLAGS=` shows pip's progress.
PIP_FLAGS ?= -q

BIN := $(VENV)/bin
# Stamp files: an install is redone when pyproject.toml (the dependency list) is newer than its stamp.
# Two, because the demo does not need the test extras (locust, schemathesis, scipy, ...).
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.DEFAULT_GOAL := help
.PHONY: help demo test serve chromium

help:
	@echo "make demo    run the whole market for SECONDS (default 60) on a fresh embedded database"
	@echo "make test    run the tests (PYTEST_ARGS=... passes through); installs Debian's chromium when missing"
	@echo "make serve   run the exchange on the embedded PostgreSQL under ./.gpux"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) -e .
	@touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) -e '.[test]'
	@touch $@

demo: $(RUN_STAMP)
	$(BIN)/gpux demo --seconds $(SECONDS)

serve: $(RUN_STAMP)
	$(BIN)/gpux serve

# The page test (tests/e2e/test_web.py) drives Debian's headless chromium and is skipped without it.
# Installed only where that can work (root, apt-get); elsewhere say so and go on.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's chromium for the page test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "no chromium, and not root with apt-get: the page test will be skipped" \
	       "(install it with: sudo apt-get install chromium)"; \
	fi

test: $(TEST_STAMP) chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)
