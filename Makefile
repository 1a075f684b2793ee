# The two set-up commands of the README: `make demo` and `make test`. Each installs what it
# needs (Debian packages, a virtual environment with the package and its test extras) first.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := wireguard-go wireguard-tools nftables libnftables1 iproute2 iputils-ping iperf3 \
	python3-venv procps tinyproxy zsh postgresql
# Packages such as tinyproxy would start their own daemons on install; the tests start what
# they need themselves (inside their namespaces), so services are kept from starting then.
NO_SERVICE_START := added_policy=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	printf '\#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && added_policy=1; fi;
SERVICE_START_AGAIN := [ -n "$$added_policy" ] && rm -f /usr/sbin/policy-rc.d;
# vm-tests: QEMU, and what builds its image (the kernel and busybox come via apt-get download).
VM_PACKAGES := qemu-system-x86 debootstrap kmod e2fsprogs

.PHONY: demo test vm-test bench setup system-packages vm-packages proto

demo: setup
	$(VENV)/bin/gatekeeper demo

test: setup vm-packages
	$(PY) -m gatekeeper.pb.generate --check
	$(VENV)/bin/ruff check gatekeeper tests bench vm-tests
	$(VENV)/bin/ruff format --check gatekeeper tests bench vm-tests
	$(VENV)/bin/mypy gatekeeper
	MYPYPATH=vm-tests:tests $(VENV)/bin/mypy tests bench
	MYPYPATH=vm-tests $(VENV)/bin/mypy --strict vm-tests/vmtests vm-tests/guest/runner.py
	$(PY) -m pytest -ra

# The VM run alone (tests/test_vm*.py run it too): builds the image under vm-tests/.cache/,
# keeps each run's console log under vm-tests/logs/.
vm-test: setup vm-packages
	PYTHON=$(PY) vm-tests/run || [ $$? = 77 ]  # 77: skipped, the reason is printed

# Every benchmark, quick sizes (about 20 minutes), one verdict table; see bench/README.md.
# BENCH_ARGS passes options through: make bench BENCH_ARGS="--skip vm --markdown bench.md".
bench: setup vm-packages
	$(PY) bench/run_all.py $(BENCH_ARGS)

# Regenerate gatekeeper/pb from proto/ (tests fail when it is stale).
proto: setup
	$(PY) -m gatekeeper.pb.generate

setup: system-packages $(VENV)/.installed

vm-packages:
	@missing=""; for p in $(VM_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "vm-tests need Debian packages:$$missing (they will be skipped)"; exit 0; fi; \
		echo "installing Debian packages for vm-tests:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing \
			|| echo "could not install$$missing: the VM tests will be skipped"; \
	fi

system-packages:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root, or apt-get install them)"; exit 1; fi; \
		echo "installing Debian packages:$$missing"; \
		$(NO_SERVICE_START) apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		rc=$$?; $(SERVICE_START_AGAIN) exit $$rc; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@
