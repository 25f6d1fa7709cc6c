# cove developer tasks. Every recipe announces what it runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(VENV)/bin/python
RUFF      := $(VENV)/bin/ruff
MYPY      := $(VENV)/bin/mypy
LINT_DIRS := $(wildcard src tests bench)

.PHONY: help setup test demo lint fmt typecheck bench clean

help:
	@echo "targets: setup test demo lint fmt typecheck bench clean"

setup:
	@echo "==> make setup: scripts/setup.sh"
	scripts/setup.sh

test:
	@echo "==> make test: scripts/test.sh"
	scripts/test.sh

demo: setup
	@echo "==> make demo: $(PY) scripts/demo.py"
	$(PY) scripts/demo.py

lint:
	@echo "==> make lint: ruff check + ruff format --check on $(LINT_DIRS)"
	$(RUFF) check $(LINT_DIRS)
	$(RUFF) format --check $(LINT_DIRS)

fmt:
	@echo "==> make fmt: ruff format + ruff check --fix on $(LINT_DIRS)"
	$(RUFF) format $(LINT_DIRS)
	$(RUFF) check --fix $(LINT_DIRS)

typecheck:
	@echo "==> make typecheck: mypy"
	$(MYPY)

# Runs every bench/*.py script (files starting with "_" are helpers, skipped).
bench: setup
	@echo "==> make bench: running bench/*.py with $(PY)"
	@set -e; shopt -s nullglob; found=0; \
	for f in bench/*.py; do \
	  case "$$(basename "$$f")" in _*) continue ;; esac; \
	  found=1; echo "==> $(PY) $$f"; $(PY) "$$f"; \
	done; \
	if [ "$$found" = 0 ]; then echo "==> no bench/*.py scripts found"; fi

clean:
	@echo "==> make clean: removing $(VENV), build artefacts and caches"
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis test-artifacts
	find . -name __pycache__ -type d -not -path "./.git/*" -prune -exec rm -rf {} +
