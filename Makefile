# The two commands: `make demo` and `make test`. Both install what they need, idempotently.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := nftables iproute2 dnsmasq-base unbound dnsperf postgresql prometheus \
	iperf3 conntrack netcat-openbsd curl iputils-ping procps
PYTEST_ARGS ?=

.PHONY: all deps debs venv demo lab-up lab-down test lint unit kernel bench clean

all: test

debs:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

deps: debs venv

demo: deps
	$(VENV)/bin/egressgw lab demo

lab-up: deps
	$(VENV)/bin/egressgw lab up

lab-down: venv
	$(VENV)/bin/egressgw lab down

lint: venv
	$(VENV)/bin/ruff check egressgw tests loadtest
	$(VENV)/bin/ruff format --check egressgw tests loadtest
	$(VENV)/bin/mypy

test: deps lint
	$(VENV)/bin/egressgw policy check policies/
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest -q tests/unit

kernel: deps
	$(PY) -m pytest -q -ra tests/kernel

bench: deps
	$(PY) -m loadtest.datapath
	$(PY) -m loadtest.dns

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
