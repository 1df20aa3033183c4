# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test test-future lint typecheck unit bench clean venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/iotdlm demo

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole suite on the real clock, then again with every process's clock 400 days and 3 years
# ahead (IOTDLM_CLOCK_OFFSET, read by iotdlm.clock): a test that mixes a fixed date with
# real-clock issuance fails the day it is written, not on a later day.
test: lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory test-future

test-future: $(STAMP)
	IOTDLM_CLOCK_OFFSET=+400d $(BIN)/pytest -q -p no:cacheprovider
	IOTDLM_CLOCK_OFFSET=+3y $(BIN)/pytest -q -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# Every benchmark section, then one summary table (figure, yardstick, ratio, target, verdict) written
# into docs/benchmarks.md between its markers. `make bench QUICK=1`: every section as a smoke run
# (under a minute; the figures go to bench/out/ only).
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
