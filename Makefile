# Everything goes through scripts/bootstrap.sh first, so `make test` works on a fresh machine.
SHELL := /bin/bash
# bootstrap.sh may install uv into ~/.local/bin, which a fresh login's PATH lacks.
export PATH := $(HOME)/.local/bin:$(PATH)

PYTEST_ARGS ?=
QUICK ?=

.PHONY: all test demo bench lint bootstrap

all: test

bootstrap:
	bash scripts/bootstrap.sh --test

test:
	bash scripts/bootstrap.sh --test
	uv run pytest -q $(PYTEST_ARGS)

demo:
	bash scripts/bootstrap.sh
	uv run usr demo

bench:
	bash scripts/bootstrap.sh --test --bench
	uv run --group bench python scripts/bench.py $(if $(QUICK),--quick)

# No linter is a project dependency; use ruff when it is installed, else a syntax check.
lint:
	bash scripts/bootstrap.sh
	@if command -v ruff >/dev/null; then ruff check usrsync remote_agent tests scripts; \
	else uv run python -m compileall -q usrsync remote_agent tests scripts; fi
