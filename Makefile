# The two set-up commands of the README: `make demo` and `make test`. Each installs what it
# needs (Debian packages, a virtual environment with the package and its test extras) first.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := wireguard-go wireguard-tools nftables libnftables1 iproute2 iputils-ping iperf3

.PHONY: demo test setup system-packages proto lint

demo: setup
	$(VENV)/bin/gatekeeper demo

test: setup
	$(PY) -m gatekeeper.pb.generate --check
	$(VENV)/bin/ruff check gatekeeper tests bench
	$(VENV)/bin/ruff format --check gatekeeper tests bench
	$(VENV)/bin/mypy gatekeeper
	$(PY) -m pytest -ra

# Regenerate gatekeeper/pb from proto/ (tests fail when it is stale).
proto: setup
	$(PY) -m gatekeeper.pb.generate

setup: system-packages $(VENV)/.installed

system-packages:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root, or apt-get install them)"; exit 1; fi; \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@
