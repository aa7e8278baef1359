# The two commands: `make demo` and `make test`. Both install what they need, idempotently.
# `make demo` installs only what the lab runs; `make test` adds what the tests and benchmarks use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# the lab: nftables and ip for the network, dnsmasq as the external DNS server, PostgreSQL (psql
# included) as the database, curl for the HTTP probes, sysctl (procps) and setpriv (util-linux)
DEMO_DEB_PACKAGES := nftables iproute2 dnsmasq-base postgresql curl procps util-linux
# the tests and benchmarks: the lab's, plus a second DNS server, the load generators, promtool
TEST_DEB_PACKAGES := $(DEMO_DEB_PACKAGES) unbound dnsperf prometheus iperf3 conntrack \
	netcat-openbsd iputils-ping
PYTEST_ARGS ?=
# test files run in parallel, each whole in one worker (its lab and fixtures built once); most
# of a kernel test's time is spent waiting for processes and packets, not computing
PYTEST_WORKERS ?= 2

.PHONY: all deps demo-deps debs demo-debs venv demo-venv demo lab-up lab-down test lint unit \
	kernel bench clean

all: test

# $(call install-debs,PACKAGES): apt-get install the ones that are missing
define install-debs
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

demo-debs:
	$(call install-debs,$(DEMO_DEB_PACKAGES))

debs:
	$(call install-debs,$(TEST_DEB_PACKAGES))

# the package and its runtime dependencies: what `egressgw lab` needs
$(VENV)/.installed-demo: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# ... plus the test, lint and type-checking tools
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-demo

demo-venv: $(VENV)/.installed-demo

venv: $(VENV)/.installed

demo-deps: demo-debs demo-venv

deps: debs venv

demo: demo-deps
	$(VENV)/bin/egressgw lab demo

lab-up: demo-deps
	$(VENV)/bin/egressgw lab up

lab-down: demo-venv
	$(VENV)/bin/egressgw lab down

lint: venv
	$(VENV)/bin/ruff check egressgw tests loadtest
	$(VENV)/bin/ruff format --check egressgw tests loadtest
	$(VENV)/bin/mypy

test: deps lint
	$(VENV)/bin/egressgw policy check policies/
	$(PY) -m pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest -q tests/unit

kernel: deps
	$(PY) -m pytest -q -ra tests/kernel

bench: deps
	$(PY) -m loadtest.datapath
	$(PY) -m loadtest.dns

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
