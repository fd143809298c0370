# The two set-up-and-go commands (README): `make demo` and `make test`.
# Each creates .venv on first use (scripts/setup.sh) and reuses it after.
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test lint bench
setup:
	@bash scripts/setup.sh

demo: setup
	lmfleet run jobs/quickstart.yaml

test: setup
	ruff check platform tests benchmarks
	python -m pytest -q -ra --durations=20

lint: setup
	ruff check platform tests benchmarks

bench: setup
	python benchmarks/dedup_bench.py
