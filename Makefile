# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test test-future lint typecheck unit bench clean venv sysdeps bench-sysdeps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests drive (never installed by hand): SoftHSM2 for the PKCS#11 CA keys,
# libcoap's coap-client as the CoAP peer, chromium for the console's browser tests. `make bench`
# also measures cfssl beside km. Installed with apt when missing and we are root (CI is);
# otherwise the command to run is printed.
SYSTEM_PACKAGES := softhsm2 libcoap3-bin chromium
SYSTEM_BINARIES := softhsm2-util coap-client-notls chromium
BENCH_PACKAGES  := golang-cfssl
BENCH_BINARIES  := cfssl
define apt_ensure
	@missing=""; for b in $(2); do command -v $$b >/dev/null 2>&1 || missing="$$b $$missing"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages: $(1)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1) >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1) >/dev/null; }; \
	  else echo "missing $$missing: install the Debian packages with: sudo apt-get install $(1)"; exit 1; fi; \
	fi
endef

sysdeps:
	$(call apt_ensure,$(SYSTEM_PACKAGES),$(SYSTEM_BINARIES))

bench-sysdeps:
	$(call apt_ensure,$(BENCH_PACKAGES),$(BENCH_BINARIES))

demo: $(STAMP)
	$(BIN)/iotdlm demo

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole suite on the real clock, then again with every process's clock 400 days and 3 years
# ahead (IOTDLM_CLOCK_OFFSET, read by iotdlm.clock): a test that mixes a fixed date with
# real-clock issuance fails the day it is written, not on a later day. On the moved clock a
# Hypothesis test runs a quarter of its examples (tests/conftest.py): inputs are the real-clock
# pass's work, dates the moved passes'. Each pass runs on WORKERS pytest-xdist workers: a test
# waits on its processes (nats-server, km, openssl, a browser) about as long as it computes, and
# one process used one of the CI machine's 2 cores (a pass took 6 min on one worker, 3.3 on two).
WORKERS ?= 2
PYTEST  := $(BIN)/pytest -q -p no:cacheprovider -n $(WORKERS)
test: sysdeps lint typecheck
	$(PYTEST)
	$(MAKE) --no-print-directory test-future

test-future: $(STAMP) sysdeps
	IOTDLM_CLOCK_OFFSET=+400d $(PYTEST)
	IOTDLM_CLOCK_OFFSET=+3y $(PYTEST)

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# Every benchmark section, then one summary table (figure, yardstick, ratio, target, verdict) written
# into docs/benchmarks.md between its markers. `make bench QUICK=1`: every section as a smoke run
# (under a minute; the figures go to bench/out/ only).
bench: $(STAMP) sysdeps bench-sysdeps
	$(BIN)/python bench/run_all.py $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
